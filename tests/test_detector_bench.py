"""`gatekeeper bench score --quick` on an untrained tiny detector: every line of the table is there."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from detector_support import untrained_detector  # noqa: E402

from service.commands.main import main as gatekeeper  # noqa: E402


def test_bench_score_quick_reports_ratios_work_peak_and_series_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = untrained_detector(tmp_path / "model")
    capsys.readouterr()
    rc = gatekeeper(
        ["bench", "score", "--quick", "--model", str(model), "--threads", "1", "--json", str(tmp_path / "bench.json")]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert re.search(r"^ORT / eager fp32 at batch 2: \d+\.\d\d× \(target ≥ 1\.3×: (met|missed)\)$", out, re.M), out
    assert re.search(r"^bf16 / eager fp32 at batch 2: \d+\.\d\d×", out, re.M), out
    assert "timing does not depend on weight values" in out
    assert re.search(r"\| 2 \| ONNX Runtime fp32 \(fused scorer\) \| [\d.]+ \| \d+ \| \d+ % \| [\d.]+× \|", out), out
    assert re.search(r"^16-slice 64² series end to end .* = \d+\.\d\d s", out, re.M), out
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["fresh_weights"] is True
    assert 0.05 < result["gflop_per_slice"] < 5  # dcgan at 64²: encoder + generator + 2 × discriminator
    assert result["matmul_peak_gflops"] > 0
    rates = result["rates"]["2"]
    assert set(rates) == {"torch_fp32", "ort_fp32", "torch_bf16"} and min(rates.values()) > 0
    assert result["agreement"]["2"]["ort_terms_max_rel"] < 1e-4  # same weights, same graph


def test_bench_score_refuses_bad_batches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = untrained_detector(tmp_path / "model")
    assert gatekeeper(["bench", "score", "--model", str(model), "--batches", "4,x"]) == 2
    assert "--batches" in capsys.readouterr().err
