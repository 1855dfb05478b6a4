"""Run a leave-one-domain-out study: for every seed, one expert per domain, then every row on every target.

Everything goes through the same pieces a user calls by hand: :class:`~lightning_score.CLIPExpert` with
:class:`~lightning_score.ScoreMergeCallback` under ``Trainer.fit`` (:mod:`.fitting`), and
:class:`~lightning_score.MergeModule` under ``Trainer.predict`` (:mod:`.evaluation`). Each finished fit (a
task vector) and each finished evaluation (a JSON file with per-image correctness) is kept with the
configuration that produced it; a rerun reuses what matches and refuses what does not, so an interrupted
study continues where it stopped and never mixes results of different settings. The whole configuration is
checked (:mod:`.checks`) before any of this starts.

A study can run on several devices and nodes (:mod:`.distributed`: every rank walks the same steps, rank zero
decides and writes) and in cluster stages (:mod:`.stages`: ``--stage experts`` per SLURM array task, then
``--stage evaluate``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lightning_score.data import DomainDataModule
from lightning_score.merging import FactorCache, get_method
from lightning_score.models import build_clip
from lightning_score.study.checks import check_study
from lightning_score.study.config import Entry, ExpertSettings, Row, config_digest, table_entries
from lightning_score.study.data import EvaluationImages, FoldData
from lightning_score.study.dataset import resolve_dataset
from lightning_score.study.distributed import World
from lightning_score.study.evaluation import evaluate_row, merge_module
from lightning_score.study.fitting import QUIET_TRAINER, fit_task_vector, quiet_lightning
from lightning_score.study.stages import Fit, planned_fits, require_fits
from lightning_score.task_vector import TaskVector, state_dict_fingerprint
from lightning_score.utilities.files import atomic_write_text

__all__ = ["Study"]

log = logging.getLogger(__name__)


def _json(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), so stored and fresh configs compare equal."""
    return json.loads(json.dumps(value, default=str))


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
        expert: ExpertSettings | None,
        rows: Sequence[Row] | None,
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
        dataset: str = "auto",
        num_nodes: int = 1,
        stage: str = "all",
        stage_domains: Sequence[str] | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.templates, self.root = templates, root
        self.expert, self.rows = expert, rows  # resolved from the dataset's preset below
        self.accelerator, self.devices, self.num_nodes = accelerator, devices, num_nodes
        self.stage, self.stage_domains = stage, stage_domains
        self.eval_batch_size, self.num_workers = eval_batch_size, num_workers
        self.split_seed, self.val_fraction, self.proxy_images = split_seed, val_fraction, proxy_images
        self.seeds = list(seeds)
        self.alpha_tuning, self.alpha_search, self.alpha_images = alpha_tuning, alpha_search, alpha_images
        self.bootstrap, self.restart = bootstrap, restart
        self.domains_arg, self.targets_arg = domains, targets
        self.console = Console(stderr=False)
        with quiet_lightning():
            choice = resolve_dataset(  # the preset (and the paper's backbone) fill auto/unset values
                root, dataset, templates, expert, rows, model_name=model_name, pretrained=pretrained
            )
            self.model_name, self.pretrained = choice.model_name, choice.pretrained
            self.dataset, self.preset, self.layout = choice.dataset, choice.preset, choice.layout
            self.templates, self.expert, self.rows = choice.templates, choice.expert, choice.rows
            self.dataset_choice = choice  # its describe(): one line saying what the preset decided
            self.domains, self.targets, self.classnames, self.default_templates = check_study(self)
            pooled = any(row.mode == "pooled" for row in self.rows)
            self.fits = planned_fits(stage, self.seeds, self.domains, self.targets, pooled, stage_domains)
            if stage == "evaluate":
                missing = [(self.fit_path(f), f) for f in self.fits if not self.fit_path(f).exists()]
                require_fits([p for p, _ in missing], [f for _, f in missing])
            distributed = devices * num_nodes > 1
            try:
                self.eval_trainer = L.Trainer(
                    accelerator=accelerator,
                    devices=devices,
                    num_nodes=num_nodes,
                    strategy="ddp" if distributed else "auto",
                    use_distributed_sampler=False,  # each rank predicts its own whole batches (FoldData), no padding
                    precision=self.expert.precision,  # one precision for fits and evaluations (the merge recipes' too)
                    logger=False,
                    **QUIET_TRAINER,
                )
            except Exception as error:  # Lightning's MisconfigurationException is not a ValueError
                raise ValueError(
                    f"accelerator={accelerator!r}, devices={devices}, num_nodes={num_nodes} with "
                    f"expert.precision={self.expert.precision!r}: {error}"
                ) from error
            #: The study's processes: Lightning's launcher starts ranks 1… here (they re-run the command).
            self.world = World.start(accelerator, devices, num_nodes)
            self.console.quiet = not self.world.is_zero
        self.entries: list[Entry] = table_entries(self.rows, alpha_tuning)
        self.base_fingerprint: str | None = None
        self.fit_configs: dict[str, dict[str, Any]] = {}
        self.records: list[dict[str, Any]] = []
        self.factors: FactorCache | None = None  #: The current seed's experts' SVDs, shared by its merges.

    # --- paths and data ----------------------------------------------------------------------------

    def task_vector_path(self, domain: str, seed: int | None = None) -> Path:
        """Where the expert of ``domain`` for ``seed`` (default: the first seed) is kept."""
        seed = self.seeds[0] if seed is None else seed
        return self.output_dir / "task_vectors" / f"seed-{seed}" / f"{domain}.safetensors"

    def pooled_path(self, target: str, seed: int) -> Path:
        """Where the pooled multi-source model of ``target``'s fold for ``seed`` is kept."""
        return self.output_dir / "task_vectors" / f"seed-{seed}" / "pooled" / f"{target}.safetensors"

    def fit_path(self, fit: Fit) -> Path:
        """Where a planned fit's task vector is kept."""
        if fit.kind == "expert":
            return self.task_vector_path(fit.domain, fit.seed)
        return self.pooled_path(fit.domain, fit.seed)

    def lock_path(self, path: Path) -> Path:
        """The inter-process lock guarding the making of ``path`` (under ``<output_dir>/.locks``)."""
        return self.output_dir / ".locks" / path.relative_to(self.output_dir).with_suffix(".lock")

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
            preset=self.dataset,
            train_transform=transform,
            val_transform=transform,
        )

    # --- the steps ---------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Prepare the base, then per seed fit the experts and evaluate every row on every target.

        ``--stage experts`` makes only its planned fits (:mod:`.stages`) and returns no records.
        """
        self.world.on_zero(lambda: self.output_dir.mkdir(parents=True, exist_ok=True))
        handler = logging.FileHandler(self.output_dir / "study.log") if self.world.is_zero else logging.NullHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        started = time.perf_counter()
        pooled = any(row.mode == "pooled" for row in self.rows)
        per_seed = len(self.domains) + len(self.targets) * (len(self.rows) + pooled)
        total = len(self.fits) if self.stage == "experts" else len(self.seeds) * per_seed
        self.records = []
        try:
            with quiet_lightning(), self._progress() as progress:
                self._task = progress.add_task("preparing the pre-trained base", total=total)
                self._progress_bar = progress
                transform = self._prepare_base()
                if self.stage == "experts":
                    for fit in self.fits:
                        self._make(fit)
                    self._say(f"--stage experts: {len(self.fits)} fit(s) ready in {self.output_dir / 'task_vectors'}"
                              f"; when every expert is, run --stage evaluate.")  # fmt: skip
                    return self.records
                self._evaluate_all(transform)
        except BaseException:
            self.world.stop_others()  # ranks waiting in a collective for this one would never return
            raise
        finally:
            log.removeHandler(handler)
            handler.close()
        self._say(f"study finished in {time.perf_counter() - started:.0f} s: {len(self.records)} evaluations")
        return self.records

    def _evaluate_all(self, transform: Any) -> None:
        """Per seed: every expert, then per target its pooled model and every row."""
        pooled = any(row.mode == "pooled" for row in self.rows)
        self.images = EvaluationImages(
            lambda train, test: self._data(train, test, self.eval_batch_size, transform),
            batch_size=self.eval_batch_size,
            num_workers=self.num_workers,
        )
        for seed in self.seeds:
            experts = {domain: self._make(Fit("expert", seed, domain)) for domain in self.domains}
            # each expert's SVDs, once per seed for every SVD-based row of every target (merges of N - 1 experts)
            self.factors = FactorCache(min_tasks=max(1, len(self.domains) - 1))
            for target in self.targets:
                fold = self._fold(self.images, target)
                pooled_path = self._make(Fit("pooled", seed, target)) if pooled else None
                for row in self.rows:
                    self.records += self._evaluate(seed, target, row, experts, pooled_path, fold)
            stats, self.factors = self.factors.stats, None  # the next seed has other experts: free these
            if stats["svd_computed"]:
                self._say(f"seed {seed}: the experts' SVDs (expert × matrix key) were computed {stats['svd_computed']} "
                          f"times and reused {stats['svd_from_memory']} times across rows and targets"
                          f"{' on this rank' if self.world.size > 1 else ''}")  # fmt: skip

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
            rank=self.world.rank,
            world_size=self.world.size,
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

    def _reusable(self, path: Path, stored: dict[str, Any] | None, wanted: dict[str, Any], redo: bool = True) -> bool:
        """Whether a kept artifact matches ``wanted``; a mismatch is an error unless ``restart`` (and ``redo``)."""
        if not path.exists():
            return False
        if stored == wanted:
            return True
        if self.restart and redo:
            path.unlink()
            return False
        differing = sorted(k for k in set(wanted) | set(stored or {}) if (stored or {}).get(k) != wanted.get(k))
        fix = ("refit it with --stage experts --restart true (--stage evaluate fits nothing)" if not redo else
               "Pass --restart true to redo what no longer matches, or choose another --output_dir")  # fmt: skip
        raise ValueError(f"'{path}' was made with different settings ({', '.join(differing)} differ) than this study: "
                         f"{fix}.")  # fmt: skip

    def _kept_fit(self, path: Path, config: dict[str, Any]) -> bool:
        """Rank zero's decision: is the fit at ``path`` kept and made with ``config``?"""
        stored = TaskVector.load(path).metadata.get("expert_config") if path.exists() else None
        return self._reusable(path, stored, config, redo=self.stage != "evaluate")

    def _make(self, fit: Fit) -> Path:
        """Reuse the fit's kept task vector (made with these settings) or fine-tune it; one decision for all ranks."""
        path, expert = self.fit_path(fit), fit.kind == "expert"
        train = [fit.domain] if expert else [d for d in self.domains if d != fit.domain]
        name = fit.domain if expert else f"pooled-{fit.domain}"
        config = self.fit_configs[str(path)] = self._fit_config(fit.kind, train, fit.seed)
        label = f"{name} (seed {fit.seed})"
        with self.world.lock(self.lock_path(path), str(path), self._say):  # another job may be making it
            if self.world.on_zero(lambda: self._kept_fit(path, config)):
                self._advance(f"{label}: reused")
                self._say(f"{label}: reused {path}")
                return path
            if self.stage == "evaluate":  # checked at the start: a file removed since
                require_fits([path], [fit])
            self._progress_bar.update(self._task, description=f"fine-tuning {label}")
            result = fit_task_vector(
                path=path,
                name=name,
                domain=fit.domain if expert else None,
                train_domains=train,
                make_data=lambda domains, batch_size: self._data(domains, domains, batch_size),
                model_name=self.model_name,
                pretrained=self.pretrained,
                templates=self.templates,
                settings=self.expert,
                seed=fit.seed,
                config=config,
                accelerator=self.accelerator,
                log_dir=self.output_dir / "logs" / f"seed-{fit.seed}",
                devices=self.devices,
                num_nodes=self.num_nodes,
            )
        self._advance(f"{label}: done")
        self._say(f"{label}: fine-tuned on {train} in {result['seconds']:.1f} s ({result['steps']} steps)")
        return path

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
        """The row's kept results (rank zero reads them, for every rank), else evaluate it and keep them."""
        used = {
            "merge": [experts[d] for d in fold.sources],
            "ensemble": [experts[d] for d in fold.sources],
            "expert": [experts[target]],
            "pooled": [pooled],
            "zeroshot": [],
        }[row.mode]
        entries = [e for e in self.entries if e.row is row]
        configs = {e.key: self._evaluation_config(e, seed, target, used) for e in entries}
        lock = self.lock_path(self.result_path(seed, target, entries[0]))  # one per row: its entries come together
        with self.world.lock(lock, f"the results of {row.name} on {target} (seed {seed})", self._say):
            kept = self.world.on_zero(lambda: self._kept_results(seed, target, entries, configs))
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
                    factors=self.factors,
                )
                fresh = evaluate_row(self.eval_trainer, module, fold, missing, self.world)  # the same on every rank
                for entry in missing:
                    trained_on = {"expert": [target], "zeroshot": []}.get(row.mode, fold.sources)
                    kept[entry.key] = {**fresh[entry.key], "seed": seed, "target": target, "sources": trained_on}
                    path = self.result_path(seed, target, entry)
                    text = json.dumps({"config": configs[entry.key], "record": kept[entry.key]}, indent=2)
                    self.world.on_zero(lambda path=path, text=text: atomic_write_text(path, text))
        self._advance(f"{row.name} on {target} (seed {seed}): {'done' if missing else 'reused'}")
        accuracies = ", ".join(f"{kept[e.key]['acc']:.3f}" + (" (α tuned)" if e.tuned else "") for e in entries)
        self._say(f"{row.name} on {target} (seed {seed}): accuracy {accuracies}{'' if missing else ' (reused)'}")
        return [kept[e.key] for e in entries]

    def _kept_results(
        self, seed: int, target: str, entries: list[Entry], configs: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """Rank zero's decision: the kept results (of these settings) of the row's entries, by entry key."""
        kept = {}
        for entry in entries:
            path = self.result_path(seed, target, entry)
            stored = json.loads(path.read_text()).get("config") if path.exists() else None
            if self._reusable(path, stored, configs[entry.key]):
                kept[entry.key] = json.loads(path.read_text())["record"]
        return kept
