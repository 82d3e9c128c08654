"""`gatekeeper report shadow [--json]`: the gate against the dosimetrists' answers, the evidence before go-live.

    gatekeeper report shadow                       # the agreement table, agreement, sensitivity, specificity
    gatekeeper report shadow --json                # the same as one JSON object (service.shadow.ShadowReport)
    gatekeeper report shadow --resamples 5000 --seed 1

Counts the newest answer ("is the auto contour acceptable?") of each series version against where
the gate sent it (service/shadow.py). The database comes from `GATEKEEPER_DATABASE_URL`; an
unreachable or un-migrated database ends the command with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json

from service.errors import UsageError
from service.settings import load_settings_or_exit


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `gatekeeper report` (with `shadow`) to the top-level parser."""
    report = subparsers.add_parser("report", help="reports from the recorded decisions and answers")
    commands = report.add_subparsers(dest="report_command", metavar="REPORT", required=True)
    shadow = commands.add_parser(
        "shadow",
        help="shadow mode: the gate's route against the reviewers' 'auto contour acceptable?' answers",
        description="The agreement table of the gate (auto / worklist) against the newest answer of each "
        "series version, with the gate's sensitivity and specificity for 'not acceptable' and "
        "percentile-bootstrap 95 %% CIs.",
    )
    shadow.add_argument("--json", action="store_true", help="one JSON object")
    shadow.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    shadow.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    shadow.set_defaults(func=run_shadow)


def run_shadow(args: argparse.Namespace) -> int:
    """Print the shadow report; exit 0 (also with no answers yet).

    Raises:
        UsageError: `--resamples` below 1.
        DatabaseNotReady: the database does not answer or is not migrated.
    """
    from service.db.schema import open_database
    from service.shadow import POSITIVE, shadow_report

    if args.resamples < 1:
        raise UsageError(f"--resamples {args.resamples}: expected at least 1")
    settings = load_settings_or_exit()
    with open_database(settings) as sessions, sessions() as session:
        report = shadow_report(session=session, resamples=args.resamples, seed=args.seed)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
        return 0
    table = report.table
    print(f"Shadow review: the gate against the newest answer of each series version (mode now: {settings.mode})")
    print(f"{'':<26}{'acceptable: yes':>16}{'acceptable: no':>16}{'total':>8}")
    rows = (
        ("gate: auto", table.auto_yes, table.auto_no),
        ("gate: worklist (manual)", table.manual_yes, table.manual_no),
        ("total", table.auto_yes + table.manual_yes, table.auto_no + table.manual_no),
    )
    for label, yes, no in rows:
        print(f"{label:<26}{yes:>16}{no:>16}{yes + no:>8}")
    print()
    for name, estimate, meaning in (
        ("agreement", table.agreement, "the gate and the reviewer agree"),
        ("sensitivity", table.sensitivity, "of the not-acceptable contours, the share the gate stopped"),
        ("specificity", table.specificity, "of the acceptable contours, the share the gate let through"),
    ):
        if estimate.value is None:
            value = "   n/a"
        else:
            value = f"{estimate.value:6.3f}"
        ci = f"(95 % CI {estimate.ci95[0]:.3f}–{estimate.ci95[1]:.3f})" if estimate.ci95 else ""
        print(f"{name:<12} {value} {f'{estimate.numerator}/{estimate.denominator}':>9} {ci:<26} {meaning}")
    print()
    print(f"positive class: {POSITIVE}")
    if report.manual_by_reason:
        print("worklist row by reason: " + ", ".join(f"{k} {v}" for k, v in sorted(report.manual_by_reason.items())))
    print(
        f"answers from shadow reviews: {report.shadow_reviews}; not applicable (not counted): "
        f"{report.not_applicable}; never routed (not counted): {report.unrouted}"
    )
    print(f"bootstrap: {table.resamples} resamples of the series versions, seed {table.seed}")
    return 0
