"""`gatekeeper listen`'s engine: a pynetdicom Storage SCP (+ Verification) and the assembler thread.

The C-STORE handler does the minimum: check the data set, store it durably, answer a status.
No inference, no broker, no waiting on anything but the disk and the database. Series completion,
queueing and resends run in a separate thread (`Assembler`), one round every
`Settings.sweeper_interval_s`.

C-STORE statuses we answer (see docs/connecting-your-pacs.md):
- 0x0000 Success: stored durably and indexed (or an identical copy already was; or a different
  copy was kept in quarantine).
- 0xA700 Out of Resources: disk reserve reached, or the file or database write failed — retry later;
  or the data set is larger than `max_instance_bytes`, or inflates to more than `max_inflated_bytes`.
- 0xA900 Data Set does not match SOP Class: required attribute missing (an empty or stripped SOP Class,
  SOP Instance, Study or Series Instance UID, named in Offending Element (0000,0901) and the Error
  Comment: nothing of such an instance is kept), or pixel data of the wrong size.
- 0xC210 Cannot Understand: the data set could not be decoded.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import time
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from service import metrics
from service.celery_app import Publisher
from service.db.session import make_engine, make_session_factory
from service.db.tables import utc_now
from service.ingest.assembly import complete_due_series
from service.ingest.checks import (
    ACCEPTED_SOP_CLASSES,
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    SUCCESS,
    RefusedInstance,
    check_instance,
)
from service.ingest.limits import (
    StoreLimits,
    handle_aborted,
    handle_connection_closed,
    handle_pdu_received,
    received_size,
)
from service.ingest.orphans import OrphanSweeper
from service.ingest.queue import queue_due_series
from service.ingest.storage import DiskReserveReached, InstanceStore, StoreOutcome, part10_file
from service.settings import IPNetwork, Settings

log = logging.getLogger(__name__)

# Transfer syntaxes accepted for every storage SOP class, in order of our preference.
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
REJECT_CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)  # rejected-permanent, service-user
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # rejected-permanent, service-user, no reason given


@dataclass(frozen=True)
class AccessPolicy:
    """Who may open an association: a calling AE title allow-list and a network allow-list.

    `*` in `ae_titles` accepts every AE title; neither list may be empty (fail closed).
    """

    ae_titles: frozenset[str]
    networks: tuple[IPNetwork, ...]

    def __post_init__(self) -> None:
        if not self.ae_titles:
            raise ValueError("allowed AE titles are empty; expected at least one title, or '*' for any")
        if not self.networks:
            raise ValueError("allowed networks are empty; expected at least one CIDR, e.g. 10.0.0.0/8")

    def refusal(self, calling_ae_title: str, address: str) -> str | None:
        """Why an association from `calling_ae_title` at `address` is refused, or None if allowed."""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return f"address {address!r} is not an IP address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not any(ip.version == net.version and ip in net for net in self.networks):
            return f"address {ip} is not in the allowed networks"
        if "*" not in self.ae_titles and calling_ae_title.strip() not in self.ae_titles:
            return f"calling AE title {calling_ae_title.strip()!r} is not allowed"
        return None


def handle_requested(event: Event, access: AccessPolicy) -> None:
    """EVT_REQUESTED: reject the association with a DICOM A-ASSOCIATE-RJ if the sender is unknown."""
    assoc = event.assoc
    primitive = assoc.requestor.primitive
    assert primitive is not None  # EVT_REQUESTED fires for a received A-ASSOCIATE-RQ
    calling = str(primitive.calling_ae_title).strip()
    address = str(assoc.requestor.address)
    reason = access.refusal(calling, address)
    metrics.record_association(calling, accepted=reason is None)
    if reason is None:
        return
    log.warning("rejecting association from %s calling AE %r: %s", address, calling, reason)
    if "AE title" in reason:
        assoc.acse.send_reject(*REJECT_CALLING_AE_NOT_RECOGNIZED)
    else:
        assoc.acse.send_reject(*REJECT_NO_REASON)
    assoc.kill()  # waits until the A-ASSOCIATE-RJ is out and the peer closed, as pynetdicom's own rejections


def handle_store(event: Event, store: InstanceStore, limits: StoreLimits) -> int | Dataset:
    """EVT_C_STORE: check, store durably, index; answer success only once all of that is done."""
    response = _store(event, store, limits)
    metrics.record_store_response(response)
    return response


def _store(event: Event, store: InstanceStore, limits: StoreLimits) -> int | Dataset:
    request = event.request
    assert isinstance(request, C_STORE)  # bound to EVT_C_STORE only
    sop_instance_uid = str(request.AffectedSOPInstanceUID)
    calling = str(event.assoc.requestor.ae_title).strip()
    size = received_size(request)
    if size > limits.max_instance_bytes:
        log.warning("refused instance %s from %s: %s bytes, over the limit", sop_instance_uid, calling, size)
        # Refused: Out of Resources — larger than max_instance_bytes; nothing was decoded or written.
        return _failure(OUT_OF_RESOURCES, f"data set larger than {limits.max_instance_bytes} bytes")
    try:
        store.check_disk_reserve()
    except DiskReserveReached as exc:
        log.error("refusing instance %s: disk reserve reached (%s)", sop_instance_uid, exc)
        return _failure(OUT_OF_RESOURCES, "storage disk reserve reached")  # Out of Resources: retry later
    except OSError:
        log.exception("cannot read the free space of the storage disk")
        return _failure(OUT_OF_RESOURCES, "cannot check storage disk")  # Out of Resources: retry later

    writing = None
    try:
        file_bytes = part10_file(
            event.encoded_dataset(include_meta=False),
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=str(event.context.transfer_syntax),
        )
        writing = store.start_write(file_bytes)  # written and synced while the data set is checked
        instance = check_instance(
            file_bytes,
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=sop_instance_uid,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            max_inflated_bytes=limits.max_inflated_bytes,
        )
    except RefusedInstance as exc:
        # UIDs, the AE title and the reason only: never a value of the data set (patient data).
        log.warning("refused instance %s from %s: %s", sop_instance_uid, calling, exc.comment)
        _discard(store, writing)
        return _failure(exc.status, exc.comment, exc.offending)  # 0xA900 / 0xC210, named by the check
    except Exception:  # an unforeseen failure to read what was sent: not acknowledged
        log.exception("could not check instance %s", sop_instance_uid)
        _discard(store, writing)
        return _failure(CANNOT_UNDERSTAND, "cannot understand data set")  # Cannot Understand

    try:
        result = store.store(
            file_bytes,
            instance=instance,
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae_title=calling,
            writing=writing,
        )
    except OSError:
        log.exception("could not persist instance %s", sop_instance_uid)
        return _failure(OUT_OF_RESOURCES, "could not write the file")  # Out of Resources: the sender will retry
    except SQLAlchemyError as exc:
        log.error("could not index instance %s: database error %s", sop_instance_uid, type(exc).__name__)
        return _failure(OUT_OF_RESOURCES, "database unavailable")  # Out of Resources: the sender will retry
    if result.outcome is not StoreOutcome.STORED:
        log.info("instance %s of series id %s: %s", sop_instance_uid, result.series_id, result.outcome.value)
    return SUCCESS


def _discard(store: InstanceStore, writing: Future[Path] | None) -> None:
    if writing is not None:
        store.discard(writing)


def recover_index(store: InstanceStore) -> int:
    """Start-up: index the stored files whose index commit a crash lost; return how many.

    A failure is logged and does not stop the start: the assembler checks each series folder
    again before it completes the series (`service.ingest.assembly.complete_series`).
    """
    try:
        return store.recover_unindexed_files()
    except (OSError, SQLAlchemyError) as exc:
        log.error("start-up index recovery failed (%s); each series is checked again before completion", exc)
        return 0


def _failure(status: int, comment: str, offending: tuple[int, ...] = ()) -> Dataset:
    response = Dataset()
    response.Status = status
    if offending:
        response.OffendingElement = list(offending)  # (0000,0901): the attributes at fault
    response.ErrorComment = comment[:64]
    return response


class _QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges every read at once (Linux TCP_QUICKACK, re-armed after each recv).

    Senders that keep Nagle's algorithm on (DCMTK's default) hold back the last small segment of
    each message until the previous one is acknowledged; with the receiver's delayed ACK that is
    ~40 ms per instance. Measured: 300 small instances from storescu take 13.4 s without this, 1.1 s with.
    """

    __slots__ = ()

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data = super().recv(bufsize, flags)
        if _HAS_QUICKACK:
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data


