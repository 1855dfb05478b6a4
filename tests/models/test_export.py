"""A merged model exported in its backbone's own format loads, without lightning_score, to the same logits.

Each backbone's base is a tiny random CLIP built in code (no download); the merged task vector is random over the
whole image tower, with one key exempt from α. The exports are loaded by a fresh Python process in which
``import lightning_score`` fails, with the libraries' own loaders only, and its features and logits are
compared with the base with the task vector applied in this process.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lightning_score.models  # noqa: F401  (registers the tiny configs)
from lightning_score.models.export import HEAD_FILE, export_model
from lightning_score.models.model_card import CARD_FILE, README_FILE, read_card
from lightning_score.models.tower_configs import hf_vision_config
from lightning_score.models.zero_shot import ZeroShotHead
from lightning_score.task_vector import TaskVector, state_dict_fingerprint
from tests.processes import REPOSITORY

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

ATOL = 1e-5
ALPHA = 0.7
EXEMPT = {"open_clip": "ln_post.bias", "hf": "vision_model.post_layernorm.bias", "timm": "norm.bias"}
TIMM_ARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0, num_classes=32)

# Loads each export with its library only; lightning_score is blocked before anything else is imported.
CHILD = r"""
import sys
sys.modules["lightning_score"] = None
import json
from pathlib import Path
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

try:
    import lightning_score
except ImportError:
    pass
else:
    raise SystemExit("lightning_score is importable in the child")

folders, inputs, out = json.loads(sys.argv[1]), torch.load(sys.argv[2]), sys.argv[3]
images, results = inputs["images"], {}

def head_logits(folder, features):
    with safe_open(str(Path(folder) / "zero_shot_head.safetensors"), "pt") as f:
        weight, classnames = f.get_tensor("weight"), json.loads(f.metadata()["classnames"])
    return F.normalize(features, dim=-1) @ weight.T, classnames

with torch.no_grad():
    import open_clip
    folder = folders["open_clip"]
    model = open_clip.create_model("local-dir:" + folder).eval()
    features = model.encode_image(images)
    text = model.encode_text(inputs["tokens"])
    clip = model.logit_scale.exp() * F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).T
    config = json.loads((Path(folder) / "open_clip_config.json").read_text())
    (Path(out).parent / "tiny-ViT-W64-L2.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(Path(out).parent / "tiny-ViT-W64-L2.json")  # a name open_clip knows
    by_name = open_clip.create_model("tiny-ViT-W64-L2", pretrained=folder + "/open_clip_model.safetensors").eval()
    results["open_clip"] = {"features": features, "clip": clip, "head": head_logits(folder, features)[0],
                            "by_name": by_name.encode_image(images),
                            "classnames": head_logits(folder, features)[1]}

    import transformers
    folder = folders["hf"]
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    features = model.get_image_features(pixel_values=images)
    features = getattr(features, "pooler_output", features)
    clip = model(input_ids=inputs["input_ids"], pixel_values=images).logits_per_image
    results["hf"] = {"features": features, "clip": clip, "head": head_logits(folder, features)[0]}

    import timm
    folder = folders["timm"]
    model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    features = model(images)
    config = json.loads((Path(folder) / "config.json").read_text())
    plain = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    plain.load_state_dict(load_file(folder + "/model.safetensors"))
    overlay = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                                pretrained_cfg_overlay=dict(file=folder + "/model.safetensors",
                                                            num_classes=config["num_classes"])).eval()
    results["timm"] = {"features": features, "head": head_logits(folder, features)[0], "by_name": plain(images),
                       "by_file": overlay(images)}

