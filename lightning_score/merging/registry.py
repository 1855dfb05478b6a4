"""The registry of merge methods: one registration per method, with its paper and validated options.

A method is registered either as a **function** that merges one key,
``fn(deltas: Tensor[T, *shape], *, option=default, ...) -> Tensor[*shape]``, or as a **class**
(:class:`KeyMerger` subclass) when it needs statistics over the whole model before merging any key
(TIES, PCB) or data besides the task vectors (ESM). Either way the options are the keyword-only
parameters with their defaults, so the registry can list them, fill defaults and reject unknown ones.

One keyword-only parameter is not an option: ``factors`` (default None). A function that declares it starts
from each task's thin SVD, and the engine passes it a :class:`~lightning_score.merging.KeyFactors`
when the merge has a :class:`~lightning_score.merging.FactorCache`, to reuse the factorizations.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Hashable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from torch import Tensor

__all__ = [
    "FACTORS_PARAMETER",
    "Factorizations",
    "KeyMerger",
    "KeyStream",
    "MethodSpec",
    "get_method",
    "list_methods",
    "register_method",
]

KeyScope = Literal["matrix", "all"]

#: The keyword a per-key merge function declares to receive reusable factorizations (not an option).
FACTORS_PARAMETER = "factors"

Derived = TypeVar("Derived")


class Factorizations(Protocol):
    """What a method that starts from each task's thin SVD receives as ``factors=``: reusable factorizations.

    The engine passes one per key when the merge has a :class:`~lightning_score.merging.FactorCache`
    (:class:`~lightning_score.merging.KeyFactors` implements it). Both calls take the ``deltas`` the method is
    merging and compute from them when those are not the exact tensor the engine loaded, so a method can never
    read factors of other inputs; every reuse returns what the computation would (bit for bit).
    """

    def leading(self, deltas: Tensor, k: int, sign_convention: str = "svd") -> tuple[Tensor, Tensor, Tensor]:
        """Each task's k leading singular triplets: ``U [T, m, k]``, ``S [T, k]``, ``Vh [T, k, n]``."""
        ...

    def reuse(self, deltas: Tensor, name: Hashable, compute: Callable[[], Derived]) -> Derived:
        """``compute()``'s result for this key and these experts, computed once per set of experts."""
        ...


class KeyStream:
    """Re-iterable stream of ``(key, deltas)`` over the whole model, one key's T slices at a time.

    ``deltas`` is a ``[T, *shape]`` tensor on the compute device in the compute dtype. The engine
    hands a stream to :meth:`KeyMerger.prepare` for methods that need global statistics; each
    iteration reads the task vectors again (from memory or from the memory-mapped files).
    """

    def __init__(
        self, keys: Sequence[str], load: Callable[[str], Tensor], shapes: Mapping[str, tuple[int, ...]], num_tasks: int
    ) -> None:
        self.keys = list(keys)
        self.shapes = {key: tuple(shapes[key]) for key in self.keys}
        self.num_tasks = num_tasks
        self._load = load

    def numel(self) -> int:
        """Entries per task over the streamed keys (P), known without reading any tensor."""
        return sum(math.prod(shape) for shape in self.shapes.values())

    def flat(self, transform: Callable[[Tensor], Tensor] | None = None) -> Iterator[Tensor]:
        """Each key's slices as ``[T, n]`` chunks, optionally transformed first (e.g. ``torch.abs``)."""
        for _, deltas in self:
            values = transform(deltas) if transform is not None else deltas
            yield values.reshape(self.num_tasks, -1)

    def map(self, transform: Callable[[str, Tensor], Tensor]) -> KeyStream:
        """The same stream with ``transform(key, deltas)`` applied to every key's slices (e.g. DARE's drop)."""
        return KeyStream(self.keys, lambda key: transform(key, self._load(key)), self.shapes, self.num_tasks)

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        for key in self.keys:
            yield key, self._load(key)

    def __len__(self) -> int:
        return len(self.keys)


