"""The study folder: where each fit, result and lock is kept, and whether a kept one was made with these settings.

Every finished fit (a task vector, its settings in the metadata's ``expert_config``) and every finished
evaluation (a JSON file: ``{"config": ..., "record": ...}``) is kept with the configuration that produced it.
A rerun reuses what matches and refuses what does not (or, with ``restart``, redoes it), so an interrupted study
continues where it stopped and never mixes results of different settings. A kept result that cannot be read
(empty, cut off, not the study's JSON) is evaluated again, with a warning naming the file::

    <output_dir>/task_vectors/seed-<s>/<domain>.safetensors            an expert
    <output_dir>/task_vectors/seed-<s>/pooled/<target>.safetensors     the pooled model of a target's fold
    <output_dir>/results/seed-<s>/<target>/<entry key>.json            one table line on one target
    <output_dir>/.locks/...                                            the inter-process lock of each of those
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_score.study.config import Entry
from lightning_score.study.stages import Fit
from lightning_score.task_vector import TaskVector

__all__ = ["StudyFolder", "as_json"]


def as_json(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), so stored and fresh configs compare equal."""
    return json.loads(json.dumps(value, default=str))


class StudyFolder:
    """The paths of a study's kept fits and results, and the decision to reuse one.

    Args:
        root: The study folder (``output_dir``).
        first_seed: The seed :meth:`task_vector_path` means when given none.
        restart: Redo (delete) a kept artifact made with other settings instead of refusing it.
    """

    def __init__(self, root: str | Path, first_seed: int, restart: bool = False) -> None:
        self.root = Path(root)
        self.first_seed = first_seed
        self.restart = restart

    def task_vector_path(self, domain: str, seed: int | None = None) -> Path:
        """Where the expert of ``domain`` for ``seed`` (default: the first seed) is kept."""
        seed = self.first_seed if seed is None else seed
        return self.root / "task_vectors" / f"seed-{seed}" / f"{domain}.safetensors"

    def pooled_path(self, target: str, seed: int) -> Path:
        """Where the pooled multi-source model of ``target``'s fold for ``seed`` is kept."""
        return self.root / "task_vectors" / f"seed-{seed}" / "pooled" / f"{target}.safetensors"

    def fit_path(self, fit: Fit) -> Path:
        """Where a planned fit's task vector is kept."""
        if fit.kind == "expert":
            return self.task_vector_path(fit.domain, fit.seed)
        return self.pooled_path(fit.domain, fit.seed)

    def lock_path(self, path: Path) -> Path:
        """The inter-process lock guarding the making of ``path`` (under ``<output_dir>/.locks``)."""
        return self.root / ".locks" / path.relative_to(self.root).with_suffix(".lock")

    def result_path(self, seed: int, target: str, entry: Entry) -> Path:
        """Where the evaluation of ``entry`` on ``target`` for ``seed`` is kept."""
        return self.root / "results" / f"seed-{seed}" / target / f"{entry.key}.json"

    def reusable(self, path: Path, stored: dict[str, Any] | None, wanted: dict[str, Any], redo: bool = True) -> bool:
        """Whether a kept artifact matches ``wanted``; a mismatch is an error unless ``restart`` (and ``redo``)."""
        if not path.exists():
            return False
        if stored == wanted:
            return True
        if self.restart and redo:
            path.unlink()
            return False
        fix = ("refit it with --stage experts --restart true (--stage evaluate fits nothing)" if not redo else
               "Pass --restart true to redo what no longer matches, or choose another --output_dir")  # fmt: skip
        changed = describe_differences(stored, wanted) if stored else "it records no study settings"
        raise ValueError(f"'{path}' was made with different settings than this study ({changed}): {fix}.")

    def kept_fit(self, path: Path, config: dict[str, Any], redo: bool = True) -> bool:
        """Is the fit at ``path`` kept and made with ``config`` (its task vector's ``expert_config``)?"""
        stored = TaskVector.load(path).metadata.get("expert_config") if path.exists() else None
        return self.reusable(path, stored, config, redo=redo)

    def kept_results(
        self, seed: int, target: str, entries: Sequence[Entry], configs: dict[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """The kept results (made with ``configs``, by entry key) of a row's entries on ``target``, by entry key."""
        kept = {}
        for entry in entries:
            path = self.result_path(seed, target, entry)
            stored = _read_result(path) if path.exists() else None
            if stored is not None and self.reusable(path, stored["config"], configs[entry.key]):
                kept[entry.key] = stored["record"]
        return kept

    def result_text(self, config: dict[str, Any], record: dict[str, Any]) -> str:
        """The kept form of one evaluation: its config (what a rerun compares) and its record."""
        return json.dumps({"config": config, "record": record}, indent=2)


def _read_result(path: Path) -> dict[str, Any] | None:
    """A kept result file's ``{"config": ..., "record": ...}``; ``None``, with a warning, when it is damaged."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict) or not isinstance(stored.get("config"), dict) or "record" not in stored:
            raise ValueError("no 'config' and 'record' in it")
    except (OSError, UnicodeDecodeError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        warnings.warn(
            f"The kept result '{path}' is damaged ({error}): evaluating it again; the new result replaces the file.",
            stacklevel=2,
        )
        return None
    return stored


_UNSET = object()  # a setting one side does not record


def _short(value: Any, width: int = 60) -> str:
    if value is _UNSET:
        return "unset"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _differing(stored: Any, wanted: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The settings whose values differ, by dotted name (nested settings such as ``expert.lr`` one by one)."""
    if isinstance(stored, Mapping) and isinstance(wanted, Mapping):
        out = []
        for key in sorted(set(stored) | set(wanted), key=str):
            out += _differing(stored.get(key, _UNSET), wanted.get(key, _UNSET), f"{prefix}{key}.")
        return out
    return [] if stored == wanted else [(prefix.rstrip("."), stored, wanted)]


def describe_differences(stored: Mapping[str, Any], wanted: Mapping[str, Any], limit: int = 4) -> str:
    """Which settings of a kept artifact differ from this study's, and both values, for the mismatch error.

    Example:
        >>> describe_differences({"expert": {"lr": 0.001, "max_steps": 6}}, {"expert": {"lr": 0.002, "max_steps": 6}})
        'expert.lr: 0.001 kept, 0.002 in this study'
    """
    differing = _differing(dict(stored), dict(wanted))
    shown = [f"{name}: {_short(old)} kept, {_short(new)} in this study" for name, old, new in differing[:limit]]
    more = len(differing) - limit
    return "; ".join(shown) + (f"; and {more} more setting(s)" if more > 0 else "")
