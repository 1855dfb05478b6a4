"""A test-only callback for the signal tests: says (by a file) that training has started, then slows it down.

The test waits for the marker file before sending its signal, so the signal comes mid-training.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class Started(Callback):
    """Write ``path`` once ``after_steps`` optimiser steps are done; sleep ``delay`` seconds after every batch.

    Args:
        path: The marker file.
        after_steps: Steps before the marker is written.
        delay: Seconds of sleep per batch (the time window for the test's signal).
    """

    def __init__(self, path: str, after_steps: int = 3, delay: float = 0.25) -> None:
        self.path, self.after_steps, self.delay = Path(path), after_steps, delay

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        """Mark (once) and slow down."""
        if trainer.global_step >= self.after_steps and not self.path.exists():
            self.path.write_text(str(trainer.global_step))
        time.sleep(self.delay)
