"""Delivery of our DICOM-SEGs to the configured PACS: exports, their attempts, backoff and receipts.

An `Export` row is the promise to deliver one object (one SOP Instance UID). Each attempt sends it
with `service.dicom_send.send_seg` (one association, one C-STORE, the response Status classified)
and is recorded as an `ExportAttempt`:

- **delivered** — Success, or a Warning (kept as the reason, e.g. "0xB000 coercion of data elements");
- **transient** — the PACS may take it later (no connection, timeout, abort, association rejected
  transient, out of resources, processing failure): tried again after `export_retry_initial_s`,
  doubling up to `export_retry_max_s`, until `export_retry_deadline_s` has passed, then failed;
- **permanent** — retrying cannot help until someone changes something (association rejected
  permanent, e.g. our AE title not known there; SOP class not supported; data set does not match
  the SOP class): failed at once, with the reason, for an operator (`gatekeeper exports retry ID`).

**Order after an outage.** Exports go out to the PACS in the order their series completed
(`Series.completed_at`, then the export id; every pending export goes to the one configured PACS).
While an earlier export is pending because the PACS was not reached at all (no association: down,
unreachable, busy), a later one is not sent: it waits behind it (reason "waiting behind export N ..."), and each export that settles
hands the line on to the next waiting one (`next_in_line`), so the backlog of a long outage is
delivered once, in order, when the first retry gets through. A failure with a DIMSE status (the
PACS answered about this one object) holds nobody back, so one object the PACS refuses cannot
stall the others.

Nothing here logs patient data: export ids, statuses and reasons only.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service import metrics
from service.db.session import rows_changed
from service.db.tables import Export, ExportAttempt, ExportState, Series, utc_now
from service.dicom_send import Outcome, SendResult, pacs_destination, peer_not_reached, send_seg
from service.lifecycle import SeriesState, transition
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """What `deliver` did for one export, and what the caller should do next."""

    export_id: int
    state: ExportState
    # False when nothing was sent (already delivered or failed, or not yet due: a duplicate message).
    attempted: bool
    # Seconds after which `deliver` should be called again; None: do not call again.
    retry_after_s: float | None
    result: SendResult | None
    # The earlier export to the same PACS this one waits behind (not sent; `next_in_line` wakes it).
    waiting_for: int | None = None


def record_export(
    *, sessions: sessionmaker[Session], settings: Settings, path: Path, series_id: int | None = None
) -> tuple[int, bool]:
    """Record that the DICOM file at `path` is to be delivered to the PACS; return (export id, created).

    The object's SOP Instance UID is its key: recording a file whose UID is already known creates
    nothing and returns the existing export (`created` False), whatever its state; it is never sent
    twice by this. Paths under `settings.storage_dir` are stored relative to it. Publish the export
    id (`service.export_tasks.ExportPublisher`) after this returns, i.e. after the commit.

    Raises:
        service.dicom_send.ExportNotConfiguredError: no PACS destination is configured.
        OSError, pydicom.errors.InvalidDicomError: the file cannot be read as DICOM.
        ValueError: the file has no SOPInstanceUID or SOPClassUID.
    """
    destination = pacs_destination(settings)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    sop_instance_uid, sop_class_uid = str(header.get("SOPInstanceUID", "")), str(header.get("SOPClassUID", ""))
    if not sop_instance_uid or not sop_class_uid:
        raise ValueError(f"{path} has no SOPInstanceUID or SOPClassUID; expected a DICOM object to store")
    stored_path = _stored_path(Path(path), settings.storage_dir)
    with sessions.begin() as session:
        existing = session.scalar(select(Export.id).where(Export.sop_instance_uid == sop_instance_uid))
        if existing is not None:
            return existing, False
        now = utc_now()
        export = Export(
            series_id=series_id,
            sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid,
            path=stored_path,
            destination=str(destination),
            state=ExportState.PENDING.value,
            attempts=0,
            created_at=now,
            pending_since=now,
            next_attempt_at=now,
        )
        session.add(export)
        session.flush()
        export_id = export.id
    log.info("export %s recorded for %s", export_id, destination)
    return export_id, True


def _stored_path(path: Path, storage_dir: Path) -> str:
    absolute = path.resolve()
    try:
        return absolute.relative_to(storage_dir.resolve()).as_posix()
    except ValueError:
        return str(absolute)


def retry_delay_s(*, round_attempts: int, settings: Settings) -> float:
    """Seconds to wait after the `round_attempts`-th failed attempt of a round (1, 2, ...).

    `export_retry_initial_s` × 2^(round_attempts − 1), at most `export_retry_max_s`.
    """
    exponent = min(max(round_attempts - 1, 0), 60)  # 2**60 s is beyond any cap; avoids huge floats
    return min(settings.export_retry_initial_s * 2.0**exponent, settings.export_retry_max_s)


def claim_seconds(settings: Settings) -> float:
    """Seconds one attempt may hold an export before another may try it (connect, associate, store, release)."""
    return 4 * settings.export_timeout_s + 30


# Leeway for a message that runs a little before the due time it was scheduled for (clock, ETA rounding).
DUE_TOLERANCE_S = 2.0

#: How the reason of an export begins while it waits behind an earlier one to the same PACS.
WAITING_REASON = "waiting behind export "


def _is_waiting(reason: str | None) -> bool:
    return reason is not None and reason.startswith(WAITING_REASON)


def _holds_the_line(last_status: int | None, last_reason: str | None) -> bool:
    """Whether a pending export in this condition keeps the later exports to its PACS waiting.

    It does when its last attempt did not reach the PACS at all, or when it waits itself.
    """
    return last_status is None and (peer_not_reached(last_reason) or _is_waiting(last_reason))


@dataclass(frozen=True)
class _InLine:
    id: int
    last_status: int | None
    last_reason: str | None
    next_attempt_at: dt.datetime | None


def _line(session: Session) -> list[_InLine]:
    """The pending exports in delivery order: their series' completion, then the export id.

    All go to the one configured PACS (`Export.destination` records where each attempt went).
    """
    rows = session.execute(
        select(
            Export.id,
            Export.last_status,
            Export.last_reason,
            Export.next_attempt_at,
            Export.created_at,
            Series.completed_at,
        )
        .outerjoin(Series, Series.id == Export.series_id)
        .where(Export.state == ExportState.PENDING.value)
    ).all()
    ordered = sorted(rows, key=lambda row: (row.completed_at or row.created_at, row.id))
    return [_InLine(row.id, row.last_status, row.last_reason, row.next_attempt_at) for row in ordered]


def _blocker(session: Session, export: Export) -> _InLine | None:
    """The first export ahead of `export` in the line that holds the line; None: `export` may go."""
    for ahead in _line(session):
        if ahead.id == export.id:
            return None
        if _holds_the_line(ahead.last_status, ahead.last_reason):
            return ahead
    return None


def next_in_line(*, sessions: sessionmaker[Session], export_id: int) -> int | None:
    """After an attempt of export `export_id`: the export waiting for the PACS that may go now, made due.

    None when `export_id` still holds the line (pending, the PACS not reached), when the first
    export holding the line is another one in its own backoff, or when nobody waits. Publish the
    id returned (a duplicate message for it does nothing: `deliver` claims first).
    """
    with sessions.begin() as session:
        export = session.get(Export, export_id)
        if export is None:
            return None
        if export.state == ExportState.PENDING.value and _holds_the_line(export.last_status, export.last_reason):
            return None
        for ahead in _line(session):
            if _is_waiting(ahead.last_reason):
                woken = rows_changed(
                    session.execute(
                        update(Export)
                        .where(
                            Export.id == ahead.id,
                            Export.state == ExportState.PENDING.value,
                            Export.last_reason == ahead.last_reason,
                        )
                        .values(next_attempt_at=utc_now())
                        .execution_options(synchronize_session=False)
                    )
                )
                return ahead.id if woken else None
            if _holds_the_line(ahead.last_status, ahead.last_reason):
                return None  # the PACS not reached by that one either: its own retry comes first
    return None


def deliver(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    export_id: int,
    send: Callable[..., SendResult] = send_seg,
) -> Delivery:
    """Make one delivery attempt for export `export_id` if it is pending and due; record it.

    Idempotent: a delivered or failed export is not sent again, and of two calls at once only
    one sends (the export is claimed in the database first). On a transient failure the export
    stays pending and `retry_after_s` says when to call again (exponential backoff); once
    `export_retry_deadline_s` has passed since `pending_since` it fails with "gave up after …".
    While an export ahead of it in the line holds the line (the PACS not reached; see the module
    docstring) nothing is sent: the export waits behind it (`waiting_for`), due again with it, and
    `next_in_line` wakes it when the one ahead settles.

    Raises:
        LookupError: there is no export `export_id`.
        service.dicom_send.ExportNotConfiguredError: no PACS destination is configured (the export stays pending).
    """
    pacs_destination(settings)  # before claiming: without a PACS there is nothing to attempt
    for _ in range(3):  # again only when the export it waited behind settled while it lined up
        now = utc_now()
        with sessions.begin() as session:
            export = session.get(Export, export_id)
            if export is None:
                raise LookupError(f"no export with id {export_id}")
            state, attempts = ExportState(export.state), export.attempts
            due = export.next_attempt_at is None or export.next_attempt_at <= now + dt.timedelta(
                seconds=DUE_TOLERANCE_S
            )
            if state != ExportState.PENDING or not due:
                log.info(
                    "export %s is %s%s; nothing to send",
                    export_id,
                    state.value,
                    "" if state != ExportState.PENDING else " and not due (another attempt owns it)",
                )
                return Delivery(export_id=export_id, state=state, attempted=False, retry_after_s=None, result=None)
            blocker = _blocker(session, export)
            claim = update(Export).where(
                Export.id == export_id,
                Export.state == ExportState.PENDING.value,
                Export.attempts == attempts,
                Export.next_attempt_at == export.next_attempt_at,
            )
            if blocker is not None:
                # Line up behind it: not sent now; due again with it (the sweeper's safety net).
                waiting = rows_changed(
                    session.execute(
                        claim.values(
                            last_reason=f"{WAITING_REASON}{blocker.id} (the PACS was not reached)",
                            next_attempt_at=max(blocker.next_attempt_at or now, now),
                        ).execution_options(synchronize_session=False)
                    )
                )
            else:
                values: dict[str, Any] = {"next_attempt_at": now + dt.timedelta(seconds=claim_seconds(settings))}
                if _is_waiting(export.last_reason):
                    values["last_reason"] = None  # in flight now: no longer waiting, not to be woken again
                claimed = rows_changed(
                    session.execute(claim.values(**values).execution_options(synchronize_session=False))
                )
            path = Path(export.path)
            pending_since = export.pending_since
        if blocker is None:
            break
        if not waiting:
            log.info("export %s was claimed by another attempt; nothing to send", export_id)
            return Delivery(
                export_id=export_id, state=ExportState.PENDING, attempted=False, retry_after_s=None, result=None
            )
        # Did the one ahead settle between our look and our commit (its hand-on then missed us)?
        with sessions.begin() as session:
            export = session.get(Export, export_id)
            assert export is not None  # rows are never deleted while an attempt runs
            still = _blocker(session, export)
            if still is None:
                session.execute(
                    update(Export)
                    .where(Export.id == export_id, Export.last_reason == export.last_reason)
                    .values(next_attempt_at=utc_now())
                    .execution_options(synchronize_session=False)
                )
        if still is not None:
            log.info("export %s waits behind export %s (the PACS was not reached)", export_id, still.id)
            return Delivery(
                export_id=export_id,
                state=ExportState.PENDING,
                attempted=False,
                retry_after_s=None,
                result=None,
                waiting_for=still.id,
            )
    else:
        log.info("export %s: the line ahead kept changing; the next message tries again", export_id)
        return Delivery(
            export_id=export_id, state=ExportState.PENDING, attempted=False, retry_after_s=None, result=None
        )
    if not claimed:
        log.info("export %s was claimed by another attempt; nothing to send", export_id)
        return Delivery(
            export_id=export_id, state=ExportState.PENDING, attempted=False, retry_after_s=None, result=None
        )

    if not path.is_absolute():
        path = settings.storage_dir / path
    result = send(path=path, settings=settings)
    return _record_attempt(
        sessions=sessions, settings=settings, export_id=export_id, result=result, pending_since=pending_since
    )


def _record_attempt(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    export_id: int,
    result: SendResult,
    pending_since: dt.datetime,
) -> Delivery:
    """Store the attempt and the export's new state; decide whether and when to try again."""
    now = utc_now()
    with sessions.begin() as session:
        export = session.get(Export, export_id)
        assert export is not None  # rows are never deleted while an attempt runs
        session.add(
            ExportAttempt(
                export_id=export_id,
                started_at=result.started_at,
                duration_s=result.duration_s,
                destination=result.destination,
                outcome=result.outcome.value,
                status=result.status,
                reason=result.reason,
            )
        )
        session.flush()
        round_attempts = (
            session.scalar(
                select(func.count())
                .select_from(ExportAttempt)
                .where(ExportAttempt.export_id == export_id, ExportAttempt.started_at >= pending_since)
            )
            or 1
        )
        export.attempts += 1
        export.last_status = result.status
        export.last_reason = result.reason
        export.destination = result.destination
        retry_after_s: float | None = None
        if result.outcome == Outcome.DELIVERED:
            export.state = ExportState.DELIVERED.value
            export.delivered_at = now
            export.next_attempt_at = None
        elif result.outcome == Outcome.PERMANENT:
            export.state = ExportState.FAILED.value
            export.next_attempt_at = None
        else:
            deadline = pending_since + dt.timedelta(seconds=settings.export_retry_deadline_s)
            if now >= deadline:
                export.state = ExportState.FAILED.value
                export.next_attempt_at = None
                hours = (now - pending_since).total_seconds() / 3600
                export.last_reason = f"gave up after {round_attempts} attempts over {hours:.1f} h: {result.reason}"
            else:
                delay = retry_delay_s(round_attempts=round_attempts, settings=settings)
                retry_after_s = min(delay, (deadline - now).total_seconds())
                export.next_attempt_at = now + dt.timedelta(seconds=retry_after_s)
        state = ExportState(export.state)
        reason = export.last_reason
    metrics.record_export_attempt(result.outcome.value, attempt=round_attempts, seconds=result.duration_s)
    if state == ExportState.DELIVERED:
        log.info(
            "export %s delivered to %s (attempt %s)%s",
            export_id,
            result.destination,
            round_attempts,
            f": {reason}" if reason else "",
        )
    elif state == ExportState.FAILED:
        log.warning("export %s failed: %s", export_id, reason)
    else:
        log.info("export %s: %s; retry in %.0f s", export_id, reason, retry_after_s)
    return Delivery(export_id=export_id, state=state, attempted=True, retry_after_s=retry_after_s, result=result)


