"""ESM: Essential Subspace Merging. Data-dependent.

Li, Qi, Tian, Geng. "Model Merging in the Essential Subspace" (code: github.com/kiddo127/ESM). The core stays
free of Lightning and models: it takes, besides the task vectors, each expert's **inputs to the target
layers** on a few unlabelled images of its own (source) domain, through one option::

    activations = [  # one mapping per task, in the task vectors' order
        {"transformer.resblocks.0.attn.in_proj_weight": X_0,  # [N, n]: rows = images × tokens,
         "transformer.resblocks.0.mlp.c_fc.weight": ...,      #          n = the layer's input width
         ...},
        ...,
    ]

The keys present there are the target layers (the Lightning layer supplies per block ``attn.in_proj_weight``,
``mlp.c_fc.weight`` and ``mlp.c_proj.weight``, collected by running expert t on ~32 images of domain t,
never the target domain). Other matrix keys are merged by TSV-M, non-matrix keys by the mean, and α
multiplies only the target layers.

Per target layer, with Δ_t ∈ ℝ^{m×n} and X_t ∈ ℝ^{N×n}, as the authors' released code computes it:

1. Essential subspace decomposition. Feature shift ΔO_t = X_t Δ_tᵀ ∈ ℝ^{N×m}; its uncentred PCA (an SVD)
   gives output directions and eigenvalues λ (squared singular values). The basis P_t ∈ ℝ^{m×m} holds
   the N' = min(N, m) principal directions; when N < m, the authors complete it with the standard basis
   vectors e_{N'}, …, e_{m−1} (not orthogonalised) with eigenvalue 0. Keep r_t = ⌊m/T⌋ columns:
   u_t = P_t[:, :r_t], v_t = (P_tᵀ Δ_t)[:r_t].
2. Polarized scaling. Task weight (a_t/ā)² on v_t, with a_t = ‖P_tᵀ Δ_t‖_F over the FULL basis, before
   truncation (= ‖Δ_t‖_F when N ≥ m; ‖P_{N'}ᵀΔ_t‖² + ‖Δ_t[N':]‖² under the square root otherwise) and ā
   the mean over tasks. Eigenvalue weights e = (λ/mean λ)^0.15 over the r_t kept directions, normalised
   to mean 1, on the columns of u_t and the rows of v_t (directions of eigenvalue 0 get weight 0).
3. Stack U_cat = [u_1 | … | u_T], V_cat = [v_1; …; v_T]; column weights (g_j/mean g)² on the columns of
   V_cat, g_j the norm of column j after step 2.
4. U_o = polar(U_cat)·mean(svals(U_cat)), V_o = polar(V_cat)·mean(svals(V_cat)), Δ* = 2·U_o V_o.
5. Layer-type-wise scaling, after every key is merged: each key of the four types ``attn.in_proj_weight``,
   ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight`` (so the TSV-merged
   ``attn.out_proj.weight`` layers too) is multiplied by (‖Δ*_ℓ‖_F / mean ‖Δ*‖_F over its type)².

Choosing α (golden-section search on [0, 2] over source-validation accuracy, as the authors do) and
collecting the proxy activations belong to the Lightning layer (``MergeModule``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping, Sequence

import torch
from torch import Tensor

from lightning_score.merging.methods.tsv import tsv_merge
from lightning_score.merging.registry import Factorizations, KeyMerger, KeyStream, register_method
from lightning_score.merging.svd import polar
from lightning_score.merging.task_matrices import TaskMatrices, as_dense

__all__ = ["ESMMerge", "essential_subspace", "layer_type", "polarized_merge"]

log = logging.getLogger(__name__)

ESM_TARGETS: tuple[str, ...] = ("attn.in_proj_weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
#: The layer types of step 5; a key belongs to the first type its name contains.
LAYER_TYPES: tuple[str, ...] = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def layer_type(key: str) -> str | None:
    """The layer type of step 5 whose name the key contains, or None (the key is not rescaled)."""
    return next((name for name in LAYER_TYPES if name in key), None)


def essential_subspace(delta: Tensor, inputs: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step 1 for one task: ``u [m, rank]``, ``v [rank, n]``, the kept eigenvalues ``λ [rank]`` and a_t.

    a_t = ‖P_tᵀ Δ_t‖_F over the whole basis P_t (principal directions, completed by standard basis vectors
    when there are fewer than m), before truncation to ``rank`` directions.
    """
    m = delta.shape[0]
    _, singular_values, directions = torch.linalg.svd(inputs @ delta.mT, full_matrices=False)  # ΔO_t = X_t Δ_tᵀ
    found = directions.shape[0]  # N' = min(N, m) principal directions
    if found < rank:
        log.warning(
            "esm: only %d principal directions from %d proxy rows for a layer with %d outputs and %d kept per task; "
            "as in the authors' code the rest are standard basis vectors of weight 0, and the polar factors complete "
            "them arbitrarily (the result then depends on the linear-algebra backend). Give more proxy images.",
            found, inputs.shape[0], m, rank,
        )  # fmt: skip
    projected = directions @ delta  # their rows of P_tᵀ Δ_t
    energy = torch.sqrt(projected.square().sum() + delta[found:].square().sum())  # + rows of the e_i completion
    basis = torch.cat([directions.mT, torch.eye(m, dtype=delta.dtype, device=delta.device)[:, found:]], dim=1)
    eigenvalues = torch.cat([singular_values.square(), singular_values.new_zeros(m - found)])
    v = torch.cat([projected, delta[found:]], dim=0)
    return basis[:, :rank], v[:rank], eigenvalues[:rank], energy


