"""The detector families behind one interface: model.json picks the family, --recipe the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models.detector.autoencoder.scoring import AUTOENCODER_KIND
from models.detector.family import FAMILIES, family_for_recipe, family_name, family_of, load_method

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "detector" / "default"


def test_every_family_is_a_folder_with_its_entry_points() -> None:
    assert set(FAMILIES) == {"stylegan2", "patch", "autoencoder"}
    for name, family in FAMILIES.items():
        assert family.name == name
        assert (Path(__file__).resolve().parent.parent / "models" / "detector" / name / "api.py").is_file()


def test_the_shipped_model_json_picks_the_stylegan2_family() -> None:
    meta = json.loads((SHIPPED / "model.json").read_text())
    assert family_name(meta) == "stylegan2"
    assert family_of(meta).describe(meta) == "slice recipe, stylegan2 128²"
    method = load_method(SHIPPED)
    assert method.label == "slice recipe, stylegan2 128²" and method.threshold == pytest.approx(meta["threshold"])


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"format": 1, "family": "dcgan"}, "stylegan2"),
        ({"format": 2, "family": "aae"}, "patch"),
        ({"format": 2, "family": "dcgan"}, "patch"),
        ({"format": 1, "kind": AUTOENCODER_KIND}, "autoencoder"),
    ],
)
def test_model_json_names_its_family(meta: dict[str, object], expected: str) -> None:
    assert family_name(meta) == expected


def test_an_unknown_format_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="format 3"):
        family_name({"format": 3})
    with pytest.raises(ValueError, match="family 'aae'"):
        family_name({"format": 1, "family": "aae"})


def test_recipe_picks_the_trainer_and_an_unknown_one_names_the_option() -> None:
    assert family_for_recipe("slice").name == "stylegan2"
    assert family_for_recipe("patch").name == "patch"
    with pytest.raises(ValueError, match="--recipe must be one of"):
        family_for_recipe("autoencoder")


def test_bench_and_diagnosis_come_from_the_family() -> None:
    stylegan2, patch, autoencoder = FAMILIES["stylegan2"], FAMILIES["patch"], FAMILIES["autoencoder"]
    assert stylegan2.bench is not None and stylegan2.bench.item == "slice"
    assert stylegan2.bench.quick_batches == (2,)
    assert patch.bench is not None and patch.bench.item == "patch"
    assert stylegan2.diagnose is not None and patch.diagnose is not None
    assert autoencoder.bench is None and autoencoder.diagnose is None and autoencoder.recipe is None
