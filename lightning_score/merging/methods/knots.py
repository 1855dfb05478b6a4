"""KnOTS: align the tasks' updates by one SVD of their concatenation, then merge them in the aligned space.

Stoica, Ramesh, Ecsedi, Choshen, Hoffman. "Model merging with SVD to tie the KnOTS", ICLR 2025,
arXiv:2410.19735 (code: github.com/gstoica27/KnOTS). Data-free; made for LoRA experts, whose updates span
different low-rank subspaces, and defined for any update.

Per matrix key, with the T updates Δ_t ∈ ℝ^{m×n} (weights ``[out, in]``):

1. Align: the thin SVD of the updates concatenated along the input dimension,
   [Δ_1 | … | Δ_T] = U Σ [V_1ᵀ | … | V_Tᵀ] ∈ ℝ^{m×Tn}, computed in float64; the triplets with σ ≤
   ``rank_tolerance`` (1e-5, absolute) are dropped, so U ∈ ℝ^{m×ρ}, ρ = the numerical rank of the
   concatenation (at most Σ_t rank(Δ_t)). Task t is then R_t = Σ V_tᵀ ∈ ℝ^{ρ×n}: Δ_t = U R_t up to the dropped
   triplets, every task in the one basis U.
2. Optionally DARE (``drop_rate`` p > 0): each entry of R_t dropped with probability p, the rest divided by 1 − p.
3. Merge the R_t over the whole model, their entries flattened over every matrix key into one vector of P
   entries per task (P = Σ_keys ρ·n): ``merge="ties"`` is TIES (trim each task to the entries with |R_t| ≥ its
   k-th smallest magnitude, k = P − int(P·``density``); elect γ = sign(Σ_t trimmed R_t), zero sums taking the
   sign of Σ γ over the model; per entry, the mean of the trimmed entries whose sign is γ); ``"sum"`` and
   ``"mean"`` trim the same way, then take Σ_t or (1/T) Σ_t.
4. Δ* = U R*. Every other key (biases, norms, ``conv1.weight``, ``text_projection``) gets the mean over tasks.

Reference implementation: gstoica27/KnOTS (read at 01a940c), ``task_merger.py``: ``SVDMerger.apply_svd`` (the
concatenation along dim 1 with ``concat_across_output=True``, float64 ``torch.linalg.svd``, the triplets with
s > 1e-5 kept, each task's block of V scaled by s with ``s_on_V=True``), ``SVDMerger.merge`` (DARE on the scaled
blocks, then the mask over the blocks of every key flattened per task, then ``masked_merge``, then U times the
merged block); ``masking_ops.py``: ``topk_values_mask`` (the per-task rank above; ``topK`` > 1 is a percentage,
a fraction ≥ 1 keeps everything), ``ties_masking`` and ``resolve_sign`` (``sum_of_values``: zero sums take the
majority sign), ``chunked_disjoint_mean``; ``ft_handlers.LoRAHandler`` (a LoRA layer's update is the dense
B·A). Its ViT-B/32 configurations: ``configs/vitB_r16_knots_ties.py`` (KnOTS-TIES: ``topK=20``, α = 0.6) and
``configs/vitB_r16_knots_dare_ties.py`` (KnOTS-DARE-TIES: p = 0.1, ``topK=100``, i.e. no trim, seed 421,
α = 0.7), both ``merging_type="mean"`` (the disjoint mean). The defaults here are KnOTS-TIES's; α is the
merge's global α. Differences: DARE's masks come from one generator per (seed, key)
(:mod:`~lightning_score.merging.seeding`), not from the reference's one global stream; and the reference merges
only the LoRA-adapted layers, whose other keys carry no update, while here every matrix key is aligned (for
full fine-tunes; the reference's full-fine-tune path appends each bias to its weight as a column, which a
per-key merge does not).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from lightning_score.merging.methods.dare import check_drop_rate, drop_and_rescale
from lightning_score.merging.methods.ties import disjoint_mean, elect_sign, threshold_rank, trim_to_top
from lightning_score.merging.order_statistics import kth_smallest
from lightning_score.merging.registry import KeyMerger, KeyStream, register_method
from lightning_score.merging.seeding import check_seed

__all__ = ["MERGE_RULES", "Basis", "KnotsMerge", "aligned_basis"]

Basis = tuple[Tensor, Tensor, Tensor]
"""What :func:`aligned_basis` returns: ``U [m, ρ]``, ``S [ρ]``, ``Vs [T, ρ, n]``."""

MERGE_RULES: tuple[str, ...] = ("ties", "sum", "mean")
"""How KnOTS merges the aligned tasks: TIES's elected-sign disjoint mean, or the sum or mean of the trimmed tasks."""


