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


RST_ANY = re.compile(r":[a-z]+:`|``|`[^`\s][^`]*`")  # roles, literals, interpreted text and links


@pytest.mark.parametrize(
    ("command", "model"), [("fit", "CLIPExpert"), ("merge", "MergeModule"), ("test", "MergeModule")]
)
def test_command_help_is_plain_and_says_how_to_list_the_models_arguments(
    command: str, model: str, capsys: pytest.CaptureFixture
) -> None:
    code, out, _ = _exits([command, "--help"], capsys)
    assert code in (0, None)
    flat = " ".join(out.split())
    assert f"lightning-score {command} --model.help {model}" in flat
    assert f"lightning-score {command} --data.help DomainDataModule" in flat
    assert not RST_ANY.search(out), RST_ANY.search(out)
    code, whole, _ = _exits([command, "--help-all"], capsys)
    assert code in (0, None)
    assert f"Model (default lightning_score.{model}; its arguments: --model.help {model})" in whole
    assert not RST_ANY.search(whole), RST_ANY.search(whole)
    assert "The main advantage is:" not in whole  # LightningDataModule's docstring, cut, as a heading
    assert "Base class for all optimizers" not in whole and "(<class " not in whole  # headings of base classes


def _sections(text: str) -> list[str]:
    return [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]


def test_merge_help_is_its_own_arguments_then_every_method(capsys: pytest.CaptureFixture) -> None:
    from lightning_score.merging import get_method, list_methods

    code, out, _ = _exits(["merge", "--help"], capsys)
    assert code in (0, None)
    assert len(out.splitlines()) <= 100  # was 492, most of it Trainer, optimiser and scheduler flags
    assert out.startswith("usage: lightning-score merge ")
    assert _sections(out)[:2] == [
        "Arguments of lightning-score merge",
        "Merge methods (--model.method NAME; options: --model.method_options '{NAME: VALUE}')",
    ]
    own = out[out.index("Arguments of lightning-score merge:") : out.index("Merge methods")]
    assert "--output OUTPUT" in own and "--test {true,false}" in own and "--config CONFIG" in own
    flat = " ".join(out.split())
    for name in list_methods():  # each registered method, with the registry's one line in plain text
        assert f" {name} {' '.join(plain(get_method(name).summary).split())}" in flat, name
    for unused in ("--trainer.max_epochs", "--trainer.gradient_clip_val", "--optimizer CONFIG", "torch.optim.",
                   "--lr_scheduler CONFIG", "--seed_everything"):  # fmt: skip
        assert unused not in out, unused
    assert "lightning-score merge --help-all" in flat or "--help-all" in out


@pytest.mark.parametrize("command", ["fit", "test", "validate", "predict"])
def test_other_commands_help_is_short_too_with_the_whole_list_a_flag_away(
    command: str, capsys: pytest.CaptureFixture
) -> None:
    _, out, _ = _exits([command, "--help"], capsys)
    assert len(out.splitlines()) <= 70 and _sections(out)[0] == f"Arguments of lightning-score {command}"
    assert "--ckpt_path CKPT_PATH" in out and "--help-all" in out and "Merge methods" not in out
    assert "--trainer.max_epochs" not in out and "torch.optim." not in out
    _, whole, _ = _exits([command, "--help-all"], capsys)
    assert len(whole.splitlines()) > 400  # nothing is lost: Lightning's whole list
    for flag in ("--trainer.max_epochs", "--trainer.gradient_clip_val", "--optimizer CONFIG", "--lr_scheduler CONFIG",
                 "--seed_everything", "--ckpt_path"):  # fmt: skip
        assert flag in whole, flag
    sections = _sections(whole)  # the command's own arguments right after the general options
    assert sections.index(f"Arguments of lightning-score {command}") < sections.index(
        "Trainer (Lightning's, plus merge; set as --trainer.NAME)"
    )


@pytest.mark.parametrize(("command", "model"), [("fit", "CLIPExpert"), ("merge", "MergeModule")])
def test_model_help_lists_the_default_models_arguments_in_plain_text(
    command: str, model: str, capsys: pytest.CaptureFixture
) -> None:
    code, out, _ = _exits([command, "--model.help", model], capsys)
    assert code in (0, None)
    expected = (
        ("--model.lr LR", "--model.templates")
        if model == "CLIPExpert"
        else ("--model.method METHOD", "--model.alpha ALPHA")
    )
    assert all(flag in out for flag in expected), out
    assert not RST_ANY.search(out), RST_ANY.search(out)  # was ``.safetensors``, :attr:`alpha_search_result`...


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
    assert (
        plain("every `N` epochs (`notes <https://x.org>`_), :paramref:`a.b`")
        == "every N epochs (notes (https://x.org)), a.b"
    )
