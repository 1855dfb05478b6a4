"""The forward passes a merge needs before testing: α's validation accuracy and the data methods' statistics.

They run as Lightning's own evaluation loops do: the model in eval mode, under ``torch.inference_mode``
(:func:`inference_pass`; the Fisher pass needs gradients, so :func:`gradient_pass` drops only that), inside
the precision plugin's forward context (autocast for ``*-mixed``, half-precision weights and inputs for
``*-true``), on the Trainer's device. They read only source-domain data: the datamodule's
``val_dataloader()`` (the sources' validation data) and ``proxy_dataloader(domain, n)`` for a source domain,
never a test (target) loader.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_score.data.protocols import DomainNames
from lightning_score.merge_module.layer_inputs import record_layer_inputs
from lightning_score.utilities.ranks import rank_share

__all__ = [
    "gradient_pass",
    "images_and_labels",
    "inference_pass",
    "layer_grams",
    "layer_inputs",
    "ready_for_passes",
    "validation_accuracy",
    "validation_loaders",
]


def ready_for_passes(module: nn.Module, trainer: pl.Trainer | None) -> None:
    """Put ``module`` on the Trainer's device and precision now, as its strategy is about to (no Trainer: nothing).

    The forward passes of a merge's ``setup`` (α search, the statistics) then run exactly as the test will; the
    conversion is in place, so the strategy's own conversion is then a no-op.
    """
    if trainer is None:
        return
    trainer.precision_plugin.convert_module(module)
    module.to(trainer.strategy.root_device)


@contextlib.contextmanager
def inference_pass(
    module: nn.Module, trainer: pl.Trainer | None, gradients: bool = False
) -> Iterator[Callable[[Tensor], Tensor]]:
    """Eval mode, inference mode and the Trainer's precision context; yields the input converter.

    The module's train/eval flags (per submodule) are restored afterwards.

    Args:
        module: The model to run.
        trainer: Its Trainer (``None``: no precision context, inputs unchanged).
        gradients: Record gradients (:func:`gradient_pass`) instead of inference mode.
    """
    modes = {sub: sub.training for sub in module.modules()}
    precision = trainer.precision_plugin if trainer is not None else None
    module.eval()
    try:
        with (
            _gradients_on() if gradients else torch.inference_mode(),
            precision.forward_context() if precision else contextlib.nullcontext(),
        ):
            yield precision.convert_input if precision is not None else (lambda images: images)
    finally:
        for sub, training in modes.items():
            sub.training = training


@contextlib.contextmanager
def _gradients_on() -> Iterator[None]:
    """Autograd on and inference mode off, even inside an evaluation loop."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def gradient_pass(module: nn.Module, trainer: pl.Trainer | None) -> contextlib.AbstractContextManager:
    """As :func:`inference_pass` (eval mode, the Trainer's precision), with autograd on: for the Fisher pass."""
    return inference_pass(module, trainer, gradients=True)


def images_and_labels(batch: Any) -> tuple[Tensor, Tensor | None]:
    """A batch's images and labels (``None`` for a loader of images only, such as ``proxy_dataloader``)."""
    if isinstance(batch, list | tuple):
        return batch[0], batch[1] if len(batch) > 1 else None
    return batch, None


def validation_loaders(datamodule: Any) -> tuple[list[Any], list[str]]:
    """The sources' validation loaders for the α search, each with the source domain(s) it holds, checked.

    ``datamodule.val_dataloader()`` as a list: one loader per source domain (named after ``train_domains`` when
    the counts agree), or one loader pooling every source domain (named after all of them). A loader whose length
    is known and zero (no images, or fewer images than one batch with ``drop_last``) is refused here, before
    anything is merged; :func:`validation_accuracy` refuses one that turns out empty when iterated.

    Returns:
        The loaders, and for each the label of its domain(s) (``'rot0'``; ``'rot0', 'rot60'`` for a pooled one).

    Raises:
        ValueError: No validation loaders, or loaders with no images, naming their domains and the fix.
    """
    found = datamodule.val_dataloader() if datamodule is not None else []
    loaders = list(found) if isinstance(found, Sequence) else [found]
    if not loaders:
        raise ValueError(
            "alpha='auto' chooses α on the source domains' validation data, but the datamodule has none: give "
            "it train_domains (the sources, whose held-out splits are the validation data), or set a number "
            "for alpha."
        )
    sources = list(datamodule.train_domains or []) if isinstance(datamodule, DomainNames) else []
    if len(sources) == len(loaders):
        names = [repr(domain) for domain in sources]
    elif len(loaders) == 1 and sources:
        names = [", ".join(repr(domain) for domain in sources)]
    else:
        names = [f"validation loader {index}" for index in range(len(loaders))]
    empty = [name for name, loader in zip(names, loaders, strict=True) if _known_length(loader) == 0]
    if empty:
        raise _no_validation_images(empty)
    return loaders, names


def _known_length(loader: Any) -> int | None:
    """``len(loader)`` (batches) when the loader knows it, else None (an iterable dataset, a generator)."""
    try:
        return len(loader)
    except TypeError:
        return None


