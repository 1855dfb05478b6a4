"""The statistics data-using merge methods take, collected by running each expert on its own source domain.

A data-using method (registered with ``needs_data=True``) takes its statistics as options; the option's
name says which statistic it is, and :data:`STATISTICS` says how MergeModule collects each one:

* ``activations`` (ESM): the inputs of ESM's target layers (``attn.in_proj_weight``, ``mlp.c_fc.weight``,
  ``mlp.c_proj.weight``), ``[images × tokens, width]`` per layer.
* ``grams`` (RegMean): ``XᵀX / N`` of the inputs X of every linear layer of the transformer blocks
  (``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight``, ``mlp.c_proj.weight``), N the
  number of rows (images × tokens), as RegMean's released code averages them.
* ``fishers`` (Fisher merging): the diagonal Fisher information of every parameter of the image encoder,
  F[i] = E_x Σ_y p(y|x) (∂ log p(y|x) / ∂θ_i)², the expectation over the label taken exactly under the
  expert's own predictive distribution (Matena & Raffel, NeurIPS 2022, §2; their released code computes
  it so for classifiers), averaged over the images. It costs one backward pass per class and image.

Expert t is θ₀ + τ_t, run on ``datamodule.proxy_dataloader(domain_t, proxy_images)``: unlabelled images
of its own domain's validation data, never an image it trained on and never a test (target) domain, in
eval mode under the Trainer's precision (:mod:`lightning_score.merge_module.passes`). A method's needs are read
from its registered options (:func:`statistic_names`), so a new data method that takes ``grams`` is
collected for without any change here. The datamodule is a :class:`~lightning_score.data.SourceDomains`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_score.data.protocols import SourceDomains
from lightning_score.merge_module.passes import gradient_pass, images_and_labels, layer_grams, layer_inputs
from lightning_score.merging import MethodSpec, get_method
from lightning_score.merging.keys import is_block_linear
from lightning_score.merging.methods.esm import ESM_TARGETS
from lightning_score.task_vector import TaskVector

__all__ = [
    "STATISTICS",
    "ProxyPass",
    "Statistic",
    "collect_statistics",
    "diagonal_fisher",
    "statistic_names",
    "statistic_options",
]


@dataclass(frozen=True)
class ProxyPass:
    """One expert on its own domain's proxy images: what a statistic's collector gets.

    Attributes:
        expert: The image encoder with θ₀ + τ_t loaded, on ``device``, in the Trainer's precision.
        loader: Its domain's proxy loader (unlabelled images of the domain's validation data).
        keys: The task vector's keys (the statistics are given for a subset of them).
        head: The zero-shot head (logits = head(normalize(expert(x)))).
        trainer: The Trainer (its precision plugin), or None.
        device: Where the expert runs.
    """

    expert: nn.Module
    loader: Any
    keys: Sequence[str]
    head: nn.Module | None
    trainer: pl.Trainer | None
    device: torch.device

    def linear_keys(self) -> list[str]:
        """The keys of the transformer blocks' 2-D linear weights."""
        state = self.expert.state_dict()
        return [k for k in self.keys if is_block_linear(k) and k in state and state[k].ndim == 2]


@dataclass(frozen=True)
class Statistic:
    """How to collect one kind of statistic, per expert.

    Attributes:
        name: The merge-method option that takes it.
        describes: One line for messages and docs.
        collect: Computes one expert's mapping ``key -> tensor`` (on CPU).
    """

    name: str
    describes: str
    collect: Callable[[ProxyPass], dict[str, Tensor]]


def _activations(run: ProxyPass) -> dict[str, Tensor]:
    targets = [k for k in run.keys if k.endswith(ESM_TARGETS)]
    return layer_inputs(run.expert, targets, run.loader, run.trainer, run.device)


def _grams(run: ProxyPass) -> dict[str, Tensor]:
    return layer_grams(run.expert, run.linear_keys(), run.loader, run.trainer, run.device)


def _fishers(run: ProxyPass) -> dict[str, Tensor]:
    if run.head is None:
        raise ValueError("The Fisher pass needs the classifier's head (the log-likelihood is over its classes).")
    return diagonal_fisher(run.expert, run.head, run.loader, run.keys, run.trainer, run.device)


STATISTICS: dict[str, Statistic] = {
    s.name: s
    for s in (
        Statistic("activations", "inputs of ESM's target layers [rows, width]", _activations),
        Statistic("grams", "X^T X / rows of each block linear layer's inputs [width, width]", _grams),
        Statistic("fishers", "diagonal Fisher of each parameter (expected squared log-likelihood gradient)", _fishers),
    )
}
"""The statistics MergeModule collects, by the option name a merge method takes them under."""


def statistic_names(registration: MethodSpec) -> tuple[str, ...]:
    """The options of a registered method that MergeModule fills with statistics (empty: a data-free one).

    Raises:
        ValueError: The method needs data but takes none of :data:`STATISTICS`.

    Example:
        >>> from lightning_score.merging import get_method
        >>> statistic_names(get_method("regmean")), statistic_names(get_method("score"))
        (('grams',), ())
    """
    if not registration.needs_data:
        return ()
    names = tuple(option for option in registration.defaults if option in STATISTICS)
    if not names:
        raise ValueError(
            f"Merge method '{registration.name}' needs data, but none of its options "
            f"({', '.join(registration.defaults) or 'none'}) is a statistic MergeModule collects "
            f"({', '.join(STATISTICS)}): call merge_task_vectors with its "
            "statistics yourself."
        )
    return names


