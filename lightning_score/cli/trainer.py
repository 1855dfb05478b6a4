"""The ``lightning-score`` command's Trainer: Lightning's, plus ``merge`` and a test table with a row per domain."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_score.cli.console import results_table
from lightning_score.cli.outputs import writable_until_done
from lightning_score.data import DomainDataModule
from lightning_score.merge_module import MergeModule
from lightning_score.utilities.ranks import on_rank_zero

__all__ = ["ScoreTrainer"]


class ScoreTrainer(Trainer):
    """Lightning's Trainer, plus merge (for lightning-score merge) and a test table with one row per domain.

    Arguments as Lightning's :class:`~lightning.pytorch.Trainer`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The merged weights the last :meth:`merge` wrote (``lightning-score merge`` writes its config beside them).
        self.merged_path: Path | None = None

    @override
    def test(
        self,
        model: LightningModule | None = None,
        dataloaders: Any = None,
        ckpt_path: str | None = None,
        verbose: bool = True,
        datamodule: LightningDataModule | None = None,
        weights_only: bool | None = None,
    ) -> list[dict[str, float]]:
        """Lightning's test loop; with ``verbose``, the results print as one table, a row per test domain.

        Args:
            model: The model to test (default: the one of the last fit).
            dataloaders: Test dataloaders, or a datamodule.
            ckpt_path: A checkpoint to test ("best", "last", a path); see Lightning's ``Trainer.test``.
            verbose: Print the results.
            datamodule: The datamodule whose test_dataloader() to use.
            weights_only: Passed to ``torch.load`` when a checkpoint is read.

        Returns:
            What ``Trainer.test`` returns: one mapping of metrics per test dataloader.
        """
        results = super().test(model, dataloaders, ckpt_path, False, datamodule, weights_only)
        if verbose and self.is_global_zero and results:
            sys.stdout.write(results_table(results) + "\n")
        return results

    def merge(
        self,
        model: LightningModule,
        datamodule: DomainDataModule | None = None,
        output: str | None = None,
        test: bool = True,
    ) -> dict[str, Any]:
        """Merge the experts' task vectors, write the merged weights, and test them on the held-out domains.

        Args:
            model: A :class:`~lightning_score.MergeModule` (mode ``merge``, ``expert`` or ``zeroshot``).
            datamodule: The domains: ``train_domains`` are the experts' (sources), ``test_domains`` the targets.
            output: The merged weights file (``.safetensors``), loadable as ``--model.pretrained``; default
                ``<trainer.default_root_dir>/merged/<method>.safetensors``.
            test: Test the merged model on the test domains straight away.

        Returns:
            The test metrics (``test/<domain>/acc``...), empty when ``test`` is false.
        """
        if not isinstance(model, MergeModule):
            raise ValueError(f"merge needs a MergeModule as the model, not {type(model).__name__}.")
        if model.mode == "ensemble":
            raise ValueError("mode='ensemble' is T models, not one set of weights: run `lightning-score test` for it.")
        target = Path(output) if output else Path(self.default_root_dir) / "merged" / f"{model.method}.safetensors"
        if target.suffix != ".safetensors":
            raise ValueError(f"--output must end in .safetensors, got '{target}'.")
        model.merged_output = target  # checked writable in setup, before the merge
        limit = self.limit_test_batches
        if not test:
            self.limit_test_batches = 0  # runs setup (where the merge happens), no test batches
        with writable_until_done(target, what="--output"):  # checked before the merge and the test, not after
            try:
                results = self.test(model, datamodule=datamodule, verbose=test)
            finally:
                self.limit_test_batches = limit  # the Trainer as it was: a later test runs every batch
            on_rank_zero(self.strategy, lambda: model.save_merged(target))  # a failed write stops every rank
        rank_zero_info(f"lightning-score merge: wrote the merged weights to {target}")
        self.merged_path = target
        return results[0] if results and test else {}
