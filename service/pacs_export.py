"""Delivery of our DICOM-SEGs to the configured PACS: one C-STORE per attempt, classified outcomes, receipts.

An `Export` row is the promise to deliver one object (one SOP Instance UID). Each attempt opens one
association, sends one C-STORE, checks the response Status and is recorded as an `ExportAttempt`:

- **delivered** — Success, or a Warning (kept as the reason, e.g. "0xB000 coercion of data elements");
- **transient** — the PACS may take it later (no connection, timeout, abort, association rejected
  transient, out of resources, processing failure): tried again after `export_retry_initial_s`,
  doubling up to `export_retry_max_s`, until `export_retry_deadline_s` has passed, then failed;
- **permanent** — retrying cannot help until someone changes something (association rejected
  permanent, e.g. our AE title not known there; SOP class not supported; data set does not match
  the SOP class): failed at once, with the reason, for an operator (`gatekeeper exports retry ID`).

The classification lives in `STORE_STATUS_RULES` and `classify_association_rejection` below.
`send_files` does the sending for any peer and any number of files (one association, the worst
outcome wins); `send_seg` uses it for the PACS, and the pipeline's forward mode for the external
auto-segmentation node (`forward_destination`).
Nothing here logs patient data: export ids, statuses and reasons only.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import Export, ExportAttempt, ExportState, utc_now
from service.settings import Settings

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """What one attempt to deliver an object means for the export."""

    DELIVERED = "delivered"  # the PACS has the object (Success or Warning)
    TRANSIENT = "transient"  # try again later
    PERMANENT = "permanent"  # do not try again without a person


@dataclass(frozen=True)
class StatusRule:
    """C-STORE response Status values from `low` to `high` (inclusive) and what they mean for us."""

    low: int
    high: int
    outcome: Outcome
    meaning: str


# How we read the Status (0000,0900) of a C-STORE response. The first rule that contains the value
# applies; a value no rule names is a failure we do not understand, treated as permanent so that a
# person looks at it rather than us retrying for days.
# Sources: PS3.4 Annex B.2.3 (Storage Service Class statuses) and PS3.7 Annex C (status categories,
# general statuses).
STORE_STATUS_RULES: tuple[StatusRule, ...] = (
    StatusRule(0x0000, 0x0000, Outcome.DELIVERED, "success"),  # PS3.7 C.1.1
    # Warnings: the object was stored, perhaps changed; we keep the warning in the receipt.
    StatusRule(0xB000, 0xB000, Outcome.DELIVERED, "warning: coercion of data elements"),  # PS3.4 B.2.3
    StatusRule(0xB006, 0xB006, Outcome.DELIVERED, "warning: elements discarded"),  # PS3.4 B.2.3
    StatusRule(0xB007, 0xB007, Outcome.DELIVERED, "warning: data set does not match SOP class"),  # PS3.4 B.2.3
    StatusRule(0x0001, 0x0001, Outcome.DELIVERED, "warning"),  # PS3.7 C.4
    StatusRule(0x0107, 0x0107, Outcome.DELIVERED, "warning: attribute list error"),  # PS3.7 C.4.2
    StatusRule(0x0116, 0x0116, Outcome.DELIVERED, "warning: attribute value out of range"),  # PS3.7 C.4.3
    StatusRule(0xB000, 0xBFFF, Outcome.DELIVERED, "warning"),  # PS3.7 C.1.3: Bxxx is the warning range
    # Failures the PACS may get over by itself: try again later.
    StatusRule(0xA700, 0xA7FF, Outcome.TRANSIENT, "refused: out of resources"),  # PS3.4 B.2.3
    StatusRule(0x0110, 0x0110, Outcome.TRANSIENT, "processing failure"),  # PS3.7 C.4.1
    StatusRule(0x0213, 0x0213, Outcome.TRANSIENT, "resource limitation"),  # PS3.7 C.5.11
    StatusRule(0x0210, 0x0210, Outcome.TRANSIENT, "duplicate invocation"),  # PS3.7 C.5.6 (message id clash)
    # Failures that sending the same object again cannot fix.
    StatusRule(0xA900, 0xA9FF, Outcome.PERMANENT, "error: data set does not match SOP class"),  # PS3.4 B.2.3
    StatusRule(0xC000, 0xCFFF, Outcome.PERMANENT, "error: cannot understand"),  # PS3.4 B.2.3
    StatusRule(0x0122, 0x0122, Outcome.PERMANENT, "refused: SOP class not supported"),  # PS3.7 C.5.14
    StatusRule(0x0124, 0x0124, Outcome.PERMANENT, "refused: not authorized"),  # PS3.7 C.5.16
    StatusRule(0x0117, 0x0117, Outcome.PERMANENT, "invalid SOP instance"),  # PS3.7 C.5.9
    StatusRule(0x0211, 0x0211, Outcome.PERMANENT, "unrecognized operation"),  # PS3.7 C.5.7
    StatusRule(0x0212, 0x0212, Outcome.PERMANENT, "mistyped argument"),  # PS3.7 C.5.8
)

# A-ASSOCIATE-RJ (PS3.8 9.3.4, Table 9-21): Result 1 is rejected-permanent, 2 rejected-transient.
REJECTED_PERMANENT = 1
REJECTED_TRANSIENT = 2
_REJECT_SOURCES = {1: "service-user", 2: "service-provider (ACSE)", 3: "service-provider (presentation)"}
_REJECT_REASONS = {
    1: {
        1: "no reason given",
        2: "application context name not supported",
        3: "calling AE title not recognized",
        7: "called AE title not recognized",
    },
    2: {1: "no reason given", 2: "protocol version not supported"},
    3: {1: "temporary congestion", 2: "local limit exceeded"},
}


def classify_store_status(status: int) -> tuple[Outcome, str]:
    """The outcome and a short reason (e.g. "0xA701 refused: out of resources") for a C-STORE Status."""
    for rule in STORE_STATUS_RULES:
        if rule.low <= status <= rule.high:
            return rule.outcome, f"0x{status:04X} {rule.meaning}"
    return Outcome.PERMANENT, f"0x{status:04X} unknown status"


def classify_association_rejection(*, result: int, source: int, reason: int) -> tuple[Outcome, str]:
    """The outcome and reason for an A-ASSOCIATE-RJ with these Result, Source and Reason/Diag. values.

    Result 1 (rejected-permanent) is permanent, anything else transient (PS3.8 9.3.4): a PACS that
    does not know our AE title says so permanently; a busy one transiently.
    """
    outcome = Outcome.PERMANENT if result == REJECTED_PERMANENT else Outcome.TRANSIENT
    kind = {REJECTED_PERMANENT: "permanently", REJECTED_TRANSIENT: "transiently"}.get(result, f"(result {result})")
    why = _REJECT_REASONS.get(source, {}).get(reason, f"reason {reason}")
    return outcome, f"association rejected {kind} by the {_REJECT_SOURCES.get(source, f'source {source}')}: {why}"


class ExportNotConfiguredError(ValueError):
    """No destination is configured: the PACS (GATEKEEPER_PACS_HOST / _PACS_AE_TITLE) or the forward node."""


@dataclass(frozen=True)
class Destination:
    """A DICOM peer: its AE title, host and port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def pacs_destination(settings: Settings) -> Destination:
    """The configured PACS.

    Raises:
        ExportNotConfiguredError: `pacs_host` or `pacs_ae_title` is empty; the message names the variable.
    """
    if not settings.pacs_host:
        raise ExportNotConfiguredError("no PACS destination: set GATEKEEPER_PACS_HOST (and _PACS_AE_TITLE, _PACS_PORT)")
    if not settings.pacs_ae_title:
        raise ExportNotConfiguredError("no PACS AE title: set GATEKEEPER_PACS_AE_TITLE")
    return Destination(ae_title=settings.pacs_ae_title, host=settings.pacs_host, port=settings.pacs_port)


