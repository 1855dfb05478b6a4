"""A merged CLIP model written in its backbone's own format, loadable without lightning-score: :func:`export_model`.

The export applies the merged task vector to a copy of the base (``TaskVector.apply_to``: θ₀ + α·τ, the keys a
method exempts from α getting θ₀ + τ), and writes the whole CLIP (the merged image tower, the base's text
tower) as its library writes it:

- ``open_clip``: ``open_clip_model.safetensors`` (the whole CLIP) and ``open_clip_config.json`` (its config
  and preprocessing); ``open_clip.create_model("local-dir:<dir>")`` builds it offline whatever the config (a
  custom or tiny one too), and ``open_clip.create_model(name, pretrained="<dir>/open_clip_model.safetensors")``
  loads it into an architecture open_clip knows by name (with ``force_quick_gelu=True`` if the card says so).
- ``hf``: ``save_pretrained``'s ``config.json`` and ``model.safetensors``;
  ``transformers.CLIPModel.from_pretrained(dir)`` (the base's class).
- ``timm``: timm's ``save_for_hf`` layout, ``config.json`` (architecture, model_args) and ``model.safetensors``;
  ``timm.create_model("local-dir:<dir>", pretrained=True)``, or ``timm.create_model(architecture,
  **model_args).load_state_dict(safetensors.torch.load_file("<dir>/model.safetensors"))``.

Beside them: ``zero_shot_head.safetensors`` when a head is given (``weight`` [classes, dim], already scaled by
the logit scale: ``logits = normalize(image_features) @ weight.T``; the class names and templates in its
header), and the model card (:mod:`~lightning_score.models.model_card`). The folder is built under a
temporary name beside the target and renamed: an interrupted or failed export leaves no folder at the target
(and, with ``overwrite=True``, the export that was there).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_score.models.convert import convert_state_dict, get_convention
from lightning_score.models.factory import save_clip_weights, uses_quick_gelu
from lightning_score.models.model_card import card_record, write_card
from lightning_score.models.zero_shot import ZeroShotHead
from lightning_score.task_vector import TaskVector
from lightning_score.utilities.extras import require
from lightning_score.utilities.files import atomic_write, atomic_write_text, publish_folder
from lightning_score.utilities.tensor_files import state_dict_fingerprint

__all__ = ["HEAD_FILE", "HEAD_FORMAT", "backbone_of", "export_model"]

HEAD_FILE = "zero_shot_head.safetensors"
HEAD_FORMAT = "lightning-score/zero-shot-head"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_CONFIG = "open_clip_config.json"
_HF_IMAGE_PREFIXES = ("vision_model.", "visual_projection.")


@dataclass(frozen=True)
class _Exporter:
    """How one library's CLIP is merged and written.

    Attributes:
        library: The library's name (the card's ``library_name``).
        tower: The module whose state dict the backbone's task vectors are keyed by (``apply_to`` updates it).
        image_keys: Which of the tower's keys are the image tower's (the fingerprints are over these).
        write: Writes the merged model into a folder; returns its files by role.
        load: The Python that loads the folder, given the model, its name and the folder.
    """

    library: str
    tower: Callable[[nn.Module], nn.Module]
    image_keys: Callable[[str], bool]
    write: Callable[[nn.Module, Path, str], dict[str, str]]
    load: Callable[[nn.Module, str, str], str]


def _write_open_clip(model: nn.Module, folder: Path, model_name: str) -> dict[str, str]:
    import open_clip

    model_cfg = open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"model_name {model_name!r} is not an open_clip architecture (see open_clip.list_models()).")
    if uses_quick_gelu(model):  # e.g. OpenAI's weights: the config says so, so that local-dir: builds the same net
        model_cfg["quick_gelu"] = True
    save_clip_weights(model, folder / OPEN_CLIP_WEIGHTS, model_name=model_name)
    preprocess = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    atomic_write_text(folder / OPEN_CLIP_CONFIG, json.dumps(config, indent=2) + "\n")
    return {"weights": OPEN_CLIP_WEIGHTS, "config": OPEN_CLIP_CONFIG}


def _load_open_clip(model: nn.Module, model_name: str, folder: str) -> str:
    quick = ", force_quick_gelu=True" if uses_quick_gelu(model) and "quickgelu" not in model_name else ""
    return (
        f"import open_clip\n\nfolder = {folder!r}\n"
        'model = open_clip.create_model("local-dir:" + folder)  # offline, any config (open_clip_config.json)\n'
        'tokenizer = open_clip.get_tokenizer("local-dir:" + folder)\n'
        f"# or, for a model name open_clip knows:\n# model = open_clip.create_model({model_name!r}, "
        f'pretrained=folder + "/{OPEN_CLIP_WEIGHTS}"{quick})'
    )


def _write_hf(model: nn.Module, folder: Path, model_name: str) -> dict[str, str]:
    model.save_pretrained(str(folder))
    return {"weights": "model.safetensors", "config": "config.json"}


def _load_hf(model: nn.Module, model_name: str, folder: str) -> str:
    return f"import transformers\n\nmodel = transformers.{type(model).__name__}.from_pretrained({folder!r})"


def _write_timm(model: nn.Module, folder: Path, model_name: str) -> dict[str, str]:
    from timm.models import save_for_hf

    if not getattr(model, "pretrained_cfg", None):
        raise ValueError(
            f"This timm {type(model).__name__} has no pretrained_cfg, so timm could not rebuild it from the export: "
            "build the base with timm.create_model(name, ...) (e.g. 'vit_base_patch32_clip_224.openai')."
        )
    save_for_hf(model, str(folder), safe_serialization=True)
    return {"weights": "model.safetensors", "config": "config.json"}


def _load_timm(model: nn.Module, model_name: str, folder: str) -> str:
    architecture, classes = model.pretrained_cfg.get("architecture", model_name), model.num_classes
    return (
        f"import timm\n\nfolder = {folder!r}\n"
        'model = timm.create_model("local-dir:" + folder, pretrained=True)  # config.json: architecture, model_args\n'
        f"# or, on a timm without local-dir: (model_args from config.json; the head's size given, as the default\n"
        f"# tag's may differ): timm.create_model({architecture!r}, pretrained=True, **model_args,\n"
        f'#     pretrained_cfg_overlay=dict(file=folder + "/model.safetensors", num_classes={classes}))'
    )


_EXPORTERS: dict[str, _Exporter] = {
    "open_clip": _Exporter("open_clip", lambda m: m.visual, lambda k: True, _write_open_clip, _load_open_clip),
    "hf": _Exporter("transformers", lambda m: m, lambda k: k.startswith(_HF_IMAGE_PREFIXES), _write_hf, _load_hf),
    "timm": _Exporter("timm", lambda m: m, lambda k: True, _write_timm, _load_timm),
}


def backbone_of(model: nn.Module) -> str:
    """The backbone of a CLIP model: ``"open_clip"`` (``CLIP``), ``"hf"`` (``CLIPModel``) or ``"timm"`` (a ViT).

    Raises:
        ValueError: A model of another library or kind.
    """
    module = type(model).__module__.split(".")[0]
    if module == "open_clip" and hasattr(model, "visual") and hasattr(model, "encode_text"):
        return "open_clip"
    if module == "transformers" and any(k.startswith(_HF_IMAGE_PREFIXES) for k in model.state_dict()):
        return "hf"
    if module == "timm" and hasattr(model, "blocks"):
        return "timm"
    raise ValueError(
        f"Cannot export a {type(model).__module__}.{type(model).__name__}: give an open_clip CLIP "
        "(open_clip.create_model), a transformers CLIPModel (CLIPModel.from_pretrained) or a timm CLIP ViT "
        "(timm.create_model)."
    )


def _in_convention(tv: TaskVector, source: str, backbone: str) -> TaskVector:
    """The task vector under the backbone's keys (exact: renames, transposes, q/k/v split)."""
    if source == backbone:
        return tv
    return TaskVector(convert_state_dict(tv, source, backbone), tv.metadata)


