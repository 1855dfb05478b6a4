"""The main job: one command runs the whole leave-one-domain-out study of the SCORE paper and reports it.

``lightning-score study --config recipes/digits/study.yaml`` (offline, about 10 minutes on 2 CPU cores)
or ``recipes/pacs/vit_b32_study.yaml`` and friends for real data. See ``docs/study.md``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from lightning_score.atomic import atomic_write_text
from lightning_score.study.config import DEFAULT_ROWS, ExpertSettings, Row
from lightning_score.study.report import markdown_table, write_report
from lightning_score.study.runner import Study

__all__ = ["DEFAULT_ROWS", "ExpertSettings", "Row", "Study", "markdown_table", "run_study", "write_report"]

log = logging.getLogger(__name__)


def run_study(
    output_dir: str = "runs/digits-study",
    model_name: str = "tiny-ViT-W96-L3",
    pretrained: str | None = "builtin:digits",
    templates: str = "digits",
    root: str = "builtin:digits",
    domains: list[str] | None = None,
    targets: list[str] | None = None,
    expert: ExpertSettings = ExpertSettings(lr=1e-4, warmup_steps=15, max_steps=150, max_epochs=None, batch_size=64),  # noqa: B008
    rows: list[Row] | None = None,
    accelerator: str = "auto",
    devices: int = 1,
    eval_batch_size: int = 256,
    num_workers: int = 0,
    split_seed: int = 17,
    val_fraction: float = 0.1,
    proxy_images: int = 32,
    seed: int = 0,
    restart: bool = False,
) -> list[dict[str, Any]]:
    """Run the leave-one-domain-out study: fit one expert per domain, merge the others' for every target.

    For every target domain, the experts of the other domains are merged by every method row and tested on
    the target's held-out split, next to the reference rows (zero-shot, logit ensemble, the target's own
    expert). Writes to ``output_dir``: ``task_vectors/``, ``results/`` (one JSON per row and target),
    ``results.csv``, ``results.json``, ``results.md`` (the paper-style table), ``accuracy.png``, ``sar.png``,
    ``study.yaml`` (the resolved config) and ``study.log``. Rerunning continues where it stopped.

    Args:
        output_dir: The study folder.
        model_name: open_clip architecture of the pre-trained model.
        pretrained: Its weights: ``builtin:digits`` (the offline base), an open_clip tag such as ``openai``,
            or a local weights file.
        templates: Prompt-template set of the zero-shot head (``digits``, ``pacs``, ``imagenet``, ``auto``...).
        root: The data: a DomainBed-layout folder ``ROOT/<domain>/<class>/<image>`` or ``builtin:digits``.
        domains: The domains of the study; default every domain of ``root``.
        targets: The held-out targets to evaluate; default every domain.
        expert: How experts are fine-tuned (learning rate, steps or epochs, batch size, precision...).
        rows: The table's rows; default SCORE, its ablations, TSV-M, Iso-C, Iso-CTS, TIES, MagMax, PCB, Task
            Arithmetic, averaging, ESM, zero-shot, the logit ensemble and the target's own expert.
        accelerator: Lightning accelerator (``auto``: the GPU when there is one).
        devices: Devices per fit and test; the study runs on one (see docs/cluster.md for several GPUs).
        eval_batch_size: Batch size of the test loops.
        num_workers: Data-loading worker processes.
        split_seed: Seed of each domain's 80/20 train/test split (17 in the SCORE paper).
        val_fraction: Part of the training split held out for validation (and for ``alpha: auto``).
        proxy_images: Unlabelled images per source domain for ESM.
        seed: Seed of every expert's fine-tuning.
        restart: Redo kept experts and results whose settings differ from these (default: refuse them).

    Returns:
        One record per row and target (method, target, acc, balanced_acc, merge_seconds, peak_memory_mb...).
    """
    settings = dict(locals())  # the arguments, exactly as given
    settings["rows"] = list(rows) if rows is not None else list(DEFAULT_ROWS)
    study = Study(**settings)
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    resolved = {**settings, "domains": study.domains, "targets": study.targets, "expert": asdict(expert),
                "rows": [asdict(row) for row in study.rows]}  # fmt: skip
    resolved.pop("restart")
    atomic_write_text(folder / "study.yaml", yaml.safe_dump(resolved, sort_keys=False))
    records = study.run()
    experts = {domain: study.task_vector_path(domain) for domain in study.domains}
    device = "cuda" if accelerator in ("auto", "gpu", "cuda") and _cuda() else "cpu"
    written = write_report(records, study.rows, study.targets, folder, experts=experts, device=device)
    study.console.print((folder / "results.md").read_text(), markup=False, highlight=False, soft_wrap=True)
    study.console.print("Wrote " + ", ".join(str(p) for p in written.values()), highlight=False, soft_wrap=True)
    return records


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
