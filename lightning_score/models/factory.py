"""One function that builds an open_clip CLIP with its transforms and tokenizer: :func:`build_clip`.

``pretrained`` says where the weights come from:

- ``None``: random initialisation (seeded by torch's global generator).
- an open_clip tag such as ``"openai"`` or ``"laion2b_s34b_b79k"``: downloaded from the hub on first use.
  When the download fails (offline machine, ``HF_HUB_OFFLINE=1``) the error says how to pass a local file.
- a local weights file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``): read without unpickling arbitrary
  objects (safetensors, or ``torch.load(weights_only=True)``) and loaded strictly.
- ``"builtin:digits"``: the offline base model pre-trained by :mod:`lightning_score.models.digits_base`; built
  into the cache the first time, then loaded as a local file, through exactly the code path above.

:func:`save_clip_weights` writes the safetensors files that this function reads back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import open_clip
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_score.data.builtin import builtin_name, get_builtin, list_builtins
from lightning_score.task_vector import state_dict_fingerprint
from lightning_score.utilities.files import atomic_write

__all__ = [
    "LOCAL_WEIGHT_SUFFIXES",
    "WEIGHTS_FORMAT",
    "CLIPComponents",
    "WeightsUnavailableError",
    "build_clip",
    "check_model_name",
    "names_a_file",
    "read_weights_metadata",
    "resolve_builtin_weights",
    "save_clip_weights",
]

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = "lightning-score/open-clip-weights"
LOCAL_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


class WeightsUnavailableError(RuntimeError):
    """An open_clip tag's weights could not be downloaded (offline, no cache); the message says how to pass a file.

    An input error like a missing weights file: the ``lightning-score`` command reports it in one line.
    """


class CLIPComponents(NamedTuple):
    """What :func:`build_clip` returns."""

    model: nn.Module
    """The open_clip model (``model.visual`` is the image encoder), in eval mode, on the requested device."""
    train_transform: Callable[[Any], torch.Tensor]
    """open_clip's training preprocessing (random resized crop, normalisation) for a PIL image."""
    val_transform: Callable[[Any], torch.Tensor]
    """open_clip's evaluation preprocessing (resize, centre crop, normalisation)."""
    tokenizer: Callable[..., torch.Tensor]
    """The model's tokenizer: a list of strings to a ``[N, context_length]`` token tensor."""
    base_model: str
    """A label for the pre-trained model, e.g. ``"ViT-B-32/openai"`` or ``"tiny-ViT-W96-L3/builtin:digits"``."""
    weights: str | None
    """The tag or the resolved local file the weights came from (``None`` for random initialisation)."""


def check_model_name(model_name: str) -> None:
    """Refuse a name that is no open_clip architecture, listing lightning-score's tiny CPU models."""
    if open_clip.get_model_config(model_name) is None:
        tiny = [m for m in open_clip.list_models() if m.startswith("tiny-")]
        raise ValueError(
            f"model_name {model_name!r} is not an open_clip architecture: use e.g. 'ViT-B-32', 'ViT-B-16', 'ViT-L-14' "
            f"(see open_clip.list_models()) or one of lightning-score's tiny CPU models {tiny}."
        )


def names_a_file(source: str) -> bool:
    """Whether ``pretrained`` names a local weights file (an existing file, a weights suffix, or a path) not a tag.

    Example:
        >>> names_a_file("openai"), names_a_file("merged.safetensors"), names_a_file("runs/base")
        (False, True, True)
    """
    return os.path.isfile(source) or Path(source).suffix in LOCAL_WEIGHT_SUFFIXES or os.sep in source


def resolve_builtin_weights(token: str, model_name: str) -> Path:
    """The local weights file behind a ``builtin:<name>`` token, built into the cache if missing.

    Args:
        token: ``"builtin:digits"``.
        model_name: The architecture the weights are built for.

    Returns:
        The path of a safetensors file that :func:`build_clip` loads like any user file.
    """
    builtin = get_builtin(token)
    if builtin.base is None:
        raise ValueError(f"The built-in {token!r} has no base model: pass pretrained=<an open_clip tag or a file>.")
    return Path(builtin.base(model_name=model_name))