loaded = sorted(name for name in sys.modules if name.startswith("lightning_score") and sys.modules[name])
torch.save({"results": results, "lightning_score_modules": loaded}, out)
"""


def _open_clip_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model("tiny-ViT-W64-L2").eval()


def _hf_base() -> torch.nn.Module:
    torch.manual_seed(1)
    config = transformers.CLIPConfig(
        vision_config=hf_vision_config(open_clip.create_model("tiny-ViT-W64-L2").visual).to_dict(),
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "vocab_size": 100,
            "max_position_embeddings": 16,
            "eos_token_id": 99,
        },
        projection_dim=32,
    )
    return transformers.CLIPModel(config).eval()


def _timm_base() -> torch.nn.Module:
    torch.manual_seed(2)
    return timm.create_model("vit_base_patch32_clip_224", pretrained=False, **TIMM_ARGS).eval()


BASES = {"open_clip": _open_clip_base, "hf": _hf_base, "timm": _timm_base}


def _tower_state(backbone: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    if backbone == "open_clip":
        return model.visual.state_dict()
    return {k: v for k, v in model.state_dict().items() if backbone != "hf" or k.startswith(("vision_", "visual_"))}


def _merged_task_vector(backbone: str, base: torch.nn.Module, seed: int = 3) -> TaskVector:
    """A random merged task vector over the whole image tower, with the metadata a merge records."""
    state = _tower_state(backbone, base)
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: 0.05 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    if backbone == "timm":
        tensors["head.bias"] = torch.zeros_like(tensors["head.bias"])  # open_clip's projection has none
    merge = {
        "method": "score",
        "options": {"variant": "trimmed", "z": 1.96},
        "alpha": 1.0,
        "inputs": [{"name": f"rot{d}", "domain": f"rot{d}", "path": f"/tv/rot{d}.safetensors"} for d in (0, 30)],
        "alpha_exempt_keys": [EXEMPT[backbone]],
    }
    meta = {"name": "merged-score", "base_model": "tiny/random", "base_fingerprint": state_dict_fingerprint(state)}
    return TaskVector(tensors, {**meta, "merge": merge})


def _head(dim: int = 32) -> ZeroShotHead:
    weight = 100 * F.normalize(torch.randn(5, dim, generator=torch.Generator().manual_seed(4)), dim=-1)
    return ZeroShotHead(weight, [f"class{i}" for i in range(5)], ["a photo of a {}."])


def _expected(backbone: str, base: torch.nn.Module, tv: TaskVector, inputs: dict) -> dict[str, torch.Tensor]:
    """The base with the task vector applied, in this process: features, CLIP logits, head logits."""
    model = copy.deepcopy(base)
    tower = model.visual if backbone == "open_clip" else model
    tv.apply_to(tower, alpha=ALPHA, exempt=[EXEMPT[backbone]])
    images = inputs["images"]
    with torch.no_grad():
        if backbone == "open_clip":
            features = model.encode_image(images)
            text = model.encode_text(inputs["tokens"])
            clip = model.logit_scale.exp() * F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).T
        elif backbone == "hf":
            features = model.get_image_features(pixel_values=images)
            features = getattr(features, "pooler_output", features)
            clip = model(input_ids=inputs["input_ids"], pixel_values=images).logits_per_image
        else:
            features, clip = model(images), None
    out = {"features": features, "head": _head()(F.normalize(features, dim=-1))}
    return out if clip is None else {**out, "clip": clip}


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Each backbone's base and task vector, exported; and what a process without lightning_score loads."""
    root = tmp_path_factory.mktemp("exports")
    generator = torch.Generator().manual_seed(5)
    inputs = {
        "images": torch.randn(4, 3, 32, 32, generator=generator),
        "tokens": open_clip.get_tokenizer("tiny-ViT-W64-L2")(["a cat", "a dog", "a rotated digit"]),
        "input_ids": torch.randint(0, 99, (3, 8), generator=generator),
    }
    torch.save(inputs, root / "inputs.pt")
    cases, folders = {}, {}
    for backbone, build in BASES.items():
        base = build()
        tv = _merged_task_vector(backbone, base)
        folders[backbone] = str(root / backbone / "merged")  # its parent does not exist yet
        export_model(base, tv, folders[backbone], alpha=ALPHA, model_name="tiny-ViT-W64-L2", head=_head(),
                     card={"test_accuracies": {"rot60": 0.91, "rot90": 0.5}})  # fmt: skip
        cases[backbone] = (base, tv)
    child = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(folders), str(root / "inputs.pt"), str(root / "loaded.pt")],
        cwd=root, env=_clean_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-4000:]
    loaded = torch.load(root / "loaded.pt", weights_only=False)
    return {"cases": cases, "folders": folders, "inputs": inputs, "loaded": loaded}


def test_the_loading_process_had_no_lightning_score(exported) -> None:
    assert exported["loaded"]["lightning_score_modules"] == []
    assert "PYTHONPATH" not in _clean_env()  # (the interpreter may live in the repository: CI's .venv does)


@pytest.mark.parametrize("backbone", ["open_clip", "hf", "timm"])
def test_an_export_loads_without_lightning_score_to_the_merged_models_logits(exported, backbone: str) -> None:
    base, tv = exported["cases"][backbone]
    expected = _expected(backbone, base, tv, exported["inputs"])
    loaded = exported["loaded"]["results"][backbone]
    unmerged = _expected(backbone, base, tv * 0.0, exported["inputs"])["features"]
    assert (expected["features"] - unmerged).abs().max() > 1e-2  # the merge changed the features: it is in the file
    for what in expected:
        torch.testing.assert_close(loaded[what], expected[what], atol=ATOL, rtol=0, msg=f"{backbone} {what}")
    if "by_name" in loaded:  # open_clip's create_model(name, pretrained=<file>), timm's load_state_dict
        torch.testing.assert_close(loaded["by_name"], expected["features"], atol=ATOL, rtol=0)
    if "by_file" in loaded:  # timm's create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))
        torch.testing.assert_close(loaded["by_file"], expected["features"], atol=ATOL, rtol=0)


