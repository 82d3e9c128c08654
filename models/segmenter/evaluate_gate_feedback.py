"""`gatekeeper evaluate gate --feedback`: the gate's signals against the dosimetrists' verdicts.

The labels are the verdicts recorded in the configured database (`gatekeeper feedback list`), not
Dice on contoured series: a `no` (the auto contour was, or would have been, unacceptable) is a
failure the gate should have sent to manual contouring, a `yes` a series it could have let through;
`not_applicable` is left out, and of several verdicts on one series version the newest counts. Per
gate signal stored in the database it reports the counts and, where both verdicts occur, the AUROC
for `no`. No segmenter or detector runs. The rest of `evaluate gate`: `models.segmenter.evaluate_gate`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from models.detector.metrics import auroc
from service.errors import UsageError

if TYPE_CHECKING:
    from service.feedback import FeedbackLabel

#: Gate signals stored in the database: name → (what it is, its value for a label; None: unknown).
FEEDBACK_SIGNALS: dict[str, tuple[str, Callable[[FeedbackLabel], float | None]]] = {
    "detector_score": (
        "detector series score ÷ its threshold",
        lambda lab: (
            lab.detector_score / lab.detector_threshold
            if lab.detector_score is not None and lab.detector_threshold
            else None
        ),
    ),
    "detector_flagged": (
        "detector flag (score above threshold)",
        lambda lab: None if lab.detector_flagged is None else float(lab.detector_flagged),
    ),
    "geometry_findings": (
        "any ingest geometry finding",
        lambda lab: None if lab.geometry_findings is None else float(lab.geometry_findings > 0),
    ),
    "routed_to_worklist": (
        "the route the pipeline took was the worklist",
        lambda lab: None if lab.route is None else float(lab.route == "worklist"),
    ),
}


def feedback_report(labels: list[FeedbackLabel]) -> dict[str, Any]:
    """Agreement of each gate signal with the dosimetrists' verdicts (`no` = failure = positive class).

    Uses the newest verdict per series version and leaves `not_applicable` out. Per signal: how many
    labelled series have a value for it, the `no`/`yes` counts among them, the AUROC for `no` (NaN
    unless both occur; for a yes/no signal it is the mean of its recall of `no` and of `yes`), and for
    yes/no signals the series it sent to manual contouring among the `no` and the `yes` verdicts.
    """
    from service.feedback import latest_per_series

    latest = latest_per_series(labels)
    judged = [lab for lab in latest if lab.verdict in ("yes", "no")]
    signals: dict[str, Any] = {}
    for name, (meaning, value_of) in FEEDBACK_SIGNALS.items():
        pairs = [(value_of(lab), lab.verdict == "no") for lab in judged]
        known = [(v, failed) for v, failed in pairs if v is not None]
        fail = np.array([v for v, failed in known if failed], np.float64)
        ok = np.array([v for v, failed in known if not failed], np.float64)
        entry: dict[str, Any] = {
            "meaning": meaning,
            "series": len(known),
            "no": int(fail.size),
            "yes": int(ok.size),
            "auroc_no": auroc(ok, fail),
        }
        if name != "detector_score":  # a yes/no signal: what it sent to manual contouring
            entry["stopped_no"] = int((fail > 0).sum())
            entry["stopped_yes"] = int((ok > 0).sum())
        signals[name] = entry
    return {
        "verdicts": len(labels),
        "series": len(latest),
        "no": sum(lab.verdict == "no" for lab in latest),
        "yes": sum(lab.verdict == "yes" for lab in latest),
        "not_applicable": sum(lab.verdict == "not_applicable" for lab in latest),
        "signals": signals,
    }


def feedback_summary(report: dict[str, Any]) -> str:
    """The report as lines for a person (what `--feedback` prints)."""
    if report["verdicts"] == 0:
        return (
            "no feedback recorded yet: dosimetrists record 'auto contour acceptable: yes / no / not applicable' "
            "on the series pages of the worklist; then run this again"
        )
    lines = [
        f"{report['verdicts']} verdicts on {report['series']} series versions (newest per series counts): "
        f"{report['no']} no (failure), {report['yes']} yes, {report['not_applicable']} not applicable (left out)"
    ]
    if report["no"] == 0 or report["yes"] == 0:
        lines.append("AUROC needs both 'no' and 'yes' verdicts; only counts for now")
    lines.append(f"{'signal':<20} {'series':>6} {'no':>4} {'yes':>4} {'AUROC(no)':>9}  stopped no / yes")
    for name, s in report["signals"].items():
        stopped = f"{s['stopped_no']}/{s['no']} / {s['stopped_yes']}/{s['yes']}" if "stopped_no" in s else "-"
        lines.append(f"{name:<20} {s['series']:>6} {s['no']:>4} {s['yes']:>4} {_f(s['auroc_no']):>9}  {stopped}")
    return "\n".join(lines)


def run_feedback(args: argparse.Namespace) -> int:
    """`evaluate gate --feedback`: read the verdicts from the configured database and report per signal.

    Raises:
        DatabaseNotReady: the database does not answer or is not migrated (one line, exit 2).
    """
    from service.db.schema import open_database
    from service.feedback import feedback_labels
    from service.settings import load_settings_or_exit

    if args.data is not None:
        raise UsageError("--feedback takes its labels from the database; leave out --data")
    settings = load_settings_or_exit()
    with open_database(settings) as sessions, sessions() as session:
        labels = feedback_labels(session=session)
    report = feedback_report(labels)
    print(feedback_summary(report))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "feedback_report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    return 0


def _f(v: float | None, nd: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"
