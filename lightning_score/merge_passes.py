"""The forward passes a merge needs before testing: α's validation accuracy and ESM's proxy activations.

Both run as Lightning's own evaluation loops do: the model in eval mode, under ``torch.inference_mode``,
inside the precision plugin's forward context (autocast for ``*-mixed``, half-precision weights and inputs
for ``*-true``), on the Trainer's device. They read only source-domain data: the datamodule's
``val_dataloader()`` (the sources' validation data) and ``proxy_dataloader(domain, n)`` for a source domain,
never a test (target) loader.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_score.merging.esm import ESM_TARGETS
from lightning_score.ranks import rank_share
from lightning_score.task_vector import TaskVector

__all__ = ["expert_activations", "inference_pass", "layer_inputs", "validation_accuracy"]


@contextlib.contextmanager
def inference_pass(module: nn.Module, trainer: pl.Trainer | None) -> Iterator[Callable[[Tensor], Tensor]]:
    """Eval mode, inference mode and the Trainer's precision context; yields the input converter.

    The module's train/eval flags (per submodule) are restored afterwards.
    """
    modes = {sub: sub.training for sub in module.modules()}
    precision = trainer.precision_plugin if trainer is not None else None
    module.eval()
    try:
        with torch.inference_mode(), precision.forward_context() if precision else contextlib.nullcontext():
            yield precision.convert_input if precision is not None else (lambda images: images)
    finally:
        for sub, training in modes.items():
            sub.training = training


def _images_and_labels(batch: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, list | tuple):
        return batch[0], batch[1] if len(batch) > 1 else None
    return batch, None


def validation_accuracy(
    encoder: nn.Module,
    head: nn.Module,
    loaders: Any,
    trainer: pl.Trainer | None,
    device: torch.device,
) -> float:
    """Top-1 accuracy of ``head(normalize(encoder(x)))`` over the validation data, split across the ranks.

    Each rank evaluates its own share of every loader; the correct/total counts are summed over ranks with
    the strategy's ``reduce``, so every rank gets the same accuracy. One loader: its pooled accuracy; a list
    of loaders (one per source domain): the mean of their accuracies.
    """
    strategy = trainer.strategy if trainer is not None else None
    rank, world = (strategy.global_rank, strategy.world_size) if strategy is not None else (0, 1)
    loader_list = list(loaders) if isinstance(loaders, Sequence) else [loaders]
    counts = torch.zeros(len(loader_list), 2, dtype=torch.float64, device=device)
    with inference_pass(encoder, trainer) as convert:
        for index, loader in enumerate(loader_list):
            for batch in rank_share(loader, rank, world):
                images, labels = _images_and_labels(batch)
                if labels is None:
                    raise ValueError("The validation loader yields images without labels; α search needs labels.")
                logits = head(F.normalize(encoder(convert(images.to(device))), dim=-1))
                counts[index, 0] += (logits.argmax(-1) == labels.to(device)).sum()
                counts[index, 1] += len(labels)
    if strategy is not None and world > 1:
        counts = strategy.reduce(counts, reduce_op="sum")
    accuracies = counts[:, 0] / counts[:, 1].clamp(min=1)
    return float(accuracies.mean())


def layer_inputs(
    encoder: nn.Module,
    targets: Sequence[str],
    loader: Any,
    trainer: pl.Trainer | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """The inputs of the layers owning the weight keys ``targets``, over every image of ``loader``.

    Returns:
        weight key → ``[images × tokens, width]`` float32 on CPU.
    """
    captured: dict[str, list[Tensor]] = {key: [] for key in targets}
    handles = []
    for key in targets:
        module_path = key.removesuffix(".in_proj_weight").removesuffix(".weight")
        module = operator.attrgetter(module_path)(encoder)

        def hook(_: nn.Module, args: tuple[Any, ...], key: str = key) -> None:
            captured[key].append(args[0].detach().reshape(-1, args[0].shape[-1]).to("cpu", torch.float32))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with inference_pass(encoder, trainer) as convert:
            for batch in loader:
                images, _ = _images_and_labels(batch)
                encoder(convert(images.to(device)))
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(chunks) for key, chunks in captured.items()}


def expert_activations(
    encoder: nn.Module,
    pretrained: Mapping[str, Tensor],
    task_vectors: Sequence[TaskVector],
    datamodule: Any,
    num_images: int,
    method: str,
    trainer: pl.Trainer | None,
    device: torch.device,
) -> list[dict[str, Tensor]]:
    """ESM's proxy pass: each expert θ₀ + τ_t on a few unlabelled images of its own (source) domain.

    Returns:
        One mapping per task vector: target weight key → its layer's inputs ``[images × tokens, width]``.
    """
    if datamodule is None or not hasattr(datamodule, "proxy_dataloader"):
        raise ValueError(f"Method '{method}' needs unlabelled source images: test with a DomainDataModule.")
    targets = [k for k in pretrained if k.endswith(ESM_TARGETS)]
    test_domains = set(getattr(datamodule, "test_domains", []) or [])
    activations = []
    for tv in task_vectors:
        if not tv.domain:
            raise ValueError(f"{tv.describe()} records no domain, which '{method}' needs to draw proxy images.")
        if tv.domain in test_domains:
            raise ValueError(
                f"{tv.describe()} is the expert of '{tv.domain}', a test domain: '{method}' never uses "
                "target-domain images. Merge only source-domain experts."
            )
        expert = copy.deepcopy(encoder).to(device)
        expert.load_state_dict(tv.apply_to(pretrained))
        loader = datamodule.proxy_dataloader(tv.domain, num_images)
        activations.append(layer_inputs(expert, targets, loader, trainer, device))
        del expert
    return activations