def test_the_card_records_the_merge_the_base_and_the_accuracies(exported) -> None:
    base, tv = exported["cases"]["open_clip"]
    folder = Path(exported["folders"]["open_clip"])
    card = read_card(folder)
    assert card["method"] == "score" and card["options"] == {"variant": "trimmed", "z": 1.96}
    assert card["alpha"] == ALPHA and card["alpha_exempt_keys"] == ["ln_post.bias"]
    assert [e["name"] for e in card["experts"]] == ["rot0", "rot30"]
    assert card["experts"][1] == {"name": "rot30", "domain": "rot30", "path": "/tv/rot30.safetensors"}
    assert card["base_fingerprint"] == state_dict_fingerprint(base.visual.state_dict()) == tv.base_fingerprint
    merged = tv.apply_to(base.visual.state_dict(), alpha=ALPHA, exempt=["ln_post.bias"])
    assert card["merged_fingerprint"] == state_dict_fingerprint(merged)
    assert card["task_vector_fingerprint"] == tv.content_fingerprint()
    assert card["test_accuracies"] == {"rot60": 0.91, "rot90": 0.5}
    assert card["backbone"] == "open_clip" and card["model_name"] == "tiny-ViT-W64-L2"
    assert card["head"]["classnames"] == [f"class{i}" for i in range(5)]
    assert exported["loaded"]["results"]["open_clip"]["classnames"] == card["head"]["classnames"]
    readme = (folder / README_FILE).read_text()
    assert readme.startswith("---\nlibrary_name: open_clip\n")
    assert "| rot60 | 0.91 |" in readme and "| rot30 | rot30 | /tv/rot30.safetensors |" in readme
    assert 'open_clip.create_model("local-dir:" + folder)' in readme and str(folder) in readme
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [CARD_FILE, README_FILE, HEAD_FILE, "open_clip_config.json", "open_clip_model.safetensors"]
    )
    assert read_card(exported["folders"]["timm"])["library"] == "timm"
    hf_folder = exported["folders"]["hf"]
    assert f"CLIPModel.from_pretrained({hf_folder!r})" in (Path(hf_folder) / README_FILE).read_text()
    assert card["merge_alpha"] == 1.0 and "the merge itself scaled" not in readme


def test_an_open_clip_merge_exports_onto_a_transformers_base(tmp_path: Path) -> None:
    """A task vector of open_clip's keys, converted on export, gives the transformers twin of the open_clip merge."""
    from lightning_score.models.convert import convert_state_dict

    oc = _open_clip_base()
    hf = _hf_base()
    hf.load_state_dict(convert_state_dict(oc.visual.state_dict(), "open_clip", "hf"), strict=False)
    tv = _merged_task_vector("open_clip", oc)
    export_model(hf, tv, tmp_path / "hf", alpha=ALPHA, task_vector_backbone="open_clip")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    reloaded = transformers.CLIPModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        features = reloaded.get_image_features(pixel_values=images)
    features = getattr(features, "pooler_output", features)
    merged = copy.deepcopy(oc)
    tv.apply_to(merged.visual, alpha=ALPHA, exempt=["ln_post.bias"])
    with torch.no_grad():
        torch.testing.assert_close(features, merged.encode_image(images), atol=ATOL, rtol=0)
    card = read_card(tmp_path / "hf")
    assert card["base_fingerprint"] == tv.base_fingerprint and card["alpha_exempt_keys"] == ["ln_post.bias"]


def test_an_existing_export_is_refused_and_replaced_only_with_overwrite(tmp_path: Path) -> None:
    base = _open_clip_base()
    target = tmp_path / "merged"
    export_model(base, _merged_task_vector("open_clip", base, seed=3), target, model_name="tiny-ViT-W64-L2")
    first = read_card(target)["merged_fingerprint"]
    second_tv = _merged_task_vector("open_clip", base, seed=4)
    with pytest.raises(FileExistsError, match=re.escape(f"'{target}' exists and is not empty: pass overwrite=True")):
        export_model(base, second_tv, target, model_name="tiny-ViT-W64-L2")
    assert read_card(target)["merged_fingerprint"] == first
    export_model(base, second_tv, target, model_name="tiny-ViT-W64-L2", overwrite=True)
    assert read_card(target)["merged_fingerprint"] != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary or old folder left
    (tmp_path / "empty").mkdir()
    export_model(base, second_tv, tmp_path / "empty", model_name="tiny-ViT-W64-L2")  # an empty folder is no export
    assert (tmp_path / "empty" / "open_clip_model.safetensors").is_file()


