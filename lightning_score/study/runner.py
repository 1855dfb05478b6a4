"""Run a leave-one-domain-out study: the base, one expert per domain, every row for every target domain.

Everything goes through the same pieces a user calls by hand: :class:`~lightning_score.CLIPExpert` with
:class:`~lightning_score.ScoreMergeCallback` under ``Trainer.fit``, and :class:`~lightning_score.MergeModule`
under ``Trainer.test``. Each finished expert (a task vector) and each finished evaluation (a JSON file) is
kept with the configuration that produced it; a rerun reuses what matches and refuses what does not, so
an interrupted study continues where it stopped and never mixes results of different settings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lightning_score.atomic import atomic_write_text
from lightning_score.callback import ScoreMergeCallback
from lightning_score.data import DomainDataModule
from lightning_score.expert import CLIPExpert
from lightning_score.merge_module import MergeModule
from lightning_score.models import build_clip
from lightning_score.study.config import ExpertSettings, Row, config_digest, slug
from lightning_score.task_vector import TaskVector, state_dict_fingerprint

__all__ = ["Study"]

log = logging.getLogger(__name__)

_QUIET_TRAINER = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}


def _json(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), so stored and fresh configs compare equal."""
    return json.loads(json.dumps(value, default=str))


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2))


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Keep Lightning's per-run chatter (devices, seeds, tips) out of the study's own progress output."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning_score")
    previous = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
            warnings.filterwarnings("ignore", message=".*never reaches its peak.*")
            yield
    finally:
        for name, level in previous.items():
            logging.getLogger(name).setLevel(level)


