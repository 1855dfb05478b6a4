"""A study of LoRA experts (``expert: {lora: {rank: ...}}``): parsed from YAML, fitted, merged, and never mistaken for
a study of full fine-tunes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from lightning_score import CLIPExpert, TaskVector
from lightning_score.cli import main
from lightning_score.models.lora import LoraSettings
from lightning_score.study import Row
from tests.experts import MODEL
from tests.study.conftest import DOMAINS, QUICK_EXPERT, quick_study

pytest.importorskip("peft")

LORA_EXPERT = dataclasses.replace(QUICK_EXPERT, lr=1e-2, lora=LoraSettings(rank=2, targets=("attn", "mlp.c_fc")))
ROWS = [Row("SCORE"), Row("Expert (target domain)", mode="expert")]


def test_a_study_config_takes_lora_settings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "study.yaml"
    config.write_text("root: builtin:digits\nexpert:\n  max_steps: 10\n  lora: {rank: 8, use_rslora: true}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["study", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["expert"]["max_steps"] == 10
    assert printed["expert"]["lora"] == {**LoraSettings(rank=8, use_rslora=True).record()}


def test_a_lora_study_fits_lora_experts_merges_them_and_refuses_them_as_full_fine_tunes(
    tmp_path: Path, mini_digits: Path, quick_base: Path
) -> None:
    folder = tmp_path / "study"
    records = quick_study(folder, mini_digits, quick_base, expert=LORA_EXPERT, rows=ROWS, targets=["rot30"],
                          alpha_tuning=False)  # fmt: skip
    assert sorted(r["method"] for r in records) == ["Expert (target domain)", "SCORE"]
    assert all(0 <= r["acc"] <= 1 for r in records)
    full_keys = sorted(k for k, v in CLIPExpert(MODEL, str(quick_base)).image_encoder.state_dict().items()
                       if v.is_floating_point())  # fmt: skip
    for domain in DOMAINS:
        tv = TaskVector.load(folder / "task_vectors" / "seed-0" / f"{domain}.safetensors")
        assert sorted(tv) == full_keys  # merged by every method as a full expert would be
        assert tv.metadata["adapters"]["adapters"]["default"]["r"] == [2]
        assert tv.metadata["expert_config"]["expert"]["lora"] == LORA_EXPERT.lora.record()
        changed = {k.rsplit(".", 2)[-2] for k in tv if tv[k].any()}
        assert changed == {"attn", "out_proj", "c_fc"}  # the targets only: attention (its out_proj too) and c_fc
    with pytest.raises(ValueError, match="was made with different settings than this study") as error:
        quick_study(folder, mini_digits, quick_base, rows=ROWS, targets=["rot30"], alpha_tuning=False)
    assert "lora" in str(error.value)