def _exempt_keys(tv: TaskVector, exempt: list[str], source: str, backbone: str) -> list[str]:
    """The keys exempt from α under the backbone's names (a fused open_clip key names its three q/k/v keys)."""
    unknown = [k for k in exempt if k not in tv]
    if unknown:
        raise ValueError(f"Keys exempt from alpha {unknown[:3]} are not keys of {tv.describe()}.")
    if source == backbone or not exempt:
        return list(exempt)
    return list(convert_state_dict({k: tv[k] for k in exempt}, source, backbone))


def _head_file(head: ZeroShotHead | Tensor, path: Path) -> dict[str, Any]:
    """Write the zero-shot head ``[classes, dim]``; returns what the card records of it."""
    weight = head.weight if isinstance(head, ZeroShotHead) else head
    if weight.ndim != 2:
        raise ValueError(f"The zero-shot head must be [classes, dim], not of shape {tuple(weight.shape)}.")
    classnames = head.classnames if isinstance(head, ZeroShotHead) else []
    templates = head.templates if isinstance(head, ZeroShotHead) else []
    header = {"format": HEAD_FORMAT, "classnames": json.dumps(classnames), "templates": json.dumps(templates)}
    tensors = {"weight": weight.detach().to("cpu").contiguous().clone()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    return {"file": path.name, "classes": int(weight.shape[0]), "classnames": classnames}


def _check_against(tv: TaskVector, tower: Mapping[str, Tensor], fingerprint: str, backbone: str, source: str) -> None:
    """Refuse a task vector that is not of this base's image tower (a key it lacks; other pre-trained weights)."""
    keyed = f"keys of {source}'s image tower" if source == backbone else f"{source}'s keys, converted to {backbone}'s"
    for key in tv:
        if key not in tower:
            raise ValueError(
                f"{tv.describe()} has key {key!r} ({keyed}), which the {backbone} base's image tower lacks (its "
                f"keys are e.g. {sorted(tower)[:3]}): export a task vector of this base's image tower (for open_clip "
                "the keys of model.visual), or pass task_vector_backbone= the library its keys are from."
            )
    if tv.base_fingerprint and tv.base_fingerprint != fingerprint:
        raise ValueError(
            f"{tv.describe()} was made from other pre-trained weights than this base (base fingerprints "
            f"{tv.base_fingerprint[:20]}… vs {fingerprint[:20]}…): export onto the base its experts were fine-tuned "
            "from."
        )


def export_model(
    base: nn.Module,
    task_vector: TaskVector,
    directory: str | os.PathLike[str],
    *,
    alpha: float = 1.0,
    exempt: Collection[str] | None = None,
    model_name: str | None = None,
    task_vector_backbone: str | None = None,
    head: ZeroShotHead | Tensor | None = None,
    card: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write θ₀ + α·τ of a CLIP model in its backbone's own format, with a model card.

    The base is not changed (a copy on CPU is merged). The folder loads without lightning-score: see the module's
    table, and the card's README.md.

    Args:
        base: The pre-trained CLIP: an open_clip ``CLIP``, a transformers ``CLIPModel`` (or
            ``CLIPVisionModelWithProjection``), or a timm CLIP ViT built with ``timm.create_model``.
        task_vector: The merged task vector of the image tower, keyed as the backbone's task vectors are:
            open_clip ``model.visual``'s keys (``conv1.weight``), transformers' ``vision_model.*`` and
            ``visual_projection.weight``, timm's own.
        directory: The export folder; created, its parents too.
        alpha: The scaling coefficient α.
        exempt: Keys α does not scale (θ₀ + τ); default: the merge's ``alpha_exempt_keys`` (its metadata).
        model_name: The open_clip architecture (required for open_clip, e.g. ``"ViT-B-32"``); for the others
            a label (default: the config's name or timm's architecture).
        task_vector_backbone: The library the task vector's keys are from, when not the base's (e.g.
            ``"open_clip"`` to export an open_clip merge onto a transformers base); converted exactly.
        head: A zero-shot head to write beside the model (``[classes, dim]``, scaled by the logit scale).
        card: Model card fields (:data:`~lightning_score.models.model_card.CARD_FIELDS`: method, options,
            experts, test_accuracies, base_model, notes); method, options and experts default to what the task
            vector's merge metadata records.
        overwrite: Replace an existing non-empty folder (only once the new one is complete).

    Returns:
        The export folder.

    Raises:
        ValueError: A model of no known backbone, a key the base's image tower lacks, a task vector of other
            pre-trained weights, an open_clip base without ``model_name``, a card value JSON cannot hold.
        FileExistsError: ``directory`` exists and is not empty (without ``overwrite``), or is a file.
        OutputNotWritableError: Its folder cannot be written.
    """
    backbone = backbone_of(base)
    source = task_vector_backbone or backbone
    get_convention(source)  # an unknown name fails here, in one line
    exporter = _EXPORTERS[backbone]
    if backbone == "open_clip" and not model_name:
        raise ValueError("Exporting an open_clip model needs model_name=<its open_clip architecture>, e.g. 'ViT-B-32'.")
    if backbone != "open_clip":
        require({"hf": "transformers", "timm": "timm"}[backbone], extra=backbone)
        config_name = getattr(getattr(base, "config", None), "name_or_path", None)
        model_name = model_name or config_name or getattr(base, "pretrained_cfg", {}).get("architecture")
        model_name = model_name or type(base).__name__
    assert model_name is not None
    merge = dict(task_vector.metadata.get("merge") or {})
    exempt = list(merge.get("alpha_exempt_keys", []) if exempt is None else exempt)
    tv = _in_convention(task_vector, source, backbone)
    exempt_here = _exempt_keys(task_vector, exempt, source, backbone)
    record_fields = card_record(card, merge, {})  # refuse a bad card before any work
    target = Path(directory)

    def build(folder: Path) -> None:
        model = copy.deepcopy(base).to("cpu").eval()
        tower = exporter.tower(model)
        state = {k: v for k, v in tower.state_dict().items() if exporter.image_keys(k)}
        in_source = convert_state_dict(state, backbone, source) if source != backbone else state
        base_fingerprint = state_dict_fingerprint(in_source)
        _check_against(tv, state, base_fingerprint, backbone, source)
        with torch.no_grad():
            tv.apply_to(tower, alpha=float(alpha), exempt=exempt_here)
        merged = {k: v for k, v in tower.state_dict().items() if exporter.image_keys(k)}
        files = exporter.write(model, folder, model_name)
        heads = {"head": _head_file(head, folder / HEAD_FILE)} if head is not None else {}
        recorded = {
            "backbone": backbone,
            "library": exporter.library,
            "model_name": model_name,
            "base_model": record_fields.get("base_model") or task_vector.base_model or model_name,
            "alpha": float(alpha),
            "merge_alpha": merge.get("alpha"),
            "alpha_exempt_keys": sorted(exempt),
            "task_vector_backbone": source,
            "base_fingerprint": base_fingerprint,
            "merged_fingerprint": state_dict_fingerprint(
                convert_state_dict(merged, backbone, source) if source != backbone else merged
            ),
            "task_vector_fingerprint": task_vector.content_fingerprint(),
            "files": files,
            **heads,
            "load": exporter.load(model, model_name, str(target)),
        }
        write_card(folder, card_record(card, merge, recorded))

    publish_folder(target, build, overwrite=overwrite, what="The export folder")
    return target
