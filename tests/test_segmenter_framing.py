"""The segmenter's geometry: a body-centred field of fixed physical pixel size (aspect ratio kept) for any matrix
and field of view, mapped back to the series' own grid; the legacy whole-matrix framing unchanged; and the synth
recipe's domain randomisation (tissue bank, random appearance) and a tiny training run with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service import imaging
from service.segmentation import FRAMING_MARGIN, SegmenterInput, dice, frame_series, prepare_volume

SPEC = SegmenterInput(size=128, context_slices=1, window=imaging.Window(50.0, 500.0), pixel_spacing_mm=3.2)
LEGACY = SegmenterInput(size=128, context_slices=1, window=imaging.Window(50.0, 500.0))


def _abdomen(
    rows: int, cols: int, spacing: float, half_width_mm: float = 160.0, k: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """(HU [k, rows, cols], liver [k, rows, cols]): an elliptic body (half axes half_width_mm × 0.7 of it, off
    the matrix centre by 20 mm) with a 'liver' ellipse on its right, on a grid of `spacing` mm pixels."""
    y = (np.arange(rows) - (rows - 1) / 2.0) * spacing
    x = (np.arange(cols) - (cols - 1) / 2.0) * spacing
    yy, xx = np.meshgrid(y, x, indexing="ij")
    bx, by = 20.0, -10.0
    body = ((xx - bx) / half_width_mm) ** 2 + ((yy - by) / (0.7 * half_width_mm)) ** 2 < 1.0
    liver = ((xx - bx + 0.45 * half_width_mm) / (0.35 * half_width_mm)) ** 2 + (
        (yy - by) / (0.4 * half_width_mm)
    ) ** 2 < 1.0
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)
    hu[liver] = 110.0
    return np.repeat(hu[None], k, 0), np.repeat(liver[None], k, 0)


@pytest.mark.parametrize(
    ("rows", "cols", "fov_mm"),
    [(512, 512, 500.0), (512, 512, 250.0 * 512 / 400), (122, 101, 366.0), (256, 200, 380.0), (101, 122, 303.0)],
)
def test_field_has_the_fixed_pixel_size_and_maps_back_onto_any_matrix(rows: int, cols: int, fov_mm: float) -> None:
    spacing = fov_mm / max(rows, cols)
    hu, liver = _abdomen(rows, cols, spacing, half_width_mm=min(160.0, 0.45 * min(rows, cols) * spacing))
    framing = frame_series(hu, (spacing, spacing), SPEC)
    assert framing.spacing_mm == (3.2, 3.2)  # the body fits: the fixed pixel size, same on both axes
    field = framing.mask_to_field(liver)
    # The liver's area in millimetres is kept (aspect ratio and pixel size honoured).
    area_mm2 = liver[0].sum() * spacing**2
    assert abs(field[0].sum() * 3.2**2 - area_mm2) / area_mm2 < 0.05
    back = framing.to_series(field.astype(np.float32)) > 0.5
    assert back.shape == liver.shape
    assert dice(back, liver) > 0.95


def test_the_same_body_looks_the_same_in_the_field_whatever_the_field_of_view() -> None:
    fields = []
    for fov in (380.0, 440.0, 500.0):
        spacing = fov / 512
        hu, _ = _abdomen(512, 512, spacing)
        framing = frame_series(hu, (spacing, spacing), SPEC)
        fields.append(prepare_volume(hu, SPEC, framing)[0])
    for other in fields[1:]:
        assert np.corrcoef(fields[0].ravel(), other.ravel())[0, 1] > 0.97


def test_a_body_wider_than_the_field_gets_coarser_pixels_and_stays_whole() -> None:
    spacing = 600.0 / 512
    hu, liver = _abdomen(512, 512, spacing, half_width_mm=260.0)
    framing = frame_series(hu, (spacing, spacing), SPEC)
    width_mm = 2 * 260.0
    assert framing.spacing_mm[0] > 3.2
    assert framing.spacing_mm[0] * SPEC.size >= width_mm * (1 + FRAMING_MARGIN) - 2 * spacing
    body = framing.to_field(hu) > -500
    assert not body[0, :, 0].any() and not body[0, :, -1].any()  # nothing cut at the field's edges
    assert dice(framing.to_series(framing.mask_to_field(liver).astype(np.float32)) > 0.5, liver) > 0.95


def test_legacy_framing_is_the_whole_matrix_resize() -> None:
    hu, _ = _abdomen(256, 200, 1.5)
    framing = frame_series(hu, (1.5, 1.5), LEGACY)
    assert framing.whole_matrix
    expected = np.stack([imaging.apply_window(imaging.resize(s, (128, 128)), LEGACY.window) for s in hu])
    np.testing.assert_array_equal(prepare_volume(hu, LEGACY, framing), expected)


def test_framing_refuses_bad_geometry_naming_the_field() -> None:
    hu, _ = _abdomen(64, 64, 5.0)
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        frame_series(hu, (0.0, 1.0), SPEC)
    with pytest.raises(ValueError, match="input.pixel_spacing_mm"):
        SegmenterInput(size=128, context_slices=1, window=imaging.Window(50.0, 500.0), pixel_spacing_mm=-1.0)


# --- the synth recipe -------------------------------------------------------------------------------------

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bank():  # type: ignore[no-untyped-def]
    from models.segmenter.synth import render_bank

    return render_bank([3_000_001, 3_000_002], 3)


def test_bank_holds_tissue_stacks_with_liver_and_varied_patients(bank) -> None:  # type: ignore[no-untyped-def]
    from models.segmenter.synth import BANK_GRID, varied_patient
    from service.phantom.anatomy import Patient
    from service.phantom.canvas import Tissue

    assert bank.tissue.shape == (6, 3, BANK_GRID, BANK_GRID)
    assert bank.liver.any(axis=(1, 2)).sum() >= 3  # most stacks are drawn around the liver
    assert (bank.tissue == Tissue.LIVER).any() and (bank.tissue == Tissue.FAT).any()
    # The anatomy varies beyond the phantom's own: the same seed, another liver.
    base, varied = Patient(3_000_001), varied_patient(3_000_001)
    assert (base.liver_scale, base.liver_left_lobe) != (varied.liver_scale, varied.liver_left_lobe)


def test_randomised_hu_cover_the_contrast_phases_and_realistic_slices_keep_the_phantom_table() -> None:
    from models.segmenter.synth import draw_hu
    from service.phantom.canvas import TISSUE_HU, Tissue

    gen = torch.Generator().manual_seed(0)
    realistic = torch.zeros(400, dtype=torch.bool)
    realistic[:100] = True
    hu, amp = draw_hu(gen, 400, realistic)
    liver = hu[100:, Tissue.LIVER]
    assert float(liver.min()) >= 20.0 and float(liver.max()) <= 200.0
    assert float(liver.min()) < 60.0 and float(liver.max()) > 140.0  # non-contrast … enhanced
    assert float(hu[100:, Tissue.AORTA].max()) > 200.0  # an arterial phase
    pv = TISSUE_HU[Tissue.LIVER][0]
    assert float((hu[:100, Tissue.LIVER] - pv).abs().max()) < 25.0
    assert float(amp[100:, Tissue.LIVER].std()) > 0  # texture strength varies


def test_randomiser_gives_windowed_slices_in_the_serving_framing(bank) -> None:  # type: ignore[no-untyped-def]
    from models.segmenter.synth import Randomiser

    r = Randomiser(bank, SPEC, torch.Generator().manual_seed(1))
    x, y = r.batch(6)
    assert x.shape == (6, 3, 128, 128) and y.shape == (6, 128, 128)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert int(y.flatten(1).any(1).sum()) >= 3
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        Randomiser(bank, LEGACY, torch.Generator())


def test_synth_recipe_trains_exports_and_records_itself(tmp_path: Path) -> None:
    from service.commands.main import main as gatekeeper
    from service.phantom.generate import SeriesSpec, generate_run

    data = tmp_path / "val"
    spec = SeriesSpec(
        folder="validation/0001_normal", patient_seed=41, series_seed=42, anomaly=None, num_slices=8, matrix=64,
        split="validation",
    )  # fmt: skip
    generate_run([spec], data, progress=False)
    out = tmp_path / "model"
    rc = gatekeeper(
        ["train", "segmenter", "--recipe", "synth", "--data", str(data), "--out", str(out), "--size", "32",
         "--base", "4", "--steps", "3", "--batch", "2", "--val-every", "3", "--bank-patients", "2",
         "--bank-per-patient", "2", "--threads", "1", "--jobs", "1", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["input"]["pixel_spacing_mm"] == 3.2
    assert meta["training"]["recipe"] == "synth"
    assert meta["training"]["domain_randomisation"]["bank_patients"] == 2
    assert "synthetic_dice_mean" in meta["metrics"]["history"][-1]
    from service.segmentation import Segmenter

    assert Segmenter(out).input.pixel_spacing_mm == 3.2