def read_weights_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata header of a safetensors weights file (``{}`` for other files or none).

    Files written by :func:`save_clip_weights` carry ``format``, ``model_name`` and ``fingerprint``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"'{path}' is not a readable safetensors file ({error}).") from error


def save_clip_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    model_name: str,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write an open_clip model's full state dict to a safetensors file, atomically.

    The file loads back with ``build_clip(model_name, pretrained=path)`` to bit-identical weights.

    Args:
        model: The open_clip model (image and text towers).
        path: Destination ``.safetensors`` file; parent folders are created.
        model_name: The open_clip architecture name, recorded in the file and checked on loading.
        metadata: Extra string fields for the header (e.g. how the weights were made).

    Returns:
        The path written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"save_clip_weights writes safetensors only; give a path ending in .safetensors, not '{path}'."
        )
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    header = {
        "format": WEIGHTS_FORMAT,
        "model_name": model_name.removesuffix(_QUICKGELU_SUFFIX),
        "fingerprint": state_dict_fingerprint(tensors),
        "quick_gelu": "true" if uses_quick_gelu(model) else "false",  # restored on loading: same network
        **(metadata or {}),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


_QUICKGELU_SUFFIX = "-quickgelu"


def uses_quick_gelu(model: nn.Module) -> bool:
    """Whether an open_clip model's activations are QuickGELU (OpenAI's CLIP weights need it)."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(module, QuickGELU) for module in model.modules())


def _load_local(model_name: str, path: Path, **kwargs: Any) -> tuple[nn.Module, Callable, Callable]:
    if not path.is_file():
        raise FileNotFoundError(
            f"Weights file '{path}' does not exist. Pass an existing .safetensors/.pt file, an open_clip tag "
            f"(e.g. 'openai'), 'builtin:digits', or None for random weights. If it is a merged model, write it "
            f"first with `lightning-score merge` (see its --output)."
        )
    if path.suffix not in LOCAL_WEIGHT_SUFFIXES:
        raise ValueError(f"Weights file '{path}' must end in one of {LOCAL_WEIGHT_SUFFIXES}.")
    header = read_weights_metadata(path)
    ours = header.get("format") == WEIGHTS_FORMAT
    if ours and header.get("model_name") not in (None, model_name.removesuffix(_QUICKGELU_SUFFIX)):
        raise ValueError(
            f"Weights file '{path}' was written for model '{header['model_name']}', not '{model_name}': "
            f"pass model_name='{header['model_name']}'."
        )
    if ours and header.get("quick_gelu") == "true":  # e.g. a merge of experts built on OpenAI's weights
        kwargs["force_quick_gelu"] = True
    try:
        return open_clip.create_model_and_transforms(model_name, pretrained=str(path), weights_only=True, **kwargs)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Refusing to load '{path}': it holds pickled Python objects beyond tensors, and lightning-score only "
            f"reads weights without unpickling code (torch.load(weights_only=True)). Re-save it as a plain state "
            f"dict (torch.save(model.state_dict(), path)) or as .safetensors. Detail: {str(error).splitlines()[0]}"
        ) from error
    except (RuntimeError, AssertionError, KeyError) as error:
        if isinstance(error, RuntimeError) and "state_dict" not in str(error):
            raise
        first = "; ".join(str(error).splitlines()[:3]) or type(error).__name__
        raise ValueError(
            f"Weights file '{path}' does not fit open_clip model '{model_name}' ({first}). Pass the model_name the "
            "file was saved from."
        ) from error


def _load_tag(model_name: str, tag: str, cfg: dict[str, Any], cache_dir: str | None, **kwargs: Any) -> tuple:
    model_cfg = open_clip.get_model_config(model_name) or {}
    if cfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
        log.info("Weights '%s' of %s were trained with QuickGELU; building the model with it.", tag, model_name)
        kwargs["force_quick_gelu"] = True
    try:
        with _without_root_records("Failed to download"):  # open_clip logs what the error below says again
            return open_clip.create_model_and_transforms(model_name, pretrained=tag, cache_dir=cache_dir, **kwargs)
    except (RuntimeError, OSError) as error:
        hub = cfg.get("hf_hub", "").rstrip("/")
        source = f"the Hugging Face hub repository '{hub}'" if hub else cfg.get("url") or "open_clip's hub"
        offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        detail = " ".join(str(error).split())
        raise WeightsUnavailableError(
            f"Could not get open_clip weights '{tag}' for '{model_name}'{offline}: {detail} These weights download "
            f"from {source} on first use. On a machine without internet, download them elsewhere (e.g. "
            f"open_clip.create_model('{model_name}', pretrained='{tag}') fills the Hugging Face cache, or fetch the "
            f"file from {source}), copy the weights file over and pass its path instead: "
            f"pretrained='/path/to/open_clip_model.safetensors' (.safetensors, .pt, .pth or .bin; on the command "
            f"line --pretrained for `lightning-score study`, --model.pretrained for fit, merge and test)."
        ) from error


@contextlib.contextmanager
def _without_root_records(*fragments: str) -> Iterator[None]:
    """Drop the root logger's records containing any of ``fragments`` (open_clip logs through the root logger).

    A NullHandler keeps ``logging.error`` from configuring the root logger as a side effect.
    """
    root = logging.getLogger()

    def drop(record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in fragments)

    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        if placeholder is not None:
            root.removeHandler(placeholder)


def build_clip(
    model_name: str,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> CLIPComponents:
    """Build an open_clip CLIP model with its train/val transforms and tokenizer.

    Args:
        model_name: An open_clip architecture (``"ViT-B-32"``, ``"ViT-L-14"``, ...) or one of the tiny CPU
            models registered by :mod:`lightning_score.models` (``"tiny-ViT-W96-L3"``, ``"tiny-ViT-W64-L2"``).
        pretrained: ``None`` (random), an open_clip tag (``"openai"``), a local ``.safetensors``/``.pt`` file, or
            ``"builtin:digits"`` (the offline base model, built into the cache on first use).
        device: Where to put the model.
        cache_dir: Download cache for open_clip tags (default: the Hugging Face cache).

    Returns:
        The model (eval mode) with its transforms, tokenizer, a ``base_model`` label and the weights' source.

    Raises:
        ValueError: Unknown model or tag, a weights file for another model, or one that would need unpickling.
        FileNotFoundError: A local weights file that does not exist.
        WeightsUnavailableError: A tag whose weights could not be downloaded (the message says how to pass a file).

    Example:
        >>> import lightning_score.models as models
        >>> clip = models.build_clip("tiny-ViT-W64-L2")
        >>> clip.model.visual.image_size, clip.base_model
        ((32, 32), 'tiny-ViT-W64-L2/random')
    """
    check_model_name(model_name)
    source = None if pretrained is None else os.fspath(pretrained)
    if source is None:
        model, train_tf, val_tf = open_clip.create_model_and_transforms(model_name, pretrained=None)
        label, weights = "random", None
    elif builtin_name(source) is not None:
        path = resolve_builtin_weights(source, model_name)
        model, train_tf, val_tf = _load_local(model_name, path)
        label, weights = source, str(path)
    elif tag_cfg := open_clip.get_pretrained_cfg(model_name, source):
        model, train_tf, val_tf = _load_tag(model_name, source, tag_cfg, cache_dir)
        label, weights = source, source
    elif names_a_file(source):
        path = Path(source).expanduser()
        model, train_tf, val_tf = _load_local(model_name, path)
        label, weights = path.name, str(path)
    else:
        raise ValueError(
            f"pretrained={source!r} is neither an open_clip tag of '{model_name}' "
            f"({open_clip.list_pretrained_tags_by_model(model_name) or 'it has none'}), nor an existing weights file, "
            f"nor a built-in ({list_builtins()}). Pass one of those, or None for "
            "random weights."
        )
    model = model.to(device).eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return CLIPComponents(model, train_tf, val_tf, tokenizer, f"{model_name}/{label}", weights)
