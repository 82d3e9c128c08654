"""`gatekeeper calibrate gate` then `gatekeeper evaluate gate` on a tiny phantom set (10 series, 128²), with the
shipped segmenter and detector (ONNX Runtime; no torch): gate.json loads, report.json has the interface other
checks rely on, report.md and the figures are written, and bad input is one line with exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from service.commands.main import main as gatekeeper
from service.gate import SIGNALS, Gate
from service.phantom.generate import SeriesSpec, generate_run


def _spec(folder: str, seed: int, split: str, anomaly: str | None = None, scan_range: str = "abdomen") -> SeriesSpec:
    """A 128² series over the clinic's abdomen range (the whole liver in the field of view: a normal series,
    not an off-target one; 2.5–5 mm slices, about 60–160 of them)."""
    return SeriesSpec(
        folder=folder,
        patient_seed=seed,
        series_seed=seed + 1000,
        anomaly=anomaly,
        matrix=128,
        split=split,
        scan_range=scan_range,
    )


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 validation normals (the calibration); test: 2 normals, a stent and a hip prosthesis."""
    out = tmp_path_factory.mktemp("gatephantom")
    specs = [_spec(f"validation/{i:04d}_normal", 700 + i, "validation") for i in range(1, 7)]
    specs += [
        _spec("test/0001_normal", 720, "test"),
        _spec("test/0002_normal", 721, "test"),
        _spec("test/0003_stent", 722, "test", "stent"),
        _spec("test/0004_hip_prosthesis", 723, "test", "hip_prosthesis", "abdomen_pelvis"),
    ]
    generate_run(specs, out, progress=False)
    return out


@pytest.fixture(scope="module")
def gate_dir(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gate")
    assert gatekeeper(["calibrate", "gate", "--data", str(phantom), "--out", str(out), "--false-flag-rate", "0.1"]) == 0
    return out


def test_calibrate_gate_writes_a_gate_json_the_pipeline_can_load(gate_dir: Path) -> None:
    gate = Gate.load(gate_dir)
    config = gate.config
    assert gate.calibrated and set(gate.specs) <= set(SIGNALS) and len(gate.specs) >= 8
    assert config["data"]["split"] == "validation" and config["data"]["series"] == 6 and config["data"]["hash"]
    assert config["false_flag_rate"] == 0.1 and "gatekeeper calibrate gate" in config["command"]
    assert config["fusion"]["threshold"] >= config["fusion"]["bonferroni_threshold"]
    assert (gate_dir / "reference.npz").stat().st_size < 2_000_000


def test_evaluate_gate_reports_every_signal_and_the_fused_gate(phantom: Path, gate_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    args = ["evaluate", "gate", "--data", str(phantom), "--gate", str(gate_dir), "--out", str(out)]
    assert gatekeeper([*args, "--bootstrap", "20", "--jobs", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["series"] == 4 and 0.0 <= report["failure_prevalence"] <= 1.0
    keys = {"aurc", "recall_dice_lt_090", "recall_dice_lt_095", "manual_share"}
    assert keys <= set(report["fused"])
    assert set(report["signals"]) == set(Gate.load(gate_dir).specs)
    for block in [report["fused"], *report["signals"].values()]:
        assert keys <= set(block)
        assert block["aurc"] is not None and 0.0 <= block["aurc"] <= 1.0
        assert 0.0 <= block["manual_share"] <= 1.0
    # A hip prosthesis scan of the pelvis may hold no liver: then it is reported among the off-target series.
    types = set(report["by_type"]) | {r["anomaly"] for r in report["off_target"]}
    assert types == {"normal", "stent", "hip_prosthesis"}
    series = json.loads((out / "series.json").read_text())["results"]
    contoured = [r for r in series if math.isfinite(r["dice"])]  # NaN: no liver in the contour's slices
    assert len(contoured) == report["contoured"] >= 3 and all(0.0 <= r["dice"] <= 1.0 for r in contoured)
    assert all(r["seconds"] > 0 for r in series)
    hip = next(r for r in series if r["anomaly"] == "hip_prosthesis")
    assert hip["signals"]["metal"]["value"] > 0 and math.isfinite(hip["fused"])
    md = (out / "report.md").read_text()
    assert "| fused |" in md and "## By severity grade" in md
    assert (out / "gate_curves.png").stat().st_size > 10_000
    # The report again from series.json, without scoring.
    assert gatekeeper([*args, "--bootstrap", "0", "--reuse"]) == 0


def test_calibrate_gate_without_normals_is_one_line_and_exit_2(
    phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = gatekeeper(["calibrate", "gate", "--data", str(phantom), "--split", "train", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no normal CT series in split 'train'" in err[0]
    assert not (tmp_path / "g" / "gate.json").exists()
