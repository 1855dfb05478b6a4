"""The main job: one command runs the whole leave-one-domain-out study of the SCORE paper and reports it.

``lightning-score study --config recipes/digits/study.yaml`` (offline, CPU; see ``docs/study.md`` for its
measured wall time) or ``recipes/pacs/vit_b32_study.yaml`` and friends for real data.

The data flow, one module per step: :mod:`.checks` (the whole configuration, before any work) →
:mod:`.fitting` (experts and pooled models, per seed) → :mod:`.evaluation` (every row on every target, with
per-image predictions, at α = 1 and α tuned on source validation data, :mod:`.data`) → :mod:`.summary`
(means over seeds, bootstrap intervals and paired differences, :mod:`.statistics`) → :mod:`.tables` and
:mod:`.report` (results.md, results.csv, results.json, accuracy.png).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import torch
import yaml

from lightning_score.study.config import DEFAULT_ROWS, Entry, ExpertSettings, Row, StudyConfig
from lightning_score.study.dataset import resolve_seeds
from lightning_score.study.report import write_report
from lightning_score.study.runner import Study
from lightning_score.utilities.files import atomic_write_text, ensure_writable
from lightning_score.utilities.signals import SignalWatch, StoppedBySignal, watch_signals

__all__ = ["DEFAULT_ROWS", "Entry", "ExpertSettings", "Row", "Study", "StudyConfig", "run_study", "write_report"]

log = logging.getLogger(__name__)


def run_study(
    output_dir: str = "runs/digits-study",
    model_name: str = "auto",
    pretrained: str | None = "auto",
    templates: str = "auto",
    backbone: str = "open_clip",
    backbone_options: dict[str, Any] | None = None,
    root: str = "builtin:digits",
    dataset: str = "auto",
    domains: list[str] | None = None,
    targets: list[str] | None = None,
    expert: ExpertSettings | None = None,
    rows: list[Row] | None = None,
    accelerator: str = "auto",
    devices: int = 1,
    num_nodes: int = 1,
    eval_batch_size: int = 256,
    num_workers: int = 0,
    split_seed: int = 17,
    val_fraction: float = 0.0,
    proxy_images: int = 32,
    seeds: list[int] | None = None,
    seed: int | None = None,
    alpha_tuning: bool = True,
    alpha_search: str = "grid",
    alpha_images: int | None = 100,
    bootstrap: int = 1000,
    restart: bool = False,
    stage: Literal["all", "experts", "evaluate"] = "all",
    stage_domains: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the leave-one-domain-out study: per seed, fit one expert per domain, merge the others' for every target.

    For every seed and target domain, the experts of the other domains are merged by every method row and
    tested on the target's test split, next to the reference rows (zero-shot, logit ensemble, a model
    fine-tuned on the pooled source domains, the target's own expert). Every weight merge is reported at its
    α (1, the paper's protocol) and, with ``alpha_tuning``, at α chosen on the source domains' validation data.
    Tables give the mean ± std over seeds, 95 % bootstrap intervals over test images, and paired differences
    against SCORE. Writes to ``output_dir``: ``results.md``, ``results.csv``, ``results.json``,
    ``accuracy.png``, ``sar.png``/``sar.json``, ``study.yaml`` (the resolved config), ``study.log``,
    ``task_vectors/seed-<s>/`` and ``results/seed-<s>/<target>/`` (one JSON per row, with per-image
    correctness). Rerunning continues where it stopped. The whole configuration is checked before any work.

    Args:
        output_dir: The study folder.
        model_name: open_clip architecture of the pre-trained model; ``auto``: the paper's ``ViT-B-32`` on real
            data, the tiny CPU model ``tiny-ViT-W96-L3`` on the built-in benchmark.
        pretrained: Its weights: an open_clip tag such as ``openai``, a local weights file, ``builtin:digits``
            (the offline base) or null (random weights); ``auto``: ``openai`` (the paper's) on real data,
            ``builtin:digits`` on the built-in benchmark.
        templates: Prompt-template set of the zero-shot head; ``auto``: the dataset's own (the SCORE authors' set
            of a preset's dataset, ``digits`` for the built-in benchmark; see :mod:`.dataset`).
        backbone: The library of the model: ``open_clip`` (the default), ``hf`` (transformers' ``CLIPModel``:
            ``model_name`` a ``save_pretrained`` folder or hub id) or ``timm`` (see ``docs/your-own-clip.md``);
            ``builtin:digits`` gives each library a copy of the offline base.
        backbone_options: The backbone's own settings (timm: ``model_args``, ``text``, ``head``).
        root: The data (any layout ``DomainDataModule`` reads) or ``builtin:digits``.
        dataset: The dataset preset (``pacs``, ``office_home``, ``fed_isic2019``... see
            ``lightning_score.data.presets``) whose protocol fills every ``auto`` or unset setting: the split,
            the templates, the experts' epochs, SCORE's options. ``auto``: detected from the root's domain
            folders; ``none``: no preset. A named preset must match the data's domains.
        domains: The domains of the study; default every domain of ``root``.
        targets: The held-out targets to evaluate; default every domain.
        expert: How experts (and pooled models) are fine-tuned; its ``precision`` is also the precision of
            every evaluation, as in the merge recipes. ``None``: the paper's settings with the preset's epochs
            on real data, 150 steps at lr 1e-3 on the built-in digits; ``max_epochs: null`` takes the preset's.
        rows: The table's rows; default SCORE, its ablations, TSV-M, Iso-C, Iso-CTS, TIES, MagMax, PCB, Task
            Arithmetic, averaging, ESM, zero-shot, the logit ensemble, the pooled fine-tune and the target's expert.
            Every ``score`` row gets the preset's SCORE options it does not set (``divide_by_tasks: false`` on
            Fed-ISIC2019 and RetinaDomains).
        accelerator: Lightning accelerator (``auto``: the GPU when there is one).
        devices: Devices per node. More than one (or ``num_nodes`` > 1): every fit is a DDP fit across all of
            them (``expert.batch_size`` stays the global batch), merges are sharded across them, and each
            device predicts its own part of every test set, gathered so the numbers equal one device's (see
            docs/cluster.md; Lightning starts the processes, or torchrun / SLURM's srun does).
        num_nodes: Nodes (with torchrun or srun starting ``devices`` processes on each).
        eval_batch_size: Batch size of the evaluations.
        num_workers: Data-loading worker processes.
        split_seed: Seed of the seeded splits (17 in the SCORE paper); pre-split data is read as is.
        val_fraction: 0 (the paper): experts train on their whole train split and the sources' test splits are
            the validation data; > 0: that part of each train split is held out for validation instead.
        proxy_images: Unlabelled images per source domain for ESM.
        seeds: One run of every fit and row per seed; default ``[0, 1, 2]`` on the built-in digits, ``[0]`` else.
        seed: Deprecated: ``seeds: [seed]``.
        alpha_tuning: Also report every fixed-α merge at α chosen on the sources' validation data (same merge).
        alpha_search: ``grid`` (MergeModule's α grid) or ``golden`` (golden-section on [0, 2]).
        alpha_images: Validation images per source domain for the α search (a seeded subset; null: all).
        bootstrap: Bootstrap resamples for the intervals.
        restart: Redo kept fits and results whose settings differ from these (default: refuse them).
        stage: ``all`` (fit, evaluate, report), ``experts`` (only fits: those of ``stage_domains``, or the
            ``SLURM_ARRAY_TASK_ID``-th seed × domain pair, or all) or ``evaluate`` (fits nothing: reuses every
            expert in ``output_dir``, evaluates and reports). See :mod:`lightning_score.study.stages`.
        stage_domains: The domains whose experts (and pooled fold models) ``--stage experts`` fits, every seed.

    Returns:
        One record per table line, target and seed (method, seed, target, acc, balanced_acc, alpha, ...).
    """
    config = StudyConfig(
        output_dir=output_dir,
        model_name=model_name,
        pretrained=pretrained,
        backbone=backbone,
        backbone_options=backbone_options,
        templates=templates,
        root=root,
        dataset=dataset,
        domains=domains,
        targets=targets,
        expert=expert,
        rows=DEFAULT_ROWS if rows is None else rows,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        eval_batch_size=eval_batch_size,
        num_workers=num_workers,
        split_seed=split_seed,
        val_fraction=val_fraction,
        proxy_images=proxy_images,
        seeds=resolve_seeds(root, seeds, seed),
        alpha_tuning=alpha_tuning,
        alpha_search=alpha_search,
        alpha_images=alpha_images,
        bootstrap=bootstrap,
        restart=restart,
        stage=stage,
        stage_domains=stage_domains,
    )
    watch = SignalWatch()
    with watch_signals(watch):  # Study.run says itself where a signal stopped it; here: before or after it
        try:
            return _run(config)
        except (SystemExit, KeyboardInterrupt) as error:
            if isinstance(error, StoppedBySignal) or not watch.stopped(error):
                raise
            message = (
                f"lightning-score study: stopped by {watch.name} while checking the configuration or writing the "
                f"report: every finished fit and result is kept in {output_dir}; rerun the same command to finish."
            )
            log.error(message)
            raise StoppedBySignal(watch.signum or 0, message) from None


