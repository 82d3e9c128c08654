"""The site-B commissioning experiment's summary: the shipped gate before, the commissioned one after.

Reads two `gatekeeper evaluate gate` reports on the same site test mix — `--before` (the shipped
detector, gate and segmenter) and `--after` (the commissioning candidates, promoted) — and the
`gatekeeper commission` report, and writes `--out/report.json`:

    {"site_profile": NAME, "normals_used": n, "failure_prevalence": p,
     "before": {"manual_share": x, "recall_dice_lt_095": x, "normals_to_manual": x, ...},
     "after": {the same keys}, "targets": {...}, "commission": {...}, "commands": [...]}

`failure_prevalence` is the before run's share of contoured test series with Dice < 0.95 (the
shipped segmenter); the after run's own is under `after`. Nothing is measured here.

    .venv/bin/python ops/site_commission_report.py --before DIR --after DIR --commission DIR \\
        --site site-b --out docs/evaluation/commission-site-b [--command "..."]...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def outcome(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's three numbers of one `evaluate gate` report, with their context."""
    fused = report["fused"]
    return {
        "manual_share": _rounded(fused["manual_share"]),
        "recall_dice_lt_095": _rounded(fused["recall_dice_lt_095"]),
        "normals_to_manual": _rounded(report["normals_sent_to_manual"]),
        "manual_share_ci": _rounded(fused.get("manual_share_ci")),
        "recall_dice_lt_095_ci": _rounded(fused.get("recall_dice_lt_095_ci")),
        "recall_dice_lt_090": _rounded(fused["recall_dice_lt_090"]),
        "failure_rate_auto_routed": _rounded(fused["failure_rate_auto_routed"]),
        "failure_prevalence": _rounded(report["failure_prevalence"]),
        "failures": report.get("failures"),
        "contoured": report.get("contoured"),
        "gate": report["meta"].get("gate"),
        "detector": report["meta"].get("detector"),
        "segmenter": report["meta"].get("segmenter"),
        "segmenter_version": report["meta"].get("segmenter_version"),
        "command": report["meta"].get("command"),
    }


def targets(after: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets after commissioning."""
    return {
        "recall_dice_lt_095_ge_0.95": after["recall_dice_lt_095"] >= 0.95,
        "manual_share_le_prevalence_plus_10": after["manual_share"] <= after["failure_prevalence"] + 0.10,
        "normals_to_manual_le_0.05": after["normals_to_manual"] <= 0.05,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", type=Path, required=True, help="evaluate gate report folder, shipped models")
    p.add_argument("--after", type=Path, required=True, help="evaluate gate report folder, commissioned models")
    p.add_argument("--commission", type=Path, required=True, help="gatekeeper commission report folder")
    p.add_argument("--site", required=True, help="the phantom site profile of the data")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--commission-seconds", type=float, default=None, help="the commission run's wall time")
    p.add_argument("--command", action="append", default=[], help="a command of the experiment, in order")
    args = p.parse_args(argv)
    before = outcome(json.loads((args.before / "report.json").read_text()))
    after = outcome(json.loads((args.after / "report.json").read_text()))
    commission = json.loads((args.commission / "report.json").read_text())
    doc = {
        "site_profile": args.site,
        "normals_used": commission["data"]["normal_series"],
        "failure_prevalence": before["failure_prevalence"],
        "before": before,
        "after": after,
        "targets": targets(after),
        "commission": {
            key: commission.get(key)
            for key in ("command", "data", "split", "gate", "evaluation", "candidates", "not_trained")
            if key in commission
        }
        | {"wall_seconds": args.commission_seconds},
        "commands": args.command,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("site_profile", "normals_used", "failure_prevalence", "targets")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
