"""A study split into cluster jobs: ``--stage experts`` (some fits) and ``--stage evaluate`` (everything else).

* ``stage: all`` (the default) is the one-command study: fits, evaluations, report.
* ``stage: experts`` fits some of the study's models and stops: the experts of ``stage_domains`` for every
  seed, together with the pooled model of each such domain's fold (when the rows have a pooled row and the
  domain is a target). Without ``stage_domains``, a SLURM array task (``SLURM_ARRAY_TASK_ID`` set) takes the
  ``SLURM_ARRAY_TASK_ID``-th (seed, domain) pair, seed-major: task ``i`` is seed ``seeds[i // D]`` and domain
  ``domains[i % D]`` for ``D`` domains (submit ``--array=0-(S·D−1)``); outside an array, every fit.
* ``stage: evaluate`` fits nothing: it reuses every expert (and pooled model) found in the study folder,
  evaluates every row on every target and writes the report. A missing fit is one error naming the files
  and the command that makes them.

Jobs share the study folder (shared storage on a cluster): every file is written atomically, and a fit or
a result two jobs could make at once is made under a file lock, so the second waits and then reuses it.
A rerun of any stage continues where the last stopped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ARRAY_ENV", "STAGES", "Fit", "planned_fits", "require_fits"]

STAGES: tuple[str, ...] = ("all", "experts", "evaluate")
"""The study's stages."""

ARRAY_ENV = "SLURM_ARRAY_TASK_ID"
"""The environment variable of a SLURM array task's index."""


@dataclass(frozen=True)
class Fit:
    """One fine-tuning run of a study.

    Attributes:
        kind: ``expert`` (one domain) or ``pooled`` (the sources of ``domain``'s fold together).
        seed: The seed.
        domain: The expert's domain, or the target whose fold a pooled model serves.
    """

    kind: str
    seed: int
    domain: str

    @property
    def name(self) -> str:
        """The model's name in its metadata and log folder: the domain (an expert) or ``pooled-<target>``."""
        return self.domain if self.kind == "expert" else f"pooled-{self.domain}"

    def train_domains(self, domains: Sequence[str]) -> list[str]:
        """What it trains on, of the study's ``domains``: its domain, or every domain but the target (pooled)."""
        return [self.domain] if self.kind == "expert" else [d for d in domains if d != self.domain]


def planned_fits(
    stage: str,
    seeds: Sequence[int],
    domains: Sequence[str],
    targets: Sequence[str],
    pooled: bool,
    stage_domains: Sequence[str] | None,
    environ: Mapping[str, str] | None = None,
) -> list[Fit]:
    """The fits a stage makes, in order (every fit of the study for ``all`` and ``evaluate``).

    Args:
        stage: ``all``, ``experts`` or ``evaluate``.
        seeds: The study's seeds.
        domains: The study's domains.
        targets: The study's targets.
        pooled: Whether the rows include a pooled fine-tune.
        stage_domains: The domains of an ``experts`` stage (``None``: the array task's pair, or all).
        environ: The environment (default ``os.environ``), for ``SLURM_ARRAY_TASK_ID``.

    Raises:
        ValueError: An unknown stage, ``stage_domains`` outside an ``experts`` stage or naming other
            domains, or an array index beyond the study's seed × domain pairs.
    """
    environ = os.environ if environ is None else environ
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: choose one of {list(STAGES)}.")
    if stage_domains is not None and stage != "experts":
        raise ValueError(f"stage_domains applies to --stage experts only, not --stage {stage}.")
    pairs = [(seed, domain) for seed in seeds for domain in domains]
    if stage == "experts":
        if stage_domains is not None:
            unknown = [d for d in stage_domains if d not in domains]
            if unknown or not stage_domains:
                raise ValueError(f"stage_domains {list(stage_domains)} must be a non-empty list of the study's "
                                 f"domains {list(domains)}.")  # fmt: skip
            pairs = [(seed, domain) for seed in seeds for domain in stage_domains]
        elif environ.get(ARRAY_ENV, "").strip():
            pairs = [_array_pair(environ[ARRAY_ENV], pairs, len(seeds), len(domains))]
    fits = []
    for seed, domain in pairs:
        fits.append(Fit("expert", seed, domain))
        if pooled and domain in targets:
            fits.append(Fit("pooled", seed, domain))
    return fits


def _array_pair(value: str, pairs: list[tuple[int, str]], seeds: int, domains: int) -> tuple[int, str]:
    try:
        index = int(value)
    except ValueError:
        raise ValueError(f"{ARRAY_ENV}={value!r} is not an integer index.") from None
    if not 0 <= index < len(pairs):
        raise ValueError(
            f"{ARRAY_ENV}={index}, but the study has {len(pairs)} (seed, domain) experts ({seeds} seeds × {domains} "
            f"domains): submit the array as --array=0-{len(pairs) - 1}."
        )
    return pairs[index]


def require_fits(missing: Sequence[Path], fits: Sequence[Fit]) -> None:
    """Raise the evaluate stage's error when fits it needs are not in the study folder.

    Args:
        missing: The missing task-vector files.
        fits: The fits they belong to (same order).
    """
    if not missing:
        return
    shown = ", ".join(str(p) for p in missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
    domains = sorted({fit.domain for fit in fits}, key=[f.domain for f in fits].index)
    seeds = sorted({fit.seed for fit in fits})
    raise FileNotFoundError(
        f"--stage evaluate fits nothing, and {len(missing)} fit(s) it needs are missing: {shown}. Make them with the "
        f"same study arguments and --stage experts --stage_domains '[{', '.join(domains)}]' (seeds {seeds}; or one "
        f"SLURM array task per seed and domain), then rerun --stage evaluate."
    )
