"""`gatekeeper exports`: deliveries of our DICOM-SEGs to the PACS.

    gatekeeper exports list [--state pending|delivered|failed] [--json]
    gatekeeper exports show ID [--json]        the delivery receipt: every attempt and its status
    gatekeeper exports retry ID                a failed export goes back to pending and is queued
    gatekeeper exports send SEG_FILE [--now] [--json]
                                               record a file for delivery and queue it; with --now
                                               make the first attempt here and print the receipt

The PACS is set by `GATEKEEPER_PACS_AE_TITLE`, `GATEKEEPER_PACS_HOST` and `GATEKEEPER_PACS_PORT`;
queued deliveries are made by `gatekeeper worker`. Nothing printed here contains patient data.
A database that does not answer or is not migrated ends each command with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pydicom.errors import InvalidDicomError

from service.db.schema import open_database
from service.db.tables import ExportState
from service.errors import UsageError
from service.settings import Settings, load_settings_or_exit

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `gatekeeper exports` and its actions to the top-level parser."""
    exports = subparsers.add_parser("exports", help="deliveries of DICOM-SEGs to the PACS: list, show, retry, send")
    actions = exports.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="every export with its state, attempts and last status")
    listing.add_argument("--state", choices=[s.value for s in ExportState], help="only exports in this state")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=run_list)

    show = actions.add_parser("show", help="the delivery receipt of one export: every attempt")
    show.add_argument("export_id", type=int, metavar="ID")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(func=run_show)

    retry = actions.add_parser("retry", help="put a failed export back to pending and queue it")
    retry.add_argument("export_id", type=int, metavar="ID")
    retry.set_defaults(func=run_retry)

    send = actions.add_parser("send", help="record a DICOM file for delivery to the PACS and queue it")
    send.add_argument("seg_file", type=Path, metavar="SEG_FILE")
    send.add_argument(
        "--now",
        action="store_true",
        help="make the first attempt in this process and print the receipt (retries go to the queue)",
    )
    send.add_argument("--json", action="store_true", help="machine-readable output")
    send.set_defaults(func=run_send)


def _queue(settings: Settings, export_id: int, countdown_s: float = 0.0) -> bool:
    """Publish export `export_id`; False (with a warning) when the broker does not take it."""
    try:
        from service.celery_app import CeleryPublisher, Next, make_celery_app

        CeleryPublisher(make_celery_app(settings), settings).publish(Next("export", export_id), countdown_s=countdown_s)
    except Exception as exc:  # the broker is down: the export stays pending for a later retry or sweep
        log.warning("could not queue export %s (%s: %s); it stays pending", export_id, type(exc).__name__, exc)
        return False
    return True


def run_list(args: argparse.Namespace) -> int:
    """Print every export, newest first."""
    from service.pacs_export import list_exports

    settings = load_settings_or_exit()
    with open_database(settings) as sessions:
        rows = list_exports(sessions=sessions, state=ExportState(args.state) if args.state else None)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        f"{'id':>5} {'state':<9} {'tries':>5} {'status':<6} {'destination':<32} {'created (UTC)':<19} "
        f"{'next/delivered (UTC)':<20} reason"
    )
    for row in rows:
        when = row["delivered_at"] or row["next_attempt_at"] or ""
        print(
            f"{row['id']:>5} {row['state']:<9} {row['attempts']:>5} {row['last_status'] or '-':<6} "
            f"{row['destination']:<32} {row['created_at'][:19]:<19} {when[:19]:<20} {row['last_reason'] or ''}"
        )
    return 0


def run_show(args: argparse.Namespace) -> int:
    """Print the delivery receipt of one export."""
    from service.pacs_export import export_receipt

    settings = load_settings_or_exit()
    with open_database(settings) as sessions:
        try:
            receipt = export_receipt(sessions=sessions, export_id=args.export_id)
        except LookupError:
            raise UsageError(f"no export with id {args.export_id}") from None
    _print_receipt(receipt, as_json=args.json)
    return 0


def _print_receipt(receipt: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(receipt, indent=1))
        return
    print(
        f"export {receipt['id']}: {receipt['state']} to {receipt['destination']}, "
        f"SOP Instance UID {receipt['sop_instance_uid']}"
    )
    for number, attempt in enumerate(receipt["attempt_log"], start=1):
        status = f", status {attempt['status']}" if attempt["status"] else ", no status"
        reason = f": {attempt['reason']}" if attempt["reason"] else ""
        print(
            f"  attempt {number} at {attempt['started_at'][:19]} UTC ({attempt['duration_s']:.2f} s): "
            f"{attempt['outcome']}{status}{reason}"
        )
    if receipt["state"] == ExportState.PENDING.value and receipt["next_attempt_at"]:
        print(f"  next attempt at {receipt['next_attempt_at'][:19]} UTC")


def run_retry(args: argparse.Namespace) -> int:
    """Put a failed export back to pending and queue it; exit 2 for an unknown or delivered export."""
    from service.pacs_export import retry_export

    settings = load_settings_or_exit()
    with open_database(settings) as sessions:
        try:
            changed = retry_export(sessions=sessions, export_id=args.export_id)
        except LookupError:
            raise UsageError(f"no export with id {args.export_id}") from None
    if not changed:
        raise UsageError(f"export {args.export_id} is already delivered; nothing to retry")
    queued = _queue(settings, args.export_id)
    print(
        f"export {args.export_id} is pending again{', queued' if queued else ' (not queued: the broker did not take the message, see the warning)'}"
    )
    return 0


def run_send(args: argparse.Namespace) -> int:
    """Record SEG_FILE for delivery and queue it, or (--now) attempt it here; exit 1 if --now failed for good."""
    from service.dicom_send import ExportNotConfiguredError
    from service.pacs_export import deliver, export_receipt, record_export

    settings = load_settings_or_exit()
    if not args.seg_file.is_file():
        raise UsageError(f"no such file: {args.seg_file}")
    with open_database(settings) as sessions:
        try:
            export_id, created = record_export(sessions=sessions, settings=settings, path=args.seg_file)
        except ExportNotConfiguredError as exc:
            raise UsageError(str(exc)) from None
        except (InvalidDicomError, ValueError) as exc:
            raise UsageError(f"{args.seg_file} is not a DICOM object we can send: {exc}") from None
        if not created:
            receipt = export_receipt(sessions=sessions, export_id=export_id)
            log.info("export %s already exists for this SOP Instance UID (%s)", export_id, receipt["state"])
        elif args.now:
            delivery = deliver(sessions=sessions, settings=settings, export_id=export_id)
            if delivery.retry_after_s is not None:
                _queue(settings, export_id, countdown_s=delivery.retry_after_s)
            receipt = export_receipt(sessions=sessions, export_id=export_id)
        else:
            _queue(settings, export_id)
            receipt = export_receipt(sessions=sessions, export_id=export_id)
    if not args.json and not created:
        print(
            f"export {export_id} already exists for this object; use `gatekeeper exports retry {export_id}` "
            "if it failed"
        )
    _print_receipt(receipt, as_json=args.json)
    return 1 if receipt["state"] == ExportState.FAILED.value else 0