def _mean_one(values: Tensor) -> Tensor:
    """Divide by the mean (0 where every value is 0: a task whose features do not move)."""
    return values / values.mean().clamp_min(torch.finfo(values.dtype).tiny)


def polarized_merge(
    deltas: Tensor, inputs: Sequence[Tensor], *, eigen_power: float = 0.15, scale: float = 2.0
) -> Tensor:
    """Steps 1-4 for one target layer: ``deltas [T, m, n]``, ``inputs`` T tensors ``[N_t, n]`` → Δ* ``[m, n]``."""
    num_tasks, m, _ = deltas.shape
    rank = m // num_tasks
    us, vs, energies = [], [], []
    for delta, x in zip(deltas, inputs, strict=True):
        u, v, eigenvalues, energy = essential_subspace(delta, x.to(delta.dtype), rank)
        e = _mean_one(_mean_one(eigenvalues) ** eigen_power)
        us.append(u * e)
        vs.append(v * e.unsqueeze(-1))
        energies.append(energy)
    task_weights = _mean_one(torch.stack(energies)).square()  # (a_t / ā)²
    U_cat = torch.cat(us, dim=1)
    V_cat = torch.cat([v * w for v, w in zip(vs, task_weights, strict=True)], dim=0)
    V_cat = V_cat * _mean_one(torch.linalg.vector_norm(V_cat, dim=0)).square()  # (g_j / mean g)²
    U_o = polar(U_cat) * torch.linalg.svdvals(U_cat).mean()
    V_o = polar(V_cat) * torch.linalg.svdvals(V_cat).mean()
    return scale * U_o @ V_o


