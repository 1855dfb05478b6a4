"""Task vectors: what fine-tuning changed, key by key, as a read-only mapping with provenance.

For an expert fine-tuned from pre-trained weights θ₀ to θ_t, its task vector is τ_t = θ_t − θ₀ over
every floating-point entry of the state dict (integer buffers such as step counters are skipped).

A :class:`TaskVector` is stored as one safetensors file: the tensors, plus a JSON metadata record that
names the base model, a fingerprint of the pre-trained weights and the expert. Nothing but safetensors
is ever read, so loading a task vector can never execute code, and :meth:`TaskVector.load` memory-maps
the file and reads a key only when it is asked for.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_score.task_vector_files import (
    FILE_FINGERPRINTS,
    FORMAT,
    FORMAT_VERSION,
    KIND,
    EntryState,
    LazyLowRank,
    content_hash,
    entry_state,
    file_contents,
    file_identity,
    read_contents,
    unchanged,
)
from lightning_score.utilities.files import atomic_write
from lightning_score.utilities.low_rank import LowRankUpdate, add_updates
from lightning_score.utilities.tensor_files import LazySafetensors, state_dict_fingerprint

__all__ = ["FORMAT", "FORMAT_VERSION", "KIND", "LowRankUpdate", "TaskVector", "state_dict_fingerprint"]


class TaskVector(Mapping[str, Tensor]):
    """A read-only mapping ``key -> τ[key]`` with metadata about where it came from.

    Build one with :meth:`from_state_dicts`, combine with ``+``, ``-`` and scalar ``*``, apply with
    :meth:`apply_to`, and store with :meth:`save` / :meth:`load`.

    Args:
        tensors: The task vector's entries.
        metadata: JSON-serialisable provenance. Known fields: ``name`` (the expert), ``domain``,
            ``base_model`` (e.g. ``"ViT-B-32/openai"``), ``base_fingerprint`` (see
            :func:`state_dict_fingerprint`); merged task vectors add ``merge``, a LoRA expert's ``adapters``.
        low_rank: Entries kept as their factors, Δ = s·B·A (a LoRA expert's adapted weights): ``tv[key]`` builds
            the dense update when asked, :meth:`low_rank` gives the factors, and saving, loading, ``+``, ``-`` and
            ``*`` keep them as factors. Keys must differ from those of ``tensors``.

    Example:
        >>> import torch
        >>> pre = {"w": torch.zeros(2, 2), "step": torch.tensor(3)}
        >>> fine = {"w": torch.ones(2, 2), "step": torch.tensor(9)}
        >>> tv = TaskVector.from_state_dicts(pre, fine, name="art")
        >>> sorted(tv), tv.name
        (['w'], 'art')
        >>> (2 * tv)["w"].sum().item()
        8.0
        >>> tv.apply_to(pre, alpha=0.5)["w"][0, 0].item()
        0.5
        >>> lora = TaskVector({}, low_rank={"w": LowRankUpdate(torch.ones(2, 1), torch.ones(1, 2), 0.5)})
        >>> lora["w"].sum().item(), lora.low_rank("w").rank, (2 * lora).low_rank("w").scale
        (2.0, 1, 1.0)
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor],
        metadata: Mapping[str, Any] | None = None,
        low_rank: Mapping[str, LowRankUpdate] | None = None,
    ) -> None:
        self._tensors = tensors
        self._low_rank: Mapping[str, LowRankUpdate] = low_rank if low_rank is not None else {}
        both = [key for key in self._low_rank if key in tensors]
        if both:
            raise ValueError(f"Key '{both[0]}' is given both as a dense entry and as a low-rank one: give it once.")
        self._keys = list(tensors) + list(self._low_rank) if self._low_rank else None
        self._metadata: dict[str, Any] = dict(metadata or {})
        try:
            json.dumps(self._metadata)
        except TypeError as error:
            raise ValueError(f"Task-vector metadata must be JSON-serialisable: {error}") from error
        self._path: Path | None = None
        self._content_fingerprint: str | None = None
        self._fingerprinted: EntryState = None  # the entries _content_fingerprint was computed from
        self._as_on_file: EntryState = None  # the entries when they last equalled the file's (load, save)

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_state_dicts(
        cls,
        pretrained: Mapping[str, Tensor],
        finetuned: Mapping[str, Tensor],
        keys: Iterable[str] | None = None,
        **metadata: Any,
    ) -> TaskVector:
        """τ = finetuned − pretrained over floating-point entries.

        Args:
            pretrained: θ₀, the weights every expert started from.
            finetuned: θ_t, the expert's weights (same keys and shapes).
            keys: Restrict to these keys (all must be floating point); default: every floating-point key.
            **metadata: Provenance stored with the task vector (``name``, ``domain``, ``base_model``...).
                ``base_fingerprint`` defaults to the fingerprint of ``pretrained`` over the same keys.

        Returns:
            The task vector, on CPU, in the pre-trained weights' dtypes (computed in float64: a ``bf16-true`` fit's
            bfloat16 weights minus its float32 θ₀ keep θ₀'s precision).
        """
        if keys is None:
            keys = [k for k, v in pretrained.items() if torch.is_floating_point(v)]
        else:
            keys = list(keys)
            for key in keys:
                if key not in pretrained:
                    raise ValueError(f"Key '{key}' is not in the pre-trained state dict.")
                if not torch.is_floating_point(pretrained[key]):
                    raise ValueError(
                        f"Key '{key}' is not floating point ({pretrained[key].dtype}); "
                        "task vectors hold floating-point entries only."
                    )
        missing = [k for k in keys if k not in finetuned]
        if missing:
            raise ValueError(
                f"The fine-tuned state dict lacks {len(missing)} key(s) of the pre-trained one, e.g. "
                f"'{missing[0]}'. Pass the state dict of the same module (or restrict with keys=...)."
            )
        tensors: dict[str, Tensor] = {}
        with torch.no_grad():
            for key in keys:
                before, after = pretrained[key], finetuned[key]
                if before.shape != after.shape:
                    raise ValueError(
                        f"Key '{key}' has shape {tuple(before.shape)} before fine-tuning and "
                        f"{tuple(after.shape)} after; both must come from one architecture."
                    )
                delta = after.detach().to("cpu", torch.float64) - before.detach().to("cpu", torch.float64)
                tensors[key] = delta.to(before.dtype).contiguous()
        if "base_fingerprint" not in metadata:  # hashing θ₀ reads every byte: only when not given
            metadata["base_fingerprint"] = state_dict_fingerprint(pretrained, keys)
        return cls(tensors, metadata)

    # --- mapping ----------------------------------------------------------------------------------

    def __getitem__(self, key: str) -> Tensor:
        if key in self._low_rank:
            return self._low_rank[key].dense()
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors) if self._keys is None else iter(self._keys)

    def __len__(self) -> int:
        return len(self._tensors) + len(self._low_rank)

    def __contains__(self, key: object) -> bool:  # without reading a tensor
        return key in self._tensors or key in self._low_rank

    def low_rank(self, key: str) -> LowRankUpdate | None:
        """Entry ``key`` as its factors Δ = s·B·A when it is kept so (a LoRA expert's adapted weight), else None."""
        return self._low_rank.get(key)

    @property
    def low_rank_keys(self) -> frozenset[str]:
        """The keys kept as factors (empty for a dense task vector)."""
        return frozenset(self._low_rank)

    def __repr__(self) -> str:
        where = f", path='{self._path}'" if self._path else ""
        return f"TaskVector(name={self.name!r}, keys={len(self)}{where})"

    # --- metadata ---------------------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        """A copy of the provenance record."""
        return json.loads(json.dumps(self._metadata))

    @property
    def name(self) -> str | None:
        """The expert's name (usually its domain), if recorded."""
        return self._metadata.get("name")

    @property
    def domain(self) -> str | None:
        """The domain the expert was fine-tuned on, if recorded."""
        return self._metadata.get("domain")

    @property
    def base_model(self) -> str | None:
        """The pre-trained model, e.g. ``"ViT-B-32/openai"``, if recorded."""
        return self._metadata.get("base_model")

    @property
    def base_fingerprint(self) -> str | None:
        """:func:`state_dict_fingerprint` of the pre-trained weights, if recorded."""
        return self._metadata.get("base_fingerprint")

    def content_fingerprint(self) -> str:
        """:func:`state_dict_fingerprint` of this task vector's own tensors: what identifies its content.

        Hashing reads every byte (about 0.4 s for a ViT-B/32 image tower), so the result is kept: per object while
        its entries are the same tensors, none changed in place (``tv[key].copy_(...)``, ``+=``: their version
        counters are compared), and per process and file (path, inode, size, mtime) for entries still the file's.
        Caches of work derived from the task vector, such as :class:`~lightning_score.merging.FactorCache`, are
        keyed by it. Writes that bypass the version counter (``tensor.data``, a NumPy view) are not seen.

        Example:
            >>> import torch
            >>> a = TaskVector({"w": torch.ones(2, 2)}, {"name": "a"})
            >>> a.content_fingerprint() == TaskVector({"w": torch.ones(2, 2)}, {"name": "b"}).content_fingerprint()
            True
            >>> before = a.content_fingerprint()
            >>> _ = a["w"].mul_(2)  # edited in place
            >>> a.content_fingerprint() == before
            False
        """
        state = self._entry_state()
        if self._content_fingerprint is not None and unchanged(state, self._fingerprinted):
            return self._content_fingerprint
        as_on_file = self._path is not None and unchanged(state, self._as_on_file) and self._path.exists()
        identity = file_identity(self._path) if as_on_file and self._path is not None else None
        cached = FILE_FINGERPRINTS.get(identity) if identity is not None else None
        self._content_fingerprint = cached or content_hash(self._tensors, self._low_rank)
        self._fingerprinted = state
        if identity is not None:
            FILE_FINGERPRINTS[identity] = self._content_fingerprint
        return self._content_fingerprint

    def _entry_state(self) -> EntryState:
        return entry_state(self._tensors, self._low_rank)

    def tensor_spec(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of entry ``key``; for a lazily loaded file, without reading the tensor."""
        if key in self._low_rank:
            if isinstance(self._low_rank, LazyLowRank):
                return self._low_rank.tensor_spec(key)
            return self._low_rank[key].shape, self._low_rank[key].dtype
        if isinstance(self._tensors, LazySafetensors):
            return self._tensors.tensor_spec(key)
        tensor = self._tensors[key]
        return tuple(tensor.shape), tensor.dtype

    @property
    def path(self) -> Path | None:
        """The file this task vector was loaded from or saved to, if any."""
        return self._path

    def describe(self) -> str:
        """A short label for messages: the file if there is one, else the name."""
        if self._path is not None:
            return f"'{self._path}'"
        return f"task vector '{self.name}'" if self.name else "an unnamed task vector"

    # --- arithmetic -------------------------------------------------------------------------------

    def _combine(self, other: Mapping[str, Tensor], sign: float) -> TaskVector:
        if set(self) != set(other):
            only_self = sorted(set(self) - set(other))[:3]
            only_other = sorted(set(other) - set(self))[:3]
            raise ValueError(
                f"Cannot combine task vectors with different keys (only in the left: {only_self}, "
                f"only in the right: {only_other})."
            )
        other_fp = other.base_fingerprint if isinstance(other, TaskVector) else None
        if self.base_fingerprint and other_fp and self.base_fingerprint != other_fp:
            raise ValueError(
                f"Cannot combine {self.describe()} and {other.describe()}: they were made "
                "from different pre-trained weights (base fingerprints differ)."
            )
        out, low_rank = {}, {}
        for key in self:
            first, second = self.low_rank(key), other.low_rank(key) if isinstance(other, TaskVector) else None
            a_shape, b_shape = self.tensor_spec(key)[0], tuple(other[key].shape) if second is None else second.shape
            if a_shape != b_shape:
                raise ValueError(f"Key '{key}' has shape {a_shape} in one task vector and {b_shape} in the other.")
            if first is not None and second is not None:  # factors stay factors, of rank ρ₁ + ρ₂
                low_rank[key] = add_updates(first, second, sign)
            else:
                a = self[key]
                out[key] = a + sign * other[key].to(a.dtype)
        meta = {k: v for k, v in self._metadata.items() if k in ("base_model", "base_fingerprint")}
        return TaskVector(out, meta, low_rank)

    def __add__(self, other: Mapping[str, Tensor]) -> TaskVector:
        return self._combine(other, 1.0)

    def __sub__(self, other: Mapping[str, Tensor]) -> TaskVector:
        return self._combine(other, -1.0)

    def __mul__(self, scalar: float) -> TaskVector:
        if not isinstance(scalar, numbers.Real):
            return NotImplemented
        low_rank = {key: update.scaled(float(scalar)) for key, update in self._low_rank.items()}
        dense = {key: tensor * float(scalar) for key, tensor in self._tensors.items()}
        return TaskVector(dense, self._metadata, low_rank)

    __rmul__ = __mul__

    def __neg__(self) -> TaskVector:
        return self * -1.0

    # --- use --------------------------------------------------------------------------------------

    def apply_to(
        self,
        target: Mapping[str, Tensor] | nn.Module,
        alpha: float = 1.0,
        exempt: Collection[str] = (),
    ) -> dict[str, Tensor] | nn.Module:
        """θ = θ₀ + α·τ (in float64, stored in θ₀'s dtype).

        Args:
            target: A state dict (left untouched; a new dict is returned) or a module (updated in place
                and returned). Keys of the target that the task vector lacks are kept as they are.
            alpha: The scaling coefficient.
            exempt: Keys that α does not scale (they get θ₀ + τ), e.g. a merge's ``alpha_exempt_keys``.

        Returns:
            The new state dict, or the same module with updated weights.
        """
        state = target.state_dict() if isinstance(target, nn.Module) else target
        for key in self:
            if key not in state:
                raise ValueError(
                    f"{self.describe()} has key '{key}' that the target lacks: apply a task vector to the "
                    "module it was made from (for a CLIP expert: the image encoder, not the whole model)."
                )
            if tuple(state[key].shape) != tuple(self[key].shape):
                raise ValueError(
                    f"Key '{key}' has shape {tuple(self[key].shape)} in {self.describe()} and "
                    f"{tuple(state[key].shape)} in the target."
                )
        exempt = set(exempt)
        out = {} if isinstance(target, nn.Module) else dict(target)
        with torch.no_grad():
            for key in self:
                base, scale = state[key], 1.0 if key in exempt else alpha
                value = base.detach().to(torch.float64) + scale * self[key].to(base.device, torch.float64)
                if isinstance(target, nn.Module):
                    base.copy_(value)  # in place: the parameter keeps its identity, dtype and device
                else:
                    out[key] = value.to(base.dtype)
        return target if isinstance(target, nn.Module) else out

    # --- storage ----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to a safetensors file atomically (a temporary file in the same folder, then a rename).

        Args:
            path: Destination, conventionally ``<name>.safetensors``; parent folders are created.

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors, header = file_contents(self._tensors, self._low_rank, self._metadata)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        self._path = path
        self._as_on_file = self._entry_state()
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], lazy: bool = True) -> TaskVector:
        """Read a task vector written by :meth:`save`.

        Args:
            path: The ``.safetensors`` file.
            lazy: Memory-map the file and read each key only when it is indexed (default). With
                ``False`` every tensor is read into memory now.

        Returns:
            The task vector, with :attr:`path` set.

        Raises:
            FileNotFoundError: The file does not exist.
            ValueError: The file is not a safetensors task vector written by lightning-score.
        """
        path = Path(path)
        tensors, metadata, factors = read_contents(path, KIND, lazy)
        tv = cls(tensors, metadata, factors)
        tv._path = path
        tv._as_on_file = tv._entry_state()
        return tv
