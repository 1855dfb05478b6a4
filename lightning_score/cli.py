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

import jsonargparse
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from packaging.version import Version

import lightning_score.models  # noqa: F401  (registers the tiny open_clip configs)
from lightning_score.atomic import atomic_write_text
from lightning_score.data import DomainDataModule
from lightning_score.merge_module import MergeModule
from lightning_score.ranks import on_rank_zero

__all__ = ["LightningScoreCLI", "SaveRunConfig", "ScoreTrainer", "analyze", "main"]

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
        on_rank_zero(self.strategy, lambda: model.save_merged(target))  # a failed write stops every rank
        rank_zero_info(f"lightning-score merge: wrote the merged weights to {target}")
        self.merged_path = target
        return results[0] if results and test else {}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, keeping the line breaks of the overview."""


def _dump(parser: LightningArgumentParser, config: Namespace) -> str:
    """The whole resolved config as YAML, None values included (what reproduces the run)."""
    if Version(jsonargparse.__version__) >= Version("4.49"):
        return parser.dump(config, skip_unset=False)
    return parser.dump(config, skip_none=False)  # pragma: no cover - older jsonargparse


class SaveRunConfig(SaveConfigCallback):
    """Save the resolved config to ``<log_dir>/config.yaml``, never overwriting another run's config.

    Lightning's own callback either refuses to start when ``config.yaml`` exists or overwrites it. Here the
    same config is not written twice, and a different one goes to ``config-1.yaml``, ``config-2.yaml``...,
    with a line saying where.
    """

    def __init__(self, parser: LightningArgumentParser, config: Namespace, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False  # written by save_config below
        super().__init__(parser, config, **kwargs)
        self.saved_path: Path | None = None
        self.resolved_log_dir: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Resolve the log folder on every rank (a collective), then save on rank zero."""
        if not self.already_saved:
            self.resolved_log_dir = trainer.log_dir
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Write the config (rank zero), to the first of config.yaml, config-1.yaml... that is free or the same."""
        folder = Path(self.resolved_log_dir or trainer.default_root_dir)
        text = _dump(self.parser, self.config)
        stem, suffix = Path(self.config_filename).stem, Path(self.config_filename).suffix
        for index in range(10_000):
            path = folder / (self.config_filename if index == 0 else f"{stem}-{index}{suffix}")
            if not path.exists():
                atomic_write_text(path, text)
                if index:
                    rank_zero_info(f"lightning-score: {folder / self.config_filename} belongs to an earlier run; "
                                   f"this run's config is {path}")  # fmt: skip
                break
            if path.read_text(encoding="utf-8") == text:
                break  # this very config was saved by an earlier run
        self.saved_path = path


_FUNCTION_HELP = {
    "analyze": "Subspace Alignment Ratio and singular spectra of task vectors (`lightning-score analyze --help`).",
    "study": "The whole leave-one-domain-out study from one recipe (`lightning-score study --help`).",
}


class LightningScoreCLI(LightningCLI):
    """``LightningCLI`` for lightning-score: any LightningModule as the model, any LightningDataModule as data.

    Both are in subclass mode: ``model: {class_path: ...}`` and ``data: {class_path: ...}`` plug in your own
    classes. Without a ``class_path`` the data is a :class:`~lightning_score.DomainDataModule` and the model a
    :class:`~lightning_score.CLIPExpert` for ``fit``, a :class:`~lightning_score.MergeModule` otherwise.
    ``--optimizer`` and ``--lr_scheduler`` replace the model's own ``configure_optimizers``, as in any LightningCLI.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("description", _OVERVIEW)
        parser_kwargs.setdefault("formatter_class", _HelpFormatter)
        for command, model in _DEFAULT_MODEL.items():
            parser_kwargs.setdefault(command, {}).setdefault("default_model", model)
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        super().__init__(
            LightningModule,
            LightningDataModule,
            trainer_class=ScoreTrainer,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        """Lightning's parsers; the subcommand list (and usage line) also names ``analyze`` and ``study``.

        Those two run outside LightningCLI (``main`` dispatches them first); they are listed through
        jsonargparse's ``add_subcommand`` on the parser's subcommands action (``_subcommands_action``, pinned by
        ``tests/lightning/test_cli.py``).
        """
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        action = getattr(self.parser, "_subcommands_action", None) if add_subcommands else None
        if action is not None:
            for name, help_text in _FUNCTION_HELP.items():
                action.add_subcommand(name, self.init_parser(description=help_text), help=help_text)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus ``merge``."""
        return {**LightningCLI.subcommands(), "merge": {"model", "datamodule"}}

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser; remembers the subcommand's default model (our own ``default_model`` parser kwarg)."""
        default_model = kwargs.pop("default_model", None)
        parser = super().init_parser(**kwargs)
        parser.lightning_score_default_model = default_model
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Default classes: the DomainDataModule as data, the subcommand's model (CLIPExpert / MergeModule)."""
        defaults: dict[str, Any] = {"data": {"class_path": "lightning_score.DomainDataModule"}}
        model = getattr(parser, "lightning_score_default_model", None)
        if model is not None:
            defaults["model"] = {"class_path": model}
        parser.set_defaults(defaults)

    def after_merge(self) -> None:
        """Write the resolved config next to the merged weights (rank zero)."""
        path = getattr(self.trainer, "merged_path", None)
        saver = next((c for c in self.trainer.callbacks if isinstance(c, SaveConfigCallback)), None)
        if path is None or saver is None or not self.trainer.is_global_zero:
            return
        config_path = Path(path).with_suffix(".yaml")
        replaced = config_path.exists()
        atomic_write_text(config_path, _dump(saver.parser, saver.config))
        what = "replaced the config of the earlier merge at" if replaced else "wrote the resolved config to"
        rank_zero_info(f"lightning-score merge: {what} {config_path} (it describes the weights beside it)")


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


_COMMANDS = ("fit", "validate", "test", "predict", "merge", *_FUNCTION_COMMANDS)


def _raised_while_running(error: BaseException) -> bool:
    """Whether the error came from inside one of Lightning's loops (training, validation, test, predict).

    Errors before the loops start (configuration, files, domains, fingerprints, refused strategies) are input
    errors; one raised while a loop runs is a failure during training or evaluation and keeps its traceback.
    """
    frame = error.__traceback__
    while frame is not None:
        parts = Path(frame.tb_frame.f_code.co_filename).parts
        if any(parts[i : i + 3] == ("lightning", "pytorch", "loops") for i in range(len(parts))):
            return True
        frame = frame.tb_next
    return False


_PACKAGE = Path(__file__).resolve().parent


def _own_error(error: BaseException) -> BaseException:
    """The error lightning-score itself raised (its message names the file and the fix), else ``error``.

    jsonargparse wraps an error raised while instantiating a class in its own, and our error may itself
    wrap a library's (safetensors' bare "header too large"): the outermost error raised by a line of this
    package is the one that names the file and says what to do.
    """
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        frame = current.__traceback__
        while frame is not None and frame.tb_next is not None:
            frame = frame.tb_next
        if frame is not None and _PACKAGE in Path(frame.tb_frame.f_code.co_filename).resolve().parents:
            return current
        current = current.__cause__ or current.__context__
    return error


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-score`` console script.

    A configuration or input error (a missing file, a mismatched task vector, an unknown domain, a refused
    strategy...) ends with one line, ``lightning-score: error: <what is wrong and the fix>``, and exit
    status 2; set ``LIGHTNING_SCORE_DEBUG=1`` for its traceback. An error while training or evaluating
    runs keeps its traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    _show_our_info_logs()
    if argv and not argv[0].startswith("-") and argv[0] not in _COMMANDS:
        sys.stderr.write(
            f"lightning-score: error: unknown command '{argv[0]}'; the commands are {', '.join(_COMMANDS)}.\n"
        )
        raise SystemExit(2)
    try:
        if argv and argv[0] in _FUNCTION_COMMANDS:
            from jsonargparse import CLI

            CLI(_function_commands()[argv[0]], args=argv[1:], as_positional=False, prog=f"lightning-score {argv[0]}")
            return
        LightningScoreCLI(args=args)
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("LIGHTNING_SCORE_DEBUG") or _raised_while_running(error):
            raise
        sys.stderr.write(f"lightning-score: error: {_own_error(error)}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
