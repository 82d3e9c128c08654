"""The gate (service/gate/): each signal on synthetic arrays, the calibration and fusion, gate.json checks
that name the field, the words a dosimetrist reads, and the whole decision — with a stub segmenter, so no
ONNX model runs — on a normal, a metal, a liver-less, a cut-off and a head series."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from service import imaging
from service.commands.gate import anomaly_type
from service.db.tables import RouteReason
from service.dicom_series import CTSeries
from service.gate import (
    HU_BINS,
    SIGNALS,
    DetectorEvidence,
    Finding,
    Gate,
    Observation,
    SignalSpec,
    body_composition,
    calibrate,
    content_version,
    end_ratio,
    fluid_rim,
    fuse,
    hu_band,
    liver_extent_mm,
    liver_hu_histogram,
    liver_hu_outside,
    metal_pixels,
    observe,
    pairwise_agreement,
    probability_pieces,
    signal_words,
    slice_run,
    tail_probability,
    write_gate,
    z_for,
)
from service.model_paths import DEFAULT_GATE_DIR
from service.segmentation import Framing, Segmenter, SegmenterInput, frame_series, prepare_volume

SIZE = 32  # the stub segmenter's input size


def _disc(n: int, r: float, cy: float | None = None, cx: float | None = None) -> np.ndarray:
    y, x = np.mgrid[:n, :n]
    cy = (n - 1) / 2 if cy is None else cy
    cx = (n - 1) / 2 if cx is None else cx
    inside: np.ndarray = (y - cy) ** 2 + (x - cx) ** 2 <= r**2
    return inside


# --- signals on synthetic arrays -------------------------------------------------------------------------


def test_metal_pixels_counts_pixels_above_the_metal_density_per_slice() -> None:
    hu = np.zeros((3, 8, 8), np.float32)
    hu[1, 2:4, 2:4] = 2600.0  # a stent
    hu[2, 0, 0] = 1300.0  # dense bone: not metal
    assert metal_pixels(hu, 2000.0).tolist() == [0, 4, 0]


def test_identical_views_agree_and_a_moved_view_disagrees_on_its_slices() -> None:
    a = np.zeros((6, 20, 20), bool)
    a[1:5] = _disc(20, 6)
    dice, profile = pairwise_agreement([a, a.copy()])
    assert dice == 1.0 and not profile.any()
    b = a.copy()
    b[3] = np.roll(a[3], 4, axis=1)
    dice, profile = pairwise_agreement([a, a.copy(), b])
    assert 0.8 < dice < 1.0
    assert np.flatnonzero(profile > 0).tolist() == [3]
    assert math.isnan(pairwise_agreement([a])[0])


def test_probability_pieces_measures_the_share_outside_the_largest_piece() -> None:
    m = np.zeros((4, 20, 20), bool)
    m[:, 2:10, 2:10] = True  # 256 voxels
    assert probability_pieces(m) == (0.0, 1)
    m[:, 15:17, 15:17] = True  # 16 voxels apart
    share, pieces = probability_pieces(m)
    assert share == pytest.approx(16 / 272) and pieces == 2
    assert probability_pieces(np.zeros((2, 4, 4), bool)) == (0.0, 0)


def test_liver_extent_and_end_ratio() -> None:
    m = np.zeros((10, 8, 8), bool)
    m[2:7, 2:6, 2:6] = True
    assert liver_extent_mm(m, 2.5) == 12.5
    assert end_ratio(m) == (0.0, 0.0)  # complete: nothing on the first or last slice
    m[0, 3:5, 3:5] = True
    assert end_ratio(m)[0] == pytest.approx(4 / 16)
    assert liver_extent_mm(np.zeros((3, 4, 4), bool), 5.0) == 0.0


def test_body_composition_tells_an_abdomen_from_a_head() -> None:
    n, pixel_mm = 64, 6.0
    abdomen = np.full((3, n, n), -1000.0, np.float32)
    abdomen[:, _disc(n, 25)] = 40.0
    abdomen[:, _disc(n, 2, cy=45)] = 700.0  # a vertebra
    area, bone = body_composition(abdomen, pixel_mm)
    assert 600 < area < 800 and bone < 0.02
    head = np.full((3, n, n), -1000.0, np.float32)
    head[:, _disc(n, 13)] = 1000.0  # skull
    head[:, _disc(n, 11)] = 35.0  # brain
    area, bone = body_composition(head, pixel_mm)
    assert area < 200 and bone > 0.25
    assert body_composition(np.full((2, n, n), -1000.0, np.float32), pixel_mm) == (0.0, 0.0)


def test_liver_hu_band_and_the_share_outside_it() -> None:
    rng = np.random.default_rng(0)
    hu = rng.normal(100.0, 8.0, (4, 32, 32)).astype(np.float32)
    liver = np.zeros(hu.shape, bool)
    liver[:, 4:28, 4:28] = True
    hist = liver_hu_histogram(hu, liver)
    assert hist.shape == (4, len(HU_BINS) + 1) and hist.sum() == 4 * 20 * 20  # eroded by two pixels in-plane
    lo, hi = hu_band(hist.sum(axis=0))
    assert 60 <= lo < 85 and 115 < hi <= 140
    share, profile = liver_hu_outside(hist, (lo, hi))
    assert share < 0.03
    hu[2, 10:20, 10:20] = 20.0  # a hypodense lesion on slice 2
    share, profile = liver_hu_outside(liver_hu_histogram(hu, liver), (lo, hi))
    assert profile is not None and int(np.argmax(profile)) == 2 and profile[2] > 0.15
    assert math.isnan(liver_hu_outside(None, (lo, hi))[0])


def test_fluid_rim_sees_fluid_along_the_liver_border() -> None:
    n = 40
    hu = np.full((3, n, n), -100.0, np.float32)  # fat around the liver
    liver = np.zeros(hu.shape, bool)
    liver[:] = _disc(n, 8)
    hu[liver] = 110.0
    share, profile = fluid_rim(hu, liver, 2.0, (-10.0, 30.0), 6.0)
    assert share == 0.0 and not profile.any()
    ring = _disc(n, 14) & ~_disc(n, 8)
    hu[1][ring] = 8.0  # ascites on slice 1
    share, profile = fluid_rim(hu, liver, 2.0, (-10.0, 30.0), 6.0)
    assert profile[1] > 0.9 and profile[0] == 0.0 and 0.25 < share < 0.4
    assert math.isnan(fluid_rim(hu, np.zeros_like(liver), 2.0, (-10.0, 30.0), 6.0)[0])


def test_slice_run_is_the_run_around_the_peak() -> None:
    p = np.array([0, 0.5, 2, 3, 2.5, 0.2, 4.0, 0.1])
    assert slice_run(p, 1.0) == (6, 6)
    p[6] = 0
    assert slice_run(p, 1.0) == (2, 4)
    assert slice_run(p, 10.0) is None and slice_run(None, 1.0) is None


# --- fusion ---------------------------------------------------------------------------------------------


def test_tail_probability_and_its_inverse() -> None:
    assert tail_probability(0.0, "upper") == pytest.approx(0.5)
    assert tail_probability(-3.0, "both") == pytest.approx(tail_probability(3.0, "both"))
    for tails in ("upper", "both"):
        assert tail_probability(z_for(1e-4, tails), tails) == pytest.approx(1e-4, rel=1e-6)


def test_fuse_is_minus_log10_of_the_smallest_probability_and_ignores_unmeasured() -> None:
    assert fuse([0.5, 1e-3, 0.2]) == pytest.approx(3.0)
    assert fuse([float("nan"), 0.1]) == pytest.approx(1.0)
    assert fuse([]) == 0.0


def test_a_dice_spec_fires_below_its_threshold_and_says_normal_at_least() -> None:
    spec = SignalSpec("tta_dice", "log1m", "upper", math.log(0.02), 0.3, 20, 0.93, None, 0.95, None, 0.1)
    assert spec.tail_probability(0.99) > 0.5 > spec.tail_probability(0.90)
    assert spec.value_at(z_for(1e-3, "upper")) < 0.98  # value_at(+z) is the unusual side: a low Dice
    words = signal_words("tta_dice", 0.81, spec, (40, 52), {})
    assert words == "segmentations disagree on slices 40–52 (pairwise Dice 0.81; normal ≥ 0.93)"


def test_words_give_value_normal_range_and_slices() -> None:
    vol = SignalSpec("liver_volume", "log", "both", math.log(1500), 0.2, 20, 2900.0, 800.0, 2300.0, 1000.0, None)
    assert signal_words("liver_volume", 3400.0, vol, None, {}) == "liver volume 3,400 ml (normal 800–2,900 ml)"
    metal = SignalSpec("metal", "log1p", "upper", 0.0, 1.0, 20, 27.0, None, 4.0, None, 0.0)
    assert signal_words("metal", 1234.0, metal, (10, 14), {"metal_hu": 2000.0}) == (
        "metal-density pixels (> 2,000 HU) on slices 10–14: 1,234 (normal ≤ 27.0)"
    )
    assert "not measured" in signal_words("tta_dice", float("nan"), None, None, {})


# --- a stub segmenter and synthetic series for the whole decision ----------------------------------------


class StubSegmenter(Segmenter):
    """The segmenter's interface without ONNX: liver = windowed values in the liver's HU range."""

    def __init__(self) -> None:
        self.input = SegmenterInput(SIZE, 1, imaging.Window(50.0, 500.0))
        self.threshold = 0.5
        self.version, self.name = "stub", "stub"

    def prepare(self, series: CTSeries) -> tuple[np.ndarray, Framing]:
        framing = frame_series(series.hu, series.pixel_spacing_mm, self.input)
        return prepare_volume(series.hu, self.input, framing), framing

    def probabilities_of_volume(self, volume: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        hu = volume * 500.0 - 200.0
        probs = np.where((hu > 80) & (hu < 150), 0.95, 0.02).astype(np.float32)
        feats = np.stack([volume.mean(axis=(1, 2)), probs.mean(axis=(1, 2)), volume.std(axis=(1, 2))], axis=1)
        return probs, feats.astype(np.float32)


def _series(kind: str, seed: int, k: int = 24, n: int = 64) -> CTSeries:
    """A synthetic series: an abdomen (6 mm pixels) with a liver on slices 4…k−5; variants by `kind`."""
    rng = np.random.default_rng(seed)
    hu = np.full((k, n, n), -1000.0, np.float32)
    r_body = 25 + rng.uniform(-1, 1)
    body = _disc(n, r_body)
    liver = _disc(n, 9 + rng.uniform(-0.5, 0.5), cy=30, cx=22)
    first, last = 4, k - 5
    for i in range(k):
        hu[i][body] = -90.0
        hu[i][_disc(n, 2, cy=50)] = 600.0  # spine
        if kind != "no_liver" and first <= i <= last:
            hu[i][liver] = 110.0
    if kind == "partial":
        hu[0][liver] = 110.0
        hu[1][liver] = 110.0
        hu[2][liver] = 110.0
        hu[3][liver] = 110.0
    if kind == "metal":
        hu[10:14, 28:32, 30:34] = 2600.0
    if kind == "head":
        hu[:] = -1000.0
        hu[:, _disc(n, 13)] = 1000.0
        hu[:, _disc(n, 11)] = 35.0
    hu += rng.normal(0, 5, hu.shape).astype(np.float32)
    return CTSeries(
        series_instance_uid=f"1.2.3.{seed}",
        sop_instance_uids=tuple(f"1.2.3.{seed}.{i}" for i in range(k)),
        hu=hu,
        locations_mm=-5.0 * np.arange(k),
        pixel_spacing_mm=(6.0, 6.0),
        folder=Path("."),
    )


def _evidence(seed: int, k: int = 24) -> DetectorEvidence:
    rng = np.random.default_rng(seed + 99)
    scores = rng.normal(1.0, 0.3, k)
    return DetectorEvidence(float(np.sort(scores)[-3:].mean()), 4.5, tuple(float(s) for s in scores), "stub")


@pytest.fixture(scope="module")
def gate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    seg = StubSegmenter()
    observations = []
    for seed in range(12):
        _, obs, _ = observe(series=_series("normal", seed), segmenter=seg, detector=_evidence(seed))
        observations.append(obs)
    config, reference = calibrate(observations, false_flag_rate=0.05)
    folder = tmp_path_factory.mktemp("gate")
    write_gate(folder, config, reference, command="test", data={"series": 12})
    return folder


def test_calibration_writes_every_signal_and_a_cut_at_least_bonferroni(gate_dir: Path) -> None:
    config = json.loads((gate_dir / "gate.json").read_text())
    assert set(config["signals"]) <= set(SIGNALS) and {"metal", "tta_dice", "gan_score"} <= set(config["signals"])
    fusion = config["fusion"]
    assert fusion["threshold"] >= fusion["bonferroni_threshold"] == pytest.approx(-math.log10(0.05 / fusion["signals"]))
    assert config["version"] == content_version(config)
    assert config["reference"]["sha256"] and (gate_dir / config["reference"]["file"]).stat().st_size < 100_000


def _assess(gate: Gate, kind: str, seed: int) -> tuple[bool, RouteReason | None, dict[str, Finding]]:
    a = gate.assess(series=_series(kind, seed), segmenter=StubSegmenter(), detector=_evidence(seed))
    d = a.decision
    assert d.gate_version == gate.version and d.fused is not None and d.fused_threshold == gate.fused_threshold
    json.dumps(d.as_json())  # strict: every NaN became None
    return d.manual, d.reason, {f.signal: f for f in d.findings}


def test_unseen_normal_series_go_through_at_about_the_false_flag_rate(gate_dir: Path) -> None:
    gate = Gate.load(gate_dir)
    outcomes = [_assess(gate, "normal", seed) for seed in range(500, 510)]
    assert sum(manual for manual, _, _ in outcomes) <= 1
    manual, reason, findings = outcomes[1]
    assert not manual and reason is None
    assert set(findings) == set(gate.specs)  # every calibrated signal is reported, fired or not


def test_metal_sends_the_series_to_manual_with_its_slices_in_words(gate_dir: Path) -> None:
    manual, reason, findings = _assess(Gate.load(gate_dir), "metal", 501)
    metal = findings["metal"]
    assert manual and reason == RouteReason.GATE
    assert metal.fired and metal.slices == (10, 13)
    assert "metal-density pixels (> 2,000 HU) on slices 10–13" in metal.words


def test_a_series_without_a_liver_is_no_liver(gate_dir: Path) -> None:
    manual, reason, findings = _assess(Gate.load(gate_dir), "no_liver", 502)
    assert manual and reason == RouteReason.NO_LIVER
    assert "no liver in the field of view" in findings["no_liver"].words


def test_a_liver_cut_by_the_first_slice_is_partly_covered(gate_dir: Path) -> None:
    manual, reason, findings = _assess(Gate.load(gate_dir), "partial", 503)
    assert manual and reason == RouteReason.LIVER_PARTIAL
    assert "cut by the first slice" in findings["liver_partial"].words


def test_a_head_is_not_an_abdominal_ct(gate_dir: Path) -> None:
    manual, reason, findings = _assess(Gate.load(gate_dir), "head", 504)
    assert manual and reason == RouteReason.NOT_ABDOMEN
    assert findings["not_abdomen"].words.startswith("not an abdominal CT")


def test_geometry_findings_route_to_manual_even_when_the_evidence_is_quiet(gate_dir: Path) -> None:
    gate = Gate.load(gate_dir)
    a = gate.assess(
        series=_series("normal", 505),
        segmenter=StubSegmenter(),
        detector=_evidence(505),
        geometry_findings=[{"code": "gap"}],
    )
    assert a.decision.manual and a.decision.reason == RouteReason.GEOMETRY


def test_route_reasons_fit_the_column() -> None:
    assert all(len(r.value) <= 32 for r in RouteReason)


# --- gate.json checks ------------------------------------------------------------------------------------


def _rewrite(folder: Path, edit: object, rehash: bool = True) -> None:
    path = folder / "gate.json"
    config = json.loads(path.read_text())
    edit(config)  # type: ignore[operator]
    if rehash:
        config["version"] = content_version(config)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c["signals"]["entropy"].pop("scale"), "signals.entropy.scale"),
        (lambda c: c["signals"]["metal"].update(tails="lower"), "signals.metal.tails"),
        (lambda c: c["signals"].update(shoe_size={}), "signals.shoe_size"),
        (lambda c: c["fusion"].update(threshold=-1), "fusion.threshold"),
        (lambda c: c.pop("false_flag_rate"), "'false_flag_rate'"),
        (lambda c: c["bands"].update(liver_hu=[200, 100]), "bands.liver_hu"),
        (lambda c: c["views"].append("rotate"), "views"),
        (lambda c: c["rules"]["liver_partial"].pop("max_end_ratio"), "rules.liver_partial.max_end_ratio"),
        (lambda c: c["reference"].pop("sha256"), "reference.sha256"),
    ],
)
def test_a_bad_gate_json_is_refused_naming_the_field(gate_dir: Path, tmp_path: Path, edit: object, named: str) -> None:
    folder = tmp_path / "g"
    folder.mkdir()
    for f in gate_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    _rewrite(folder, edit)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        Gate.load(folder)


def test_an_edited_gate_json_or_reference_is_refused(gate_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "g"
    folder.mkdir()
    for f in gate_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    _rewrite(folder, lambda c: c["fusion"].update(threshold=1.0), rehash=False)
    with pytest.raises(ValueError, match="field 'version'"):
        Gate.load(folder)
    _rewrite(folder, lambda c: None)
    Gate.load(folder)
    ref = folder / "reference.npz"
    ref.write_bytes(ref.read_bytes() + b"x")
    with pytest.raises(ValueError, match="reference.sha256"):
        Gate.load(folder)
    ref.unlink()
    with pytest.raises(FileNotFoundError, match="reference.file"):
        Gate.load(folder)


def test_rules_only_gate_keeps_the_behaviour_before_calibration() -> None:
    gate = Gate.rules_only()
    a = gate.assess(
        series=_series("normal", 7), segmenter=StubSegmenter(), detector=DetectorEvidence(9.0, 4.5, (), "stub")
    )
    assert a.decision.manual and a.decision.reason == RouteReason.ANOMALY and a.decision.fused is None
    assert gate.version == "rules-only"


def test_calibration_needs_five_normals_with_a_liver() -> None:
    with pytest.raises(ValueError, match=">= 5 normal series"):
        calibrate([Observation(num_slices=3, slice_spacing_mm=5.0)] * 6, false_flag_rate=0.05)
    with pytest.raises(ValueError, match="false_flag_rate"):
        calibrate([], false_flag_rate=0.7)


def test_manifest_entries_name_normal_anomalous_and_off_target_series() -> None:
    assert anomaly_type(None) == "unknown"
    assert anomaly_type({"anomaly": None, "category": "normal"}) == "normal"
    assert anomaly_type({"anomaly": {"type": "stent"}, "category": "anomaly"}) == "stent"
    off = {"anomaly": None, "category": "off_target", "scan_range": {"kind": "chest", "liver": "absent"}}
    assert anomaly_type(off) == "chest"  # never calibrated on as a normal series


def test_readiness_gate_check_names_a_gate_json_that_does_not_load(tmp_path: Path) -> None:
    from service.web.health import check_gate_dir

    assert check_gate_dir(tmp_path).status == "ok"  # no gate.json: the rules-only gate
    assert check_gate_dir(DEFAULT_GATE_DIR).status == "ok"
    broken = tmp_path / "gate"
    shutil.copytree(DEFAULT_GATE_DIR, broken)
    (broken / "reference.npz").write_bytes(b"changed")
    result = check_gate_dir(broken)
    assert result.status == "failed" and "SHA-256" in (result.reason or "")
