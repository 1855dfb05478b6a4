"""RegMean: the closed-form merge of each linear layer from its inputs' Gram matrices. Data-using.

Jin, Ren, Preotiuc-Pietro, Cheng. "Dataless Knowledge Fusion by Merging Weights of Language Models",
ICLR 2023, arXiv:2212.09849.

A linear layer y = W x merged from T experts should map every expert's inputs as that expert does:
minimising Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖² gives W* = (Σ_t W_t G_t)(Σ_t G_t)⁻¹ with G_t = X_tᵀX_t, the Gram matrix
of the layer's inputs on expert t's data. The formula is linear in W_t, so with W_t = W₀ + τ_t the
pre-trained weights drop out and the merged update is

    Δ* = (Σ_t τ_t G̃_t)(Σ_t G̃_t)⁻¹,   G̃_t = a·G_t + (1 − a)·diag(G_t),

where the paper's regulariser a (``reduce_non_diagonal``) scales the off-diagonal entries. Every key without
Gram matrices (biases, norms, embeddings, the 4-D patch embedding) gets the mean over tasks, as in the
authors' code. The system is solved through a Cholesky factorisation of Σ_t G̃_t (never an explicit
inverse); a Gram sum that is not positive definite is an error that names the layer.

Reference implementation: bloomberg/dataless-model-merging@92247ae (the merger's RegMean path with
``regmean_reduce_nondiag``, ``src/configs/defaults.yaml`` and the ``exps/**/*regmean*.yaml`` configurations);
with the same Gram matrices it computes this exactly.

The statistics come as one option (the core never runs a model)::

    grams = [  # one mapping per task, in the task vectors' order
        {"transformer.resblocks.0.attn.in_proj_weight": G_0,  # [n, n] = X_tᵀ X_t, float32 or float64
         "transformer.resblocks.0.mlp.c_fc.weight": ...,      # n = the weight's input width (shape[1])
         ...},
        ...,
    ]

The keys are weight keys of the task vectors, of 2-D weights applied as y = x Wᵀ (PyTorch's ``Linear``
layout [out, in]; open_clip's ``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight``,
``mlp.c_proj.weight``), and every task covers the same keys. X_t stacks the layer's inputs on expert t's
own proxy images (source domains only), one row per image and token. Use one normalisation for every task:
the paper sums over examples; dividing each G_t by its row count weighs the tasks equally.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lightning_score.merging.registry import KeyMerger, KeyStream, register_method

__all__ = ["RegMeanMerge", "regmean_layer", "regularise_gram"]


def regularise_gram(gram: Tensor, reduce_non_diagonal: float) -> Tensor:
    """G̃ = a·G + (1 − a)·diag(G): the off-diagonal entries scaled by a, the diagonal unchanged."""
    if reduce_non_diagonal == 1.0:
        return gram
    diagonal = torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
    return reduce_non_diagonal * gram + (1.0 - reduce_non_diagonal) * diagonal


def regmean_layer(deltas: Tensor, grams: Tensor, reduce_non_diagonal: float = 1.0, key: str = "layer") -> Tensor:
    """Δ* = (Σ_t τ_t G̃_t)(Σ_t G̃_t)⁻¹ for one layer: ``deltas [T, m, n]``, ``grams [T, n, n]`` → ``[m, n]``."""
    regularised = regularise_gram(grams, reduce_non_diagonal)
    total = regularised.sum(dim=0)
    rhs = (deltas @ regularised).sum(dim=0)  # Σ_t τ_t G̃_t, [m, n]
    factor, info = torch.linalg.cholesky_ex(total)
    if int(info) != 0:
        raise ValueError(
            f"regmean: the summed Gram matrix of layer '{key}' is not positive definite (fewer input rows than "
            "its input width, or a dead input): collect more proxy images, or set reduce_non_diagonal below 1."
        )
    # Δ* Σ G̃ = Σ τ_t G̃_t  ⇔  (Σ G̃) Δ*ᵀ = (Σ τ_t G̃_t)ᵀ, Σ G̃ symmetric
    return torch.cholesky_solve(rhs.mT, factor).mT


@register_method(
    "regmean",
    reference="Jin, Ren, Preotiuc-Pietro, Cheng, Dataless Knowledge Fusion by Merging Weights of Language Models, "
    "ICLR 2023, arXiv:2212.09849",
    scope="all",
    needs_data=True,
)
class RegMeanMerge(KeyMerger):
    """Merge each linear layer so that it maps every expert's own inputs as that expert does (least squares).

    Cost per m×n linear layer: T products m×n×n, one Cholesky factorisation and solve of n×n; memory
    O(T·(m·n + n²)). Needs the Gram matrices of each linear layer's inputs on a few unlabelled images of each
    source domain, supplied as ``grams`` (see the module docstring for their format).

    Args:
        grams: One mapping per task, weight key → Gram matrix ``[n, n]`` of that layer's inputs on the task's
            proxy images. Required.
        reduce_non_diagonal: The paper's regulariser a: off-diagonal Gram entries are multiplied by it (1.0:
            the plain closed form, which is the authors' code's default, ``regmean_reduce_nondiag: -1``, i.e.
            off). Their released configurations set it per benchmark: unset (1.0) on GLUE; 0.1 for RoBERTa-base
            on emotion and NER, for DeBERTa-v3-large on emotion and for T5-v1.1-base; 0.9 for DeBERTa-v3-large
            on out-of-domain NER. Values below 1 also make a rank-deficient Gram sum solvable.
    """

    def __init__(
        self, *, grams: Sequence[Mapping[str, Tensor]] | None = None, reduce_non_diagonal: float = 1.0
    ) -> None:
        if grams is None:
            raise ValueError(
                "Merge method 'regmean' needs data: pass grams=[{layer weight key: X^T X [n, n]}, ...], one mapping "
                "per task, computed on a few unlabelled images of that task's (source) domain."
            )
        if isinstance(grams, Mapping) or not isinstance(grams, Sequence):
            raise ValueError("regmean: grams must be a list with one mapping (weight key -> Gram matrix) per task.")
        if not 0.0 <= reduce_non_diagonal <= 1.0:
            raise ValueError(f"regmean: reduce_non_diagonal must lie in [0, 1], got {reduce_non_diagonal}.")
        self.grams = list(grams)
        self.reduce_non_diagonal = reduce_non_diagonal
        self.targets = set(self.grams[0]) if self.grams else set()

    def prepare(self, stream: KeyStream) -> None:
        """Check the Gram matrices against the task vectors before any work."""
        if len(self.grams) != stream.num_tasks:
            raise ValueError(
                f"regmean: got grams for {len(self.grams)} task(s) but {stream.num_tasks} task vectors; give one "
                "mapping per task, in the same order."
            )
        for index, mapping in enumerate(self.grams):
            if set(mapping) != self.targets:
                raise ValueError(f"regmean: the grams of task {index} cover other layers than those of task 0.")
        for key in sorted(self.targets):
            if key not in stream.shapes:
                raise ValueError(f"regmean: grams given for '{key}', which is not a key of the task vectors.")
            shape = stream.shapes[key]
            if len(shape) != 2:
                raise ValueError(f"regmean: grams given for '{key}', which has shape {shape}, not a 2-D weight.")
            for index, mapping in enumerate(self.grams):
                gram = mapping[key]
                if tuple(gram.shape) != (shape[1], shape[1]):
                    raise ValueError(
                        f"regmean: the Gram matrix of '{key}' for task {index} has shape {tuple(gram.shape)}; expected "
                        f"[{shape[1]}, {shape[1]}] (the layer's input width, weight shape {shape})."
                    )
                if not bool(torch.isfinite(gram).all()):
                    raise ValueError(f"regmean: the Gram matrix of '{key}' for task {index} has NaN or inf entries.")

    def merge_key(self, key: str, deltas: Tensor) -> Tensor:
        """The RegMean solution for layers with Gram matrices, the mean for every other key."""
        if key not in self.targets:
            return deltas.mean(dim=0)
        grams = torch.stack([mapping[key].to(device=deltas.device, dtype=deltas.dtype) for mapping in self.grams])
        return regmean_layer(deltas, grams, self.reduce_non_diagonal, key)
