"""The paper's matrix convention on every backbone: which tensors an SVD-based merge sees as one matrix.

The SCORE, TSV, Iso and ESM papers merge open_clip's image tower, so each block's fused q/k/v input projection
(``attn.in_proj_weight``, [3d, d]) is *one* matrix, the positional embedding is a [T, d] matrix and the
projection ``proj`` is [d, e]. Other libraries hold the same tensors otherwise: transformers' CLIP splits q, k
and v into three [d, d] matrices and stores the projection transposed; timm fuses q/k/v but keeps a 3-D
``pos_embed`` [1, T, d] (which a merge would not treat as a matrix at all) and a transposed ``head.weight``.
An SVD-based merge of the split matrices is another merge (the merged q/k/v differ by 50-110 % on synthetic
experts, ``tests/models/test_conventions.py``). Nor is a transposed matrix always merged to the transposed merge:
Iso-C and CART are transpose-equivariant, TSV and SCORE's ``full`` and ``diagonal`` only when T divides
r = min(m, n) (else the polar factor fills the empty slots with an arbitrary basis), SCORE's trimming and
Iso-CTS's common subspace never; so the projection is given transposed, as open_clip's ``proj``.

:func:`to_matrix_convention` rewrites a task vector of any backbone so that every matrix is the one open_clip
holds (under the backbone's own key names, the q/k/v keys excepted); merge it; :func:`from_matrix_convention`
gives the merged result back in the backbone's convention. The same experts then merge to the same model
whichever library holds them. ``qkv="split"`` instead gives q, k and v as three matrices (FusionBench's
per-matrix convention on transformers' CLIP), on every backbone alike; the rest is as with ``"fused"``.

Example:
    >>> import torch
    >>> hf = {f"vision_model.encoder.layers.0.self_attn.{p}_proj.weight": torch.eye(2) for p in "qkv"}
    >>> {k: tuple(v.shape) for k, v in to_matrix_convention(hf, "hf").items()}
    {'vision_model.encoder.layers.0.self_attn.qkv_proj.weight': (6, 2)}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from lightning_score.models.convert import KeyConvention, get_convention, key_pattern

__all__ = ["QKV_CONVENTIONS", "QKVConvention", "from_matrix_convention", "to_matrix_convention"]

QKVConvention = Literal["fused", "split"]
QKV_CONVENTIONS: tuple[str, ...] = ("fused", "split")


def _check(qkv: str) -> None:
    if qkv not in QKV_CONVENTIONS:
        raise ValueError(
            f"qkv={qkv!r}: use 'fused' (each block's q/k/v input projection as one matrix, the papers' convention) "
            "or 'split' (q, k and v as three matrices, FusionBench's)."
        )


def _fuse(state: Mapping[str, Tensor], convention: KeyConvention) -> dict[str, Tensor]:
    """Each block's q, k, v keys as one key (at q's place), concatenated along the output dimension."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        for fused, split in convention.qkv:
            found = key_pattern(split).fullmatch(key)
            if found is None:
                continue
            names = [split.format(i=found["i"], p=p) for p in "qkv"]
            missing = [n for n in names if n not in state]
            if missing:
                raise ValueError(
                    f"{key!r} fuses with {missing}, which the task vector lacks: q, k and v of a block go together "
                    "(or pass qkv='split')."
                )
            if found["p"] == "q":
                out[fused.format(i=found["i"])] = torch.cat([state[n] for n in names], dim=0)
            break
        else:
            out[key] = tensor
    return out


def _split(state: Mapping[str, Tensor], convention: KeyConvention) -> dict[str, Tensor]:
    """Each block's fused q/k/v key as three keys, split at d and 2d along the output dimension."""
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        for fused, split in convention.qkv:
            found = key_pattern(fused).fullmatch(key)
            if found is not None:
                if tensor.shape[0] % 3:
                    raise ValueError(f"{key!r} has {tensor.shape[0]} rows, not 3·d: it is no fused q/k/v projection.")
                for p, part in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                    out[split.format(i=found["i"], p=p)] = part.contiguous()
                break
        else:
            out[key] = tensor
    return out


def _regroup(state: Mapping[str, Tensor], convention: KeyConvention, have: str, want: str) -> dict[str, Tensor]:
    if have == want:
        return dict(state)
    return _fuse(state, convention) if want == "fused" else _split(state, convention)


def to_matrix_convention(
    task_vector: Mapping[str, Tensor], backbone: str, *, qkv: QKVConvention = "fused"
) -> dict[str, Tensor]:
    """A backbone's task vector (or state dict) with every matrix as open_clip holds it, ready to merge.

    Args:
        task_vector: Keys to tensors in ``backbone``'s own convention (see :mod:`lightning_score.models.convert`).
        backbone: ``"open_clip"``, ``"hf"`` or ``"timm"``.
        qkv: ``"fused"`` (default): each block's q/k/v input projection as one [3d, d] matrix (and its bias as one
            [3d] vector) under the fused key (open_clip's ``attn.in_proj_weight``, timm's ``attn.qkv.weight``,
            ``self_attn.qkv_proj.weight`` for transformers). ``"split"``: q, k and v as three keys
            (transformers' ``self_attn.{q,k,v}_proj.weight``, ``attn.{q,k,v}_proj_weight`` for open_clip,
            ``attn.{q,k,v}.weight`` for timm).

    Returns:
        A new dict; tensors that need no change are the input's own. timm's ``pos_embed`` is [T, d], the
        projection (transformers' ``visual_projection.weight``, timm's ``head.weight``) is [d, e].
    """
    _check(qkv)
    convention = get_convention(backbone)
    state = {k: next((f(v) for name, f, _ in convention.as_matrix if name == k), v) for k, v in task_vector.items()}
    return _regroup(state, convention, convention.qkv_native, qkv)


def from_matrix_convention(
    task_vector: Mapping[str, Tensor], backbone: str, *, qkv: QKVConvention = "fused"
) -> dict[str, Tensor]:
    """The inverse of :func:`to_matrix_convention`: a merged task vector back in the backbone's own convention.

    Args:
        task_vector: What :func:`to_matrix_convention` gives (after merging), for the same ``backbone``.
        backbone: ``"open_clip"``, ``"hf"`` or ``"timm"``.
        qkv: The ``qkv`` it was given in.

    Returns:
        A new dict in ``backbone``'s convention (its model's ``load_state_dict`` keys and shapes).
    """
    _check(qkv)
    convention = get_convention(backbone)
    state = _regroup(task_vector, convention, qkv, convention.qkv_native)
    return {k: next((f(v) for name, _, f in convention.as_matrix if name == k), v) for k, v in state.items()}
