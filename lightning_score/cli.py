"""The ``lightning-score`` command: a LightningCLI with ``merge`` next to fit/validate/test/predict, plus ``analyze``.

* ``lightning-score fit --config recipes/digits/expert.yaml --data.train_domains '[rot15]'`` fine-tunes one
  expert (the model defaults to :class:`~lightning_score.CLIPExpert`); the recipe's ScoreMergeCallback writes
  its task vector.
* ``lightning-score merge --config recipes/digits/merge.yaml`` merges task vectors with a
  :class:`~lightning_score.MergeModule`, writes the merged weights (loadable as ``pretrained``) and the
  resolved config next to them, and tests the result on the held-out domains unless ``--test false``.
* ``lightning-score test --config recipes/digits/test.yaml`` runs Lightning's test loop on any module (the
  model defaults to :class:`~lightning_score.MergeModule`).
* ``lightning-score analyze --task_vectors '[a.safetensors, b.safetensors]'`` prints the Subspace Alignment
  Ratio and singular spectra of task vectors and saves them as PNG and JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info

import lightning_score.models  # noqa: F401  (registers the tiny open_clip configs)
from lightning_score.atomic import atomic_write_text
from lightning_score.data import DomainDataModule
from lightning_score.merge_module import MergeModule

__all__ = ["LightningScoreCLI", "ScoreTrainer", "analyze", "main"]

log = logging.getLogger(__name__)

_DEFAULT_MODEL = {
    "fit": "lightning_score.CLIPExpert",
    "validate": "lightning_score.MergeModule",
    "test": "lightning_score.MergeModule",
    "predict": "lightning_score.MergeModule",
    "merge": "lightning_score.MergeModule",
}

_OVERVIEW = """\
Train-then-merge for CLIP experts with SCORE.

  fit       fine-tune one expert per domain (the recipe's ScoreMergeCallback writes its task vector)
  merge     merge task vectors, write the merged weights and config, test on held-out domains
  validate  / test / predict   Lightning's loops on any module (default: MergeModule)
  analyze   Subspace Alignment Ratio and singular spectra of task vectors (table, PNG, JSON)
  study     the whole leave-one-domain-out study from one recipe: experts, every merge, tables, figures

Run `lightning-score <command> --help` for a command's arguments."""


class ScoreTrainer(Trainer):
    """Lightning's Trainer with one more entry point, :meth:`merge`, used by ``lightning-score merge``."""

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
        if not test:
            self.limit_test_batches = 0  # runs setup (where the merge happens), no test batches
        results = self.test(model, datamodule=datamodule, verbose=test)
        if self.is_global_zero:
            model.save_merged(target)
            rank_zero_info(f"lightning-score merge: wrote the merged weights to {target}")
        self.strategy.barrier("ScoreTrainer.merge")
        self.merged_path = target
        return results[0] if results and test else {}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, keeping the line breaks of the overview."""


class LightningScoreCLI(LightningCLI):
    """``LightningCLI`` for lightning-score: any LightningModule as the model, the DomainDataModule as data."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("parser_kwargs", {})
        kwargs["parser_kwargs"].setdefault("description", _OVERVIEW)
        kwargs["parser_kwargs"].setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            LightningModule,
            DomainDataModule,
            trainer_class=ScoreTrainer,
            subclass_mode_model=True,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus ``merge``."""
        return {**LightningCLI.subcommands(), "merge": {"model", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Nothing beyond the LightningCLI defaults; per-command model defaults are set after parsing setup."""

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.set_defaults({"model": {"class_path": _DEFAULT_MODEL[subcommand]}})
        return parser

    def after_merge(self) -> None:
        """Write the resolved config next to the merged weights."""
        path = getattr(self.trainer, "merged_path", None)
        if path is None or not self.trainer.is_global_zero:
            return
        config_path = Path(path).with_suffix(".yaml")
        self._subcommand_parsers["merge"].save(self.config["merge"], config_path, overwrite=True, skip_check=True)
        rank_zero_info(f"lightning-score merge: wrote the resolved config to {config_path}")


def analyze(
    task_vectors: list[str],
    output_dir: str = "analysis",
    energy: float = 0.97,
    prefix: str | None = None,
    device: str = "cpu",
) -> None:
    """Subspace Alignment Ratio and singular spectra of a set of task vectors: printed, and saved as PNG and JSON.

    Args:
        task_vectors: The task-vector files (``.safetensors``).
        output_dir: Where to write ``sar.png``, ``spectra.png``, ``sar.json`` and ``spectra.json``.
        energy: Energy threshold of the effective rank (0.97 in the SCORE paper).
        prefix: Only keys starting with this (e.g. ``transformer.resblocks.11.``).
        device: Where to compute the SVDs (``cpu`` or ``cuda``).
    """
    from lightning_score.analysis import singular_spectra, subspace_alignment
    from lightning_score.task_vector import TaskVector

    tvs = [TaskVector.load(path) for path in task_vectors]
    sar = subspace_alignment(tvs, energy=energy, prefix=prefix, device=device, progress=True)
    spectra = singular_spectra(tvs, energy=energy, prefix=prefix, device=device, progress=True)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sar.json", json.dumps(sar.to_dict(), indent=2))
    atomic_write_text(out / "spectra.json", json.dumps(spectra.to_dict(top=16), indent=2))
    written = [out / "sar.json", out / "spectra.json"]
    try:
        from lightning_score.plots import plot_singular_spectra, plot_subspace_alignment

        written += [plot_subspace_alignment(sar, out / "sar.png"), plot_singular_spectra(spectra, out / "spectra.png")]
    except ImportError as error:
        log.warning("%s (the tables and JSON files are written; the PNGs need the plot extra).", error)
    sys.stdout.write(sar.to_table() + "\n\n" + spectra.to_table() + "\n\n")
    sys.stdout.write("Wrote " + ", ".join(str(p) for p in written) + "\n")


def _function_commands() -> dict[str, Any]:
    from lightning_score.study import run_study

    return {"analyze": analyze, "study": run_study}


_FUNCTION_COMMANDS = ("analyze", "study")


def _show_our_info_logs() -> None:
    """lightning-score's INFO messages on stderr (as Lightning does for its own); other libraries stay quiet."""
    ours = logging.getLogger("lightning_score")
    ours.setLevel(logging.INFO)
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
        ours.propagate = False


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-score`` console script.

    Bad input (a missing file, a mismatched task vector, an unknown domain...) ends with one line,
    ``lightning-score: error: <what is wrong and the fix>``, and exit status 2; set ``LIGHTNING_SCORE_DEBUG=1``
    for the full traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    _show_our_info_logs()
    try:
        if argv and argv[0] in _FUNCTION_COMMANDS:
            from jsonargparse import CLI

            CLI(_function_commands()[argv[0]], args=argv[1:], as_positional=False, prog=f"lightning-score {argv[0]}")
            return
        LightningScoreCLI(args=args)
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("LIGHTNING_SCORE_DEBUG"):
            raise
        cause = _root_cause(error)
        sys.stderr.write(f"lightning-score: error: {cause}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
