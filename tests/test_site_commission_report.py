"""ops/site_commission_report.py: the site experiment's summary from two gate reports and a commissioning report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "ops"))

import site_commission_report  # noqa: E402


def _gate_report(folder: Path, *, manual: float, recall: float, normals: float, prevalence: float) -> Path:
    folder.mkdir()
    doc = {
        "meta": {"gate": "g", "detector": "d", "segmenter": "s", "segmenter_version": "v", "command": "c"},
        "fused": {
            "manual_share": manual,
            "recall_dice_lt_095": recall,
            "recall_dice_lt_090": 1.0,
            "failure_rate_auto_routed": 0.01,
        },
        "normals_sent_to_manual": normals,
        "failure_prevalence": prevalence,
        "failures": 10,
        "contoured": 190,
    }
    (folder / "report.json").write_text(json.dumps(doc))
    return folder


def test_the_summary_carries_the_issue_keys_and_judges_the_targets(tmp_path: Path) -> None:
    before = _gate_report(tmp_path / "before", manual=0.40, recall=1.0, normals=0.35, prevalence=0.06)
    after = _gate_report(tmp_path / "after", manual=0.12, recall=0.9, normals=0.04, prevalence=0.06)
    commission = tmp_path / "commission"
    commission.mkdir()
    (commission / "report.json").write_text(json.dumps({"data": {"normal_series": 96}, "candidates": {"gate": "x"}}))
    out = tmp_path / "out"
    args = ["--before", str(before), "--after", str(after), "--commission", str(commission)]
    assert site_commission_report.main([*args, "--site", "site-b", "--out", str(out)]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["site_profile"] == "site-b" and doc["normals_used"] == 96 and doc["failure_prevalence"] == 0.06
    for side, manual in (("before", 0.40), ("after", 0.12)):
        assert set(doc[side]) >= {"manual_share", "recall_dice_lt_095", "normals_to_manual"}
        assert doc[side]["manual_share"] == manual
    assert doc["targets"] == {
        "recall_dice_lt_095_ge_0.95": False,
        "manual_share_le_prevalence_plus_10": True,
        "normals_to_manual_le_0.05": True,
    }
    assert doc["commission"]["candidates"] == {"gate": "x"}
