"""The SNAPSHOT step: :class:`ScoreMergeCallback` writes θ₀ when fitting starts and the task vector when it ends.

* :mod:`.score_merge`: the callback;
* :mod:`.snapshot`: θ₀ kept once on disk, beside the task vectors;
* :mod:`.records`: what the callback keeps between a fit's events (where θ₀ is, a receipt of what it wrote).
"""

from lightning_score.callback.score_merge import ScoreMergeCallback

__all__ = ["ScoreMergeCallback"]