def statistic_options(method: str) -> tuple[str, ...]:
    """:func:`statistic_names` of the method registered as ``method``.

    Raises:
        ValueError: The method is unknown, or needs data but takes none of :data:`STATISTICS`.
    """
    return statistic_names(get_method(method))


def _check_sources(task_vectors: Sequence[TaskVector], datamodule: Any, method: str) -> SourceDomains:
    if not isinstance(datamodule, SourceDomains):
        raise ValueError(
            f"Method '{method}' needs unlabelled images of the source domains: test with a DomainDataModule (or "
            "a datamodule with proxy_dataloader(domain, num_images) and the rest of "
            "lightning_score.data.SourceDomains)."
        )
    test_domains = set(datamodule.test_domains or [])
    for tv in task_vectors:
        if not tv.domain:
            raise ValueError(f"{tv.describe()} records no domain, which '{method}' needs to draw proxy images.")
        if tv.domain in test_domains:
            raise ValueError(
                f"{tv.describe()} is the expert of '{tv.domain}', a test domain: '{method}' never uses "
                "target-domain images. Merge only source-domain experts."
            )
    return datamodule


def collect_statistics(
    method: str,
    names: Sequence[str],
    task_vectors: Sequence[TaskVector],
    encoder: nn.Module,
    pretrained: Mapping[str, Tensor],
    head: nn.Module | None,
    datamodule: Any,
    *,
    num_images: int,
    trainer: pl.Trainer | None,
    device: torch.device,
) -> dict[str, list[dict[str, Tensor]]]:
    """Run each expert θ₀ + τ_t on ``num_images`` proxy images of its own domain; collect the statistics ``names``.

    Args:
        method: The merge method's name (for messages).
        names: The statistics it takes (:func:`statistic_names` of its registration); empty: nothing is run.
        task_vectors: The experts' task vectors; each records its (source) domain.
        encoder: The image encoder (θ₀ loaded or not: each expert's weights are loaded into a copy).
        pretrained: θ₀, the encoder's pre-trained state.
        head: The zero-shot head (for the Fisher's log-likelihood).
        datamodule: A :class:`~lightning_score.data.SourceDomains`: ``proxy_dataloader(domain, num_images)`` and
            ``test_domains``.
        num_images: Proxy images per source domain.
        trainer: The Trainer (precision), or None.
        device: Where the experts run.

    Returns:
        Option name → one mapping per task vector, in their order (tensors on CPU): the options to give
        :func:`~lightning_score.merging.merge_task_vectors`.

    Raises:
        ValueError: A task vector has no domain or is a test domain's expert, or there is no proxy data.
    """
    if not names:
        return {}
    sources = _check_sources(task_vectors, datamodule, method)
    collected: dict[str, list[dict[str, Tensor]]] = {name: [] for name in names}
    for tv in task_vectors:  # one expert at a time: one extra copy of the encoder in memory
        expert = copy.deepcopy(encoder).to(device)
        expert.load_state_dict(tv.apply_to(pretrained))
        loader = sources.proxy_dataloader(tv.domain, num_images)
        run = ProxyPass(expert, loader, list(tv), head, trainer, device)
        for name in names:
            collected[name].append(STATISTICS[name].collect(run))
        del expert, run
    return collected


def diagonal_fisher(
    model: nn.Module,
    head: nn.Module,
    loader: Any,
    keys: Sequence[str],
    trainer: pl.Trainer | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """The diagonal Fisher of ``model``'s parameters ``keys`` under the classifier ``head(normalize(model(x)))``.

    F[i] = (1/N) Σ_x Σ_y p(y|x) (∂ log p(y|x) / ∂θ_i)² over the N images of ``loader``: per image, one
    forward pass and one backward pass per class (the expectation over y is exact). Runs in eval mode
    under the Trainer's precision, with gradients; the squares are summed in float32.

    Args:
        model: The image encoder (its parameters' ``requires_grad`` flags are changed: pass a copy).
        head: Features → logits.
        loader: Images (labels, if any, are not used).
        keys: Parameter names to compute the Fisher for; names that are not parameters are skipped.
        trainer: The Trainer (precision), or None.
        device: Where to compute.

    Returns:
        key → Fisher tensor of the parameter's shape, float32 on CPU.
    """
    parameters = dict(model.named_parameters())
    names = [k for k in keys if k in parameters and parameters[k].is_floating_point()]
    model.requires_grad_(False)
    chosen = [parameters[k].requires_grad_(True) for k in names]
    sums = {k: torch.zeros(parameters[k].shape, dtype=torch.float32, device=parameters[k].device) for k in names}
    count = 0
    with gradient_pass(model, trainer) as convert:
        for batch in loader:
            images, _ = images_and_labels(batch)
            for image in images:
                logits = head(F.normalize(model(convert(image[None].to(device))), dim=-1))[0]
                log_probs = logits.float().log_softmax(dim=-1)
                probs = log_probs.detach().exp()
                classes = len(log_probs)
                for label in range(classes):
                    grads = torch.autograd.grad(
                        log_probs[label], chosen, retain_graph=label < classes - 1, allow_unused=True
                    )
                    for name, grad in zip(names, grads, strict=True):
                        if grad is not None:
                            sums[name] += probs[label] * grad.float().square()
                count += 1
    model.requires_grad_(False)
    if count == 0:
        raise ValueError("The Fisher pass got no images: the proxy loader is empty.")
    return {name: (total / count).cpu() for name, total in sums.items()}
