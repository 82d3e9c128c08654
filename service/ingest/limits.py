"""What one association may hold of the listener: memory for its data set, and its slot when the peer stalls.

pynetdicom appends every P-DATA fragment of a DIMSE message to an in-memory buffer and hands the
whole message over only once its last fragment is in. `handle_pdu_received` (bound to
EVT_PDU_RECV, which fires for each PDU before it is added) swaps that buffer for an
`OversizedDataSet` as soon as it holds more than `Settings.max_instance_bytes`: the rest of the
message is counted and dropped, so one association holds at most the limit plus one PDU, and the
C-STORE handler answers 0xA700 without decoding or writing anything (`received_size`).

A single PDU is still read whole by pynetdicom before any handler sees it; its size is bounded
only by what the peer sends before `Settings.network_timeout_s` of silence.

`handle_aborted` (EVT_ABORTED) makes an abort end the connection even when pynetdicom cannot: it
aborts an association idle for the network timeout by queueing an A-ABORT for the association's
reader thread, which never sends it while it sits in a blocking read inside a PDU that the peer
stopped sending (or trickles a byte at a time). Such a peer would hold one of the
`max_associations` forever; after `ABORT_GRACE_S` the socket is shut down and the read ends.

`handle_connection_closed` (EVT_CONN_CLOSE) frees the association slot of a connection that closed
before its A-ASSOCIATE-RQ was complete (a TCP health check, a port scan, a garbled request):
pynetdicom would otherwise keep waiting for that request until the ACSE timeout (30 s by default),
so 16 such connections in 30 s would refuse every real sender.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

log = logging.getLogger(__name__)

# Seconds an aborted association may take to send its A-ABORT and close before its socket is shut down.
ABORT_GRACE_S = 2.0


@dataclass(frozen=True)
class StoreLimits:
    """What one C-STORE may carry: bytes as sent, and bytes a Deflated data set may inflate to."""

    max_instance_bytes: int
    max_inflated_bytes: int

    def __post_init__(self) -> None:
        for name in ("max_instance_bytes", "max_inflated_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} is {getattr(self, name)}; expected at least 1 byte")


class OversizedDataSet(BytesIO):
    """Stands in for a data set that grew past the limit: counts the bytes written, keeps none."""

    def __init__(self, size: int) -> None:
        super().__init__()
        #: Bytes of the data set received so far (those dropped included).
        self.size = size

    def write(self, data: Any) -> int:
        count = len(memoryview(data))
        self.size += count
        return count


def handle_pdu_received(event: Event, max_instance_bytes: int) -> None:
    """EVT_PDU_RECV: stop keeping the data set of the message being received once it passes the limit."""
    message = event.assoc.dimse.message
    if message is None:  # no message under way: this PDU starts one
        return
    buffer = message.data_set
    if buffer is None or isinstance(buffer, OversizedDataSet):
        return
    size = buffer.tell()  # the buffer is only ever appended to
    if size > max_instance_bytes:
        log.warning(
            "association from %s: data set passes the %s-byte limit; receiving the rest without keeping it",
            event.assoc.requestor.address,
            max_instance_bytes,
        )
        message.data_set = OversizedDataSet(size)
        buffer.close()


def received_size(request: C_STORE) -> int:
    """Bytes of the data set that `request` carried as sent (also when it was not kept)."""
    data_set = request.DataSet
    if isinstance(data_set, OversizedDataSet):
        return data_set.size
    if isinstance(data_set, BytesIO):
        with data_set.getbuffer() as view:
            return view.nbytes
    return 0


def handle_aborted(event: Event, grace_s: float = ABORT_GRACE_S) -> None:
    """EVT_ABORTED: if the connection is still open `grace_s` seconds after the abort, shut its socket down."""
    timer = threading.Timer(grace_s, _shut_down_if_open, [event.assoc])
    timer.daemon = True
    timer.start()


def _shut_down_if_open(assoc: Any) -> None:
    if not assoc.dul.is_alive():
        return
    raw = getattr(assoc.dul.socket, "socket", None)
    if raw is None:
        return
    log.warning(
        "association from %s: still open after its abort (peer stopped inside a PDU); closing the connection",
        assoc.requestor.address,
    )
    with contextlib.suppress(OSError):  # already closed
        raw.shutdown(socket.SHUT_RDWR)


def handle_connection_closed(event: Event) -> None:
    """EVT_CONN_CLOSE: wake an acceptor still waiting for the A-ASSOCIATE-RQ of a connection now closed.

    pynetdicom's acceptor waits on its upper layer's queue for the request; None there reads as
    "no request came", on which it ends the association at once instead of at the ACSE timeout.
    """
    assoc = event.assoc
    waiting = assoc.is_acceptor and not assoc.is_established and assoc.requestor.primitive is None
    if waiting and assoc.dul.to_user_queue.empty():
        assoc.dul.to_user_queue.put(None)
