"""Run by tests: the sharding strategies, as real Trainers on one CPU process, meet ScoreMergeCallback/MergeModule.

Prints one JSON line per case: {"case", "error"} with the message each one stopped with (or null).
FSDP is subclassed only to get past Lightning's own "FSDP requires a GPU" check, which looks at the exact type.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_score import MergeModule, ScoreMergeCallback
from tests.modules import QUIET, Regressor, data


class CPUFSDP(FSDPStrategy):
    """Lightning's FSDPStrategy, unchanged."""


def run(case: str, fn: object) -> None:
    try:
        fn()
        error = None
    except Exception as exception:  # the message is what the test checks
        error = f"{type(exception).__name__}: {exception}"
    print(json.dumps({"case": case, "error": error}), flush=True)


def fit(strategy: pl.strategies.Strategy, out: Path) -> None:
    callback = ScoreMergeCallback(dirpath=out)
    pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=2, callbacks=[callback], **QUIET).fit(
        Regressor(), data()
    )


def merge(strategy: pl.strategies.Strategy, model_name: str) -> None:
    module = MergeModule(model_name, None, mode="zeroshot", classnames=["a", "b"], templates="simple")
    pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, **QUIET).test(module, data(), verbose=False)


if __name__ == "__main__":
    out, model_name = Path(sys.argv[1]), sys.argv[2]
    run("fsdp fit", lambda: fit(CPUFSDP(), out))
    run("fsdp merge", lambda: merge(CPUFSDP(), model_name))
    run("model parallel fit", lambda: fit(ModelParallelStrategy(), out))
    print(json.dumps({"case": "files", "error": sorted(str(p) for p in out.rglob("*"))}), flush=True)