def aligned_basis(deltas: Tensor, rank_tolerance: float = 1e-5) -> Basis:
    """Step 1: the thin SVD of [Δ_1 | … | Δ_T] without the triplets whose singular value is ≤ ``rank_tolerance``.

    Computed in float64 and returned in the dtype of ``deltas``: the shared basis ``U [m, ρ]``, the singular values
    ``S [ρ]`` and each task's block ``Vs [T, ρ, n]`` (Δ_t = U diag(S) Vs[t]).

    Example:
        >>> import torch
        >>> a, b = torch.randn(6, 1) @ torch.randn(1, 4), torch.randn(6, 1) @ torch.randn(1, 4)
        >>> U, S, Vs = aligned_basis(torch.stack([a, b]).double())
        >>> U.shape, S.shape, Vs.shape, torch.allclose((U * S) @ Vs[1], b.double())
        (torch.Size([6, 2]), torch.Size([2]), torch.Size([2, 2, 4]), True)
    """
    tasks, m, n = deltas.shape
    concatenated = deltas.transpose(0, 1).reshape(m, tasks * n).double()
    U, S, Vh = torch.linalg.svd(concatenated, full_matrices=False)
    kept = S.gt(rank_tolerance)  # σ > tolerance
    U, S, Vh = U[:, kept], S[kept], Vh[kept]
    Vs = Vh.reshape(-1, tasks, n).transpose(0, 1)
    return U.to(deltas.dtype), S.to(deltas.dtype), Vs.to(deltas.dtype)