@register_method(
    "esm",
    reference="Li, Qi, Tian, Geng, Model Merging in the Essential Subspace (code: github.com/kiddo127/ESM)",
    needs_data=True,
)
class ESMMerge(KeyMerger):
    """Merge each target layer in the subspace where the experts' features actually move, from a few images.

    Cost per target layer: T SVDs of the N×m feature shifts, two polar factors and two singular-value
    computations of the stacked factors; memory O(T·(N + n)·m). Needs about 32 unlabelled images per
    source domain (never the target domain), supplied as ``activations``.

    Args:
        activations: One mapping per task, weight key → that layer's inputs ``[N, n]`` on the task's own
            proxy images; the keys given are the target layers. Required.
        eigen_power: The exponent of the eigenvalue weights (0.15).
        scale: The factor of Δ* = scale·U_o V_o (2.0).
    """

    shardable = False  # the layer-type-wise scaling needs every target layer in one process

    def __init__(
        self,
        *,
        activations: Sequence[Mapping[str, Tensor]] | None = None,
        eigen_power: float = 0.15,
        scale: float = 2.0,
    ) -> None:
        if activations is None:
            raise ValueError(
                "Merge method 'esm' needs data: pass activations=[{layer key: inputs [N, n]}, ...], one mapping per "
                "task, or let MergeModule(method='esm') collect them from a few unlabelled source-domain images."
            )
        if isinstance(activations, Mapping) or not isinstance(activations, Sequence):
            raise ValueError("esm: activations must be a list with one mapping (layer key -> inputs) per task.")
        self.activations = list(activations)
        self.eigen_power, self.scale = eigen_power, scale
        self.targets = set(self.activations[0]) if self.activations else set()

    def prepare(self, stream: KeyStream) -> None:
        """Check the activations against the task vectors before any work."""
        if len(self.activations) != stream.num_tasks:
            raise ValueError(
                f"esm: got activations for {len(self.activations)} task(s) but {stream.num_tasks} task vectors; "
                "give one mapping per task, in the same order."
            )
        for index, mapping in enumerate(self.activations):
            if set(mapping) != self.targets:
                raise ValueError(f"esm: the activations of task {index} cover other layers than those of task 0.")
        unknown = sorted(self.targets - set(stream.keys))
        if unknown:
            raise ValueError(
                f"esm: activations given for {unknown[:3]}, which are not matrix keys of the task vectors."
            )
        for key in self.targets:
            width = stream.shapes[key][1]
            for index, mapping in enumerate(self.activations):
                x = mapping[key]
                if x.ndim != 2 or x.shape[1] != width:
                    raise ValueError(
                        f"esm: inputs of layer '{key}' for task {index} have shape {tuple(x.shape)}; expected "
                        f"[N, {width}] (rows = images × tokens)."
                    )

    def low_rank_keys(self, keys: Sequence[str]) -> list[str]:
        """The TSV-merged matrices: LoRA experts' factors go to TSV-M's factor path (the target layers read X Δᵀ)."""
        return [key for key in keys if key not in self.targets]

    def factorized_keys(self, keys: Sequence[str]) -> list[str]:
        """The matrices merged by TSV-M (not the target layers): they start from the tasks' SVDs."""
        return [key for key in keys if key not in self.targets]

    def rank_per_task(self, key: str, shape: tuple[int, ...], num_tasks: int) -> int | None:
        """⌊m/T⌋ output directions per task for a target layer (step 1), ⌊r/T⌋ for the TSV-merged matrices."""
        return (shape[-2] if key in self.targets else min(shape[-2], shape[-1])) // num_tasks

    def merge_key(self, key: str, deltas: Tensor | TaskMatrices, factors: Factorizations | None = None) -> Tensor:
        """Target layers by polarized merging in their essential subspace, other matrices by TSV-M."""
        if key not in self.targets:
            merged = tsv_merge(deltas, factors=factors)
            # dense: step 5 rescales every key of a layer type, out_proj's included, from the merged update's norm
            return as_dense(merged)
        inputs = [mapping[key].to(deltas.device) for mapping in self.activations]
        return polarized_merge(deltas, inputs, eigen_power=self.eigen_power, scale=self.scale)

    def finalize(self, merged: MutableMapping[str, Tensor]) -> None:
        """Step 5: rescale every key of each layer type by (its norm / its type's mean norm)².

        The types cover ``attn.out_proj.weight`` too, which is merged by TSV-M, as in the authors' code.
        """
        groups: dict[str, list[str]] = {}
        for key in merged:
            group = layer_type(key)
            if group is not None:
                groups.setdefault(group, []).append(key)
        for keys in groups.values():
            norms = {key: torch.linalg.vector_norm(merged[key]) for key in keys}
            mean = torch.stack(list(norms.values())).mean().clamp_min(torch.finfo(merged[keys[0]].dtype).tiny)
            for key in keys:
                merged[key] = merged[key] * (norms[key] / mean).square()

    def scales_with_alpha(self, key: str) -> bool:
        """α multiplies only the target layers."""
        return key in self.targets