class Study:
    """One leave-one-domain-out study (see :func:`lightning_score.study.run_study` for the arguments)."""

    def __init__(
        self,
        output_dir: str | Path,
        model_name: str,
        pretrained: str | None,
        templates: str,
        root: str,
        domains: Sequence[str] | None,
        targets: Sequence[str] | None,
        expert: ExpertSettings,
        rows: Sequence[Row],
        accelerator: str,
        devices: int,
        eval_batch_size: int,
        num_workers: int,
        split_seed: int,
        val_fraction: float,
        proxy_images: int,
        seed: int,
        restart: bool,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.model_name, self.pretrained, self.templates, self.root = model_name, pretrained, templates, root
        self.expert, self.rows = expert, list(rows)
        self.accelerator, self.devices = accelerator, devices
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
        self.split_seed, self.val_fraction, self.proxy_images = split_seed, val_fraction, proxy_images
        self.seed, self.restart = seed, restart
        self.console = Console(stderr=False)
        if not self.rows:
            raise ValueError("The study has no rows: give at least one method or reference row.")
        if devices != 1:
            raise ValueError(
                f"devices={devices}: the study runs every fit and test on one device. For several GPUs, fit experts "
                "in parallel (recipes/multi_gpu/experts_in_parallel.sh) or with DDP (recipes/multi_gpu/ddp_fit.yaml) "
                "and merge per target (recipes/<dataset>/vit_b32_merge.yaml)."
            )
        names = [row.name for row in self.rows]
        if len(set(map(slug, names))) != len(names):
            raise ValueError(f"Row names must be distinct (after slugging): {names}.")
        self.domains = self._check_domains(domains, "domains", DomainDataModule(root, num_workers=0).domains)
        self.targets = self._check_domains(targets, "targets", self.domains)
        if len(self.domains) < 2:
            raise ValueError(f"A leave-one-domain-out study needs at least 2 domains; got {self.domains}.")
        self.base_fingerprint: str | None = None
        self.expert_configs: dict[str, dict[str, Any]] = {}

    @staticmethod
    def _check_domains(given: Sequence[str] | None, what: str, available: Sequence[str]) -> list[str]:
        if given is None:
            return list(available)
        unknown = [d for d in given if d not in available]
        if unknown:
            raise ValueError(f"{what} {unknown} are not domains of the data; its domains are {list(available)}.")
        return list(given)

    # --- paths and data ----------------------------------------------------------------------------

    def task_vector_path(self, domain: str) -> Path:
        """Where the expert of ``domain`` is kept."""
        return self.output_dir / "task_vectors" / f"{domain}.safetensors"

    def result_path(self, target: str, row: Row) -> Path:
        """Where the evaluation of ``row`` on ``target`` is kept."""
        return self.output_dir / "results" / target / f"{slug(row.name)}.json"

    def _data(self, train_domains: Sequence[str], test_domains: Sequence[str], batch_size: int) -> DomainDataModule:
        return DomainDataModule(
            self.root,
            train_domains=list(train_domains),
            test_domains=list(test_domains),
            batch_size=batch_size,
            eval_batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            val_fraction=self.val_fraction,
            split_seed=self.split_seed,
        )

    # --- the steps ---------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Prepare the base, fit the experts, evaluate every row on every target; return the records."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.output_dir / "study.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        started = time.perf_counter()
        try:
            with _quiet_lightning(), self._progress() as progress:
                total = len(self.domains) + len(self.targets) * len(self.rows)
                self._task = progress.add_task("preparing the pre-trained base", total=total)
                self._progress_bar = progress
                self._prepare_base()
                experts = {domain: self._expert(domain) for domain in self.domains}
                records = [self._evaluate(target, row, experts) for target in self.targets for row in self.rows]
        finally:
            log.removeHandler(handler)
            handler.close()
        self._say(f"study finished in {time.perf_counter() - started:.0f} s: {len(records)} evaluations")
        return records

    @contextlib.contextmanager
    def _progress(self) -> Iterator[Progress]:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            yield progress

    def _say(self, message: str) -> None:
        """One line per finished step: on the console (above the progress bar) and in study.log."""
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)
        for handler in log.handlers:
            handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None))

    def _advance(self, description: str) -> None:
        self._progress_bar.update(self._task, advance=1, description=description)

    def _prepare_base(self) -> None:
        components = build_clip(self.model_name, self.pretrained)  # builds and caches the offline base once
        self.base_fingerprint = state_dict_fingerprint(components.model.visual.state_dict())
        self._say(f"base: {components.base_model} (image encoder {self.base_fingerprint[:20]}…)")

    def _expert_config(self, domain: str) -> dict[str, Any]:
        return _json(
            {
                "kind": "expert",
                "model_name": self.model_name,
                "base_fingerprint": self.base_fingerprint,
                "templates": self.templates,
                "root": self.root,
                "split_seed": self.split_seed,
                "val_fraction": self.val_fraction,
                "domain": domain,
                "expert": asdict(self.expert),
                "seed": self.seed,
            }
        )

    def _reusable(self, path: Path, stored: dict[str, Any] | None, wanted: dict[str, Any]) -> bool:
        """Whether a kept artifact matches ``wanted``; a mismatch is an error unless ``restart``."""
        if not path.exists():
            return False
        if stored == wanted:
            return True
        if self.restart:
            path.unlink()
            return False
        differing = sorted(k for k in set(wanted) | set(stored or {}) if (stored or {}).get(k) != wanted.get(k))
        raise ValueError(
            f"'{path}' was made with different settings ({', '.join(differing)} differ) than this study. Pass "
            "--restart true to redo what no longer matches, or choose another --output_dir."
        )

    def _expert(self, domain: str) -> Path:
        path = self.task_vector_path(domain)
        config = self._expert_config(domain)
        self.expert_configs[domain] = config
        stored = TaskVector.load(path).metadata.get("expert_config") if path.exists() else None
        if self._reusable(path, stored, config):
            self._advance(f"expert {domain}: reused")
            self._say(f"expert {domain}: reused {path}")
            return path
        self._progress_bar.update(self._task, description=f"fitting the expert of {domain}")
        L.seed_everything(self.seed, verbose=False)
        module = CLIPExpert(
            self.model_name,
            self.pretrained,
            templates=self.templates,
            lr=self.expert.lr,
            weight_decay=self.expert.weight_decay,
            warmup_steps=self.expert.warmup_steps,
        )
        module.expert_config = config  # recorded in the task vector's metadata by the callback
        callback = ScoreMergeCallback(dirpath=path.parent, filename=path.name, name=domain, domain=domain)
        trainer = L.Trainer(
            accelerator=self.accelerator,
            devices=self.devices,
            precision=self.expert.precision,
            max_steps=self.expert.max_steps,
            max_epochs=self.expert.max_epochs if self.expert.max_steps < 0 else None,
            gradient_clip_val=self.expert.gradient_clip_val,
            num_sanity_val_steps=0,
            log_every_n_steps=5,
            callbacks=[callback],
            logger=CSVLogger(self.output_dir / "logs", name="experts", version=domain),
            default_root_dir=self.output_dir,
            **_QUIET_TRAINER,
        )
        started = time.perf_counter()
        trainer.fit(module, datamodule=self._data([domain], [domain], self.expert.batch_size))
        val = trainer.callback_metrics.get("val/acc")
        detail = f", validation accuracy {float(val):.3f}" if val is not None else ""
        self._advance(f"expert {domain}: done")
        seconds = time.perf_counter() - started
        self._say(f"expert {domain}: fine-tuned in {seconds:.1f} s ({trainer.global_step} steps{detail})")
        return path

    def _evaluation_config(self, target: str, row: Row, sources: list[str], used: list[str]) -> dict[str, Any]:
        return _json(
            {
                "kind": "evaluation",
                "row": asdict(row),
                "target": target,
                "sources": sources,
                "experts": {d: config_digest(self.expert_configs[d]) for d in used},
                "model_name": self.model_name,
                "base_fingerprint": self.base_fingerprint,
                "templates": self.templates,
                "root": self.root,
                "split_seed": self.split_seed,
                "proxy_images": self.proxy_images,
            }
        )

    def _evaluate(self, target: str, row: Row, experts: dict[str, Path]) -> dict[str, Any]:
        sources = [d for d in self.domains if d != target]
        used = {"merge": sources, "ensemble": sources, "expert": [target], "zeroshot": []}[row.mode]
        config = self._evaluation_config(target, row, sources, used)
        path = self.result_path(target, row)
        stored = json.loads(path.read_text()).get("config") if path.exists() else None
        if self._reusable(path, stored, config):
            record = json.loads(path.read_text())["record"]
            self._advance(f"{row.name} on {target}: reused")
            self._say(f"{row.name} on {target}: reused (accuracy {record['acc']:.3f})")
            return record
        self._progress_bar.update(self._task, description=f"{row.name} on {target}")
        module = MergeModule(
            self.model_name,
            self.pretrained,
            task_vectors=[str(experts[d]) for d in used],
            method=row.method,
            mode=row.mode,
            alpha=row.alpha,
            method_options=dict(row.options),
            proxy_images=self.proxy_images,
            templates=self.templates,
        )
        trainer = L.Trainer(accelerator=self.accelerator, devices=1, logger=False, **_QUIET_TRAINER)
        data = self._data(sources, [target], self.expert.batch_size)
        started = time.perf_counter()
        metrics = trainer.test(module, datamodule=data, verbose=False)[0]
        record = {
            "method": row.name,
            "mode": row.mode,
            "merge_method": row.method if row.mode == "merge" else None,
            "options": row.options,
            "target": target,
            "sources": used,
            "acc": float(metrics[f"test/{target}/acc"]),
            "balanced_acc": float(metrics[f"test/{target}/balanced_acc"]),
            "merge_seconds": module.merge_seconds,
            "peak_memory_mb": None if module.merge_peak_bytes is None else module.merge_peak_bytes / 2**20,
            "alpha": module.alpha_search["selected"] if module.alpha_search else row.alpha,
            "eval_seconds": time.perf_counter() - started,
        }
        _write_json(path, {"config": config, "record": record})
        self._advance(f"{row.name} on {target}: {record['acc']:.3f}")
        merge = f" (merged in {record['merge_seconds']:.1f} s)" if record["merge_seconds"] is not None else ""
        self._say(f"{row.name} on {target}: accuracy {record['acc']:.3f}, balanced {record['balanced_acc']:.3f}{merge}")
        return record
