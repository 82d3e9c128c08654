"""`gatekeeper evaluate active-learning --quick`: the report's schema, and a resumed run redoes nothing.

A tiny run (short 64² phantoms, 2 budgets, strategies gan and random, 3 fine-tune steps each) on the
shipped segmenter, detector and gate; then the same command again, which must read every series and
every fine-tune from its cache (their files untouched) and write the same report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.commands.main import main

pytestmark = pytest.mark.slow


def test_quick_curve_writes_the_report_and_resumes_without_redoing_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "curve"
    command = ["evaluate", "active-learning", "--out", str(out), "--quick", "--matrix", "64", "--jobs", "1"]
    command += ["--random-repeats", "2", "--bootstrap", "200"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "estimated wall time" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["random_max_budget"] == 4
    assert set(report["strategies"]) == {"gan", "random"}
    for curve in report["strategies"].values():
        assert curve["budgets"] == [2, 4] and len(curve["dice"]) == 2
        assert all(0.0 <= d <= 1.0 for d in curve["dice"])
    assert set(report["labels_to_match_random"]) == {"gan", "random"}
    assert report["labels_to_match_random"]["random"] in (2, 4)
    details = report["strategies"]["gan"]["details"]["2"]
    assert {"failures", "per_type", "normals_minus_shipped", "chosen_types"} <= set(details)
    assert {"tumor", "truncation", "normal"} <= set(details["per_type"])
    assert (out / "curve.png").stat().st_size > 1000
    assert report["wall_s"] > 0 and report["series_s"] > 0
    assert 0 < report["fine_tune_s"] <= report["wall_s"]
    results = sorted((out / "runs").glob("*/result.json"))
    assert [p.parent.name for p in results] == [
        "gan-k002",
        "gan-k004",
        "random-r0-k002",
        "random-r0-k004",
        "random-r1-k002",
        "random-r1-k004",
    ]
    stamps = {p: p.stat().st_mtime_ns for p in [*results, *(out / "series").glob("*/*.npz")]}

    assert main(command) == 0  # resumed: everything cached
    assert "0 series to render" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "report.json").read_text())
    assert again["strategies"] == report["strategies"]
    # the cost of the whole experiment survives the resume: the fine-tunes and series are not re-timed
    assert (again["fine_tune_s"], again["series_s"]) == (report["fine_tune_s"], report["series_s"])