def forward_destination(settings: Settings) -> Destination:
    """The external auto-segmentation node that `segmentation_mode` "forward" sends series to.

    Raises:
        ExportNotConfiguredError: `forward_host` or `forward_ae_title` is empty (settings refuse
            that in forward mode, so only a caller outside it sees this).
    """
    if not settings.forward_host or not settings.forward_ae_title:
        raise ExportNotConfiguredError(
            "no forward destination: set GATEKEEPER_FORWARD_HOST and GATEKEEPER_FORWARD_AE_TITLE (and _FORWARD_PORT)"
        )
    return Destination(ae_title=settings.forward_ae_title, host=settings.forward_host, port=settings.forward_port)


def make_pacs_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The client TLS context for the PACS, or None when `pacs_tls` is off.

    The PACS's certificate is verified (against `pacs_tls_ca_path`, or the system's CAs) and must
    name `pacs_host`; our certificate is presented when `pacs_tls_cert_path` is set.

    Raises:
        OSError, ssl.SSLError: a certificate, key or CA file is missing or invalid.
    """
    if not settings.pacs_tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.pacs_tls_ca_path)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.pacs_tls_cert_path is not None and settings.pacs_tls_key_path is not None:
        context.load_cert_chain(certfile=settings.pacs_tls_cert_path, keyfile=settings.pacs_tls_key_path)
    return context


@dataclass(frozen=True)
class SendResult:
    """What one association and its C-STOREs to a DICOM peer gave (the worst outcome of its instances)."""

    outcome: Outcome
    # Status (0000,0900) of the C-STORE response that decided the outcome (the first with the worst
    # outcome); None when none came back.
    status: int | None
    # Why it failed, or the warning it was delivered with; None for a plain success.
    reason: str | None
    destination: str
    started_at: dt.datetime
    duration_s: float


#: Outcomes from best to worst: the worst outcome among a send's instances is the send's outcome.
_SEVERITY = {Outcome.DELIVERED: 0, Outcome.TRANSIENT: 1, Outcome.PERMANENT: 2}
#: Most presentation contexts one association may propose (PS3.8 9.3.2.2: odd ids 1 to 255).
MAX_PRESENTATION_CONTEXTS = 128


def send_seg(*, path: Path, settings: Settings) -> SendResult:
    """Send the DICOM file at `path` to the configured PACS: one association, one C-STORE, released.

    Never raises for a network or PACS problem: every failure is a `SendResult` with its outcome
    (see the module docstring). An unreadable file is a permanent failure.

    Raises:
        ExportNotConfiguredError: no PACS destination is configured.
        OSError, ssl.SSLError: `pacs_tls` is on and a TLS file cannot be read.
    """
    return send_files(
        paths=[path],
        destination=pacs_destination(settings),
        settings=settings,
        tls_context=make_pacs_ssl_context(settings),
    )


def send_files(
    *,
    paths: Sequence[Path],
    destination: Destination,
    settings: Settings,
    tls_context: ssl.SSLContext | None = None,
) -> SendResult:
    """Send the DICOM files at `paths` to `destination` over one association, one C-STORE each, released.

    Our calling AE title is `settings.export_calling_ae_title()`, every wait is bounded by
    `export_timeout_s`; with `tls_context` the association runs over TLS and the peer's
    certificate must name `destination.host`. Every response Status is classified
    (`classify_store_status`) and the worst outcome wins: all stored (Success or Warning) is
    delivered; any transient failure and no permanent one is transient; any permanent failure is
    permanent. With more than one file the reason says how many instances failed (or were stored
    with a warning) and gives the reason of the first with the worst outcome. An association that
    ends early leaves the rest unsent: transient, unless a permanent failure came first.

    Never raises for a network or peer problem: every failure is a `SendResult`. Files are checked
    before connecting: an unreadable one, or one that is not a DICOM Part 10 file with a SOP
    Class UID, is a permanent failure and nothing is sent.

    Raises:
        ValueError: `paths` is empty.
    """
    if not paths:
        raise ValueError("paths is empty; expected at least one DICOM file to send")
    started_at = utc_now()
    clock = time.monotonic()
    total = len(paths)

    def result(outcome: Outcome, status: int | None, reason: str | None) -> SendResult:
        return SendResult(
            outcome=outcome,
            status=status,
            reason=reason,
            destination=str(destination),
            started_at=started_at,
            duration_s=round(time.monotonic() - clock, 3),
        )

    # Every (SOP class, transfer syntax) pair needs an accepted presentation context; read headers only.
    pairs: dict[tuple[str, str], None] = {}
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError) as exc:
            return result(Outcome.PERMANENT, None, f"cannot read {path}: {exc}")
        sop_class_uid = header.get("SOPClassUID")
        file_meta = getattr(header, "file_meta", None)
        transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
        if not sop_class_uid or not transfer_syntax:
            return result(Outcome.PERMANENT, None, f"{path} is not a DICOM Part 10 file with a SOPClassUID")
        pairs[(str(sop_class_uid), str(transfer_syntax))] = None
    if len(pairs) > MAX_PRESENTATION_CONTEXTS:
        return result(
            Outcome.PERMANENT,
            None,
            f"{len(pairs)} SOP class and transfer syntax pairs; one association "
            f"carries at most {MAX_PRESENTATION_CONTEXTS}",
        )

    ae = AE(ae_title=settings.export_calling_ae_title())
    for sop_class_uid, transfer_syntax in pairs:
        # Offer the file's own transfer syntax, and the two uncompressed ones when the file is
        # uncompressed (pynetdicom re-encodes between those), so a picky peer still finds one it takes.
        syntaxes = [UID(transfer_syntax)]
        if not syntaxes[0].is_compressed:
            syntaxes += [ts for ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if ts != transfer_syntax]
        ae.add_requested_context(sop_class_uid, syntaxes)
    ae.connection_timeout = settings.export_timeout_s
    ae.acse_timeout = settings.export_timeout_s
    ae.dimse_timeout = settings.export_timeout_s
    ae.network_timeout = settings.export_timeout_s
    connected: list[bool] = []
    association = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        tls_args=(tls_context, destination.host) if tls_context is not None else None,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True))],
    )
    try:
        if not association.is_established:
            outcome, reason = _why_not_established(
                association,
                connected=bool(connected),
                tls=tls_context is not None,
                settings=settings,
                destination=destination,
            )
            return result(outcome, None, reason)
        # (outcome, status, reason) of every instance that was not a plain success.
        problems: list[tuple[Outcome, int | None, str]] = []
        for number, path in enumerate(paths, start=1):
            if not association.is_established:
                problems.append(
                    (
                        Outcome.TRANSIENT,
                        None,
                        f"association ended before {total - number + 1} of {total} instances were sent",
                    )
                )
                break
            problems += _store_one(association, path=path, message_id=number % 0x10000, settings=settings)
        if not problems:
            return result(Outcome.DELIVERED, 0x0000, None)
        worst = max(_SEVERITY[outcome] for outcome, _, _ in problems)
        outcome, status, reason = next(p for p in problems if _SEVERITY[p[0]] == worst)
        if total > 1:
            failed = sum(1 for p in problems if p[0] != Outcome.DELIVERED)
            if outcome == Outcome.DELIVERED:
                reason = f"{len(problems)} of {total} instances stored with a warning; first: {reason}"
            else:
                reason = f"{failed} of {total} instances failed; the worst: {reason}"
        return result(outcome, status, reason)
    finally:
        if association.is_established:
            association.release()
        ae.shutdown()


def _store_one(
    association: Any, *, path: Path, message_id: int, settings: Settings
) -> list[tuple[Outcome, int | None, str]]:
    """C-STORE the file at `path` on `association`: [] for Success, else [(outcome, status, reason)]."""
    try:
        dataset = pydicom.dcmread(path)
    except (OSError, InvalidDicomError) as exc:  # changed on disk since its header was read
        return [(Outcome.PERMANENT, None, f"cannot read {path}: {exc}")]
    try:
        response = association.send_c_store(dataset, msg_id=message_id)
    except ValueError as exc:  # no accepted presentation context can carry this data set
        return [(Outcome.PERMANENT, None, f"the peer accepts no transfer syntax we can send: {exc}")]
    if "Status" not in response:
        return [
            (
                Outcome.TRANSIENT,
                None,
                f"no C-STORE response within {settings.export_timeout_s:g} s (timeout, or the association was aborted)",
            )
        ]
    status = int(response.Status)
    if status == 0x0000:
        return []
    outcome, reason = classify_store_status(status)
    comment = response.get("ErrorComment")
    if comment:
        reason += f" ({comment})"
    return [(outcome, status, reason)]


def _why_not_established(
    association: Any, *, connected: bool, tls: bool, settings: Settings, destination: Destination
) -> tuple[Outcome, str]:
    """Outcome and reason of an association that did not come up."""
    if not connected:
        if tls:
            # pynetdicom reports a failed TLS handshake like a refused connection (details in its log).
            return Outcome.TRANSIENT, (
                f"cannot connect to {destination.host}:{destination.port} over TLS "
                "(connection refused, or the TLS handshake failed: check the certificates)"
            )
        return Outcome.TRANSIENT, f"cannot connect to {destination.host}:{destination.port}"
    if association.is_rejected:
        answer = association.acceptor.primitive
        return classify_association_rejection(
            result=int(answer.result), source=int(answer.result_source), reason=int(answer.diagnostic)
        )
    if association.rejected_contexts and not association.accepted_contexts:
        # PS3.8 9.3.3.2: every presentation context refused, e.g. abstract syntax not supported.
        return Outcome.PERMANENT, "the peer accepts no presentation context for these SOP classes"
    return Outcome.TRANSIENT, (f"association aborted, or no answer within {settings.export_timeout_s:g} s")


# --- the database side: exports, attempts, backoff ------------------------------------------------


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


def record_export(
    *, sessions: sessionmaker[Session], settings: Settings, path: Path, series_id: int | None = None
) -> tuple[int, bool]:
    """Record that the DICOM file at `path` is to be delivered to the PACS; return (export id, created).

    The object's SOP Instance UID is its key: recording a file whose UID is already known creates
    nothing and returns the existing export (`created` False), whatever its state; it is never sent
    twice by this. Paths under `settings.storage_dir` are stored relative to it. Publish the export
    id (`service.export_tasks.ExportPublisher`) after this returns, i.e. after the commit.

    Raises:
        ExportNotConfiguredError: no PACS destination is configured.
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

    Raises:
        LookupError: there is no export `export_id`.
        ExportNotConfiguredError: no PACS destination is configured (the export stays pending).
    """
    pacs_destination(settings)  # before claiming: without a PACS there is nothing to attempt
    now = utc_now()
    with sessions.begin() as session:
        export = session.get(Export, export_id)
        if export is None:
            raise LookupError(f"no export with id {export_id}")
        state, attempts = ExportState(export.state), export.attempts
        due = export.next_attempt_at is None or export.next_attempt_at <= now + dt.timedelta(seconds=DUE_TOLERANCE_S)
        if state != ExportState.PENDING or not due:
            log.info(
                "export %s is %s%s; nothing to send",
                export_id,
                state.value,
                "" if state != ExportState.PENDING else " and not due (another attempt owns it)",
            )
            return Delivery(export_id=export_id, state=state, attempted=False, retry_after_s=None, result=None)
        claimed = session.execute(
            update(Export)
            .where(
                Export.id == export_id,
                Export.state == ExportState.PENDING.value,
                Export.attempts == attempts,
                Export.next_attempt_at == export.next_attempt_at,
            )
            .values(next_attempt_at=now + dt.timedelta(seconds=claim_seconds(settings)))
            .execution_options(synchronize_session=False)
        ).rowcount
        path = Path(export.path)
        pending_since = export.pending_since
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

    The caller publishes the export id afterwards. The retry deadline counts from now; earlier
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