def test_a_failed_export_leaves_no_folder_and_keeps_the_one_it_would_replace(tmp_path: Path) -> None:
    base = _open_clip_base()
    tv = _merged_task_vector("open_clip", base)
    bad = TaskVector({**tv, "visual.conv1.weight": tv["conv1.weight"]}, tv.metadata)  # a whole-model key
    target = tmp_path / "new" / "deeper" / "merged"
    with pytest.raises(ValueError, match=r"key 'visual\.conv1\.weight' .*which the open_clip base's image tower lacks"):
        export_model(base, bad, target, model_name="tiny-ViT-W64-L2")
    assert list(tmp_path.iterdir()) == []  # neither the folder, its parents nor a temporary folder
    kept = tmp_path / "kept"
    export_model(base, tv, kept, model_name="tiny-ViT-W64-L2")
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    other = TaskVector(dict(tv), {**tv.metadata, "base_fingerprint": "blake2b:" + "0" * 32})
    with pytest.raises(ValueError, match="other pre-trained weights than this base"):
        export_model(base, other, kept, model_name="tiny-ViT-W64-L2", overwrite=True)
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    with pytest.raises(ValueError, match=r"Model card field 'notes' is not JSON-serialisable"):
        export_model(base, tv, tmp_path / "x", model_name="tiny-ViT-W64-L2", card={"notes": object()})
    with pytest.raises(ValueError, match=r"Unknown model card field\(s\) \['acc'\]"):
        export_model(base, tv, tmp_path / "x", model_name="tiny-ViT-W64-L2", card={"acc": 1})
    with pytest.raises(ValueError, match="needs model_name=<its open_clip architecture>"):
        export_model(base, tv, tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


KILLED = r"""
import os, signal, sys
import open_clip, torch
import lightning_score.models
from lightning_score.models import export
from lightning_score.task_vector import TaskVector

torch.manual_seed(0)
base = open_clip.create_model("tiny-ViT-W64-L2")
tv = TaskVector({k: torch.full_like(v, 0.5) for k, v in base.visual.state_dict().items()})
export.write_card = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # killed once the weights are written
export.export_model(base, tv, sys.argv[1], model_name="tiny-ViT-W64-L2", overwrite=True)
"""


def test_an_export_killed_midway_leaves_the_previous_export_whole(tmp_path: Path) -> None:
    base = _open_clip_base()
    target = tmp_path / "merged"
    export_model(base, _merged_task_vector("open_clip", base), target, model_name="tiny-ViT-W64-L2")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPOSITORY)}
    child = subprocess.run([sys.executable, "-c", KILLED, str(target)], env=env, capture_output=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    leftovers = [p for p in tmp_path.iterdir() if p.name != "merged"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".merged.") and leftovers[0].name.endswith(".tmp")
    assert (leftovers[0] / "open_clip_model.safetensors").is_file()  # the half-written export, under a hidden name
    torch.testing.assert_close(load_file(target / "open_clip_model.safetensors")["visual.conv1.weight"],
                               _merged_weight(base), atol=0, rtol=0)  # fmt: skip


def _merged_weight(base: torch.nn.Module) -> torch.Tensor:
    tv = _merged_task_vector("open_clip", base)
    return tv.apply_to(base.visual.state_dict(), exempt=["ln_post.bias"])["conv1.weight"]


def test_a_timm_model_built_without_timm_create_model_is_refused(tmp_path: Path) -> None:
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**TIMM_ARGS).eval()
    tv = TaskVector({"norm.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match=r"has no pretrained_cfg.*timm\.create_model"):
        export_model(model, tv, tmp_path / "timm")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=r"Cannot export a torch\.nn\.modules\.linear\.Linear"):
        export_model(torch.nn.Linear(2, 2), tv, tmp_path / "x")


def test_a_quick_gelu_model_exports_with_its_activation(tmp_path: Path) -> None:
    """OpenAI's weights need QuickGELU: the config says so, so that ``local-dir:`` builds the same network."""
    torch.manual_seed(0)
    base = open_clip.create_model("tiny-ViT-W64-L2", force_quick_gelu=True).eval()
    tv = _merged_task_vector("open_clip", base)
    export_model(base, tv, tmp_path / "quick", model_name="tiny-ViT-W64-L2", exempt=[])
    config = json.loads((tmp_path / "quick" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["quick_gelu"] is True
    reloaded = open_clip.create_model(f"local-dir:{tmp_path / 'quick'}").eval()
    merged = copy.deepcopy(base)
    tv.apply_to(merged.visual)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_image(images), merged.encode_image(images), atol=ATOL, rtol=0)
    assert read_card(tmp_path / "quick")["alpha_exempt_keys"] == []
    assert "force_quick_gelu=True" in read_card(tmp_path / "quick")["load"]
    with pytest.raises(ValueError, match=r"Keys exempt from alpha \['nope'\] are not keys of task vector"):
        export_model(base, tv, tmp_path / "x", model_name="tiny-ViT-W64-L2", exempt=["nope"])