_HAS_QUICKACK = hasattr(socket, "TCP_QUICKACK")


class _Server(ThreadedAssociationServer):
    """pynetdicom's threaded server with TCP_NODELAY and quick ACKs on every accepted socket.

    Without them, the delayed-ACK / Nagle interplay costs ~45 ms per instance with DCMTK senders
    (see `_QuickAckSocket`). With `reuse_port`, several listener processes can share one port
    (the kernel spreads connections over them).
    """

    reuse_port = False

    def server_bind(self) -> None:
        if self.reuse_port:
            assert self.socket is not None  # created in __init__ before bind
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None  # bound and listening
        client_socket, address = self.socket.accept()
        client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _HAS_QUICKACK:
            client_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        if self.ssl_context:
            # The TLS handshake happens on the first read, in the association's own thread, so a
            # client that connects and stays silent cannot hold up the accept loop.
            client_socket = self.ssl_context.wrap_socket(client_socket, server_side=True, do_handshake_on_connect=False)
        else:
            client_socket = _QuickAckSocket(fileno=client_socket.detach())
        # pynetdicom leaves accepted sockets without a timeout: a peer that stops in the middle of a
        # PDU (even of its A-ASSOCIATE-RQ) would block the association's reader forever.
        client_socket.settimeout(self.ae.network_timeout)
        return client_socket, address