def retry_export(*, sessions: sessionmaker[Session], export_id: int) -> bool:
    """Put a failed (or stuck pending) export back to pending, due now, as a new round; False if delivered.

    Its series version goes back from `export_failed` to `exporting` through the lifecycle (a
    series already `exporting` stays so). The caller publishes the export id afterwards. The retry deadline counts from now; earlier
    attempts stay in the receipt.

    Raises:
        LookupError: there is no export `export_id`.
    """
    now = utc_now()
    with sessions.begin() as session:
        export = session.get(Export, export_id)
        if export is None:
            raise LookupError(f"no export with id {export_id}")
        if export.state == ExportState.DELIVERED.value:
            return False
        export.state = ExportState.PENDING.value
        export.pending_since = now
        export.next_attempt_at = now
        if export.series_id is not None:
            transition(
                session=session,
                series_id=export.series_id,
                source=SeriesState.EXPORT_FAILED,
                target=SeriesState.EXPORTING,
                event="export_retried",
                detail={"export_id": export_id},
            )
    log.info("export %s put back to pending by an operator", export_id)
    return True


def due_exports(*, sessions: sessionmaker[Session], overdue_s: float, now: dt.datetime | None = None) -> list[int]:
    """Ids of pending exports due more than `overdue_s` seconds ago: their message was probably lost.

    For a periodic sweeper (like the listener's for series) that publishes them again; a message
    for an export that is not due is harmless (see `deliver`).
    """
    before = (now or utc_now()) - dt.timedelta(seconds=overdue_s)
    with sessions() as session:
        return list(
            session.scalars(
                select(Export.id)
                .where(Export.state == ExportState.PENDING.value, Export.next_attempt_at < before)
                .order_by(Export.id)
            )
        )


