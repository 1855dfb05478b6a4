"""``mode="ensemble"``: the experts' logit ensemble, one image encoder per expert (T× the inference cost).

Expert t is θ₀ + α·τ_t in a copy of the image encoder; the ensemble's logits are the mean over the experts of
``head(normalize(expert(x)))``, each expert's features normalised and scored by the one zero-shot head.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_score.task_vector import TaskVector

__all__ = ["ensemble_logits", "expert_encoders"]


def expert_encoders(
    encoder: nn.Module, task_vectors: Sequence[TaskVector], pretrained: Mapping[str, Tensor], alpha: float
) -> nn.ModuleList:
    """One copy of ``encoder`` per task vector, holding θ₀ + α·τ_t (in the encoder's dtype and on its device).

    Args:
        encoder: The image encoder (copied; its own weights are not used).
        task_vectors: The experts' task vectors, read one after another (each expert's weights once).
        pretrained: θ₀, the encoder's pre-trained state.
        alpha: The scaling coefficient of every expert.

    Example:
        >>> encoder = nn.Linear(2, 2, bias=False)
        >>> theta0 = {"weight": torch.zeros(2, 2)}
        >>> experts = expert_encoders(encoder, [TaskVector({"weight": torch.eye(2)})], theta0, alpha=0.5)
        >>> experts[0].weight.diagonal().tolist()
        [0.5, 0.5]
    """
    experts = []
    for tv in task_vectors:
        expert = copy.deepcopy(encoder)
        expert.load_state_dict(tv.apply_to(pretrained, alpha=alpha))
        experts.append(expert)
    return nn.ModuleList(experts)


def ensemble_logits(experts: Sequence[nn.Module], head: nn.Module, images: Tensor) -> Tensor:
    """The mean over ``experts`` of ``head(normalize(expert(images)))``: ``[N, classes]``."""
    logits = [head(F.normalize(expert(images), dim=-1)) for expert in experts]
    return torch.stack(logits).mean(dim=0)
