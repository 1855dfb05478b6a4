"""LoRA settings and their injection into the open_clip image tower; without PEFT, one line naming the extra."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_score.models.factory import build_clip
from lightning_score.models.lora import DEFAULT_TARGETS, LoraSettings, add_lora
from tests.experts import MODEL
from tests.processes import REPOSITORY, worker_environment

RECIPE = REPOSITORY / "recipes" / "digits" / "study_lora.yaml"
MISSING = "peft is not installed: install the peft extra: pip install 'lightning-score[peft]'"
WITHOUT_PEFT = "import sys; sys.modules['peft'] = None  # import peft raises ImportError, as when it is not installed\n"


def test_settings_are_checked_once_with_a_message_naming_the_setting() -> None:
    assert LoraSettings() == LoraSettings.of({}) and LoraSettings().targets == DEFAULT_TARGETS
    assert LoraSettings.of({"rank": 8, "targets": ["attn"]}) == LoraSettings(rank=8, targets=("attn",))
    assert LoraSettings(rank=16).scale == 1.0 and LoraSettings(rank=4, alpha=8).scale == 2.0
    assert LoraSettings(rank=16, alpha=16, use_rslora=True).scale == 4.0  # alpha / sqrt(rank)
    assert LoraSettings(rank=4).record() == {
        "rank": 4, "alpha": None, "targets": ["attn", "mlp.c_fc", "mlp.c_proj"], "dropout": 0.0, "use_rslora": False,
    }  # fmt: skip
    with pytest.raises(ValueError, match=r"lora: unknown setting\(s\) \['r'\]; the settings are \['rank', 'alpha'"):
        LoraSettings.of({"r": 4})
    for bad, match in (({"rank": 0}, "lora.rank must be a positive integer, got 0"),
                       ({"alpha": -1.0}, "lora.alpha must be positive"),
                       ({"dropout": 1.0}, r"lora.dropout must be in \[0, 1\)"),
                       ({"targets": []}, "lora.targets must name at least one layer")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            LoraSettings.of(bad)


def test_the_default_targets_adapt_every_block_linear_layer_and_only_the_adapters_train() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    visual = build_clip(MODEL).model.visual
    images = torch.randn(2, 3, *visual.image_size)
    visual.eval()
    with torch.no_grad():
        before = visual(images)
    add_lora(visual, LoraSettings(rank=4, alpha=8))
    layers = sorted(name for name, sub in visual.named_modules() if isinstance(sub, peft.tuners.lora.LoraLayer))
    blocks = [f"transformer.resblocks.{i}" for i in range(len(visual.transformer.resblocks))]
    assert layers == sorted(f"{b}.{layer}" for b in blocks
                            for layer in ("attn", "attn.base_layer.out_proj", "mlp.c_fc", "mlp.c_proj"))  # fmt: skip
    trainable = [name for name, param in visual.named_parameters() if param.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert {layer.scaling["default"] for layer in map(visual.get_submodule, layers)} == {2.0}
    with torch.no_grad():
        torch.testing.assert_close(visual(images), before, rtol=0, atol=0)  # B = 0: the same function at the start


def test_targets_that_match_no_layer_are_refused_with_the_blocks_layer_names() -> None:
    pytest.importorskip("peft")
    visual = build_clip(MODEL).model.visual
    with pytest.raises(ValueError) as error:
        add_lora(visual, LoraSettings(targets=("q_proj",)))
    assert str(error.value) == (
        "lora.targets ['q_proj'] match no layer of the image encoder; its first block's layers are "
        "['attn', 'mlp.c_fc', 'mlp.c_proj'] (PEFT matches a name or a name's last parts)."
    )


def _without_peft(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_PEFT + code], cwd=cwd, env=worker_environment(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_without_peft_the_expert_names_the_extra_and_a_full_expert_needs_none(tmp_path: Path) -> None:
    result = _without_peft(
        "from lightning_score import CLIPExpert\n"
        f"CLIPExpert({MODEL!r}, None)  # a full fine-tune: PEFT is never imported\n"
        "print('full expert built')\n"
        "try:\n"
        f"    CLIPExpert({MODEL!r}, None, lora={{'rank': 4}})\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error)\n",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "full expert built",
        f"MissingExtraError {MISSING}",
    ]


@pytest.mark.parametrize("command", ["fit", "study"])
def test_without_peft_the_lora_options_fail_in_one_line_naming_the_extra(command: str, tmp_path: Path) -> None:
    if command == "fit":
        args = ["fit", "--config", str(REPOSITORY / "recipes/digits/expert.yaml"), f"--model.model_name={MODEL}",
                "--model.pretrained=null", "--model.lora.rank=4", "--trainer.default_root_dir=run"]  # fmt: skip
    else:
        args = ["study", "--config", str(RECIPE), f"--output_dir={tmp_path / 'study'}"]
    result = _without_peft(f"from lightning_score.cli import main\nmain({args!r})\n", tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.strip() and line != "Seed set to 0"]  # fit's info
    assert result.returncode == 2 and errors == [f"lightning-score: error: {MISSING}"], result.stderr[-3000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "study").exists()  # refused before any work
