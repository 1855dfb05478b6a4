"""MergeModule's inputs, checked before any long work: the task-vector files, their base, held-out test domains."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from lightning_score.data.protocols import TestDomains
from lightning_score.merge_module.alpha import ALPHA_SEARCHES
from lightning_score.merge_module.statistics import statistic_names
from lightning_score.merging import MethodSpec, get_method
from lightning_score.task_vector import TaskVector

__all__ = [
    "MODES",
    "NOT_HELD_OUT",
    "MergeInputs",
    "Mode",
    "ResolvedMethod",
    "check_arguments",
    "check_base",
    "check_count",
    "check_held_out",
    "expert_domains",
    "held_out",
    "load_task_vectors",
    "read_inputs",
]

Mode = Literal["merge", "zeroshot", "ensemble", "expert"]
"""What MergeModule builds: a merge, θ₀ as it is, the experts' logit ensemble, or one expert (θ₀ + α·τ)."""

MODES: tuple[str, ...] = get_args(Mode)
NOT_HELD_OUT = " (not held out)"
"""Appended to a test domain's metric names when an expert of that domain is merged (``allow_target_experts``)."""
_COUNTS = {"merge": (1, None), "ensemble": (1, None), "expert": (1, 1), "zeroshot": (0, None)}


class ResolvedMethod(NamedTuple):
    """A merge method as :func:`check_arguments` resolved it, once: what the merge then uses as it is."""

    method: MethodSpec
    """Its registration (:func:`~lightning_score.merging.get_method`)."""
    options: dict[str, Any]
    """Its options, defaults filled in and checked."""
    statistics: tuple[str, ...]
    """The options MergeModule fills with statistics (:func:`~.statistics.statistic_names`; empty: data-free)."""


