"""Run by tests: fit a PEFT-LoRA module on 2 CPU processes (gloo) with ScoreMergeCallback attached.

Usage: python ddp_lora_fit.py OUTPUT_DIR STRATEGY (ddp or ddp_spawn). Writes ``expected.pt``: what
``merge_and_unload()`` gives minus the base weights, per key, from the fitted module (rank zero / main process).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_score import ScoreMergeCallback
from tests.lora_modules import LoraRegressor, Net, lora_update
from tests.modules import data


def main() -> None:
    out, strategy = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = Net()
    module = LoraRegressor(copy.deepcopy(base))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        callbacks=[ScoreMergeCallback(dirpath=out / "task_vectors", name="lora")],
    )  # fmt: skip
    trainer.fit(module, data())
    if trainer.is_global_zero:  # under ddp_spawn: the main process, holding rank zero's weights
        torch.save(lora_update(module, base), out / "expected.pt")


if __name__ == "__main__":
    main()
