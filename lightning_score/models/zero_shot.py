"""Zero-shot classification heads: class prompts → one frozen, bias-free linear layer.

For class c and templates t₁…t_K: e_{c,k} = normalise(text_encoder(t_k.format(c))); w_c = normalise(mean_k e_{c,k});
W = logit_scale · [w_1; …; w_C]. An image is classified by ``normalise(image_features) @ Wᵀ``. The scale is
the model's own (``exp(logit_scale)``, 100 for OpenAI's CLIP).

The head is the same for every expert and every merged model of a dataset, so it is cached on disk,
keyed by a fingerprint of the text-side weights, the class names and the templates: a second fit
reads it back instead of re-encoding. Each cached file records a digest of its tensor; a file that cannot be
read (cut off, not safetensors) or does not match its digest is recomputed and rewritten, with a warning naming
it, never used.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_score.task_vector import state_dict_fingerprint
from lightning_score.utilities.files import atomic_write, cache_key, cache_root

__all__ = ["ZeroShotHead", "build_zero_shot_head", "encode_class_prompts", "fixed_zero_shot_head", "text_fingerprint"]

log = logging.getLogger(__name__)

_HEAD_VERSION = 1
_DIGEST_KEY = "fingerprint"  # the header field holding state_dict_fingerprint({"weight": weight})


class ZeroShotHead(nn.Module):
    """A frozen, bias-free linear classifier whose rows are scaled class-prompt embeddings.

    The weight is a buffer (saved in checkpoints, never given to an optimiser).

    Args:
        weight: ``[num_classes, embed_dim]``, already multiplied by the logit scale.
        classnames: The class names, in label order.
        templates: The templates the rows were built from.

    Example:
        >>> head = ZeroShotHead(torch.eye(2) * 100, ["cat", "dog"], ["a photo of a {}."])
        >>> head(torch.tensor([[0.0, 1.0]])).argmax(-1).item()
        1
    """

    weight: Tensor

    def __init__(self, weight: Tensor, classnames: Sequence[str], templates: Sequence[str]) -> None:
        super().__init__()
        if weight.ndim != 2 or weight.shape[0] != len(classnames):
            raise ValueError(f"Head weight has shape {tuple(weight.shape)}; expected [{len(classnames)}, embed_dim].")
        self.register_buffer("weight", weight.detach().clone())
        self.classnames = list(classnames)
        self.templates = list(templates)

    @property
    def num_classes(self) -> int:
        """Number of classes (rows)."""
        return self.weight.shape[0]

    def forward(self, features: Tensor) -> Tensor:
        """Logits ``features @ weightᵀ`` (pass L2-normalised image features)."""
        return features @ self.weight.to(features.dtype).T

    def extra_repr(self) -> str:
        """Shape and template count, for ``print(module)``."""
        return f"num_classes={self.num_classes}, embed_dim={self.weight.shape[1]}, templates={len(self.templates)}"


def text_fingerprint(model: nn.Module) -> str:
    """Fingerprint of everything in an open_clip model except the image encoder (``visual.*``)."""
    state = model.state_dict()
    return state_dict_fingerprint(
        state, [k for k, v in state.items() if not k.startswith("visual.") and torch.is_floating_point(v)]
    )


@torch.no_grad()
def encode_class_prompts(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> Tensor:
    """The unscaled head: one L2-normalised mean prompt embedding per class, ``[C, D]`` float32 on CPU.

    Args:
        model: An open_clip model (its ``encode_text`` is used on the model's current device).
        tokenizer: The model's tokenizer.
        classnames: Class names, substituted into each template.
        templates: Templates with one ``{}``.
        batch_size: Prompts per text-encoder call.
    """
    device = next(model.parameters()).device
    prompts = [t.format(c) for c in classnames for t in templates]
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size]).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    model.train(was_training)
    per_prompt = torch.cat(chunks).view(len(classnames), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1).cpu()


def build_zero_shot_head(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
    *,
    cache: bool = True,
    cache_dir: str | Path | None = None,
) -> ZeroShotHead:
    """Build (or read from the disk cache) the zero-shot head of ``model`` for ``classnames``.

    Args:
        model: An open_clip model; its text tower and ``logit_scale`` are used.
        tokenizer: The model's tokenizer.
        classnames: Class names in label order.
        templates: Prompt templates (see :mod:`lightning_score.models.templates`).
        cache: Read and write the on-disk cache.
        cache_dir: Folder for cached heads (default ``<cache root>/zero_shot_heads``).

    Returns:
        The frozen head, on CPU, rows of norm ``exp(logit_scale)``.
    """
    classnames, templates = list(classnames), list(templates)
    if not classnames:
        raise ValueError("A zero-shot head needs at least one class name.")
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "zero_shot_heads"
    key = cache_key(_HEAD_VERSION, text_fingerprint(model), classnames, templates)
    path = folder / f"{key}.safetensors"
    if cache and path.is_file():
        cached = _read_cached_head(path, len(classnames))
        if cached is not None:
            log.debug("Zero-shot head read from %s", path)
            return ZeroShotHead(cached, classnames, templates)
    scale = model.logit_scale.detach().float().exp().cpu()
    weight = encode_class_prompts(model, tokenizer, classnames, templates) * scale
    if cache:
        tensors = {"weight": weight.contiguous()}
        header = {_DIGEST_KEY: state_dict_fingerprint(tensors)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
        log.debug("Zero-shot head for %d classes x %d templates cached at %s", len(classnames), len(templates), path)
    return ZeroShotHead(weight, classnames, templates)


def fixed_zero_shot_head(head: tuple[Tensor, Sequence[str] | None], classnames: Sequence[str]) -> ZeroShotHead:
    """A head given as weights (a backbone without a text tower), checked against the datamodule's classes.

    Args:
        head: ``(weight [classes, dim] scaled by the logit scale, the class names it records or None)``.
        classnames: The datamodule's class names, in label order.

    Raises:
        ValueError: Another number of rows, or recorded class names that differ (in names or order).

    Example:
        >>> fixed_zero_shot_head((torch.eye(2), ["cat", "dog"]), ["cat", "dog"]).num_classes
        2
    """
    weight, recorded = head
    if weight.shape[0] != len(classnames):
        raise ValueError(
            f"The zero-shot head file has {weight.shape[0]} rows but the datamodule has {len(classnames)} classes: "
            "give the head of these classes (backbone_options.head)."
        )
    if recorded is not None and list(recorded) != list(classnames):
        raise ValueError(
            f"The zero-shot head file is of classes {list(recorded)[:5]}..., the datamodule's are "
            f"{list(classnames)[:5]}...: the names and their order must agree."
        )
    return ZeroShotHead(weight, classnames, [])


def _read_cached_head(path: Path, num_classes: int) -> Tensor | None:
    """The cached head's weight, or ``None`` (with a warning naming the file) when the file is damaged.

    Damaged: not a readable safetensors file (cut off, overwritten), no ``weight`` of ``num_classes`` rows, or
    content that does not hash to the digest recorded when it was written (a file of an earlier release,
    without one, is recomputed too).
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored = (handle.metadata() or {}).get(_DIGEST_KEY)
            weight = handle.get_tensor("weight")
    except (SafetensorError, OSError, ValueError) as error:
        problem = f"cannot be read ({error})"
    else:
        if weight.ndim != 2 or weight.shape[0] != num_classes:
            problem = f"holds a weight of shape {tuple(weight.shape)}, not [{num_classes}, embed_dim]"
        elif stored is None:
            problem = "records no digest of its content (written by an earlier release)"
        elif state_dict_fingerprint({"weight": weight}) != stored:
            problem = "does not match the digest recorded when it was written (its content changed)"
        else:
            return weight
    warnings.warn(f"The cached zero-shot head '{path}' {problem}: recomputing it and rewriting the file.", stacklevel=3)
    return None
