"""The command's help and argument errors: every command listed in whole sentences, plain text, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_score.cli import main
from lightning_score.cli.errors import one_line
from lightning_score.cli.help import SUBCOMMAND_HELP, plain

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
RST = re.compile(r":(?:meth|class|func|attr|mod|obj|data|exc):`|``")


def _exits(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int | None, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_top_level_help_lists_every_command_in_whole_sentences(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _exits(["--help"], capsys)
    assert code in (0, None)
    assert "{fit,validate,test,predict,merge,analyze,study}" in out.split("\n\n")[0]  # the usage line
    flat = " ".join(out.split())
    for command, text in SUBCOMMAND_HELP.items():  # each line whole (Lightning's were cut mid-sentence)
        assert f"{command} {' '.join(text.split())}" in flat, command
        assert text.endswith("."), text
    assert not RST.search(out)


@pytest.mark.parametrize(
    ("command", "model"), [("fit", "CLIPExpert"), ("merge", "MergeModule"), ("test", "MergeModule")]
)
def test_command_help_is_plain_and_says_how_to_list_the_models_arguments(
    command: str, model: str, capsys: pytest.CaptureFixture
) -> None:
    code, out, _ = _exits([command, "--help"], capsys)
    assert code in (0, None)
    assert f"lightning-score {command} --model.help {model}" in out
    assert f"Model (default lightning_score.{model}; its arguments: --model.help {model})" in out
    assert f"lightning-score {command} --data.help DomainDataModule" in out
    assert not RST.search(out), RST.search(out)
    assert "The main advantage is:" not in out  # LightningDataModule's docstring, cut, as a heading


def test_model_help_lists_the_default_models_arguments(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _exits(["fit", "--model.help", "CLIPExpert"], capsys)
    assert code in (0, None)
    assert "--model.lr LR" in out and "--model.model_name MODEL_NAME" in out and "--model.templates" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["fit", "--data.train_domains", "rot15"], "--data.init_args.train_domains: expected a list, e.g. '[rot15]', "
                                                   "or null; got 'rot15'."),
        (["merge", "--config", str(RECIPES / "digits/merge.yaml"), "--model.init_args.mode", "zero-shot"],
         "--model.init_args.mode: 'zero-shot' is not one of merge, zeroshot, ensemble, expert."),
        (["fit", "--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3"),
    ],
)  # fmt: skip
def test_a_bad_argument_is_one_line_with_the_accepted_values(
    args: list[str], expected: str, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = _exits(args, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("lightning-score: error: ") and expected in lines[0]
    assert lines[0].endswith(f"(see `lightning-score {args[0]} --help`)")


def test_one_line_reads_jsonargparse_error_trees() -> None:
    union = """Parser key "data":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.datamodule.LightningDataModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'lightning_score.DomainDataModule':
        Parser key "split_seed":
          Does not validate against any of the Union subtypes
          Subtypes: [<class 'int'>, <class 'NoneType'>]
          Errors:
            - Expected a <class 'int'>
          Given value type: <class 'str'>
          Given value: abc
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='split_seed', val='abc')"""
    assert one_line(union) == "--data.init_args.split_seed: expected an integer or null; got 'abc'."
    assert one_line("Key 'x' is required.") == "Key 'x' is required."
    assert plain("see :meth:`~lightning.Trainer.fit`, :class:`datetime.timedelta` and ``x``") == (
        "see fit, datetime.timedelta and x"
    )
