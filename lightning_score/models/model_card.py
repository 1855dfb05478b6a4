"""The model card of an exported merged model: what was merged, how, from which base, and how well it tested.

Every export folder (:func:`~lightning_score.models.export.export_model`) holds the card twice: as
``lightning_score_card.json`` (machine-readable: :data:`CARD_FORMAT`) and as ``README.md`` (the same facts in
prose, with Hugging Face's YAML front matter, and how to load the folder without lightning-score).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_score._version import __version__
from lightning_score.utilities.files import atomic_write_text

__all__ = ["CARD_FIELDS", "CARD_FILE", "CARD_FORMAT", "README_FILE", "card_record", "read_card", "write_card"]

CARD_FILE = "lightning_score_card.json"
README_FILE = "README.md"
CARD_FORMAT = "lightning-score/export-card"
CARD_VERSION = 1

CARD_FIELDS = ("method", "options", "experts", "test_accuracies", "base_model", "notes")
"""The fields a caller may give (``card=``); the rest (α, fingerprints, files, loading) the export records."""


def _json_checked(fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` as JSON would give them back, refusing a value JSON cannot hold by name."""
    for name, value in fields.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"Model card field {name!r} is not JSON-serialisable ({error}): give numbers, strings, lists and "
                "dicts (e.g. test_accuracies={'rot60': 0.91})."
            ) from None
    return json.loads(json.dumps(dict(fields)))


def card_record(
    given: Mapping[str, Any] | None,
    merge: Mapping[str, Any],
    recorded: Mapping[str, Any],
) -> dict[str, Any]:
    """The card's JSON record: the caller's fields over what the merged task vector's metadata records.

    Args:
        given: The caller's fields (:data:`CARD_FIELDS`); ``experts`` is a list of ``{name, domain, path}``,
            ``test_accuracies`` maps a test domain to its accuracy.
        merge: The merged task vector's ``metadata["merge"]`` (``method``, ``options``, ``inputs``), or ``{}``.
        recorded: What the export measured: ``backbone``, ``alpha``, fingerprints, ``files``, ``load``, ...

    Returns:
        The record :func:`write_card` writes.

    Raises:
        ValueError: An unknown field, or a value JSON cannot hold (named).
    """
    given = dict(given or {})
    unknown = sorted(set(given) - set(CARD_FIELDS))
    if unknown:
        raise ValueError(f"Unknown model card field(s) {unknown}: use {list(CARD_FIELDS)}.")
    inputs = merge.get("inputs") or []
    defaults = {
        "method": merge.get("method"),
        "options": merge.get("options") or {},
        "experts": [{k: e.get(k) for k in ("name", "domain", "path")} for e in inputs],
        "test_accuracies": {},
    }
    fields = _json_checked({**defaults, **given})
    return {"format": CARD_FORMAT, "version": CARD_VERSION, **fields, **recorded,
            "lightning_score_version": __version__}  # fmt: skip


def _readme(record: Mapping[str, Any]) -> str:
    """The card in prose: front matter, what was merged, the accuracies, how to load it."""
    tags = ["lightning-score", "model-merging", "clip"]
    lines = ["---", f"library_name: {record['library']}", "tags:", *(f"- {t}" for t in tags), "---", ""]
    method = record.get("method") or "a merge"
    scaled = record.get("merge_alpha")
    merge_alpha = f"; the merge itself scaled τ* by {scaled:g}" if scaled not in (None, 1.0) else ""
    lines += [
        f"# {record.get('base_model') or record['model_name']} merged with {method}",
        "",
        f"Exported by lightning-score {record['lightning_score_version']} in {record['backbone']}'s own format: "
        "loading it needs no lightning-score.",
        "",
        f"- Method: `{method}`, options `{json.dumps(record.get('options') or {}, sort_keys=True)}`",
        f"- α = {record['alpha']:g} on export (keys exempt from α: {len(record['alpha_exempt_keys'])}){merge_alpha}",
        f"- Base model: `{record['model_name']}`, image tower fingerprint `{record['base_fingerprint']}`",
        f"- Merged image tower fingerprint `{record['merged_fingerprint']}`",
    ]
    experts: Sequence[Mapping[str, Any]] = record.get("experts") or []
    if experts:
        lines += ["", "## Experts", "", "| name | domain | task vector |", "|---|---|---|"]
        lines += [f"| {e.get('name')} | {e.get('domain')} | {e.get('path')} |" for e in experts]
    accuracies: Mapping[str, Any] = record.get("test_accuracies") or {}
    if accuracies:
        lines += ["", "## Test accuracies", "", "| domain | accuracy |", "|---|---|"]
        lines += [f"| {domain} | {value} |" for domain, value in accuracies.items()]
    if record.get("notes"):
        lines += ["", "## Notes", "", str(record["notes"])]
    lines += ["", "## Loading", "", "```python", record["load"], "```", ""]
    return "\n".join(lines)


def write_card(folder: Path, record: Mapping[str, Any]) -> None:
    """Write ``lightning_score_card.json`` and ``README.md`` into ``folder``."""
    atomic_write_text(folder / CARD_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    atomic_write_text(folder / README_FILE, _readme(record))


def read_card(folder: str | Path) -> dict[str, Any]:
    """The JSON record of an export folder's card.

    Raises:
        FileNotFoundError: The folder holds no card (it is no lightning-score export).
        ValueError: The card is not a lightning-score export card.
    """
    path = Path(folder) / CARD_FILE
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or record.get("format") != CARD_FORMAT:
        raise ValueError(f"'{path}' is not a lightning-score export card (format {CARD_FORMAT!r}).")
    return record
