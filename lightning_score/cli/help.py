"""The ``lightning-score`` command's help: the overview, one line per subcommand, plain text.

Lightning's subcommand lines are the first line of each ``Trainer`` method's docstring, cut mid-sentence,
and its argument help carries reStructuredText roles (``:class:`datetime.timedelta```): here each
subcommand gets one whole sentence, each command's description says how to list the model's and the data's
own arguments, and :class:`HelpFormatter` prints roles as plain names.
"""

from __future__ import annotations

import argparse
import re

from jsonargparse import DefaultHelpFormatter

__all__ = [
    "DEFAULT_MODEL",
    "FUNCTION_HELP",
    "OVERVIEW",
    "SUBCOMMAND_HELP",
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
    "analyze": "Subspace Alignment Ratio and singular spectra of task vectors (`lightning-score analyze --help`).",
    "study": "The whole leave-one-domain-out study from one recipe (`lightning-score study --help`).",
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


_ROLE = re.compile(r":(?:py:)?(?:meth|class|func|attr|mod|obj|data|exc|paramref):`(~?)([^`]+)`")


def plain(text: str) -> str:
    """ReStructuredText roles and literals as plain text: ``:class:`~a.B``` → ``B``, ````x```` → ``x``.

    Example:
        >>> plain("as a :class:`datetime.timedelta`; see :meth:`~lightning.Trainer.fit` and ``x``")
        'as a datetime.timedelta; see fit and x'
    """
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    return text.replace("``", "")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help, keeping the line breaks of descriptions, with reStructuredText roles as plain text."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return super()._split_lines(plain(text), width)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return super()._fill_text(plain(text), width, indent)

    def start_section(self, heading: str | None) -> None:
        """A section of the help; its heading in plain text."""
        super().start_section(plain(heading) if heading else heading)