def check_arguments(
    mode: str, alpha: Any, alpha_search: str, method: str, options: Mapping[str, Any]
) -> ResolvedMethod | None:
    """MergeModule's arguments, before anything is loaded: mode, α, α search, method and its options.

    In ``merge`` mode the method must be known, its options valid, and a data-using method's statistics
    (collected by MergeModule, see :mod:`lightning_score.merge_module.statistics`) not given as options.

    Returns:
        The method looked up and its options resolved, once; None in another mode (no method runs there).

    Example:
        >>> method, options, statistics = check_arguments("merge", 1.0, "grid", "score", {"variant": "diagonal"})
        >>> method.name, options["variant"], options["z"], statistics
        ('score', 'diagonal', 1.96, ())
        >>> check_arguments("zeroshot", 1.0, "grid", "no such method", {}) is None
        True
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(MODES)}.")
    if isinstance(alpha, str) and alpha != "auto":
        raise ValueError(f"alpha must be a number or 'auto', got {alpha!r}.")
    if alpha_search not in ALPHA_SEARCHES:
        raise ValueError(f"alpha_search={alpha_search!r} is not one of {list(ALPHA_SEARCHES)}.")
    if mode != "merge":
        return None
    spec = get_method(method)  # unknown method: a clear error before loading anything
    statistics = statistic_names(spec)
    given = sorted(set(statistics) & set(options))  # a data method MergeModule cannot feed: refused
    if given:
        raise ValueError(
            f"method_options[{given[0]!r}]: MergeModule collects '{method}'s {given[0]} itself, from proxy_images "
            "unlabelled images of each source domain; drop it (to merge with statistics of your own, call "
            "lightning_score.merging.merge_task_vectors)."
        )
    return ResolvedMethod(spec, spec.resolve_options(options), statistics)


def check_count(mode: str, count: int) -> None:
    """Refuse a number of task vectors that ``mode`` cannot use.

    ``expert`` takes exactly one, ``merge`` and ``ensemble`` one or more, ``zeroshot`` any number (and ignores them).

    Example:
        >>> check_count("expert", 2)
        Traceback (most recent call last):
        ...
        ValueError: MergeModule(mode='expert') needs exactly one task vector; got 2: pass task_vectors=[...].
    """
    low, high = _COUNTS[mode]
    if count < low or (high is not None and count > high):
        wanted = "exactly one task vector" if mode == "expert" else "at least one task vector"
        raise ValueError(f"MergeModule(mode='{mode}') needs {wanted}; got {count}: pass task_vectors=[...].")


def load_task_vectors(paths: Sequence[Path], mode: str) -> list[TaskVector]:
    """The task vectors a mode needs (``zeroshot``: none), loaded lazily; a clear error for a wrong count or file."""
    check_count(mode, len(paths))
    if mode == "zeroshot" and paths:
        rank_zero_info("MergeModule(mode='zeroshot') ignores its task vectors.")
        return []
    return [TaskVector.load(path) for path in paths]  # missing / not a task vector: clear errors


@dataclass(frozen=True)
class MergeInputs:
    """What MergeModule reads in ``setup``: the task vectors and θ₀.

    Attributes:
        task_vectors: The task vectors the mode needs (lazy: each key is read when used), checked against θ₀.
        pretrained: θ₀: a copy of the image encoder's state on CPU, taken before anything changed it.
    """

    task_vectors: list[TaskVector]
    pretrained: dict[str, Tensor]


def read_inputs(paths: Sequence[Path], mode: str, encoder: nn.Module, base_model: str, fingerprint: str) -> MergeInputs:
    """:func:`load_task_vectors`, each checked with :func:`check_base` against ``encoder``, and a copy of θ₀.

    Args:
        paths: The task-vector files.
        mode: MergeModule's mode (how many it needs; ``zeroshot``: none are read).
        encoder: The image encoder, holding θ₀.
        base_model: Its label, e.g. ``"ViT-B-32/openai"``.
        fingerprint: Its fingerprint (``state_dict_fingerprint``).
    """
    task_vectors = load_task_vectors(paths, mode)
    state = encoder.state_dict()
    for tv in task_vectors:
        check_base(tv, state, base_model, fingerprint)
    return MergeInputs(task_vectors, {k: v.detach().to("cpu", copy=True) for k, v in state.items()})


def check_base(tv: TaskVector, encoder: Mapping[str, Tensor], base_model: str, fingerprint: str) -> None:
    """Refuse a task vector of another architecture (keys, shapes) or of other pre-trained weights (fingerprint).

    Args:
        tv: The task vector.
        encoder: The image encoder's state dict (θ₀).
        base_model: Its label, e.g. ``"ViT-B-32/openai"``.
        fingerprint: Its fingerprint (``state_dict_fingerprint``).

    Raises:
        ValueError: Naming both sides' base models, and "different architecture" when keys or shapes differ.
    """
    theirs = f"{tv.describe()} (fine-tuned from {tv.base_model or 'an unrecorded base model'})"
    fix = "Merge experts into the model they were fine-tuned from: set model_name and pretrained to theirs."
    for key in tv:
        if key not in encoder:
            raise ValueError(
                f"{theirs} is of a different architecture than {base_model}: its key '{key}' is not in this "
                f"model's image encoder. {fix}"
            )
        shape = tv.tensor_spec(key)[0]
        if tuple(shape) != tuple(encoder[key].shape):
            raise ValueError(
                f"{theirs} is of a different architecture than {base_model}: '{key}' has shape "
                f"{list(shape)} there and {list(encoder[key].shape)} here. {fix}"
            )
    if tv.base_fingerprint and tv.base_fingerprint != fingerprint:
        raise ValueError(
            f"{theirs} was made from different pre-trained weights than {base_model}, of the same architecture "
            f"(base fingerprints {tv.base_fingerprint[:20]}… vs {fingerprint[:20]}…). {fix}"
        )


def expert_domains(tv: TaskVector) -> list[str]:
    """The domains an expert was fine-tuned on, as its metadata records them (``domain`` and ``train_domains``).

    Example:
        >>> import torch
        >>> pooled = TaskVector({"w": torch.zeros(1)}, {"name": "pooled", "train_domains": ["rot0", "rot30"]})
        >>> expert_domains(TaskVector({"w": torch.zeros(1)}, {"domain": "rot30"})), expert_domains(pooled)
        (['rot30'], ['rot0', 'rot30'])
    """
    recorded = [tv.domain, *(tv.metadata.get("train_domains") or [])]
    return list(dict.fromkeys(d for d in recorded if isinstance(d, str) and d))


def check_held_out(task_vectors: Sequence[TaskVector], test_domains: Sequence[str], allow: bool) -> list[str]:
    """Refuse to test on a domain one of the experts was fine-tuned on: its accuracy would not be held out.

    Args:
        task_vectors: The experts' task vectors (their metadata records their domains, :func:`expert_domains`).
        test_domains: The domains about to be tested.
        allow: ``allow_target_experts``: test them anyway, with a warning; the caller labels their metrics
            :data:`NOT_HELD_OUT`.

    Returns:
        The test domains that are not held out (empty when every one is; only with ``allow``).

    Raises:
        ValueError: Without ``allow``: naming each such domain and the task-vector file(s) of its expert(s).
    """
    leaks: dict[str, list[str]] = {}
    for tv in task_vectors:
        for domain in expert_domains(tv):
            if domain in test_domains:
                leaks.setdefault(domain, []).append(tv.describe())
    if not leaks:
        return []
    found = "; ".join(
        f"test domain '{domain}' is not held out: the task vector{'s' if len(files) > 1 else ''} "
        f"{' and '.join(files)} {'were' if len(files) > 1 else 'was'} fine-tuned on it"
        for domain, files in leaks.items()
    )
    if not allow:
        raise ValueError(
            f"Target leakage: {found}. Drop that task vector or that test domain, or set allow_target_experts=True "
            f"(--model.allow_target_experts true) to test it anyway, labelled '<domain>{NOT_HELD_OUT}'."
        )
    rank_zero_warn(
        f"MergeModule: {found}; its metrics are named 'test/<domain>{NOT_HELD_OUT}/...' (allow_target_experts=True)."
    )
    return list(leaks)


def held_out(task_vectors: Sequence[TaskVector], mode: str, stage: str, datamodule: Any, allow: bool) -> list[str]:
    """:func:`check_held_out` for MergeModule's ``setup``: the test domains, when ``stage`` tests and ``mode`` merges.

    ``test`` and ``predict`` read the datamodule's ``test_domains`` (:class:`~lightning_score.data.TestDomains`);
    ``merge`` and ``ensemble`` combine experts and are checked; ``expert`` (one expert, e.g. the target's own as an
    upper bound) and ``zeroshot`` are not.

    Returns:
        The test domains that are not held out (only with ``allow``).
    """
    if stage not in ("test", "predict") or mode not in ("merge", "ensemble") or not isinstance(datamodule, TestDomains):
        return []
    return check_held_out(task_vectors, list(datamodule.test_domains or []), allow)
