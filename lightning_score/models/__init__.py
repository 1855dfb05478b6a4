"""CLIP models for lightning-score: the model factory, zero-shot heads, prompt templates, the built-in base.

Importing this package registers lightning-score's tiny CLIP configs with open_clip (``model_configs/``):

- ``tiny-ViT-W96-L3``: ViT image tower of width 96, 3 layers, 8 px patches on 32 px images; open_clip's
  standard text transformer (width 64, 2 layers) and tokenizer; 64-d embeddings. The offline default.
- ``tiny-ViT-W64-L2``: width 64, 2 layers, 32-d embeddings; for quick tests.

Both build real open_clip ``CLIP`` models on a CPU in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

from lightning_score.data.builtin import BUILTIN_PREFIX
from lightning_score.models import digits_base  # noqa: F401  (registers the base model of builtin:digits)
from lightning_score.models.factory import CLIPComponents, build_clip, read_weights_metadata, save_clip_weights
from lightning_score.models.templates import guess_template_set, list_template_sets, load_templates
from lightning_score.models.zero_shot import ZeroShotHead, build_zero_shot_head, encode_class_prompts
from lightning_score.utilities.files import cache_root

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODELS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))
DEFAULT_TINY_MODEL = "tiny-ViT-W96-L3"

if not set(TINY_MODELS) <= set(open_clip.list_models()):
    open_clip.add_model_config(MODEL_CONFIG_DIR)

__all__ = [
    "BUILTIN_PREFIX",
    "DEFAULT_TINY_MODEL",
    "MODEL_CONFIG_DIR",
    "TINY_MODELS",
    "CLIPComponents",
    "ZeroShotHead",
    "build_clip",
    "build_zero_shot_head",
    "cache_root",
    "encode_class_prompts",
    "guess_template_set",
    "list_template_sets",
    "load_templates",
    "read_weights_metadata",
    "save_clip_weights",
]