def _run(config: StudyConfig) -> list[dict[str, Any]]:
    """:func:`run_study` once its settings are gathered: check, run, report."""
    stage, accelerator, bootstrap = config.stage, config.accelerator, config.bootstrap
    study = Study(config)  # with several devices, Lightning's launcher starts the other ranks here
    resolved = study.config.record()  # what the study is (not how this job runs), as resolved
    folder = study.folder.root
    text = yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
    ensure_writable(folder, what="--output_dir")  # one line naming it (the command prints it), before any work
    study.world.on_zero(lambda: atomic_write_text(folder / "study.yaml", text))
    records = study.run()
    if stage == "experts":
        return records
    experts = {domain: study.folder.task_vector_path(domain) for domain in study.config.domains}
    device = "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"

    def report() -> None:
        written, _ = write_report(
            records, study.entries, study.config.targets, study.config.seeds, folder, resamples=bootstrap,
            settings=resolved, experts=experts, device=device,
        )  # fmt: skip
        study.console.print((folder / "results.md").read_text(), markup=False, highlight=False, soft_wrap=True)
        study.console.print("Wrote " + ", ".join(str(p) for p in written.values()), highlight=False, soft_wrap=True)

    study.world.on_zero(report)  # rank zero writes it; the other ranks wait, and raise its error if it fails
    return records