def export_receipt(*, sessions: sessionmaker[Session], export_id: int) -> dict[str, Any]:
    """The delivery receipt of one export: its state and every attempt (no patient data).

    Raises:
        LookupError: there is no export `export_id`.
    """
    with sessions() as session:
        export = session.get(Export, export_id)
        if export is None:
            raise LookupError(f"no export with id {export_id}")
        row = export_row(export)
        row["attempt_log"] = [
            {
                "started_at": a.started_at.isoformat(),
                "duration_s": a.duration_s,
                "destination": a.destination,
                "outcome": a.outcome,
                "status": _hex(a.status),
                "reason": a.reason,
            }
            for a in session.scalars(
                select(ExportAttempt).where(ExportAttempt.export_id == export_id).order_by(ExportAttempt.id)
            )
        ]
        return row


def list_exports(*, sessions: sessionmaker[Session], state: ExportState | None = None) -> list[dict[str, Any]]:
    """Every export (newest first), or those in `state`, as plain dicts (no patient data)."""
    with sessions() as session:
        query = select(Export).order_by(Export.id.desc())
        if state is not None:
            query = query.where(Export.state == state.value)
        return [export_row(export) for export in session.scalars(query)]


def export_row(export: Export) -> dict[str, Any]:
    """One export as a plain dict; times in ISO 8601 UTC, the status as "0xNNNN"."""

    def iso(value: dt.datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "id": export.id,
        "series_id": export.series_id,
        "sop_instance_uid": export.sop_instance_uid,
        "state": export.state,
        "attempts": export.attempts,
        "last_status": _hex(export.last_status),
        "last_reason": export.last_reason,
        "destination": export.destination,
        "created_at": iso(export.created_at),
        "next_attempt_at": iso(export.next_attempt_at) if export.state == ExportState.PENDING.value else None,
        "delivered_at": iso(export.delivered_at),
    }


def _hex(status: int | None) -> str | None:
    return None if status is None else f"0x{status:04X}"
