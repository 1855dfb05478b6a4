"""Prompt-template sets: the SCORE authors' sets, dataset names as set names, and templates that name domains."""

from __future__ import annotations

import json

import pytest

from lightning_score.data.presets import PRESETS
from lightning_score.models.templates import (
    TEMPLATE_DIR,
    guess_template_set,
    list_template_sets,
    load_templates,
    templates_naming_domains,
)


def test_the_authors_sets() -> None:
    assert load_templates("pacs") == ["a photo of a {}.", "a photo of the {}."]
    assert load_templates("fed_isic2019") == ["This is dermatoscopy of {}.", "This is dermoscopy of {}."]
    assert load_templates("retina") == [
        "a fundus image with {}",
        "a retina photograph showing {}",
        "retinal scan indicating {}",
        "an eye fundus with {}",
    ]
    imagenet = load_templates("imagenet")
    assert len(imagenet) == len(set(imagenet)) == 80
    assert (imagenet[0], imagenet[39], imagenet[-1]) == (
        "a bad photo of a {}.",
        "a photo of a {}.",
        "a tattoo of the {}.",
    )
    terra = load_templates("terra_incognita")
    # TerraIncognita's set: 38 of the 80, in the same order, none about renditions
    assert len(terra) == 38 and terra == [t for t in imagenet if t in terra]
    assert terra[:3] == ["a bad photo of a {}.", "a photo of many {}.", "a photo of the hard to see {}."]
    assert terra[-1] == "a dark photo of a {}."


def test_a_dataset_name_names_its_authors_set() -> None:
    for name in ("office_home", "domainnet", "nico_pp", "imagenet_r", "vlcs"):
        assert load_templates(name) == load_templates("imagenet")
    with pytest.raises(ValueError, match=r"Unknown template set 'officehome'.*'office_home'"):
        load_templates("officehome")


def test_domain_naming_sets_are_explicit_choices_never_guessed() -> None:
    for name in ("pacs_domains", "office_home_domains", "domainnet_domains", "nico_domains"):
        assert name in list_template_sets()
        body = json.loads((TEMPLATE_DIR / f"{name}.json").read_text())
        assert body["domains"] == [] and "never a default" in body["description"]
    pacs = PRESETS["pacs"].domains
    named = templates_naming_domains(load_templates("pacs_domains"), pacs)
    assert sorted({d for hits in named.values() for d in hits}) == sorted(pacs)


def test_guess_template_set_picks_the_authors_set() -> None:
    assert guess_template_set(["art_painting", "cartoon", "photo", "sketch"]) == "pacs"
    assert guess_template_set(["Art", "Clipart", "Product", "Real World"]) == "imagenet"
    assert guess_template_set(["location_38", "location_100"]) == "terra_incognita"
    assert guess_template_set(["aptos2019", "DDR", "idrid_retina", "messidor2"]) == "retina"
    assert guess_template_set(["BCN", "MSK"]) == "fed_isic2019"
    assert guess_template_set(["rot0", "rot75"]) == "digits"  # a set's own domains, when no dataset preset fits
    assert guess_template_set(["photo"]) is None and guess_template_set(["a", "b"]) is None


def test_templates_naming_domains_matches_whole_words() -> None:
    templates = [
        "a photo of a {}.",
        "an art painting of a {}.",
        "a painting of the {}.",
        "a sketched {}.",
        "a REAL WORLD photo of {}",
        "{} in a quickdraw",
    ]
    named = templates_naming_domains(templates, ["art_painting", "painting", "sketch", "Real_World", "quickdraw"])
    assert named == {
        "an art painting of a {}.": ["art_painting", "painting"],
        "a painting of the {}.": ["painting"],
        "a REAL WORLD photo of {}": ["Real_World"],
        "{} in a quickdraw": ["quickdraw"],
    }
    assert templates_naming_domains(templates, []) == {} and templates_naming_domains([], ["photo"]) == {}


def test_which_default_sets_name_their_own_domains() -> None:
    """What a held-out-domain warning sees on each dataset's default set (the authors' choices)."""
    expected = {
        "pacs": ["photo"],
        "office_home": ["Art"],  # "art of a {}."
        "domainnet": ["painting", "sketch"],
        "imagenet_r": ["art", "cartoon", "graffiti", "origami", "painting", "sculpture", "sketch", "tattoo", "toy"],
    }
    for name, preset in PRESETS.items():
        named = templates_naming_domains(load_templates(preset.templates), preset.domains)
        assert sorted({d for hits in named.values() for d in hits}) == expected.get(name, []), name
