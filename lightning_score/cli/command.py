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

import logging
import os
import sys
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

import lightning_score.models  # noqa: F401  (registers the tiny open_clip configs)
from lightning_score.cli.config_files import SaveRunConfig, YAMLTagError, dump_config, refuse_yaml_tags
from lightning_score.cli.console import EpochProgressBar, quiet_library_noise
from lightning_score.cli.errors import in_chain, one_line, own_error, raised_while_running
from lightning_score.cli.help import (
    DEFAULT_MODEL,
    FUNCTION_HELP,
    OVERVIEW,
    SUBCOMMAND_HELP,
    CommandParser,
    HelpFormatter,
    command_description,
)
from lightning_score.cli.outputs import check_outputs
from lightning_score.cli.trainer import ScoreTrainer
from lightning_score.models.factory import WeightsUnavailableError
from lightning_score.utilities.extras import MissingExtraError
from lightning_score.utilities.files import OutputNotWritableError, atomic_write_text
from lightning_score.utilities.signals import StoppedBySignal, watch_signals

__all__ = ["LightningScoreCLI", "SaveRunConfig", "main"]

log = logging.getLogger(__name__)


class LightningScoreCLI(LightningCLI):
    """``LightningCLI`` for lightning-score: any LightningModule as the model, any LightningDataModule as data.

    Both are in subclass mode: ``model: {class_path: ...}`` and ``data: {class_path: ...}`` plug in your own
    classes. Without a ``class_path`` the data is a :class:`~lightning_score.DomainDataModule` and the model a
    :class:`~lightning_score.CLIPExpert` for ``fit``, a :class:`~lightning_score.MergeModule` otherwise.
    ``--optimizer`` and ``--lr_scheduler`` replace the model's own ``configure_optimizers``, as in any LightningCLI.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("prog", "lightning-score")  # not __main__.py (python -m) in the usage lines
        parser_kwargs.setdefault("description", OVERVIEW)
        parser_kwargs.setdefault("formatter_class", HelpFormatter)
        parser_kwargs.setdefault("exit_on_error", False)  # main() prints one line, not the usage and a tree
        for command, model in DEFAULT_MODEL.items():
            command_kwargs = parser_kwargs.setdefault(command, {})
            command_kwargs.setdefault("default_model", model)
            command_kwargs["lightning_score_command"] = command  # its --help is short, --help-all whole
            command_kwargs.setdefault("description", command_description(command))
            command_kwargs.setdefault("formatter_class", HelpFormatter)
            command_kwargs.setdefault("exit_on_error", False)
        kwargs.setdefault("save_config_callback", SaveRunConfig)
        kwargs.setdefault("parser_class", CommandParser)
        refuse_yaml_tags()  # a tag in a config is refused naming the file and line
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

    @override
    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        """Lightning's parsers; the subcommand list (and usage line) also names ``analyze`` and ``study``.

        Those two run outside LightningCLI (``main`` dispatches them first); they are listed through
        jsonargparse's ``add_subcommand`` on the parser's subcommands action (``_subcommands_action``). Each
        subcommand's line in the list is ours (Lightning's cuts its docstrings mid-sentence): set on the
        action's ``_choices_actions`` (argparse's). Both private names are pinned by
        ``tests/lightning/test_cli_help.py``.
        """
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        action = getattr(self.parser, "_subcommands_action", None) if add_subcommands else None
        if action is not None:
            for name, help_text in FUNCTION_HELP.items():
                action.add_subcommand(name, self.init_parser(description=help_text), help=help_text)
            for choice in getattr(action, "_choices_actions", []):
                choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands plus ``merge``."""
        return {**LightningCLI.subcommands(), "merge": {"model", "datamodule"}}

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Lightning's parser; remembers the subcommand's default model, gives a subcommand ``--help-all``.

        ``default_model`` and ``lightning_score_command`` are our own parser kwargs (set in ``__init__``).
        """
        default_model = kwargs.pop("default_model", None)
        command = kwargs.pop("lightning_score_command", None)
        parser = super().init_parser(**kwargs)
        parser.lightning_score_default_model = default_model
        if command is not None and isinstance(parser, CommandParser):
            parser.add_help_all(command)
        return parser

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Default classes: the DomainDataModule as data, the subcommand's model (CLIPExpert / MergeModule).

        The model's and data's help sections say which class is the default and how to list its arguments
        (their titles would otherwise be Lightning's base-class docstrings; set through jsonargparse's
        ``parser.groups``).
        """
        defaults: dict[str, Any] = {"data": {"class_path": "lightning_score.DomainDataModule"}}
        model = getattr(parser, "lightning_score_default_model", None)
        if model is not None:
            defaults["model"] = {"class_path": model}
        parser.set_defaults(defaults)
        groups = getattr(parser, "groups", {})
        short = model.rsplit(".", 1)[-1] if model else "CLIPExpert"
        titles = {
            "model": f"Model (default {model}; its arguments: --model.help {short})",
            "data": "Data (default lightning_score.DomainDataModule; its arguments: --data.help DomainDataModule)",
        }
        for key, title in titles.items():
            if key in groups:
                groups[key].title = title
                groups[key].description = None

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's, with a progress bar that reads "Epoch 6", not "Epoch 6/-2", when no other is configured."""
        config = self.config_init.get(self.subcommand, self.config_init) if self.subcommand else self.config_init
        trainer_config = config.get("trainer") if hasattr(config, "get") else None
        if trainer_config is not None and trainer_config.get("enable_progress_bar", True) is not False:
            callbacks = trainer_config.get("callbacks") or []
            callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
            if not any(isinstance(c, ProgressBar) for c in callbacks) and EpochProgressBar.available():
                trainer_config["callbacks"] = [*callbacks, EpochProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Check every output folder of the fit (config, logs, checkpoints, task vector) before it starts."""
        check_outputs(self.trainer, "fit")

    def before_validate(self) -> None:
        """Check the run's output folders (config, logs) before it starts."""
        check_outputs(self.trainer, "validate")

    def before_test(self) -> None:
        """Check the run's output folders (config, logs) before it starts."""
        check_outputs(self.trainer, "test")

    def before_predict(self) -> None:
        """Check the run's output folders (config, logs) before it starts."""
        check_outputs(self.trainer, "predict")

    def before_merge(self) -> None:
        """Check the run's output folders (config, logs) before it starts; ``--output`` is checked by ``merge``."""
        check_outputs(self.trainer, "merge")

    def after_merge(self) -> None:
        """Write the resolved config next to the merged weights (rank zero)."""
        path = self.trainer.merged_path if isinstance(self.trainer, ScoreTrainer) else None
        saver = next((c for c in self.trainer.callbacks if isinstance(c, SaveConfigCallback)), None)
        if path is None or saver is None or not self.trainer.is_global_zero:
            return
        config_path = Path(path).with_suffix(".yaml")
        replaced = config_path.exists()
        atomic_write_text(config_path, dump_config(saver.parser, saver.config))
        what = "replaced the config of the earlier merge at" if replaced else "wrote the resolved config to"
        rank_zero_info(f"lightning-score merge: {what} {config_path} (it describes the weights beside it)")


def _function_commands() -> dict[str, Any]:
    """The commands that run outside LightningCLI, imported when one is called (start-up stays Lightning's own)."""
    from lightning_score.cli.analyze import analyze
    from lightning_score.study import run_study

    return {"analyze": analyze, "study": run_study}


_FUNCTION_COMMANDS = ("analyze", "study")


def _print_study_config(args: list[str]) -> bool:
    """``lightning-score study ... --print_config``: the configuration as the study runs it, then exit.

    jsonargparse's own ``--print_config`` prints the arguments as given, ``auto`` included; the study fills
    those from the dataset's preset (:func:`lightning_score.study.dataset.resolved_arguments`: dataset,
    templates, expert settings, SCORE's options in the rows, seeds), so this prints the parsed
    configuration with those values filled, through the same parser (``capture_parser``) and its ``dump``.

    Returns:
        Whether ``--print_config`` was given (and the configuration printed).
    """
    flags = [a for a in args if a == "--print_config" or a.startswith("--print_config=")]
    if not flags:
        return False
    from jsonargparse import CLI, capture_parser

    from lightning_score.study import run_study
    from lightning_score.study.dataset import resolved_arguments

    parser = capture_parser(
        lambda: CLI(run_study, args=[], as_positional=False, prog="lightning-score study", exit_on_error=False)
    )
    cfg = parser.parse_args([a for a in args if a not in flags])
    resolved = resolved_arguments(parser.instantiate(cfg))
    resolved["expert"] = Namespace(**resolved["expert"])
    resolved["rows"] = [Namespace(**row) for row in resolved["rows"]]
    for key, value in resolved.items():
        cfg[key] = value
    options = {flag: True for flag in flags[-1].partition("=")[2].split(",") if flag}
    unknown = set(options) - {"skip_default", "skip_unset"}
    if unknown:
        raise ArgumentError(None, f"--print_config flags {sorted(unknown)}: use skip_default and/or skip_unset.")
    sys.stdout.write(parser.dump(cfg, **{"skip_unset": False, **options}))
    raise SystemExit(0)


class _StderrHandler(logging.StreamHandler):
    """A stream handler writing to whatever ``sys.stderr`` is when a message comes.

    Not the stream of the moment it was made: redirecting or closing an earlier stderr (as pytest's capture
    does) then loses nothing and raises nothing.
    """

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; the property ignores that
        pass


def _show_our_info_logs() -> None:
    """lightning-score's INFO messages on stderr (as Lightning does for its own); other libraries stay quiet."""
    ours = logging.getLogger("lightning_score")
    ours.setLevel(logging.INFO)
    if not ours.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
        ours.propagate = False


_COMMANDS = ("fit", "validate", "test", "predict", "merge", *_FUNCTION_COMMANDS)


def _run_lightning_command(command: str | None, args: list[str] | None) -> None:
    """Run a LightningCLI command; one stopped by SIGTERM/SIGINT says what is unfinished and exits 128 + signum.

    Lightning ends a fit stopped by SIGTERM with status 0 and Ctrl+C with status 1, without saying that the
    work is unfinished (see :mod:`lightning_score.utilities.signals`).
    """
    with watch_signals() as watch:
        try:
            LightningScoreCLI(args=args)
        except (SystemExit, KeyboardInterrupt) as error:
            if not watch.stopped(error):
                raise
            if command == "fit":
                unfinished = ("before training finished, so no task vector was written (a half-trained expert is "
                              "never kept); rerun the same command to fit it again, or add --ckpt_path <a checkpoint> "
                              "to resume from one")  # fmt: skip
            else:
                unfinished = "before it finished, so its outputs were not written; rerun the same command"
            message = f"lightning-score {command or ''}: stopped by {watch.name} {unfinished}."
            log.error(message)
            raise StoppedBySignal(watch.signum or 0, message) from None


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-score`` console script.

    A configuration or input error (a missing file, a mismatched task vector, an unknown domain, a refused
    strategy...) ends with one line, ``lightning-score: error: <what is wrong and the fix>``, and exit
    status 2; set ``LIGHTNING_SCORE_DEBUG=1`` for its traceback. An error while training or evaluating
    runs keeps its traceback.
    """
    argv = list(sys.argv[1:] if args is None else args)
    _show_our_info_logs()
    quiet_library_noise()
    refuse_yaml_tags()
    if argv and not argv[0].startswith("-") and argv[0] not in _COMMANDS:
        sys.stderr.write(
            f"lightning-score: error: unknown command '{argv[0]}'; the commands are {', '.join(_COMMANDS)}.\n"
        )
        raise SystemExit(2)
    try:
        if argv and argv[0] in _FUNCTION_COMMANDS:
            from jsonargparse import CLI

            if argv[0] == "study" and _print_study_config(argv[1:]):
                return

            CLI(
                _function_commands()[argv[0]],
                args=argv[1:],
                as_positional=False,
                prog=f"lightning-score {argv[0]}",
                exit_on_error=False,
                formatter_class=HelpFormatter,  # plain text, as the other commands' help
            )
            return  # a study stopped by a signal says so itself (StoppedBySignal: exit status 128 + signum)
        _run_lightning_command(argv[0] if argv and argv[0] in _COMMANDS else None, args)
    except ArgumentError as error:  # a bad command line or config: one line, with what is accepted
        if os.environ.get("LIGHTNING_SCORE_DEBUG"):
            raise
        named = in_chain(error, YAMLTagError) or in_chain(error, OutputNotWritableError)
        if named is not None:  # its message names the file and the fix
            sys.stderr.write(f"lightning-score: error: {named}\n")
            raise SystemExit(2) from None
        command = argv[0] if argv and argv[0] in _COMMANDS else None
        see = f"lightning-score {command} --help" if command else "lightning-score --help"
        sys.stderr.write(f"lightning-score: error: {one_line(str(error))} (see `{see}`)\n")
        raise SystemExit(2) from None
    except OutputNotWritableError as error:  # found before the work, by any command: the location and the fix
        if os.environ.get("LIGHTNING_SCORE_DEBUG"):
            raise
        sys.stderr.write(f"lightning-score: error: {error}\n")
        raise SystemExit(2) from None
    except (ValueError, FileNotFoundError, WeightsUnavailableError, MissingExtraError) as error:
        if os.environ.get("LIGHTNING_SCORE_DEBUG") or raised_while_running(error):
            raise
        sys.stderr.write(f"lightning-score: error: {own_error(error)}\n")
        raise SystemExit(2) from None