class KeyMerger:
    """A merge method with state: options in ``__init__``, statistics in :meth:`prepare`.

    Subclasses declare their options as keyword-only ``__init__`` parameters with defaults and
    implement :meth:`merge_key`. The engine calls, in order: ``prepare(stream)`` once, ``merge_key``
    for every key in scope, then ``finalize(merged)`` once.
    """

    #: Whether keys may be merged in separate processes (False when ``finalize`` needs every key).
    shardable: bool = True

    def prepare(self, stream: KeyStream) -> None:
        """Collect statistics over the whole model (default: nothing to collect)."""

    def factorized_keys(self, keys: Sequence[str]) -> list[str]:
        """Of the keys in scope, those whose merge starts from each task's thin SVD (default: none).

        For these keys the engine may call ``merge_key(key, deltas, factors=...)`` with a
        :class:`~lightning_score.merging.KeyFactors`, so a merger that returns any must accept it.
        """
        return []

    def low_rank_keys(self, keys: Sequence[str]) -> list[str]:
        """Of the keys in scope, those whose ``merge_key`` takes a :class:`~lightning_score.merging.TaskMatrices`.

        For these keys, when a task vector keeps the key as factors (a LoRA expert), the engine passes the tasks as
        ``TaskMatrices`` (factors, and each task's known rank) instead of the dense ``[T, m, n]`` stack (default:
        none; every other method reads the stack, built one key at a time). ``merge_key`` may then return the
        merged update as a :class:`~lightning_score.merging.low_rank.LowRankUpdate` (a merge of low rank kept as
        factors); the merged task vector keeps it so, and :meth:`finalize` does not see it (a merger whose
        ``finalize`` reads every key must return dense updates).
        """
        return []

    def rank_per_task(self, key: str, shape: tuple[int, ...], num_tasks: int) -> int | None:
        """How many singular directions of each task the merge of a key keeps, for methods with such a budget.

        None (default): the method has none. 0: the key has fewer directions than there are tasks, so the method
        would keep none of any task's; the engine then merges the key by the mean over tasks, with a warning
        naming it, instead of calling :meth:`merge_key`.
        """
        return None

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """Merge the T slices ``deltas[t]`` of one key into one tensor of the same shape."""
        raise NotImplementedError

    def finalize(self, merged: MutableMapping[str, Tensor]) -> None:
        """Adjust the merged update in place after every key is merged (default: nothing)."""

    def scales_with_alpha(self, key: str) -> bool:
        """Whether the global coefficient α multiplies this key's merged update (default: yes)."""
        return True


class _FunctionMerger(KeyMerger):
    """Adapts a per-key merge function with bound options to the :class:`KeyMerger` protocol."""

    def __init__(
        self, fn: Callable[..., Tensor], options: Mapping[str, Any], per_task_rank: bool = False, low_rank: bool = False
    ) -> None:
        self._fn = fn
        self._options = dict(options)
        self._takes_factors = FACTORS_PARAMETER in inspect.signature(fn).parameters
        self._per_task_rank = per_task_rank
        self._low_rank = low_rank

    def factorized_keys(self, keys: Sequence[str]) -> list[str]:
        return list(keys) if self._takes_factors else []

    def low_rank_keys(self, keys: Sequence[str]) -> list[str]:
        return list(keys) if self._low_rank else []

    def rank_per_task(self, key: str, shape: tuple[int, ...], num_tasks: int) -> int | None:
        return min(shape[-2], shape[-1]) // num_tasks if self._per_task_rank else None

    def merge_key(self, key: str, deltas: Tensor, factors: Any = None) -> Tensor:
        if factors is not None:
            return self._fn(deltas, **self._options, factors=factors)
        return self._fn(deltas, **self._options)


@dataclass(frozen=True)
class MethodSpec:
    """One registered merge method.

    Attributes:
        name: The name users pass as ``method=``.
        reference: The paper (authors, venue, arXiv id).
        summary: One line on what it does.
        scope: ``"matrix"``: the method merges matrix keys and every other key gets the mean over tasks
            (as in SCORE, TSV-M and Iso); ``"all"``: the method merges every key itself.
        defaults: Option names and their default values.
        choices: For options with a fixed set of valid values, that set.
        needs_data: True for data-dependent methods (ESM), which need more than task vectors.
        shardable: Whether keys may be merged in separate processes (see :attr:`KeyMerger.shardable`).
    """

    name: str
    reference: str
    summary: str
    scope: KeyScope
    defaults: Mapping[str, Any]
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    needs_data: bool = False
    shardable: bool = True
    _factory: Callable[[dict[str, Any]], KeyMerger] | None = field(default=None, repr=False, compare=False)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickled by name: the registration holds a factory closure (a spawned process looks the method up)."""
        return get_method, (self.name,)

    def resolve_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Fill defaults and reject unknown options, values of the wrong type or outside an option's choices.

        Every entry point (``merge_task_vectors``, ``MergeModule``, a study's rows) calls this once and hands
        the result on: :meth:`build` takes it as it is.

        Example:
            >>> from lightning_score.merging import get_method
            >>> get_method("score").resolve_options({"z": 2.5})
            {'variant': 'trimmed', 'z': 2.5, 'divide_by_tasks': True, 'sign_convention': 'svd'}
        """
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()) or "none"
            raise ValueError(f"Unknown option(s) {unknown} for merge method '{self.name}'. Valid options: {valid}.")
        resolved = {**self.defaults, **options}
        for option, value in options.items():
            _check_type(self.name, option, value, self.defaults[option])
        for option, valid_values in self.choices.items():
            if resolved[option] not in valid_values:
                raise ValueError(
                    f"Option {option}={resolved[option]!r} is not valid for merge method '{self.name}'; "
                    f"choose one of {list(valid_values)}."
                )
        return resolved

    def build(self, options: Mapping[str, Any]) -> KeyMerger:
        """A fresh merger for one merge run, from options :meth:`resolve_options` returned.

        The options are not resolved again (defaults, types and choices were checked once, by the caller):
        ``spec.build(spec.resolve_options(options))``. Only their names are compared with the method's, so that
        unresolved options fail here, by name, instead of deep inside the method.

        Raises:
            ValueError: ``options`` does not name every option of the method, or names others.

        Example:
            >>> from lightning_score.merging import get_method
            >>> tsv = get_method("tsv")
            >>> merger = tsv.build(tsv.resolve_options({}))
            >>> merger.factorized_keys(["w"])
            ['w']
        """
        if self._factory is None:
            raise TypeError(f"MethodSpec '{self.name}' has no factory: make merge methods with register_method.")
        missing, unknown = sorted(set(self.defaults) - set(options)), sorted(set(options) - set(self.defaults))
        if missing or unknown:
            raise ValueError(
                f"MethodSpec.build of merge method '{self.name}' takes the options resolve_options returned "
                f"(missing {missing}, unknown {unknown}): call spec.build(spec.resolve_options(options))."
            )
        return self._factory(dict(options))


