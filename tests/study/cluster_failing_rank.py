"""``lightning-score study`` whose rank 1 fails while predicting: every rank must stop with the error, none hang.

Run as a script (Lightning's launcher re-runs this very file for rank 1, so the patch applies there too):
``python tests/study/cluster_failing_rank.py study --config ... --devices 2``.
"""

from __future__ import annotations

import os
import sys

from lightning_score.cli import main
from lightning_score.study.data import FoldData

real_predict_dataloader = FoldData.predict_dataloader


def failing_on_rank_one(self: FoldData) -> object:
    if self.rank == 1:
        raise RuntimeError(f"injected failure on rank 1 (pid {os.getpid()}) while predicting {self.target}")
    return real_predict_dataloader(self)


FoldData.predict_dataloader = failing_on_rank_one  # type: ignore[method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])
