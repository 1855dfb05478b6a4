"""What a prepared MergeModule records beside its merged weights: in a Lightning checkpoint, and in a merged file.

* :class:`PreparedRecord`: the entry ``checkpoint["lightning_score_merge"]`` (mode, the α in the weights, the α
  search, the merge's provenance, the ensemble's size), from which ``load_from_checkpoint`` restores a tested module
  without merging again.
* :func:`merge_summary`: the console line of a merge (method, options, cost).
* :func:`merged_file_header`: the JSON that ``save_merged`` writes under ``lightning_score_merge`` in the header of
  the merged weights file (what was merged, how, at which α).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_score.merge_module.alpha import AlphaSearchResult
from lightning_score.merge_module.statistics import STATISTICS
from lightning_score.utilities.profiling import Measure

__all__ = ["CHECKPOINT_KEY", "HEADER_KEY", "PreparedRecord", "describe_options", "merge_summary", "merged_file_header"]

CHECKPOINT_KEY = "lightning_score_merge"
"""The checkpoint entry of a MergeModule."""

HEADER_KEY = "lightning_score_merge"
"""The metadata key of a merged weights file's header."""


@dataclass(frozen=True)
class PreparedRecord:
    """A MergeModule's state besides its weights, as a checkpoint keeps it.

    Attributes:
        mode: The mode it was prepared in.
        current_alpha: The α of the weights in its image encoder (None: no α applies, ``zeroshot``).
        alpha_search: The α search, when α was searched.
        merge: The merge's provenance (``TaskVector.metadata["merge"]``), for ``mode="merge"``.
        experts: The number of expert encoders (``mode="ensemble"``), else 0.
    """

    mode: str
    current_alpha: float | None = None
    alpha_search: AlphaSearchResult | None = None
    merge: dict[str, Any] | None = None
    experts: int = 0

    def checkpoint_entry(self, prepared: bool) -> dict[str, Any]:
        """The entry to store under :data:`CHECKPOINT_KEY` (``prepared``: whether the weights are the mode's)."""
        return {
            "prepared": prepared,
            "mode": self.mode,
            "current_alpha": self.current_alpha,
            "alpha_search": self.alpha_search.state_dict() if self.alpha_search is not None else None,
            "merge": self.merge,
            "experts": self.experts,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], mode: str) -> PreparedRecord | None:
        """The record of a checkpoint whose weights were prepared in ``mode``; None when they were not prepared.

        Raises:
            ValueError: They were prepared in another mode.

        Example:
            >>> entry = PreparedRecord("merge", current_alpha=0.6).checkpoint_entry(prepared=True)
            >>> PreparedRecord.from_checkpoint({CHECKPOINT_KEY: entry}, "merge").current_alpha
            0.6
            >>> PreparedRecord.from_checkpoint({}, "merge") is None
            True
        """
        entry = checkpoint.get(CHECKPOINT_KEY) or {}
        if not entry.get("prepared"):
            return None
        if entry.get("mode") != mode:
            raise ValueError(
                f"The checkpoint holds a MergeModule prepared in mode '{entry.get('mode')}', not '{mode}'."
            )
        search = entry.get("alpha_search")
        return cls(
            mode=mode,
            current_alpha=entry.get("current_alpha"),
            alpha_search=AlphaSearchResult.from_state_dict(search) if search is not None else None,
            merge=entry.get("merge"),
            experts=entry.get("experts", 0),
        )


def merged_file_header(
    record: PreparedRecord, base_model: str, alpha: float | None, task_vectors: Sequence[str | Path]
) -> dict[str, str]:
    """The header metadata of a merged weights file: ``{HEADER_KEY: json}``.

    The JSON holds the mode, the base model, α, the α search, the merge's provenance and the task-vector files.

    Example:
        >>> header = merged_file_header(PreparedRecord("expert"), "ViT-B-32/openai", 0.5, ["rot0.safetensors"])
        >>> json.loads(header[HEADER_KEY])
        {'mode': 'expert', 'base_model': 'ViT-B-32/openai', 'alpha': 0.5, 'task_vectors': ['rot0.safetensors']}
    """
    content: dict[str, Any] = {"mode": record.mode, "base_model": base_model, "alpha": alpha}
    if record.alpha_search is not None:
        content["alpha_search"] = record.alpha_search.to_dict()
    if record.merge is not None:
        content["merge"] = record.merge
    content["task_vectors"] = [str(p) for p in task_vectors]
    return {HEADER_KEY: json.dumps(content)}


def describe_options(options: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    """``variant='diagonal', divide_by_tasks=True``: a merge's options for one console line (``skip``: left out).

    Example:
        >>> describe_options({"variant": "diagonal", "grams": "<list>"}, skip=["grams"])
        "variant='diagonal'"
    """
    shown = [f"{name}={value!r}" for name, value in options.items() if name not in skip]
    return ", ".join(shown) if shown else "no options"


def merge_summary(
    method: str,
    count: int,
    record: Mapping[str, Any],
    statistics: tuple[Sequence[str], int],
    device: Any,
    measure: Measure,
) -> str:
    """The console line of a merge: how many task vectors, the method and its options, the data, the cost.

    Args:
        method: The method's name.
        count: The number of task vectors.
        record: The merge's provenance (``TaskVector.metadata["merge"]``; its ``options`` are shown).
        statistics: The statistics the method took (empty: data-free) and the proxy images per source domain.
        device: Where it ran.
        measure: Its wall time and peak memory.
    """
    names, proxy_images = statistics
    note = f"; {' and '.join(names)} from {proxy_images} proxy images per source domain" if names else ""
    return (
        f"MergeModule: merged {count} task vectors with '{method}' "
        f"({describe_options(record.get('options', {}), skip=list(STATISTICS))}{note}) on {device} in "
        f"{measure.seconds:.1f} s (peak memory +{measure.peak_bytes / 2**20:.0f} MiB)."
    )
