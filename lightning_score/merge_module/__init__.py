"""The MERGE and TEST steps: :class:`MergeModule` merges the experts' task vectors in ``setup``, then tests.

* :mod:`.module`: the LightningModule;
* :mod:`.inputs`: its arguments and task vectors, checked before any long work;
* :mod:`.sharding`: one merge for all of a Trainer's ranks (split by keys, or on rank zero);
* :mod:`.statistics`, :mod:`.passes`, :mod:`.layer_inputs`: the data-using methods' statistics and the forward
  passes that collect them;
* :mod:`.alpha`: choosing α on the source domains' validation data;
* :mod:`.ensemble`: ``mode="ensemble"``, the experts' logit ensemble;
* :mod:`.records`: what a prepared module records in a checkpoint and in a merged weights file.
"""

from lightning_score.merge_module.module import MergeModule

__all__ = ["MergeModule"]
