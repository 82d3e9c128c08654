"""`gatekeeper feedback list [--json]`: the dosimetrists' verdicts on the auto contours, for review and export.

    gatekeeper feedback list            # a table: when, who, verdict, series version, detector score
    gatekeeper feedback list --json     # every row with the gate's signals (service.feedback.FeedbackLabel)

The database comes from `GATEKEEPER_DATABASE_URL`; an unreachable or un-migrated database ends the
command with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging

from service.settings import load_settings_or_exit

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `gatekeeper feedback` to the top-level parser."""
    feedback = subparsers.add_parser(
        "feedback", help="the dosimetrists' verdicts on the auto contours (labels for the gate)"
    )
    commands = feedback.add_subparsers(dest="feedback_command", metavar="FEEDBACK_COMMAND", required=True)
    listing = commands.add_parser("list", help="every recorded verdict, oldest first")
    listing.add_argument("--json", action="store_true", help="JSON, with the gate's signals of each series version")
    listing.set_defaults(func=run_list)


def run_list(args: argparse.Namespace) -> int:
    """Print every recorded verdict; exit 0 (also when there is none yet).

    Raises:
        DatabaseNotReady: the database does not answer or is not migrated.
    """
    from service.db.schema import open_database
    from service.feedback import feedback_labels

    settings = load_settings_or_exit()
    with open_database(settings) as sessions, sessions() as session:
        labels = feedback_labels(session=session)
    if args.json:
        print(json.dumps([label.to_json() for label in labels], indent=1))
        return 0
    if not labels:
        print("no feedback recorded yet")
        return 0
    print(
        f"{'id':>5} {'recorded (UTC)':<16} {'user':<12} {'verdict':<14} {'ver':>3} {'score/thr':>9} series_instance_uid"
    )
    for label in labels:
        ratio = (
            f"{label.detector_score / label.detector_threshold:9.2f}"
            if label.detector_score is not None and label.detector_threshold
            else f"{'-':>9}"
        )
        print(
            f"{label.id:>5} {label.created_at.strftime('%Y-%m-%d %H:%M'):<16} {label.user:<12} {label.verdict:<14} "
            f"{label.series_version:>3} {ratio} {label.series_instance_uid}"
        )
    return 0