def _no_validation_images(domains: Sequence[str]) -> ValueError:
    return ValueError(
        f"alpha='auto' chooses α on the source domains' validation data, but it has no images for "
        f"{'; '.join(domains)}: every α would score 0. Give those domains validation images "
        "(a validation split), or set a number for alpha."
    )


def validation_accuracy(
    encoder: nn.Module,
    head: nn.Module,
    loaders: Any,
    trainer: pl.Trainer | None,
    device: torch.device,
    domains: Sequence[str] | None = None,
) -> float:
    """Top-1 accuracy of ``head(normalize(encoder(x)))`` over the validation data, split across the ranks.

    Each rank evaluates its own share of every loader; the correct/total counts are summed over ranks with
    the strategy's ``reduce``, so every rank gets the same accuracy. One loader: its pooled accuracy; a list
    of loaders (one per source domain): the mean of their accuracies.

    Args:
        encoder: The image encoder.
        head: The zero-shot head.
        loaders: One validation loader or a list of them.
        trainer: The Trainer (its strategy splits the data and sums the counts; ``None``: this process alone).
        device: Where to run.
        domains: The label of each loader's domain(s), for the error (:func:`validation_loaders`); default
            ``validation loader <i>``.

    Raises:
        ValueError: A loader gave no images (over all ranks), naming its domains; every rank raises it.
    """
    strategy = trainer.strategy if trainer is not None else None
    rank, world = (strategy.global_rank, strategy.world_size) if strategy is not None else (0, 1)
    loader_list = list(loaders) if isinstance(loaders, Sequence) else [loaders]
    counts = torch.zeros(len(loader_list), 2, dtype=torch.float64, device=device)
    with inference_pass(encoder, trainer) as convert:
        for index, loader in enumerate(loader_list):
            for batch in rank_share(loader, rank, world):
                images, labels = images_and_labels(batch)
                if labels is None:
                    raise ValueError("The validation loader yields images without labels; α search needs labels.")
                logits = head(F.normalize(encoder(convert(images.to(device))), dim=-1))
                counts[index, 0] += (logits.argmax(-1) == labels.to(device)).sum()
                counts[index, 1] += len(labels)
    if strategy is not None and world > 1:
        counts = strategy.reduce(counts, reduce_op="sum")
    names = list(domains) if domains is not None else [f"validation loader {i}" for i in range(len(loader_list))]
    empty = [names[index] for index in range(len(loader_list)) if counts[index, 1] == 0]
    if empty:  # the counts are every rank's: every rank raises
        raise _no_validation_images(empty)
    accuracies = counts[:, 0] / counts[:, 1]
    return float(accuracies.mean())


def layer_inputs(
    encoder: nn.Module,
    targets: Sequence[str],
    loader: Any,
    trainer: pl.Trainer | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """The inputs of the layers owning the weight keys ``targets``, over every image of ``loader`` (ESM).

    Returns:
        weight key → ``[images × tokens, width]`` float32 on CPU.
    """
    captured: dict[str, list[Tensor]] = {key: [] for key in targets}

    def keep(key: str, rows: Tensor) -> None:
        captured[key].append(rows.to("cpu", torch.float32))

    _run_over(encoder, targets, loader, trainer, device, keep)
    return {key: torch.cat(chunks) for key, chunks in captured.items()}


def layer_grams(
    encoder: nn.Module,
    targets: Sequence[str],
    loader: Any,
    trainer: pl.Trainer | None,
    device: torch.device,
) -> dict[str, Tensor]:
    """RegMean's statistics: ``XᵀX / N`` of each target layer's inputs X ``[N, width]`` over ``loader``.

    N counts rows (images × tokens); the products are summed in float64 on ``device`` batch by batch, so
    the inputs themselves are never kept. Dividing by N is the normalisation of RegMean's released code
    (a running mean over batches): with the same number of proxy images per source, every task weighs the same.

    Returns:
        weight key → ``[width, width]`` float32 on CPU.
    """
    sums: dict[str, Tensor] = {}
    rows: dict[str, int] = dict.fromkeys(targets, 0)

    def accumulate(key: str, x: Tensor) -> None:
        x = x.to(device=device, dtype=torch.float64)
        product = x.T @ x
        sums[key] = sums[key] + product if key in sums else product
        rows[key] += x.shape[0]

    _run_over(encoder, targets, loader, trainer, device, accumulate)
    return {key: (sums[key] / rows[key]).to("cpu", torch.float32) for key in targets}


def _run_over(
    encoder: nn.Module,
    targets: Sequence[str],
    loader: Any,
    trainer: pl.Trainer | None,
    device: torch.device,
    sink: Callable[[str, Tensor], None],
) -> None:
    seen: set[str] = set()

    def record(key: str, rows: Tensor) -> None:
        seen.add(key)
        sink(key, rows)

    with record_layer_inputs(encoder, targets, record), inference_pass(encoder, trainer) as convert:
        for batch in loader:
            images, _ = images_and_labels(batch)
            encoder(convert(images.to(device)))
    missing = [key for key in targets if key not in seen]
    if missing:
        raise ValueError(
            f"Layer '{missing[0]}' (and {len(missing) - 1} more) received no input during the proxy pass: the "
            "loader was empty, or the model never calls that layer."
        )
