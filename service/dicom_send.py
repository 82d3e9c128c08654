"""Sending DICOM objects to a peer (SCU): one association, C-STOREs, classified outcomes. No database.

Each response Status is classified, and so is an association that does not come up:

- **delivered** — Success, or a Warning (kept as the reason, e.g. "0xB000 coercion of data elements");
- **transient** — the peer may take it later (no connection, timeout, abort, association rejected
  transient, out of resources, processing failure);
- **permanent** — retrying cannot help until someone changes something (association rejected
  permanent, e.g. our AE title not known there; SOP class not supported; data set does not match
  the SOP class).

The classification lives in `STORE_STATUS_RULES` and `classify_association_rejection` below.
`send_files` does the sending for any peer and any number of files (one association, the worst
outcome wins); `send_seg` uses it for the PACS (`service.pacs_export` keeps the exports, their
attempts and the backoff), and the pipeline's forward mode for the external auto-segmentation node
(`forward_destination`). Nothing here logs patient data.
"""

from __future__ import annotations

import datetime as dt
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from service.settings import Settings


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


#: Why nothing is sent in shadow mode (`Settings.mode` "shadow", service/shadow.py).
SHADOW_MODE_REFUSAL = "shadow mode (GATEKEEPER_MODE=shadow): nothing is sent to the PACS or the forward node"


def pacs_destination(settings: Settings) -> Destination:
    """The configured PACS.

    Raises:
        ExportNotConfiguredError: shadow mode (every C-STORE to the PACS goes through here, so
            nothing is sent); or `pacs_host` or `pacs_ae_title` is empty, the message names the variable.
    """
    if settings.mode == "shadow":
        raise ExportNotConfiguredError(SHADOW_MODE_REFUSAL)
    if not settings.pacs_host:
        raise ExportNotConfiguredError("no PACS destination: set GATEKEEPER_PACS_HOST (and _PACS_AE_TITLE, _PACS_PORT)")
    if not settings.pacs_ae_title:
        raise ExportNotConfiguredError("no PACS AE title: set GATEKEEPER_PACS_AE_TITLE")
    return Destination(ae_title=settings.pacs_ae_title, host=settings.pacs_host, port=settings.pacs_port)


def forward_destination(settings: Settings) -> Destination:
    """The external auto-segmentation node that `segmentation_mode` "forward" sends series to.

    Raises:
        ExportNotConfiguredError: shadow mode; or `forward_host` or `forward_ae_title` is empty
            (settings refuse that in forward mode, so only a caller outside it sees this).
    """
    if settings.mode == "shadow":
        raise ExportNotConfiguredError(SHADOW_MODE_REFUSAL)
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
    started_at = dt.datetime.now(dt.UTC)
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


#: How `_why_not_established` begins the reason of a transient failure in which no association came
#: up: the peer down, unreachable or busy — a state of the peer, not a problem with the object sent.
NOT_REACHED_REASONS = ("cannot connect to ", "association rejected transiently ", "association aborted, or no answer ")


def peer_not_reached(reason: str | None) -> bool:
    """Whether a failure `reason` (from a `SendResult`) says the peer was not reached at all (no association)."""
    return reason is not None and reason.startswith(NOT_REACHED_REASONS)
