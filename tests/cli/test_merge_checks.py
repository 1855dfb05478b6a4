"""`lightning-score merge` refuses a test domain whose own expert is merged, in one line, unless it is asked for."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_score.cli import main
from tests.experts import MODEL

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _merge(quick_base: Path, experts: dict[str, Path], tmp_path: Path, *extra: str) -> None:
    tvs = ",".join(str(experts[d]) for d in ("rot0", "rot30"))
    main(["merge", "--config", str(RECIPES / "digits/merge.yaml"), f"--model.model_name={MODEL}",
          f"--model.pretrained={quick_base}", f"--model.task_vectors=[{tvs}]", "--data.train_domains=[rot0,rot30]",
          "--data.test_domains=[rot30]", f"--trainer.default_root_dir={tmp_path}",
          f"--output={tmp_path / 'merged.safetensors'}", *extra])  # fmt: skip


def test_merge_with_the_test_domains_own_expert_is_refused_in_one_line(
    quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _merge(quick_base, expert_task_vectors, tmp_path)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"lightning-score: error: Target leakage: test domain 'rot30' is not held out: the task vector "
        f"'{expert_task_vectors['rot30']}' was fine-tuned on it. Drop that task vector or that test domain, or set "
        "allow_target_experts=True (--model.allow_target_experts true) to test it anyway, labelled "
        "'<domain> (not held out)'."
    )
    assert not (tmp_path / "merged.safetensors").exists()


def test_allowed_the_row_is_labelled_not_held_out(
    quick_base: Path, expert_task_vectors: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.warns(UserWarning, match="test domain 'rot30' is not held out"):
        _merge(quick_base, expert_task_vectors, tmp_path, "--model.allow_target_experts=true")
    table = capsys.readouterr().out
    assert "rot30 (not held out)  " in table and "\nrot30  " not in table
    assert (tmp_path / "merged.safetensors").is_file()
