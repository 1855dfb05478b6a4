"""The ``lightning-score`` command's Trainer: Lightning's, plus ``merge`` and a test table with a row per domain."""

from __future__ import annotations

import contextlib
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
from lightning_score.utilities.files import check_folder_target
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
        export: str | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Merge the experts' task vectors, write the merged model, and test it on the held-out domains.

        Args:
            model: A :class:`~lightning_score.MergeModule` (mode ``merge``, ``expert`` or ``zeroshot``).
            datamodule: The domains: ``train_domains`` are the experts' (sources), ``test_domains`` the targets.
            output: The merged weights file (``.safetensors``, open_clip backbone), loadable as
                ``--model.pretrained``; default ``<trainer.default_root_dir>/merged/<method>.safetensors``.
            test: Test the merged model on the test domains straight away.
            export: Also (for the hf and timm backbones: instead, by default into
                ``<trainer.default_root_dir>/merged/<method>/``) write the merged model in its backbone's own format
                into this folder, with a model card holding the test accuracies (:meth:`MergeModule.export`);
                it loads without lightning-score.
            overwrite: Replace an existing non-empty ``export`` folder (once the new one is complete).

        Returns:
            The test metrics (``test/<domain>/acc``...), empty when ``test`` is false.
        """
        if not isinstance(model, MergeModule):
            raise ValueError(f"merge needs a MergeModule as the model, not {type(model).__name__}.")
        if model.mode == "ensemble":
            raise ValueError("mode='ensemble' is T models, not one set of weights: run `lightning-score test` for it.")
        root = Path(self.default_root_dir) / "merged"
        native = model.backbone.name == "open_clip"
        if not native and output:
            raise ValueError(
                f"--output writes open_clip weights files; the '{model.backbone.name}' backbone's merge is written in "
                "its own format: pass --export FOLDER instead."
            )
        target = (Path(output) if output else root / f"{model.method}.safetensors") if native else None
        folder = Path(export) if export else None if native else root / model.method
        if target is not None and target.suffix != ".safetensors":
            raise ValueError(f"--output must end in .safetensors, got '{target}'.")
        if folder is not None:  # what the export would refuse, refused before the merge
            fix = "pass --overwrite true to replace it"
            check_folder_target(folder, overwrite=overwrite, what="--export folder", fix=fix)
        model.merged_output = target  # checked writable in setup, before the merge
        limit = self.limit_test_batches
        if not test:
            self.limit_test_batches = 0  # runs setup (where the merge happens), no test batches
        checked = [writable_until_done(p, what=w) for p, w in ((target, "--output"), (folder, "--export")) if p]
        with contextlib.ExitStack() as stack:  # checked before the merge and the test, not after
            for check in checked:
                stack.enter_context(check)
            try:
                results = self.test(model, datamodule=datamodule, verbose=test)
            finally:
                self.limit_test_batches = limit  # the Trainer as it was: a later test runs every batch
            if target is not None:
                on_rank_zero(self.strategy, lambda: model.save_merged(target))  # a failed write stops every rank
                rank_zero_info(f"lightning-score merge: wrote the merged weights to {target}")
            if folder is not None:
                accuracies = _accuracies(results[0] if results and test else {})
                write = lambda: model.export(folder, overwrite=overwrite, test_accuracies=accuracies)  # noqa: E731
                on_rank_zero(self.strategy, write)
                rank_zero_info(f"lightning-score merge: exported the merged {model.backbone.name} model to {folder}")
        self.merged_path = target if target is not None else folder
        return results[0] if results and test else {}


def _accuracies(metrics: dict[str, float]) -> dict[str, float]:
    """``test/<domain>/acc`` → ``{domain: acc}`` for the model card."""
    accuracies = {}
    for key, value in metrics.items():
        if key.startswith("test/") and key.endswith("/acc"):
            accuracies[key.removeprefix("test/").removesuffix("/acc")] = float(value)
    return accuracies