@register_method(
    "knots",
    reference="Stoica, Ramesh, Ecsedi, Choshen, Hoffman, Model merging with SVD to tie the KnOTS, ICLR 2025, "
    "arXiv:2410.19735",
    choices={"merge": MERGE_RULES},
)
class KnotsMerge(KeyMerger):
    """Align the tasks by one SVD of their concatenated updates, then merge them in that basis with TIES.

    Cost per matrix key: float64 SVDs of m×Tn. A merge with ``density`` < 1 streams the model once to count P
    and two (float32) or four (float64) times for the thresholds, ``merge="ties"`` once more for the majority
    sign, then once to merge; a low-rank key's SVD (LoRA experts') is computed once for the statistics and once
    to merge, a full-rank key's in every pass. Memory: one key's T slices and their SVD, plus the low-rank keys'
    bases during the statistics passes (at most one task vector's size).

    Args:
        density: The fraction K of each task's aligned entries TIES keeps, over every matrix key (0.2: the
            authors' ViT KnOTS-TIES ``topK=20``; 1.0 keeps everything, as their KnOTS-DARE-TIES).
        merge: ``"ties"`` (the elected sign's disjoint mean, the authors' setting), ``"sum"`` or ``"mean"`` of
            the trimmed aligned tasks.
        drop_rate: DARE's drop probability p on the aligned tasks before trimming (0.0: none; the authors'
            KnOTS-DARE-TIES uses 0.1 with ``density=1.0``).
        seed: Seeds DARE's per-key generators (0).
        rank_tolerance: Singular values of the concatenation at or below it are dropped with their vectors
            (1e-5, the authors' absolute cut).
    """

    def __init__(
        self,
        *,
        density: float = 0.2,
        merge: str = "ties",
        drop_rate: float = 0.0,
        seed: int = 0,
        rank_tolerance: float = 1e-5,
    ) -> None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"knots: density must lie in (0, 1], got {density}.")
        if not rank_tolerance >= 0.0:
            raise ValueError(f"knots: rank_tolerance must be >= 0, got {rank_tolerance}.")
        self.density, self.merge, self.rank_tolerance = density, merge, float(rank_tolerance)
        self.drop_rate = check_drop_rate("knots", drop_rate)
        self.seed = check_seed("knots", seed)
        self.thresholds: Tensor | None = None  # None: nothing trimmed
        self.majority_sign = torch.ones(())

    def aligned(self, key: str, deltas: Tensor, basis: Basis | None = None) -> tuple[Tensor, Tensor]:
        """Steps 1-2 for one key: the basis ``U [m, ρ]`` and the aligned tasks ``R [T, ρ, n]``, DARE applied.

        ``basis``: :func:`aligned_basis` of these ``deltas`` when already computed.
        """
        U, S, Vs = aligned_basis(deltas, self.rank_tolerance) if basis is None else basis
        aligned = S[:, None] * Vs
        if self.drop_rate > 0.0:
            aligned = drop_and_rescale(key, aligned, self.drop_rate, self.seed)
        return U, aligned

    def _stream(self, stream: KeyStream, kept: dict[str, Basis]) -> Iterator[Tensor]:
        """Every matrix key's aligned tasks, flattened to ``[T, ρ·n]`` (keys of rank 0 left out).

        A basis no larger than one task's slice of its key (ρ·(m + 1 + T·n) ≤ m·n: low-rank updates, as LoRA
        experts') is kept in ``kept`` for the next passes, so those keys' SVDs are computed once in
        :meth:`prepare`, in at most one task vector's memory; the others are computed again in each pass.
        """
        for key, deltas in stream:
            basis = kept.get(key)
            if basis is None:
                basis = aligned_basis(deltas, self.rank_tolerance)
                if sum(part.numel() for part in basis) <= deltas[0].numel():
                    kept[key] = basis
            aligned = self.aligned(key, deltas, basis)[1].reshape(stream.num_tasks, -1)
            if aligned.shape[1]:
                yield aligned

    def _trim(self, aligned: Tensor) -> Tensor:
        if self.thresholds is None:
            return aligned
        return trim_to_top(aligned, self.thresholds.to(aligned.device, aligned.dtype))

    def prepare(self, stream: KeyStream) -> None:
        """Each task's trim threshold over the aligned entries of every matrix key, then the majority sign."""
        kept: dict[str, Basis] = {}  # this merge's low-rank bases, for prepare's passes only
        if self.density < 1.0:
            total = sum(chunk.shape[1] for chunk in self._stream(stream, kept))
            if total:
                ranks = torch.full((stream.num_tasks, 1), threshold_rank(total, self.density))

                def magnitudes() -> Iterator[Tensor]:
                    return (aligned.abs() for aligned in self._stream(stream, kept))

                self.thresholds = kth_smallest(magnitudes, ranks).squeeze(1)
        if self.merge == "ties":
            sign_sum = torch.zeros((), dtype=torch.float64)
            for aligned in self._stream(stream, kept):
                summed = torch.sign(self._trim(aligned).sum(dim=0)).sum()
                sign_sum += summed.to(device="cpu", dtype=torch.float64)
            self.majority_sign = torch.sign(sign_sum)

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """Δ* = U R*, R* the merge of the key's trimmed aligned tasks."""
        U, aligned = self.aligned(key, deltas)
        trimmed = self._trim(aligned)
        if self.merge == "ties":
            merged = disjoint_mean(trimmed, elect_sign(trimmed, self.majority_sign.to(trimmed.device)))
        elif self.merge == "sum":
            merged = trimmed.sum(dim=0)
        else:
            merged = trimmed.mean(dim=0)
        return U @ merged