class _ReusePortServer(_Server):
    reuse_port = True


def make_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context from the settings, or None when TLS is not configured.

    Raises:
        OSError, ssl.SSLError: a certificate or key file is missing or invalid.
    """
    if settings.tls_cert_path is None or settings.tls_key_path is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=settings.tls_cert_path, keyfile=settings.tls_key_path)
    if settings.tls_ca_path is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=settings.tls_ca_path)
    return context


def make_ae(settings: Settings) -> AE:
    """The Application Entity: our title, timeouts, PDU size, association limit, accepted contexts."""
    # pynetdicom logs C-FIND/C-MOVE identifiers (patient names, ids) unless told not to.
    _config.LOG_REQUEST_IDENTIFIERS = False
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.maximum_pdu_size = settings.max_pdu_bytes
    ae.maximum_associations = settings.max_associations
    ae.require_called_aet = False  # some PACS address us by another title; access is by calling AE and IP
    for sop_class in ACCEPTED_SOP_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.add_supported_context(Verification)
    return ae


class Assembler:
    """Completes quiet series, queues complete ones and re-sends lost ones, in a background thread."""

    def __init__(
        self,
        *,
        store: InstanceStore,
        settings: Settings,
        publisher: Publisher,
        sweepers: Sequence[Callable[[dt.datetime | None], object]] = (),
    ) -> None:
        self.store = store
        self.settings = settings
        self.publisher = publisher
        # Further periodic jobs of this thread, e.g. the pipeline's sweeper (`service.pipeline.tasks`).
        self.sweepers = list(sweepers)
        self.started_at = utc_now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gatekeeper-assembler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def run_once(self, now: dt.datetime | None = None) -> None:
        """One round: complete due series, then queue complete ones and resend stale ones."""
        complete_due_series(store=self.store, settings=self.settings, not_before=self.started_at, now=now)
        queue_due_series(
            sessions=self.store.sessions,
            publisher=self.publisher,
            resend_after_s=self.settings.queue_resend_after_s,
            now=now,
        )
        for sweeper in self.sweepers:
            sweeper(now)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.sweeper_interval_s):
            try:
                self.run_once()
            except SQLAlchemyError as exc:  # database away: nothing is lost, the next round retries
                log.warning("assembler round failed: database error %s", type(exc).__name__)
            except Exception:
                log.exception("assembler round failed; retrying next round")


@dataclass
class Listener:
    """A running listener: DICOM server(s) on the configured ports plus the assembler thread.

    Build with `Listener.start(settings)`; `stop()` closes the ports and the database engine.
    """

    settings: Settings
    store: InstanceStore
    servers: list[ThreadedAssociationServer] = field(default_factory=list)
    assembler: Assembler | None = None

    @property
    def port(self) -> int:
        return int(self.servers[0].server_address[1])

    @property
    def tls_port(self) -> int | None:
        return int(self.servers[1].server_address[1]) if len(self.servers) > 1 else None

    @classmethod
    def start(
        cls,
        settings: Settings,
        *,
        publisher: Publisher | None = None,
        sweepers: Sequence[Callable[[dt.datetime | None], object]] = (),
        run_assembler: bool = True,
        reuse_port: bool = False,
    ) -> Listener:
        """Open the port(s) and start serving in background threads.

        With `run_assembler`, a background thread completes quiet series, queues complete ones with
        `publisher` and runs each of `sweepers` every round (the command that starts the listener
        builds them: `service.pipeline.tasks.listener_jobs`); without it, the DICOM server only.

        Raises:
            ValueError: the access allow-lists are empty (fail closed), or an assembler without a publisher.
            OSError: a port cannot be bound, or a TLS file cannot be read.
        """
        if run_assembler and publisher is None:
            raise ValueError("publisher: the assembler needs a publisher to queue complete series; got None")
        access = AccessPolicy(frozenset(settings.allowed_ae_titles), tuple(settings.allowed_networks))
        if settings.database_url.startswith("sqlite"):
            engine = make_engine(settings.database_url)
        else:
            # One connection per association; a database that does not answer fails the store
            # (0xA700) within seconds instead of holding the sender until its DIMSE timeout.
            engine = make_engine(
                settings.database_url,
                pool_size=settings.max_associations,
                max_overflow=4,
                pool_timeout=10,
                connect_args={"connect_timeout": 5, "options": "-c statement_timeout=30000"},
            )
        store = InstanceStore(
            storage_dir=settings.storage_dir,
            sessions=make_session_factory(engine),
            min_free_disk_bytes=settings.min_free_disk_bytes,
            max_disk_used_fraction=settings.max_disk_used_fraction,
        )
        listener = cls(settings=settings, store=store)
        if run_assembler:
            recover_index(store)
        limits = StoreLimits(settings.max_instance_bytes, settings.max_inflated_bytes)
        # Leftovers of failed stores in tmp/ go before we serve; the assembler repeats it (service/ingest/orphans.py).
        orphan_sweeper = OrphanSweeper(store.tmp_dir, older_than_s=settings.orphan_tmp_age_s)
        ae = make_ae(settings)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, handle_requested, [access]),
            (evt.EVT_C_STORE, handle_store, [store, limits]),
            (evt.EVT_PDU_RECV, handle_pdu_received, [limits.max_instance_bytes]),
            (evt.EVT_ABORTED, handle_aborted),
            (evt.EVT_CONN_CLOSE, handle_connection_closed),
        ]
        server_class = _ReusePortServer if reuse_port else _Server
        try:
            addresses: list[tuple[int, ssl.SSLContext | None]] = [(settings.port, None)]
            tls = make_ssl_context(settings)
            if tls is not None:
                addresses.append((settings.tls_port, tls))
            for port, context in addresses:
                server = ae.make_server(
                    (settings.bind_address, port), ssl_context=context, evt_handlers=handlers, server_class=server_class
                )
                ae._servers.append(server)  # as AE.start_server does, so AE.shutdown() stops it
                thread = threading.Thread(target=server.serve_forever, name=f"dicom-server-{port}", daemon=True)
                thread.start()
                listener.servers.append(server)
                log.info(
                    "listening as %s on %s:%s%s",
                    settings.ae_title,
                    settings.bind_address,
                    server.server_address[1],
                    " (TLS)" if context else "",
                )
        except BaseException:
            listener.stop()
            raise
        if run_assembler:
            assert publisher is not None  # checked above
            listener.assembler = Assembler(
                store=store, settings=settings, publisher=publisher, sweepers=[*sweepers, orphan_sweeper]
            )
            listener.assembler.start()
        return listener

    def stop(self) -> None:
        """Stop accepting, stop the assembler, and close the database engine."""
        for server in self.servers:
            server.shutdown()
        self.servers.clear()
        if self.assembler is not None:
            self.assembler.stop()
        self.store.close()
        self.store.sessions.kw["bind"].dispose()
