"""Subspace-conflict analysis: the Subspace Alignment Ratio (SAR) and singular-spectrum summaries.

Notation of the SCORE paper (Chaves et al., CVPR 2026, arXiv:2603.05768). For T task vectors and one matrix key,
Δ_t ∈ ℝ^{m×n} is task t's update, r = min(m, n), and Δ_t = U_t S_t V_tᵀ its thin SVD with singular
values σ_1 ≥ … ≥ σ_r.

- **Effective rank at an energy threshold.** k_t is the smallest rank whose leading singular values hold
  at least ``energy`` of Δ_t's squared Frobenius norm: Σ_{l ≤ k_t} σ_l² ≥ energy · Σ_l σ_l². (This is the
  definition; the SCORE authors' script takes one rank fewer.) A zero matrix has k_t = 0.
- **Subspace Alignment Ratio.** SAR(Δ_j | Δ_i) = ‖U_{i,:k_i} U_{i,:k_i}ᵀ Δ_j‖_F / ‖Δ_j‖_F ∈ [0, 1]: the
  fraction (in Frobenius norm) of task j's update that lies in the dominant column space of task i's
  update. Computed for every ordered pair, i = j included, it forms a T×T matrix whose **row i is the basis
  task i and column j the projected task j**. High off-diagonal values mean strongly overlapping
  subspaces: the conflicts SCORE resolves.

Two consequences worth knowing when reading the numbers. The matrix is not symmetric in general (a task
with a narrow subspace can lie inside a wide one but not the reverse), and the diagonal is not exactly 1:
SAR(Δ_i | Δ_i) = sqrt(Σ_{l ≤ k_i} σ_l² / Σ_l σ_l²) ∈ [sqrt(energy), 1], equal to 1 only when the leading
k_i directions hold all of Δ_i (a matrix of rank ≤ k_i, or ``energy=1.0``).

**Zero matrices.** When Δ_j = 0 the ratio is 0/0; it is defined as 0 in the per-key values, and the mean
over keys of column j skips those keys (a key that a task did not change says nothing about its
overlap). When Δ_i = 0, k_i = 0 and the basis is empty, so SAR(Δ_j | Δ_i) = 0 for every non-zero Δ_j.
Neither case ever produces NaN.

Everything here is pure torch: task vectors (lazy files included) are read one key at a time, each key's
T matrices get one batched SVD on the compute device, and the results come back on CPU in float64.

The steps, one module each: :mod:`.keys` (validate the inputs, choose the matrix keys, stream them one at a
time) → :mod:`.svd` (per key: the scaled batched SVD, effective ranks, SAR of every ordered pair) →
:mod:`.alignment` (:func:`subspace_alignment`, the mean over keys, :class:`SubspaceAlignment`) and
:mod:`.spectra` (:func:`singular_spectra`, :class:`SingularSpectra`).
"""

from __future__ import annotations

from lightning_score.analysis.alignment import SubspaceAlignment, subspace_alignment
from lightning_score.analysis.keys import depth_key
from lightning_score.analysis.spectra import SingularSpectra, singular_spectra
from lightning_score.analysis.svd import effective_rank, key_alignment

__all__ = [
    "SingularSpectra",
    "SubspaceAlignment",
    "depth_key",
    "effective_rank",
    "key_alignment",
    "singular_spectra",
    "subspace_alignment",
]
