"""Run a leave-one-domain-out study: for every seed, one expert per domain, then every row on every target.

Everything goes through the same pieces a user calls by hand: :class:`~lightning_score.CLIPExpert` with
:class:`~lightning_score.ScoreMergeCallback` under ``Trainer.fit`` (:mod:`.fitting`), and
:class:`~lightning_score.MergeModule` under ``Trainer.predict`` (:mod:`.evaluation`). Each finished fit (a
task vector) and each finished evaluation (a JSON file with per-image correctness) is kept with the
configuration that produced it (:mod:`.folder`); a rerun reuses what matches and refuses what does not, so an
interrupted study continues where it stopped and never mixes results of different settings. The configuration
(:class:`~lightning_score.study.config.StudyConfig`) is resolved (:mod:`.dataset`) and checked (:mod:`.checks`)
before any of this starts, and handed whole to every step.

A study can run on several devices and nodes (:mod:`.distributed`: every rank walks the same steps, rank zero
decides and writes) and in cluster stages (:mod:`.stages`: ``--stage experts`` per SLURM array task, then
``--stage evaluate``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lightning_score.data import DomainDataModule
from lightning_score.data.builtin import builtin_name
from lightning_score.merging import FactorCache
from lightning_score.models.backbones import get_backbone
from lightning_score.study.checks import check_study
from lightning_score.study.config import Entry, Row, StudyConfig, config_digest
from lightning_score.study.data import EvaluationImages, FoldData
from lightning_score.study.dataset import resolve_dataset, resolve_seeds
from lightning_score.study.distributed import World
from lightning_score.study.evaluation import evaluate_row, merge_module
from lightning_score.study.fitting import (
    QUIET_TRAINER,
    StopPredictingOnSigterm,
    fit_task_vector,
    quiet_lightning,
    remove_hpc_checkpoints,
)
from lightning_score.study.folder import StudyFolder, as_json
from lightning_score.study.stages import Fit, planned_fits, require_fits
from lightning_score.task_vector import state_dict_fingerprint
from lightning_score.utilities.environment import describe_environment
from lightning_score.utilities.files import atomic_write_text
from lightning_score.utilities.progress import LogTrainingProgress, ProgressLines, forward_log_lines
from lightning_score.utilities.signals import SignalWatch, StoppedBySignal, watch_signals

__all__ = ["Study"]

log = logging.getLogger(__name__)


class Study:
    """One leave-one-domain-out study (see :func:`lightning_score.study.run_study` for the settings).

    Args:
        config: The study's settings as given; the study resolves its ``auto`` and unset values (the dataset's
            preset, the model, the domains and targets, the seeds), checks the whole of it, and keeps the
            resolved configuration as :attr:`config` (its ``expert``, ``domains``, ``targets`` and ``seeds`` set).
    """

    def __init__(self, config: StudyConfig) -> None:
        self.console = Console(stderr=False)
        #: Not on a terminal (a log file, a SLURM job's output): progress lines instead of the bar.
        self.progress_lines = not self.console.is_terminal
        if config.backbone != "open_clip" and config.model_name == "auto" and builtin_name(config.root) is None:
            raise ValueError(  # auto is open_clip's ViT-B-32 on real data: no name of another library's model
                f"model_name: auto names open_clip's ViT-B-32; with backbone '{config.backbone}' set model_name to "
                "your model (a save_pretrained folder or hub id for hf, a timm architecture for timm)."
            )
        with quiet_lightning():
            choice = resolve_dataset(  # the preset (and the paper's backbone) fill auto/unset values; rows checked
                config.root, config.dataset, config.templates, config.expert, config.rows,
                model_name=config.model_name, pretrained=config.pretrained, tune_alpha=config.alpha_tuning,
            )  # fmt: skip
            self.preset, self.layout = choice.preset, choice.layout
            self.dataset_choice = choice  # its describe(): one line saying what the preset decided
            config = dataclasses.replace(
                config, model_name=choice.model_name, pretrained=choice.pretrained, dataset=choice.dataset,
                templates=choice.templates, expert=choice.expert, rows=choice.rows,
                seeds=resolve_seeds(config.root, config.seeds, None),
            )  # fmt: skip
            self.entries: list[Entry] = choice.entries  #: The table's lines, each with its row's method.
            domains, targets, self.classnames, self.default_templates = check_study(config, self.entries)
            #: The resolved configuration, handed whole to every step (``study.yaml`` records it).
            self.config: StudyConfig = dataclasses.replace(config, domains=domains, targets=targets)
            self.folder = StudyFolder(config.output_dir, self.config.seeds[0], config.restart)
            pooled = any(row.mode == "pooled" for row in config.rows)
            self.fits = planned_fits(config.stage, self.config.seeds, domains, targets, pooled, config.stage_domains)
            if config.stage == "evaluate":
                missing = [(self.folder.fit_path(f), f) for f in self.fits if not self.folder.fit_path(f).exists()]
                require_fits([p for p, _ in missing], [f for _, f in missing])
            self.eval_trainer = self._eval_trainer()
            #: The study's processes: Lightning's launcher starts ranks 1… here (they re-run the command).
            self.world = World.start(config.accelerator, config.devices, config.num_nodes)
            self.console.quiet = not self.world.is_zero
        self.base_fingerprint: str | None = None
        self.fit_configs: dict[str, dict[str, Any]] = {}
        self.records: list[dict[str, Any]] = []
        self.factors: FactorCache | None = None  #: The current seed's experts' SVDs, shared by its merges.

    def _eval_trainer(self) -> L.Trainer:
        """The one Trainer of every evaluation: the fits' precision, every device, no distributed sampler."""
        config = self.config
        try:
            return L.Trainer(
                accelerator=config.accelerator,
                devices=config.devices,
                num_nodes=config.num_nodes,
                strategy="ddp" if config.world_size > 1 else "auto",
                use_distributed_sampler=False,  # each rank predicts its own whole batches (FoldData), no padding
                precision=config.expert.precision,  # the fits' (and the merge recipes') too
                logger=False,
                callbacks=[StopPredictingOnSigterm()],
                default_root_dir=self.folder.root / "logs" / "evaluation",  # SLURM's requeue checkpoints go here
                **QUIET_TRAINER,
            )
        except Exception as error:  # Lightning's MisconfigurationException is not a ValueError
            raise ValueError(
                f"accelerator={config.accelerator!r}, devices={config.devices}, num_nodes={config.num_nodes} with "
                f"expert.precision={config.expert.precision!r}: {error}"
            ) from error

    # --- data --------------------------------------------------------------------------------------

    def _data(self, train: list[str], test: list[str], batch_size: int, transform: Any = None) -> DomainDataModule:
        config = self.config
        return DomainDataModule(
            config.root,
            train_domains=train,
            test_domains=test or None,
            batch_size=batch_size,
            eval_batch_size=config.eval_batch_size,
            num_workers=config.num_workers,
            val_fraction=config.val_fraction,
            split_seed=config.split_seed,
            preset=config.dataset,
            train_transform=transform,
            val_transform=transform,
        )

    # --- the steps ---------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Prepare the base, then per seed fit the experts and evaluate every row on every target.

        ``--stage experts`` makes only its planned fits (:mod:`.stages`) and returns no records.
        """
        config, folder = self.config, self.folder.root
        self.world.on_zero(lambda: folder.mkdir(parents=True, exist_ok=True))
        handler = logging.FileHandler(folder / "study.log") if self.world.is_zero else logging.NullHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        remove_hpc_checkpoints(Path(self.eval_trainer.default_root_dir))  # an evaluation has nothing to resume
        self._note(f"environment: {json.dumps(describe_environment())}")  # what reproducing this run needs
        started = time.perf_counter()
        pooled = any(row.mode == "pooled" for row in config.rows)
        per_seed = len(config.domains) + len(config.targets) * (len(config.rows) + pooled)
        total = len(self.fits) if config.stage == "experts" else len(config.seeds) * per_seed
        self.records = []
        watch = SignalWatch()
        try:
            with watch_signals(watch), quiet_lightning(), self._progress() as progress:
                self._task = progress.add_task("preparing the pre-trained base", total=total)
                self._progress_bar = progress
                self._study_lines = ProgressLines("study: step", total, self._say, percent=5)
                transform = self._prepare_base()
                if config.stage == "experts":
                    for fit in self.fits:
                        self._make(fit)
                    self._say(f"--stage experts: {len(self.fits)} fit(s) ready in {folder / 'task_vectors'}"
                              f"; when every expert is, run --stage evaluate.")  # fmt: skip
                    return self.records
                self._evaluate_all(transform)
        except BaseException as error:
            self.world.stop_others()  # ranks waiting in a collective for this one would never return
            if not watch.stopped(error):
                raise
            message = self._stopped_message(watch.name)
            if self.world.is_zero:
                log.error(message)  # on stderr and in study.log
            raise StoppedBySignal(watch.signum or 0, message) from None
        finally:
            log.removeHandler(handler)
            handler.close()
        self._say(f"study finished in {time.perf_counter() - started:.0f} s: {len(self.records)} evaluations")
        return self.records

    def _evaluate_all(self, transform: Any) -> None:
        """Per seed: every expert, then per target its pooled model and every row."""
        config = self.config
        domains, targets = list(config.domains), list(config.targets)
        pooled = any(row.mode == "pooled" for row in config.rows)
        self.images = EvaluationImages(
            lambda train, test: self._data(train, test, config.eval_batch_size, transform),
            batch_size=config.eval_batch_size,
            num_workers=config.num_workers,
        )
        for seed in config.seeds:
            experts = {domain: self._make(Fit("expert", seed, domain)) for domain in domains}
            # each expert's SVDs, once per seed for every SVD-based row of every target (merges of N - 1 experts)
            self.factors = FactorCache(min_tasks=max(1, len(domains) - 1))
            for target in targets:
                fold = self._fold(self.images, target)
                pooled_path = self._make(Fit("pooled", seed, target)) if pooled else None
                for row in config.rows:
                    self.records += self._evaluate(seed, target, row, experts, pooled_path, fold)
            stats, self.factors = self.factors.stats, None  # the next seed has other experts: free these
            if stats["svd_computed"]:
                self._say(f"seed {seed}: the experts' SVDs (expert × matrix key) were computed {stats['svd_computed']} "
                          f"times and reused {stats['svd_from_memory']} times across rows and targets"
                          f"{' on this rank' if self.world.size > 1 else ''}")  # fmt: skip

    def _fold(self, images: EvaluationImages, target: str) -> FoldData:
        config = self.config
        domains = list(config.domains)
        sources = [d for d in domains if d != target]
        return FoldData(
            images,
            sources,
            target,
            classnames=self.classnames,
            domains=domains,
            default_templates=self.default_templates,
            batch_size=config.eval_batch_size,
            alpha_images=config.alpha_images,
            proxy_data=lambda: self._data(sources, [target], config.eval_batch_size, self._transform),
            rank=self.world.rank,
            world_size=self.world.size,
        )

    @contextlib.contextmanager
    def _progress(self) -> Iterator[Progress]:
        """The bar, on a terminal; elsewhere it draws nothing and :attr:`progress_lines` says it in lines."""
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=False, disable=self.progress_lines) as progress:
            yield progress

    def _say(self, message: str) -> None:
        """One line per finished step: on the console (above the progress bar) and in study.log."""
        self.console.print(message, highlight=False, markup=False, soft_wrap=True)
        self._note(message)

    def _note(self, message: str) -> None:
        """A line in study.log only."""
        for handler in log.handlers:
            handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None))

    def _stopped_message(self, signal_name: str) -> str:
        """The one line of a study stopped by a signal: where it stopped, what is kept, how to resume."""
        task = self._progress_bar.tasks[0] if hasattr(self, "_task") else None  # the study's one task
        where = f" at '{task.description}' ({task.completed:.0f} of {task.total:.0f} steps done)" if task else ""
        return (
            f"lightning-score study: stopped by {signal_name}{where}. Every finished fit and result is kept in "
            f"{self.folder.root} and nothing partial was written: rerun the same command to resume from there."
        )

    def _advance(self, description: str) -> None:
        self._progress_bar.update(self._task, advance=1, description=description)
        if self.progress_lines:  # every 5 % of the study's steps or every minute: the count and an estimate
            self._study_lines.update(int(self._progress_bar.tasks[0].completed))

    def _prepare_base(self) -> Any:
        with forward_log_lines("lightning_score.models.digits_base", self._say):  # its pre-training's lines, if built
            config = self.config  # builds and caches the base (and its copy in the backbone's library) once
            components = get_backbone(config.backbone).build(
                config.model_name, config.pretrained, config.backbone_options or {}
            )
        self.base_fingerprint = state_dict_fingerprint(components.model.visual.state_dict())
        self._transform = components.val_transform
        self._say(f"base: {components.base_model} (image encoder {self.base_fingerprint[:20]}…)")
        return components.val_transform

    # --- fits ----------------------------------------------------------------------------------------

    def _fit_config(self, kind: str, train_domains: list[str], seed: int) -> dict[str, Any]:
        config = self.config
        return as_json(
            {
                "kind": kind,
                "model_name": config.model_name,
                "base_fingerprint": self.base_fingerprint,
                "templates": config.templates,
                "root": config.root,
                "split_seed": config.split_seed,
                "val_fraction": config.val_fraction,
                "train_domains": train_domains,
                "expert": {k: v for k, v in asdict(config.expert).items() if k != "lora" or v},  # as before LoRA
                "seed": seed,
            }
        )

    def _make(self, fit: Fit) -> Path:
        """Reuse the fit's kept task vector (made with these settings) or fine-tune it; one decision for all ranks."""
        config, path = self.config, self.folder.fit_path(fit)
        train = fit.train_domains(config.domains)
        record = self.fit_configs[str(path)] = self._fit_config(fit.kind, train, fit.seed)
        label = f"{fit.name} (seed {fit.seed})"
        with self.world.lock(self.folder.lock_path(path), str(path), self._say):  # another job may be making it
            if self.world.on_zero(lambda: self.folder.kept_fit(path, record, redo=config.stage != "evaluate")):
                self._advance(f"{label}: reused")
                self._say(f"{label}: reused {path}")
                return path
            if config.stage == "evaluate":  # checked at the start: a file removed since
                require_fits([path], [fit])
            self._progress_bar.update(self._task, description=f"fine-tuning {label}")
            lines = [LogTrainingProgress(f"fine-tuning {label}", self._say)] if self.progress_lines else []
            result = fit_task_vector(
                fit, config, path, lambda domains, batch: self._data(domains, domains, batch), record, callbacks=lines
            )
        self._advance(f"{label}: done")
        self._say(f"{label}: fine-tuned on {train} in {result.seconds:.1f} s ({result.steps} steps)")
        return path

    # --- evaluations ---------------------------------------------------------------------------------

    def _evaluation_config(self, entry: Entry, seed: int, target: str, used: list[Path]) -> dict[str, Any]:
        config, row = self.config, entry.row
        record: dict[str, Any] = {
            "kind": "evaluation",
            "row": asdict(row),
            "tuned": entry.tuned,
            "seed": seed,
            "target": target,
            "sources": [d for d in config.domains if d != target],
            "fits": {p.name: config_digest(self.fit_configs[str(p)]) for p in used},
            "model_name": config.model_name,
            "base_fingerprint": self.base_fingerprint,
            "templates": config.templates,
            "root": config.root,
            "split_seed": config.split_seed,
            "val_fraction": config.val_fraction,
            "precision": config.expert.precision,
        }
        if entry.method is not None:
            record["method_options"] = entry.method_options
        if entry.needs_data:
            record["proxy_images"] = config.proxy_images
        if entry.tuned or row.alpha == "auto":
            record["alpha_search"] = {"search": config.alpha_search, "images_per_source": config.alpha_images}
        return as_json(record)

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
        lock = self.folder.lock_path(self.folder.result_path(seed, target, entries[0]))  # one per row
        with self.world.lock(lock, f"the results of {row.name} on {target} (seed {seed})", self._say):
            kept = self.world.on_zero(lambda: self.folder.kept_results(seed, target, entries, configs))
            missing = [e for e in entries if e.key not in kept]
            if missing:
                self._progress_bar.update(self._task, description=f"{row.name} on {target} (seed {seed})")
                paths = [str(p) for p in used]
                module = merge_module(entries[0], paths, self.config, seed=seed, factors=self.factors)
                fresh = evaluate_row(self.eval_trainer, module, fold, missing, self.world)  # the same on every rank
                for entry in missing:
                    trained_on = {"expert": [target], "zeroshot": []}.get(row.mode, fold.sources)
                    kept[entry.key] = {**fresh[entry.key], "seed": seed, "target": target, "sources": trained_on}
                    path = self.folder.result_path(seed, target, entry)
                    text = self.folder.result_text(configs[entry.key], kept[entry.key])
                    self.world.on_zero(lambda path=path, text=text: atomic_write_text(path, text))
        self._advance(f"{row.name} on {target} (seed {seed}): {'done' if missing else 'reused'}")
        accuracies = ", ".join(f"{kept[e.key]['acc']:.3f}" + (" (α tuned)" if e.tuned else "") for e in entries)
        self._say(f"{row.name} on {target} (seed {seed}): accuracy {accuracies}{'' if missing else ' (reused)'}")
        return [kept[e.key] for e in entries]