_REGISTRY: dict[str, MethodSpec] = {}


def _check_type(method: str, option: str, value: Any, default: Any) -> None:
    """Reject a value whose type does not match the option's default (a number for a number, and so on)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        kind = "True or False"
    elif isinstance(default, int):
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        kind = "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        kind = "a finite number"
    elif isinstance(default, str):
        ok = isinstance(value, str)
        kind = "a string"
    else:
        return
    if not ok:
        raise ValueError(f"Option {option}={value!r} of merge method '{method}' must be {kind}.")


def _keyword_defaults(signature: inspect.Signature, owner: str) -> dict[str, Any]:
    defaults = {}
    for param in signature.parameters.values():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY or param.name == FACTORS_PARAMETER:
            continue
        if param.default is inspect.Parameter.empty:
            raise TypeError(f"Option '{param.name}' of merge method {owner} needs a default value.")
        defaults[param.name] = param.default
    return defaults


def register_method(
    name: str,
    *,
    reference: str,
    scope: KeyScope = "matrix",
    choices: Mapping[str, Sequence[Any]] | None = None,
    needs_data: bool = False,
    per_task_rank: bool = False,
    low_rank: bool = False,
) -> Callable[[Any], Any]:
    """Register a merge method under ``name`` (decorator for a function or a :class:`KeyMerger` class).

    Args:
        name: The method name, lower case (``"score"``, ``"ties"``...).
        reference: The paper the method comes from.
        scope: ``"matrix"`` or ``"all"``; see :class:`MethodSpec`.
        choices: Valid values of options that take one of a few settings.
        needs_data: Whether the method needs data besides the task vectors.
        per_task_rank: For a function: it keeps k = ⌊r/T⌋ singular directions of each task of an m×n key, r =
            min(m, n) (see :meth:`KeyMerger.rank_per_task`; a class overrides that method instead).
        low_rank: For a function: it also takes a :class:`~lightning_score.merging.TaskMatrices` as ``deltas``
            (see :meth:`KeyMerger.low_rank_keys`; a class overrides that method instead).

    Returns:
        The decorator; it returns the function or class unchanged.
    """
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"Method name {name!r} must be a lower-case identifier.")

    def decorator(obj: Any) -> Any:
        if name in _REGISTRY:
            raise ValueError(f"A merge method named '{name}' is already registered.")
        doc = inspect.getdoc(obj) or ""
        summary = doc.splitlines()[0] if doc else name
        if inspect.isclass(obj) and issubclass(obj, KeyMerger):
            defaults = _keyword_defaults(inspect.signature(obj.__init__), obj.__name__)

            def factory(options: dict[str, Any]) -> KeyMerger:
                return obj(**options)
        elif callable(obj):
            defaults = _keyword_defaults(inspect.signature(obj), obj.__name__)

            def factory(options: dict[str, Any]) -> KeyMerger:
                return _FunctionMerger(obj, options, per_task_rank, low_rank)
        else:
            raise TypeError(f"Cannot register {obj!r}: expected a function or a KeyMerger subclass.")
        unknown_choices = set(choices or {}) - set(defaults)
        if unknown_choices:
            raise ValueError(f"choices given for unknown option(s) {sorted(unknown_choices)} of '{name}'.")
        _REGISTRY[name] = MethodSpec(
            name=name,
            reference=reference,
            summary=summary,
            scope=scope,
            defaults=defaults,
            choices={k: tuple(v) for k, v in (choices or {}).items()},
            needs_data=needs_data,
            shardable=bool(getattr(obj, "shardable", True)) if inspect.isclass(obj) else True,
            _factory=factory,
        )
        return obj

    return decorator


def list_methods() -> list[str]:
    """The names of every registered merge method, in registration order.

    Example:
        >>> from lightning_score.merging import list_methods
        >>> "score" in list_methods()
        True
    """
    return list(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    """The registration of method ``name``.

    Raises:
        ValueError: No method has that name; the message lists the registered ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown merge method {name!r}. Registered methods: {', '.join(_REGISTRY)}.") from None
