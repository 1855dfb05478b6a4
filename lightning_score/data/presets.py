"""What the SCORE paper's protocol fixes for each benchmark: domains, classes, prompts, epochs, split, threshold.

One :class:`DatasetPreset` per dataset, written from the released code of SCORE (Chaves et al., CVPR 2026,
arXiv:2603.05768) and the datasets' own releases. A :class:`~lightning_score.data.DomainDataModule` detects its
preset from its domain folders (or is told one), which gives ``templates="auto"`` the authors' prompt set;
``lightning-score study`` takes the rest from it too (epochs, SCORE's options), unless told otherwise.

This module is plain data: no torch, no Lightning, no file access.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["PRESETS", "DatasetPreset", "detect_preset", "get_preset", "list_presets", "normalise_domain"]


def normalise_domain(name: str) -> str:
    """A domain name compared without case, spaces, hyphens or underscores (``"Real World"`` = ``"real_world"``)."""
    return "".join(ch for ch in name.lower() if ch not in " _-")


@dataclass(frozen=True)
class DatasetPreset:
    """One benchmark as the SCORE paper runs it.

    Attributes:
        name: The preset's key (``pacs``); also accepted as a template-set name meaning "this dataset's set".
        title: The dataset's usual name (``PACS``).
        domains: The domain folder names, as the authors' processing writes them.
        num_classes: Number of classes.
        templates: The prompt-template set the authors use (a name of ``lightning_score/models/template_sets``).
        epochs: Fine-tuning epochs of each expert in the paper.
        split: How the paper splits each domain into train and test (one sentence, for docs and logs).
        paper_layouts: The on-disk layouts that give exactly the paper's split (see ``data/layouts.py``); any
            other layout still loads, with a warning that says how to get the paper's split.
        hint: How to give the data in a paper layout (for that warning).
        score_options: SCORE's options in the paper for this dataset (the medical datasets drop the /T of the
            threshold: ``{"divide_by_tasks": False}``).
        classes: The class names, when the data itself does not name them (Fed-ISIC2019's csv holds numbers).
        aliases: Other folder names of the same domain (``"Real World"`` for ``Real_World``).
        in_paper: Whether the SCORE paper reports this dataset (VLCS is an extra).
    """

    name: str
    title: str
    domains: tuple[str, ...]
    num_classes: int
    templates: str
    epochs: int
    split: str
    paper_layouts: tuple[str, ...]
    hint: str = ""
    score_options: Mapping[str, Any] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)
    in_paper: bool = True

    def canonical_domain(self, name: str) -> str | None:
        """This preset's name for a domain folder (aliases and case/spacing forgiven), or ``None``."""
        key = normalise_domain(name)
        for domain in self.domains:
            if normalise_domain(domain) == key:
                return domain
        for alias, domain in self.aliases.items():
            if normalise_domain(alias) == key:
                return domain
        return None


_RANDOM_SPLIT = (
    "each domain's images in ImageFolder order split by torch.utils.data.random_split into "
    "[int(0.8·n), n − int(0.8·n)] with torch.Generator().manual_seed(17); train = the first part"
)

# fmt: off
_IMAGENET_R_DOMAINS = (
    "art", "cartoon", "deviantart", "embroidery", "graffiti", "graphic", "misc", "origami",
    "painting", "sculpture", "sketch", "sticker", "tattoo", "toy", "videogame",
)
_ISIC_CLASSES = (  # FLamby's target 0..7 (MEL, NV, BCC, AK, BKL, DF, VASC, SCC), named as the authors name them
    "Melanoma", "Melanocytic nevus", "Basal cell carcinoma", "Actinic keratosis",
    "Benign keratosis", "Dermatofibroma", "Vascular lesion", "Squamous cell carcinoma",
)
# fmt: on

PRESETS: Mapping[str, DatasetPreset] = MappingProxyType(
    {
        preset.name: preset
        for preset in (
            DatasetPreset(
                name="pacs",
                title="PACS",
                domains=("art_painting", "cartoon", "photo", "sketch"),
                num_classes=7,
                templates="pacs",
                epochs=10,
                split="the official lists <domain>_train_kfold.txt / <domain>_test_kfold.txt (labels 1-based)",
                paper_layouts=("pacs_lists",),
                hint="put the official <domain>_train_kfold.txt and <domain>_test_kfold.txt lists in ROOT",
            ),
            DatasetPreset(
                name="office_home",
                title="OfficeHome",
                domains=("Art", "Clipart", "Product", "Real_World"),
                num_classes=65,
                templates="imagenet",
                epochs=10,
                split=_RANDOM_SPLIT,
                paper_layouts=("unsplit", "presplit"),
                aliases={"Real World": "Real_World"},
            ),
            DatasetPreset(
                name="terra_incognita",
                title="TerraIncognita",
                domains=("location_38", "location_43", "location_46", "location_100"),
                num_classes=10,
                templates="terra_incognita",
                epochs=15,
                split=(
                    "per location, the annotation rows (cis_val, train, trans_val, cis_test, trans_test files, in "
                    "that order) shuffled by random.Random(17), 80/20"
                ),
                paper_layouts=("terra_annotations", "presplit"),
                classes=("bird", "bobcat", "cat", "coyote", "dog", "empty", "opossum", "rabbit", "raccoon", "squirrel"),
                hint=(
                    "put the ECCV'18 annotation files in ROOT/eccv_18_annotation_files/ and the images in "
                    "ROOT/eccv_18_all_images_sm/, or use the train/ and test/ folders the authors' script writes"
                ),
            ),
            DatasetPreset(
                name="domainnet",
                title="DomainNet",
                domains=("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
                num_classes=345,
                templates="imagenet",
                epochs=10,
                split="the official lists <domain>_train.txt / <domain>_test.txt",
                paper_layouts=("domainnet_lists", "presplit"),
                hint="put the official <domain>_train.txt and <domain>_test.txt lists in ROOT",
            ),
            DatasetPreset(
                name="nico_pp",
                title="NICO++",
                domains=("autumn", "dim", "grass", "outdoor", "rock", "water"),
                num_classes=60,
                templates="imagenet",
                epochs=15,
                split=_RANDOM_SPLIT + " (of the public_dg_0416/train folder)",
                paper_layouts=("unsplit", "presplit"),
            ),
            DatasetPreset(
                name="imagenet_r",
                title="ImageNet-R",
                domains=_IMAGENET_R_DOMAINS,
                num_classes=200,
                templates="imagenet",
                epochs=10,
                split=(
                    "all 30,000 images (class folders, the domain is the file-name prefix) split once by "
                    "torch.utils.data.random_split 80/20 with seed 17"
                ),
                paper_layouts=("presplit_filename_domains", "unsplit_filename_domains"),
                hint="use ImageNet-R's own layout, ROOT/<class>/<domain>_<n>.jpg (split once over all images)",
            ),
            DatasetPreset(
                name="fed_isic2019",
                title="Fed-ISIC2019",
                domains=("BCN", "HAM_vidir_molemax", "HAM_vidir_modern", "HAM_rosendahl", "MSK", "HAM_vienna_dias"),
                num_classes=8,
                templates="fed_isic2019",
                epochs=20,
                split="FLamby's train_test_split.csv (column fold2: train_<centre> / test_<centre>)",
                paper_layouts=("fed_isic2019_csv",),
                hint="put FLamby's train_test_split.csv next to ISIC_2019_Training_Input/ in ROOT",
                score_options={"divide_by_tasks": False},
                classes=_ISIC_CLASSES,
            ),
            DatasetPreset(
                name="retina",
                title="RetinaDomains",
                domains=("aptos2019", "DDR", "idrid_retina", "messidor2"),
                num_classes=5,
                templates="retina",
                epochs=20,
                split="pre-split by the authors' notebook (each source's own split, or a seeded 80/20 shuffle)",
                paper_layouts=("presplit",),
                hint="use the train/ and test/ folders the authors' notebook writes",
                score_options={"divide_by_tasks": False},
                aliases={"idrid": "idrid_retina"},
            ),
            DatasetPreset(
                name="vlcs",
                title="VLCS",
                domains=("Caltech101", "LabelMe", "SUN09", "VOC2007"),
                num_classes=5,
                templates="imagenet",
                epochs=10,
                split=_RANDOM_SPLIT,
                paper_layouts=("unsplit", "presplit"),
                in_paper=False,
            ),
        )
    }
)
"""Every preset by name."""


def list_presets() -> list[str]:
    """The preset names: ``pacs``, ``office_home``, ``terra_incognita``, ``domainnet``, ``nico_pp``... ."""
    return list(PRESETS)


def get_preset(name: str) -> DatasetPreset:
    """The preset called ``name`` (case-insensitive; ``"PACS"``, ``"NICO++"`` and ``"ImageNet-R"`` work too).

    Raises:
        ValueError: For an unknown name, listing the known ones.
    """
    key = normalise_domain(name).replace("+", "p")
    for preset in PRESETS.values():
        if key in (normalise_domain(preset.name), normalise_domain(preset.title).replace("+", "p")):
            return preset
    raise ValueError(f"Unknown dataset preset {name!r}; the presets are {list_presets()}.")


def detect_preset(domains: Iterable[str]) -> DatasetPreset | None:
    """The preset whose domains these are, if exactly one fits.

    A preset fits when at least two domains are given and each is one of its domains (aliases, case and
    spacing forgiven), so a dataset with a domain left out still matches. When several fit, the one with
    exactly these domains wins; otherwise there is no answer (``None``).

    Example:
        >>> detect_preset(["art_painting", "cartoon", "photo", "sketch"]).name
        'pacs'
        >>> detect_preset(["Art", "Clipart", "Real World"]).name
        'office_home'
        >>> detect_preset(["rot0", "rot15"]) is None
        True
    """
    given = {normalise_domain(d) for d in domains}
    if len(given) < 2:
        return None
    fitting = []
    for preset in PRESETS.values():
        mapped = {preset.canonical_domain(d) for d in given}
        if None not in mapped:
            fitting.append((preset, len(mapped) == len(preset.domains)))
    exact = [preset for preset, is_exact in fitting if is_exact]
    if len(exact) == 1:
        return exact[0]
    return fitting[0][0] if len(fitting) == 1 else None
