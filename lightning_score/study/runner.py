"""Run a leave-one-domain-out study: for every seed, one expert per domain, then every row on every target.

Everything goes through the same pieces a user calls by hand: :class:`~lightning_score.CLIPExpert` with
:class:`~lightning_score.ScoreMergeCallback` under ``Trainer.fit`` (:mod:`.fitting`), and
:class:`~lightning_score.MergeModule` under ``Trainer.predict`` (:mod:`.evaluation`). Each finished fit (a
task vector) and each finished evaluation (a JSON file with per-image correctness) is kept with the
configuration that produced it; a rerun reuses what matches and refuses what does not, so an interrupted
study continues where it stopped and never mixes results of different settings. The whole configuration is
checked (:mod:`.checks`) before any of this starts.
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
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lightning_score.atomic import atomic_write_text
from lightning_score.data import DomainDataModule
from lightning_score.merging import get_method
from lightning_score.models import build_clip
from lightning_score.study.checks import check_study
from lightning_score.study.config import Entry, ExpertSettings, Row, config_digest, table_entries
from lightning_score.study.data import EvaluationImages, FoldData
from lightning_score.study.evaluation import evaluate_row, merge_module
from lightning_score.study.fitting import QUIET_TRAINER, fit_task_vector
from lightning_score.task_vector import TaskVector, state_dict_fingerprint

__all__ = ["Study"]

log = logging.getLogger(__name__)


def _json(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), so stored and fresh configs compare equal."""
    return json.loads(json.dumps(value, default=str))


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
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
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # a redone fit's old curve
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
        seeds: Sequence[int],
        alpha_tuning: bool,
        alpha_search: str,
        alpha_images: int | None,
        bootstrap: int,
        restart: bool,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.model_name, self.pretrained, self.templates, self.root = model_name, pretrained, templates, root
        self.expert, self.rows = expert, list(rows)
        self.accelerator, self.devices = accelerator, devices
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
        self.split_seed, self.val_fraction, self.proxy_images = split_seed, val_fraction, proxy_images
        self.seeds = list(seeds)
        self.alpha_tuning, self.alpha_search, self.alpha_images = alpha_tuning, alpha_search, alpha_images
        self.bootstrap, self.restart = bootstrap, restart
        self.domains_arg, self.targets_arg = domains, targets
        self.console = Console(stderr=False)
        with quiet_lightning():
            self.domains, self.targets, self.classnames, self.default_templates = check_study(self)
            try:
                self.eval_trainer = L.Trainer(
                    accelerator=accelerator,
                    devices=1,
                    precision=expert.precision,  # one precision for fits and evaluations (the merge recipes' too)
                    logger=False,
                    **QUIET_TRAINER,
                )
            except Exception as error:  # Lightning's MisconfigurationException is not a ValueError
                raise ValueError(
                    f"accelerator={accelerator!r} with expert.precision={expert.precision!r}: {error}"
                ) from error
        self.entries: list[Entry] = table_entries(self.rows, alpha_tuning)
        self.base_fingerprint: str | None = None
        self.fit_configs: dict[str, dict[str, Any]] = {}
        self.records: list[dict[str, Any]] = []

    # --- paths and data ----------------------------------------------------------------------------

    def task_vector_path(self, domain: str, seed: int | None = None) -> Path:
        """Where the expert of ``domain`` for ``seed`` (default: the first seed) is kept."""
        seed = self.seeds[0] if seed is None else seed
        return self.output_dir / "task_vectors" / f"seed-{seed}" / f"{domain}.safetensors"

    def pooled_path(self, target: str, seed: int) -> Path:
        """Where the pooled multi-source model of ``target``'s fold for ``seed`` is kept."""
        return self.output_dir / "task_vectors" / f"seed-{seed}" / "pooled" / f"{target}.safetensors"

    def result_path(self, seed: int, target: str, entry: Entry) -> Path:
        """Where the evaluation of ``entry`` on ``target`` for ``seed`` is kept."""
        return self.output_dir / "results" / f"seed-{seed}" / target / f"{entry.key}.json"

    def _data(self, train: list[str], test: list[str], batch_size: int, transform: Any = None) -> DomainDataModule:
        return DomainDataModule(
            self.root,
            train_domains=train,
            test_domains=test or None,
            batch_size=batch_size,
            eval_batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
            val_fraction=self.val_fraction,
            split_seed=self.split_seed,
            train_transform=transform,
            val_transform=transform,
        )

    # --- the steps ---------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Prepare the base, then per seed fit the experts and evaluate every row on every target."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.output_dir / "study.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        started = time.perf_counter()
        pooled = any(row.mode == "pooled" for row in self.rows)
        per_seed = len(self.domains) + len(self.targets) * (len(self.rows) + pooled)
        try:
            with quiet_lightning(), self._progress() as progress:
                self._task = progress.add_task("preparing the pre-trained base", total=len(self.seeds) * per_seed)
                self._progress_bar = progress
                transform = self._prepare_base()
                images = EvaluationImages(
                    lambda train, test: self._data(train, test, self.eval_batch_size, transform),
                    batch_size=self.eval_batch_size,
                    num_workers=self.num_workers,
                )
                self.images = images
                self.records = []
                for seed in self.seeds:
                    experts = {domain: self._fit_expert(domain, seed) for domain in self.domains}
                    for target in self.targets:
                        fold = self._fold(images, target)
                        pooled_path = self._fit_pooled(target, seed) if pooled else None
                        for row in self.rows:
                            self.records += self._evaluate(seed, target, row, experts, pooled_path, fold)
        finally:
            log.removeHandler(handler)
            handler.close()
        self._say(f"study finished in {time.perf_counter() - started:.0f} s: {len(self.records)} evaluations")
        return self.records

    def _fold(self, images: EvaluationImages, target: str) -> FoldData:
        sources = [d for d in self.domains if d != target]
        return FoldData(
            images,
            sources,
            target,
            classnames=self.classnames,
            domains=self.domains,
            default_templates=self.default_templates,
            batch_size=self.eval_batch_size,
            alpha_images=self.alpha_images,
            proxy_data=lambda: self._data(sources, [target], self.eval_batch_size, self._transform),
        )

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

    def _prepare_base(self) -> Any:
        components = build_clip(self.model_name, self.pretrained)  # builds and caches the offline base once
        self.base_fingerprint = state_dict_fingerprint(components.model.visual.state_dict())
        self._transform = components.val_transform
        self._say(f"base: {components.base_model} (image encoder {self.base_fingerprint[:20]}…)")
        return components.val_transform

    def _fit_config(self, kind: str, train_domains: list[str], seed: int) -> dict[str, Any]:
        return _json(
            {
                "kind": kind,
                "model_name": self.model_name,
                "base_fingerprint": self.base_fingerprint,
                "templates": self.templates,
                "root": self.root,
                "split_seed": self.split_seed,
                "val_fraction": self.val_fraction,
                "train_domains": train_domains,
                "expert": asdict(self.expert),
                "seed": seed,
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

    def _fit(self, path: Path, kind: str, name: str, domain: str | None, train: list[str], seed: int) -> Path:
        config = self._fit_config(kind, train, seed)
        self.fit_configs[str(path)] = config
        stored = TaskVector.load(path).metadata.get("expert_config") if path.exists() else None
        label = f"{name} (seed {seed})"
        if self._reusable(path, stored, config):
            self._advance(f"{label}: reused")
            self._say(f"{label}: reused {path}")
            return path
        self._progress_bar.update(self._task, description=f"fine-tuning {label}")
        result = fit_task_vector(
            path=path,
            name=name,
            domain=domain,
            train_domains=train,
            make_data=lambda domains, batch_size: self._data(domains, domains, batch_size),
            model_name=self.model_name,
            pretrained=self.pretrained,
            templates=self.templates,
            settings=self.expert,
            seed=seed,
            config=config,
            accelerator=self.accelerator,
            log_dir=self.output_dir / "logs" / f"seed-{seed}",
        )
        self._advance(f"{label}: done")
        self._say(f"{label}: fine-tuned on {train} in {result['seconds']:.1f} s ({result['steps']} steps)")
        return path

    def _fit_expert(self, domain: str, seed: int) -> Path:
        return self._fit(self.task_vector_path(domain, seed), "expert", domain, domain, [domain], seed)

    def _fit_pooled(self, target: str, seed: int) -> Path:
        sources = [d for d in self.domains if d != target]
        return self._fit(self.pooled_path(target, seed), "pooled", f"pooled-{target}", None, sources, seed)

    def _evaluation_config(self, entry: Entry, seed: int, target: str, used: list[Path]) -> dict[str, Any]:
        row = entry.row
        config: dict[str, Any] = {
            "kind": "evaluation",
            "row": asdict(row),
            "tuned": entry.tuned,
            "seed": seed,
            "target": target,
            "sources": [d for d in self.domains if d != target],
            "fits": {p.name: config_digest(self.fit_configs[str(p)]) for p in used},
            "model_name": self.model_name,
            "base_fingerprint": self.base_fingerprint,
            "templates": self.templates,
            "root": self.root,
            "split_seed": self.split_seed,
            "val_fraction": self.val_fraction,
            "precision": self.expert.precision,
        }
        if row.mode == "merge" and get_method(row.method).needs_data:
            config["proxy_images"] = self.proxy_images
        if entry.tuned or row.alpha == "auto":
            config["alpha_search"] = {"search": self.alpha_search, "images_per_source": self.alpha_images}
        return _json(config)

    def _evaluate(
        self, seed: int, target: str, row: Row, experts: dict[str, Path], pooled: Path | None, fold: FoldData
    ) -> list[dict[str, Any]]:
        used = {
            "merge": [experts[d] for d in fold.sources],
            "ensemble": [experts[d] for d in fold.sources],
            "expert": [experts[target]],
            "pooled": [pooled],
            "zeroshot": [],
        }[row.mode]
        entries = [e for e in self.entries if e.row is row]
        configs = {e.key: self._evaluation_config(e, seed, target, used) for e in entries}
        kept: dict[str, dict[str, Any]] = {}
        for entry in entries:
            path = self.result_path(seed, target, entry)
            stored = json.loads(path.read_text()).get("config") if path.exists() else None
            if self._reusable(path, stored, configs[entry.key]):
                kept[entry.key] = json.loads(path.read_text())["record"]
        missing = [e for e in entries if e.key not in kept]
        if missing:
            self._progress_bar.update(self._task, description=f"{row.name} on {target} (seed {seed})")
            module = merge_module(
                row,
                [str(p) for p in used],
                model_name=self.model_name,
                pretrained=self.pretrained,
                templates=self.templates,
                proxy_images=self.proxy_images,
                alpha_search=self.alpha_search,
                seed=seed,
            )
            fresh = evaluate_row(self.eval_trainer, module, fold, missing)
            for entry in missing:
                trained_on = {"expert": [target], "zeroshot": []}.get(row.mode, fold.sources)
                record = {**fresh[entry.key], "seed": seed, "target": target, "sources": trained_on}
                atomic_write_text(
                    self.result_path(seed, target, entry),
                    json.dumps({"config": configs[entry.key], "record": record}, indent=2),
                )
                kept[entry.key] = record
        self._advance(f"{row.name} on {target} (seed {seed}): {'done' if missing else 'reused'}")
        accuracies = ", ".join(f"{kept[e.key]['acc']:.3f}" + (" (α tuned)" if e.tuned else "") for e in entries)
        self._say(f"{row.name} on {target} (seed {seed}): accuracy {accuracies}{'' if missing else ' (reused)'}")
        return [kept[e.key] for e in entries]
