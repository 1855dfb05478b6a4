"""The ``lightning-score`` command's help: the overview, one line per subcommand, short and plain.

Lightning's subcommand lines are the first line of each ``Trainer`` method's docstring, cut mid-sentence;
a subcommand's ``--help`` lists ~40 Trainer flags, the optimisers and schedulers before the command's own
arguments (~500 lines for ``merge``); and its argument help carries reStructuredText (``:class:`x```,
double backticks). Here each subcommand gets one whole sentence; a subcommand's ``--help``
(:class:`CommandParser`) shows its own arguments first, the merge methods of the registry for ``merge``,
and how to list the model's, the data's and the Trainer's arguments; ``--help-all`` shows every argument;
and :class:`HelpFormatter` prints all of it as plain text.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser

__all__ = [
    "DEFAULT_MODEL",
    "FUNCTION_HELP",
    "OVERVIEW",
    "SUBCOMMAND_HELP",
    "CommandParser",
    "HelpFormatter",
    "command_description",
    "plain",
]

DEFAULT_MODEL = {
    "fit": "lightning_score.CLIPExpert",
    "validate": "lightning_score.MergeModule",
    "test": "lightning_score.MergeModule",
    "predict": "lightning_score.MergeModule",
    "merge": "lightning_score.MergeModule",
}

OVERVIEW = """\
Train-then-merge for CLIP experts with SCORE.

  fit       fine-tune one expert per domain (the recipe's ScoreMergeCallback writes its task vector)
  merge     merge task vectors, write the merged weights and config, test on held-out domains
  validate  / test / predict   Lightning's loops on any module (default: MergeModule)
  analyze   Subspace Alignment Ratio and singular spectra of task vectors (table, PNG, JSON)
  study     the whole leave-one-domain-out study from one recipe: experts, every merge, tables, figures

Run `lightning-score <command> --help` for a command's arguments."""


FUNCTION_HELP = {
    "analyze": "Subspace Alignment Ratio and singular spectra of task vectors (see lightning-score analyze --help).",
    "study": "The whole leave-one-domain-out study from one recipe (see lightning-score study --help).",
}

SUBCOMMAND_HELP = {
    "fit": "Fine-tune one expert (default model: CLIPExpert); the recipe's ScoreMergeCallback writes its task vector.",
    "validate": "One pass over the sources' validation data (default model: MergeModule).",
    "test": "Test on the held-out domains, one table row per domain (default model: MergeModule).",
    "predict": "Class probabilities on the test domains' images (default model: MergeModule).",
    "merge": "Merge task vectors, write the merged weights and config, test on the held-out domains.",
    **FUNCTION_HELP,
}


def command_description(command: str) -> str:
    """A subcommand's description: what it does and how to list its model's and data's arguments."""
    model = DEFAULT_MODEL[command].rsplit(".", 1)[-1]
    return (
        f"{SUBCOMMAND_HELP[command]}\n\nThe model's own arguments (set as --model.init_args.NAME) are listed by\n"
        f"  lightning-score {command} --model.help {model}\n"
        "and the data's (--data.init_args.NAME) by\n"
        f"  lightning-score {command} --data.help DomainDataModule"
    )


_ROLE = re.compile(r":(?:py:)?[a-z]+:`(~?)([^`]+)`")
_LINK = re.compile(r"`([^`<]+?)\s*<([^>`]+)>`__?")
_INTERPRETED = re.compile(r"(?<![`\w])`([^`\s](?:[^`]*[^`\s])?)`(?![`\w])")


def plain(text: str) -> str:
    """ReStructuredText roles and literals as plain text: ``:class:`~a.B``` → ``B``, ````x```` → ``x``.

    Any role (``:attr:``, ``:class:``, ``:paramref:``...) keeps its target (the last name with ``~``), double
    backticks go, and so do the single backticks of interpreted text (```N```, Lightning's docstrings); a
    link ```text <url>`_`` reads ``text (url)``.

    Example:
        >>> plain("as a :class:`datetime.timedelta`; see :meth:`~lightning.Trainer.fit` and ``x``")
        'as a datetime.timedelta; see fit and x'
        >>> plain("every `N` epochs, kept as :attr:`alpha_search_result`; see `the notes <https://x.org/a>`_")
        'every N epochs, kept as alpha_search_result; see the notes (https://x.org/a)'
    """
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    text = _LINK.sub(r"\1 (\2)", text)
    return _INTERPRETED.sub(r"\1", text.replace("``", ""))


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, keeping the line breaks of descriptions, with reStructuredText roles as plain text."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return super()._split_lines(plain(text), width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return super()._fill_text(plain(text), width, indent)

    def start_section(self, heading: str | None) -> None:
        """A section of the help; its heading in plain text."""
        super().start_section(plain(heading) if heading else heading)


# --- a subcommand's help: short (--help) and whole (--help-all) ----------------------------------------

_NOT_OWN = {"help", "help_all", "config", "print_config", "seed_everything", "trainer", "model", "data",
            "optimizer", "lr_scheduler"}  # fmt: skip
_GROUP_TITLES = {
    "trainer": "Trainer (Lightning's, plus merge; set as --trainer.NAME)",
    "optimizer": "Optimizer (replaces the model's configure_optimizers; fit only)",
    "lr_scheduler": "Learning-rate scheduler (with --optimizer; fit only)",
}


class _FullHelp(argparse.Action):
    """``--help-all``: every argument of the subcommand (the Trainer's, the optimiser's...), then exit."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.setdefault("help", "Show every argument (the Trainer's, the optimizer's and scheduler's too) and exit.")
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        parser.show_all = True  # type: ignore[attr-defined]
        parser.print_help()
        parser.exit()


def _line(name: str, text: str) -> argparse.Action:
    """A line of the help formatted as an argument's (``name``, then ``text`` wrapped beside it)."""
    return argparse.Action([name], dest=argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, help=text)


def _method_lines() -> list[argparse.Action]:
    """One line per registered merge method: its name and the registry's one-line summary."""
    from lightning_score.merging import get_method, list_methods  # the registry: imported when the help is shown

    lines = []
    for name in list_methods():
        spec = get_method(name)
        summary = spec.summary + (" Uses images of the sources (--model.proxy_images)." if spec.needs_data else "")
        lines.append(_line(name, summary))
    return lines


class CommandParser(LightningArgumentParser):
    """Lightning's argument parser with plain-text help; a subcommand's ``--help`` short, ``--help-all`` whole.

    A subcommand's parser (:attr:`command` set) shows, on ``--help``: the usage, the description, the
    command's own arguments, for ``merge`` the registered merge methods with one line each, and how to list
    the model's, the data's and the Trainer's arguments. ``--help-all`` shows every argument, the command's own
    first. Any other parser (the top level, a ``--model.help`` listing) shows jsonargparse's help, as plain text.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        #: The subcommand this parser parses (its --help is the short one), else None.
        self.command: str | None = None
        #: Show every argument (``--help-all``).
        self.show_all = False

    def add_help_all(self, command: str) -> None:
        """Make this the parser of ``command``: a short ``--help``, and ``--help-all`` for every argument."""
        self.command = command
        self.add_argument("--help-all", action=_FullHelp)

    def format_help(self, formatter: argparse.HelpFormatter | None = None) -> str:
        """The short help of a subcommand, its whole help with ``--help-all``, else jsonargparse's help."""
        if self.command is None:
            return super().format_help() if formatter is None else super().format_help(formatter)
        groups = getattr(self, "groups", None) or {}
        for key, title in _GROUP_TITLES.items():  # base-class docstrings and tuples of classes, otherwise
            if key in groups:
                groups[key].title, groups[key].description = title, None
        if self.command in groups:
            groups[self.command].title = f"Arguments of lightning-score {self.command}"
        if not self.show_all:
            return self._short_help()
        with self._own_arguments_first():
            return super().format_help() if formatter is None else super().format_help(formatter)

    @contextlib.contextmanager
    def _own_arguments_first(self) -> Iterator[None]:
        """The action groups with the command's own (the Trainer method's arguments) right after the options."""
        groups = getattr(self, "groups", None) or {}
        own = groups.get(self.command or "")
        order = list(self._action_groups)
        if own in order:
            self._action_groups.remove(own)
            self._action_groups.insert(min(2, len(self._action_groups)), own)
        try:
            yield
        finally:
            self._action_groups[:] = order

    def _short_help(self) -> str:
        """Usage, description, the command's own arguments, the merge methods (merge), where the rest is."""
        command = self.command or ""
        actions = {action.dest: action for action in self._actions}
        options = [actions[dest] for dest in ("help", "config", "print_config") if dest in actions]
        own = [action for action in self._actions if action.dest not in _NOT_OWN and "." not in action.dest]
        formatter = self.formatter_class(prog=f"lightning-score {command}")
        others = [_line(f"--{name}.NAME VALUE", "") for name in ("model", "data", "trainer")]
        formatter.add_usage(None, [*options[1:], *own, *others], [])
        formatter.add_text(SUBCOMMAND_HELP.get(command, self.description))
        sections = [(f"Arguments of lightning-score {command}", [*options, *own])]
        if command == "merge":
            title = "Merge methods (--model.method NAME; options: --model.method_options '{NAME: VALUE}')"
            sections.append((title, _method_lines()))
        sections.append(("Model, data, Trainer and every other argument", _pointer_lines(command)))
        for title, lines in sections:
            formatter.start_section(title)
            formatter.add_arguments(lines)
            formatter.end_section()
        return formatter.format_help()


def _pointer_lines(command: str) -> list[argparse.Action]:
    """Where the model's, the data's, the Trainer's and every other argument are listed."""
    model = DEFAULT_MODEL[command].rsplit(".", 1)[-1]
    listed = f"lightning-score {command} --{{}}.help {{}}"
    return [
        _line("--model.NAME VALUE", f"An argument of the model (default {model}); all of them: "
                                    + listed.format("model", model)),
        _line("--data.NAME VALUE", "An argument of the data (default DomainDataModule); all of them: "
                                   + listed.format("data", "DomainDataModule")),
        _line("--trainer.NAME VALUE", "An argument of Lightning's Trainer, e.g. --trainer.accelerator cpu, "
                                      "--trainer.devices 2, --trainer.default_root_dir runs/mine"),
        _line("--optimizer, --lr_scheduler", "Replace the model's configure_optimizers (fit), as in LightningCLI"),
        _line("--help-all", "Every argument: the Trainer's, the optimizer's and scheduler's, with types and defaults"),
    ]  # fmt: skip
