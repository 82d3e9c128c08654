"""Fuzz the DICOM listener: malformed data sets over real associations, and malformed PDUs over raw sockets.

    nice -n 10 .venv/bin/python ops/fuzz.py [--cases 10000] [--seed 1] [--json results.json]
                                            [--database-url postgresql://postgres@127.0.0.1:5432/postgres]
                                            [--work DIR] [--workers 3]

Starts `gatekeeper listen` in its own process, on a fresh PostgreSQL database (dropped at the end) and a
fresh storage folder, with small limits so that the oversized cases stay cheap (max_instance_bytes
2 MB, max_inflated_bytes 4 MB) and short timeouts (ACSE and network 3 s). Then, seeded (case i is
the same for the same --seed whatever else runs):

- data-set cases: a phantom CT slice mutated (header bytes, element lengths, removed or nonsense
  values, sequences, pixel data lengths, transfer syntax mismatches, Deflate streams, truncation,
  garbage, UIDs that differ from the request, oversized, and unmodified controls), each file sent
  as bytes by a pynetdicom SCU, many per association;
- PDU cases: raw bytes over a socket — truncated, garbled, oversized and badly framed
  A-ASSOCIATE-RQ, unknown PDU types, P-DATA before association, P-DATA with bad lengths, broken
  DIMSE command sets, A-RELEASE/A-ABORT in the middle of a message, floods of associations;
- stall cases (last, a few at a time): a partial PDU then silence — the listener must close the
  connection within its ACSE/network timeout.

Checks: the listener process never dies; every data-set case is answered with a DICOM status (or a
clean abort); every PDU case ends with an A-ASSOCIATE-RJ, an A-ABORT, a DIMSE answer or the
connection closed by the listener, within a deadline; no case of a kind that is broken by
construction (truncated, garbage, UID mismatch, oversized, deflate bomb, ...) is acknowledged with
success; afterwards `storescu` stores a clean series and every instance of it is indexed. Exit
code 0 when all hold, 1 otherwise. Prints a Markdown summary; --json writes the full numbers.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from sqlalchemy.engine import make_url

from service import dcmtk

GATEKEEPER = str(Path(sys.executable).parent / "gatekeeper")
CALLED = "GATEKEEPER"
CALLING = "FUZZ"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
VERIFICATION = "1.2.840.10008.1.1"
UID_ROOT = "1.2.826.0.1.3680043.8.498.99"  # pydicom's root + our branch: fuzz instances
NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
ENCAPSULATED_SYNTAXES = (JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, JPEG2000, RLELossless)
# The fuzz listener's limits: small, so that the oversized cases cost little.
MAX_INSTANCE_BYTES = 2_000_000
MAX_INFLATED_BYTES = 4_000_000
TIMEOUT_S = 3.0
# How long a PDU case may take to end after we stopped sending; a stall case after its last byte.
CASE_DEADLINE_S = 20.0
STALL_DEADLINE_S = TIMEOUT_S + 2.0 + 25.0  # timeout + abort grace (service.ingest.limits) + load
DATA_SET_BATCH = 40  # data-set cases per association

# Kinds of case and their weights (per 100 cases). "Broken" kinds must never be acknowledged with success.
DATA_SET_KINDS = {
    "valid": 3,
    "header_bytes": 6,
    "element_length": 5,
    "element_removed": 4,
    "element_value": 5,
    "sequence": 5,
    "pixel_data_length": 4,
    "transfer_syntax": 5,
    "encapsulation": 3,
    "deflate": 5,
    "truncated": 3,
    "garbage": 2,
    "uid_mismatch": 2,
    "oversized": 1,
}
PDU_KINDS = {
    "associate_truncated": 5,
    "associate_garbled": 6,
    "associate_bad_lengths": 5,
    "associate_oversized": 2,
    "associate_unknown_ae": 2,
    "pdu_type_unknown": 3,
    "random_stream": 3,
    "pdata_before_association": 2,
    "pdata_bad_lengths": 6,
    "pdata_oversized_claim": 2,
    "dimse_garbage": 5,
    "release_or_abort_mid_message": 3,
}
STALL_SHARE = 0.01  # of all cases, at least 2
FLOOD_SHARE = 0.002  # of all cases, at least 1: more associations at once than max_associations (16)
BROKEN_KINDS = frozenset({"element_removed", "truncated", "garbage", "uid_mismatch", "oversized", "pixel_data_length"})

# DCMTK's tools, not the pynetdicom console scripts of the same names (service/dcmtk.py).
STORESCU = dcmtk.tool("storescu") or "storescu"


# --- PDU encoding (PS3.8 9.3) -------------------------------------------------------------------------


def pdu(pdu_type: int, body: bytes, *, length: int | None = None) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body) if length is None else length) + body


def item(item_type: int, payload: bytes, *, length: int | None = None) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload) if length is None else length) + payload


def associate_rq(
    *,
    calling: str = CALLING,
    contexts: list[tuple[int, str, list[str]]] | None = None,
    max_pdu: int = 65536,
    version: int = 1,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU proposing `contexts` (id, abstract syntax, transfer syntaxes)."""
    if contexts is None:
        contexts = [(1, CT_IMAGE_STORAGE, [ExplicitVRLittleEndian]), (3, VERIFICATION, [ImplicitVRLittleEndian])]
    body = struct.pack(">HH", version, 0) + CALLED.encode().ljust(16) + calling.encode().ljust(16) + bytes(32)
    body += item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, abstract, syntaxes in contexts:
        sub = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in syntaxes)
        body += item(0x20, bytes([context_id, 0, 0, 0]) + sub)
    user = (
        item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.826.0.1.3680043.8.498.99.1") + item(0x55, b"GKFUZZ")
    )
    body += item(0x50, user)
    return pdu(0x01, body)


def p_data(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF PDU of (presentation context id, message control header, fragment) values."""
    body = b"".join(struct.pack(">IBB", len(data) + 2, cid, control) + data for cid, control, data in pdvs)
    return pdu(0x04, body)


def command_set(elements: list[tuple[int, bytes]]) -> bytes:
    """A DIMSE command set (implicit VR little endian, group 0000) with its group length."""
    encoded = b"".join(struct.pack("<HHI", 0x0000, element, len(value)) + value for element, value in elements)
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(encoded)) + encoded


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def c_store_command(message_id: int, sop_instance_uid: str, *, has_data_set: bool = True) -> bytes:
    return command_set(
        [
            (0x0002, _uid(CT_IMAGE_STORAGE)),
            (0x0100, _us(0x0001)),
            (0x0110, _us(message_id)),
            (0x0700, _us(0)),
            (0x0800, _us(0x0000 if has_data_set else 0x0101)),
            (0x1000, _uid(sop_instance_uid)),
        ]
    )


# --- outcomes -------------------------------------------------------------------------------------------


@dataclass
class Result:
    """What happened to one case."""

    kind: str
    outcome: str  # a status "0xA900", or rejected / aborted / closed / answered / not_associated ...
    ok: bool
    detail: str = ""


@dataclass
class Tally:
    results: list[Result] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, result: Result) -> None:
        with self.lock:
            self.results.append(result)


def read_until_closed(sock: socket.socket, deadline: float) -> tuple[list[int], bool, list[int]]:
    """PDU types received until the peer closes or `deadline`; whether it closed; DIMSE statuses seen."""
    buffer = b""
    types: list[int] = []
    statuses: list[int] = []
    closed = False
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except OSError:  # reset by the peer: closed
            closed = True
            break
        if not chunk:
            closed = True
            break
        buffer += chunk
        while len(buffer) >= 6:
            pdu_type, _, length = struct.unpack(">BBI", buffer[:6])
            if len(buffer) < 6 + length:
                break
            body, buffer = buffer[6 : 6 + length], buffer[6 + length :]
            types.append(pdu_type)
            if pdu_type == 0x04:
                statuses.extend(_statuses_in(body))
    return types, closed, statuses


def _statuses_in(p_data_body: bytes) -> list[int]:
    """Status (0000,0900) values of the command sets in a P-DATA-TF body."""
    found = []
    for match in re.finditer(rb"\x00\x00\x00\x09\x02\x00\x00\x00(..)", p_data_body, re.DOTALL):
        found.append(struct.unpack("<H", match.group(1))[0])
    return found


def raw_outcome(types: list[int], closed: bool, statuses: list[int]) -> tuple[str, bool]:
    """Name what the listener did, and whether that is an acceptable end (a reply, a reject/abort, or a close)."""
    if statuses:
        name = "status " + ",".join(f"0x{s:04X}" for s in statuses)
    elif 0x03 in types:
        name = "rejected"
    elif 0x07 in types:
        name = "aborted"
    elif 0x06 in types:
        name = "released"
    elif 0x02 in types:
        name = "accepted then closed"
    else:
        name = "closed"
    return (name, True) if closed else (name + " (still open at deadline)", False)


# --- the data sets --------------------------------------------------------------------------------------


class Templates:
    """Phantom CT slices (bytes of their data set in each native syntax) to mutate."""

    def __init__(self, files: list[Path]) -> None:
        self.datasets = [dcmread(path) for path in files]

    def fresh(self, rng: random.Random) -> Dataset:
        dataset = dcmread(io.BytesIO(_file_bytes(rng.choice(self.datasets), ExplicitVRLittleEndian)))
        dataset.SOPInstanceUID = new_uid(rng)
        dataset.SeriesInstanceUID = f"{UID_ROOT}.7.{rng.randrange(50)}"
        return dataset


def new_uid(rng: random.Random) -> str:
    return f"{UID_ROOT}.{rng.getrandbits(96)}"


def _file_bytes(dataset: Dataset, syntax: str) -> bytes:
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.get("SOPInstanceUID", UID_ROOT)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def encode_data_set(dataset: Dataset, syntax: str) -> bytes:
    """The data set alone (no preamble or meta), encoded in `syntax` (deflated when that says so)."""
    raw = _file_bytes(dataset, syntax)
    group_length = struct.unpack("<I", raw[140:144])[0]
    return raw[144 + group_length :]


def file_with(data_set: bytes, *, syntax: str, sop_instance_uid: str, sop_class_uid: str = CT_IMAGE_STORAGE) -> bytes:
    """A PS3.10 file whose meta says `syntax` and the UIDs the C-STORE request will carry, around `data_set`."""
    meta = Dataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = f"{UID_ROOT}.1"
    buffer = io.BytesIO()
    from pydicom.filewriter import write_file_meta_info

    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return b"\0" * 128 + b"DICM" + buffer.getvalue() + data_set


def _top_level_elements(data_set: bytes) -> list[tuple[int, int, int]]:
    """(offset, header length, value length) of each top-level element of an explicit VR LE data set."""
    elements, offset = [], 0
    while offset + 8 <= len(data_set):
        vr = data_set[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR"):
            header, length = 12, struct.unpack("<I", data_set[offset + 8 : offset + 12])[0]
        else:
            header, length = 8, struct.unpack("<H", data_set[offset + 6 : offset + 8])[0]
        elements.append((offset, header, length))
        if length == 0xFFFFFFFF:
            break
        offset += header + length
    return elements


def _pixel_offset(data_set: bytes) -> int:
    index = data_set.find(b"\xe0\x7f\x10\x00")
    return index if index > 0 else len(data_set)


def deep_sequence(depth: int) -> bytes:
    """(0008,1115) Referenced Series Sequence nested `depth` deep, undefined lengths, delimited."""
    opening = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return opening * depth + closing * depth


def _insert_sorted(data_set: bytes, element: bytes) -> bytes:
    """Insert an (0008,xxxx) element right after the (0008,0060) Modality element or at the start."""
    index = data_set.find(b"\x08\x00\x60\x00CS")
    if index < 0:
        return element + data_set
    length = struct.unpack("<H", data_set[index + 6 : index + 8])[0]
    end = index + 8 + length
    return data_set[:end] + element + data_set[end:]


def make_data_set_case(kind: str, rng: random.Random, templates: Templates) -> tuple[bytes, str]:
    """The file to send for a data-set case of `kind`, and a short description."""
    dataset = templates.fresh(rng)
    uid = str(dataset.SOPInstanceUID)
    syntax = ExplicitVRLittleEndian
    if kind == "valid":
        syntax = rng.choice(NATIVE_SYNTAXES)
        return file_with(encode_data_set(dataset, syntax), syntax=syntax, sop_instance_uid=uid), syntax
    if kind == "element_removed":
        keyword = rng.choice(
            ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"]
            + ["BitsAllocated", "PixelData"]
        )
        delattr(dataset, keyword)
        syntax = rng.choice(NATIVE_SYNTAXES)
        return file_with(encode_data_set(dataset, syntax), syntax=syntax, sop_instance_uid=uid), keyword
    if kind == "element_value":
        keyword, value = rng.choice(
            [
                ("Rows", 0),
                ("Rows", 65535),
                ("Columns", 1),
                ("BitsAllocated", 0),
                ("BitsAllocated", 3),
                ("BitsAllocated", 64),
                ("SamplesPerPixel", 0),
                ("SamplesPerPixel", 3),
                ("NumberOfFrames", "0"),
                ("NumberOfFrames", "x1"),
                ("NumberOfFrames", "999999999"),
                ("StudyInstanceUID", "1..2"),
                ("StudyInstanceUID", "1." + "2" * 80),
                ("SeriesInstanceUID", "abc"),
                ("SOPInstanceUID", ""),
                ("PatientName", "^" * 5000),
                ("SpecificCharacterSet", "ISO_IR 999"),
                ("SpecificCharacterSet", ["ISO 2022 IR 6", "ISO 2022 IR 87"]),
                ("ImagePositionPatient", ["a", "b", "c"]),
                ("PixelSpacing", ["0", "-1"]),
                ("FrameOfReferenceUID", "\x00\x01\x02"),
            ]
        )
        unchanged = encode_data_set(dataset, ExplicitVRLittleEndian)
        detail = f"{keyword}={str(value)[:20]!r}"
        try:
            setattr(dataset, keyword, value)
            data = encode_data_set(dataset, ExplicitVRLittleEndian)
        except Exception:  # pydicom refuses to write that value: the case sends the slice unchanged
            data, detail = unchanged, detail + " (not encodable; unchanged)"
        return file_with(data, syntax=syntax, sop_instance_uid=uid), detail

    data = encode_data_set(dataset, ExplicitVRLittleEndian)
    if kind == "header_bytes":
        end = _pixel_offset(data)
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(end)] = rng.randrange(256)
        return file_with(bytes(mutated), syntax=syntax, sop_instance_uid=uid), "flipped"
    if kind == "element_length":
        offset, header, length = rng.choice(_top_level_elements(data))
        new = rng.choice([0, 1, length + 1, length - 1, length * 2 + 2, 0xFFFF, 0xFFFFFFFF, rng.getrandbits(32)])
        mutated = bytearray(data)
        if header == 12:
            mutated[offset + 8 : offset + 12] = struct.pack("<I", new & 0xFFFFFFFF)
        else:
            mutated[offset + 6 : offset + 8] = struct.pack("<H", new & 0xFFFF)
        return file_with(bytes(mutated), syntax=syntax, sop_instance_uid=uid), f"length {new}"
    if kind == "sequence":
        variant = rng.choice(["deep", "bad_item_length", "no_delimiter", "bad_item_tag", "many_items", "pixel_inside"])
        if variant == "deep":
            element = deep_sequence(rng.choice([5, 50, 300, 3000]))
        elif variant == "bad_item_length":
            element = b"\x08\x00\x15\x11SQ\x00\x00\x10\x00\x00\x00" + b"\xfe\xff\x00\xe0\x00\x10\x00\x00" + bytes(8)
        elif variant == "no_delimiter":
            element = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
        elif variant == "bad_item_tag":
            element = b"\x08\x00\x15\x11SQ\x00\x00\x10\x00\x00\x00" + b"\x12\x34\x56\x78\x08\x00\x00\x00" + bytes(8)
        elif variant == "many_items":
            items = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" * rng.choice([1000, 20000])
            element = b"\x08\x00\x15\x11SQ\x00\x00" + struct.pack("<I", len(items)) + items
        else:
            inner = b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", 0xFFFFFFF0)
            element = b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff" + inner
        return file_with(_insert_sorted(data, element), syntax=syntax, sop_instance_uid=uid), variant
    if kind == "pixel_data_length":
        start = _pixel_offset(data)
        pixels = data[start + 12 :]
        variant = rng.choice(["short", "long", "empty", "half", "huge_dims"])
        if variant == "huge_dims":
            dataset.Rows = dataset.Columns = 65535
            dataset.NumberOfFrames = "1000"
            new = encode_data_set(dataset, ExplicitVRLittleEndian)
            return file_with(new, syntax=syntax, sop_instance_uid=uid), variant
        cut = {"short": len(pixels) - 2, "long": len(pixels) + 2 + 2 * rng.randrange(100), "empty": 0}.get(
            variant, len(pixels) // 2
        )
        body = (pixels + bytes(max(0, cut - len(pixels))))[:cut]
        new = data[:start] + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", len(body)) + body
        return file_with(new, syntax=syntax, sop_instance_uid=uid), variant
    if kind == "transfer_syntax":
        encoded_as, sent_as = rng.choice(
            [
                (ImplicitVRLittleEndian, ExplicitVRLittleEndian),
                (ExplicitVRLittleEndian, ImplicitVRLittleEndian),
                (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian),
                (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian),
                (ExplicitVRBigEndian, ExplicitVRLittleEndian),
                (ExplicitVRLittleEndian, rng.choice(ENCAPSULATED_SYNTAXES)),
            ]
        )
        if encoded_as == ExplicitVRBigEndian:
            swapped = bytearray(data)  # little endian bytes read as if big endian: a cheap stand-in
            for i in range(0, min(len(swapped), _pixel_offset(data)) - 1, 2):
                swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
            body = bytes(swapped)
        else:
            body = encode_data_set(dataset, encoded_as)
        return file_with(body, syntax=sent_as, sop_instance_uid=uid), f"{encoded_as[-8:]} as {sent_as[-8:]}"
    if kind == "encapsulation":
        syntax = rng.choice(ENCAPSULATED_SYNTAXES)
        variant = rng.choice(["garbage_codestream", "bad_item_tag", "bad_item_length", "no_fragments", "no_delimiter"])
        frame = rng.randbytes(rng.randrange(16, 4096))
        encapsulated = encapsulate([frame])
        if variant == "bad_item_tag":
            encapsulated = b"\x12\x34\x56\x78" + encapsulated[4:]
        elif variant == "bad_item_length":
            encapsulated = encapsulated[:12] + struct.pack("<I", 0x7FFFFFF0) + encapsulated[16:]
        elif variant == "no_fragments":
            encapsulated = encapsulated[:8] + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
        elif variant == "no_delimiter":
            encapsulated = encapsulated[:-8] if encapsulated.endswith(b"\x00\x00\x00\x00") else encapsulated
        start = _pixel_offset(data)
        body = data[:start] + b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff" + encapsulated
        return file_with(body, syntax=syntax, sop_instance_uid=uid), variant
    if kind == "deflate":
        deflated = encode_data_set(dataset, DeflatedExplicitVRLittleEndian)
        variant = rng.choice(["truncated", "garbage", "bomb", "zlib_header", "trailing_junk", "deflated_garbage"])
        if variant == "truncated":
            deflated = deflated[: rng.randrange(1, len(deflated))]
        elif variant == "garbage":
            deflated = rng.randbytes(rng.randrange(1, 4096))
        elif variant == "bomb":
            compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
            head = zlib.decompress(deflated, -zlib.MAX_WBITS)
            chunk = bytes(1 << 20)
            deflated = compressor.compress(head[: _pixel_offset(head)])
            deflated += compressor.compress(b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", 0xFFFFFFF0))
            deflated += b"".join(compressor.compress(chunk) for _ in range(rng.choice([5, 64]))) + compressor.flush()
        elif variant == "zlib_header":
            deflated = zlib.compress(zlib.decompress(deflated, -zlib.MAX_WBITS))
        elif variant == "trailing_junk":
            deflated += rng.randbytes(rng.randrange(1, 64))
        else:
            compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            deflated = compressor.compress(rng.randbytes(rng.randrange(1, 10000))) + compressor.flush()
        syntax = DeflatedExplicitVRLittleEndian
        return file_with(deflated, syntax=syntax, sop_instance_uid=uid), variant
    if kind == "truncated":
        cut = rng.randrange(0, len(data) - 1)
        return file_with(data[:cut], syntax=syntax, sop_instance_uid=uid), f"at {cut} of {len(data)}"
    if kind == "garbage":
        return file_with(rng.randbytes(rng.randrange(0, 65536)), syntax=syntax, sop_instance_uid=uid), "random"
    if kind == "uid_mismatch":
        if rng.random() < 0.5:
            return file_with(data, syntax=syntax, sop_instance_uid=new_uid(rng)), "instance"
        return file_with(data, syntax=syntax, sop_instance_uid=uid, sop_class_uid=RT_STRUCTURE_SET_STORAGE), "class"
    if kind == "oversized":
        start = _pixel_offset(data)
        size = MAX_INSTANCE_BYTES + rng.randrange(2, 1_000_000, 2)
        body = data[:start] + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", size) + bytes(size)
        return file_with(body, syntax=syntax, sop_instance_uid=uid), f"{len(body)} bytes"
    raise ValueError(f"unknown data-set kind {kind!r}")


# --- running cases --------------------------------------------------------------------------------------


def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"{seed}:{index}")


class Fuzzer:
    def __init__(self, *, port: int, templates: Templates, work: Path, seed: int, tally: Tally) -> None:
        self.port = port
        self.templates = templates
        self.work = work
        self.seed = seed
        self.tally = tally

    # data sets over pynetdicom associations

    def run_data_set_batch(self, cases: list[tuple[int, str]]) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=CALLING)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.maximum_pdu_size = 65536
        for syntax in (*NATIVE_SYNTAXES, *ENCAPSULATED_SYNTAXES):
            ae.add_requested_context(CT_IMAGE_STORAGE, syntax)
        for syntax in NATIVE_SYNTAXES:
            ae.add_requested_context(RT_STRUCTURE_SET_STORAGE, syntax)
        assoc = None
        last_used = time.monotonic()
        for index, kind in cases:
            rng = case_rng(self.seed, index)
            path = self.work / f"case{index}.dcm"
            try:
                content, detail = make_data_set_case(kind, rng, self.templates)
                path.write_bytes(content)
                if assoc is not None and assoc.is_established and time.monotonic() - last_used > TIMEOUT_S / 3:
                    # Making this case took a while (a loaded machine): do not let the listener's network
                    # timeout end the association under the request.
                    assoc.release()
                for _ in range(3):  # an association the listener aborted or rejected (busy) is opened again
                    if assoc is None or not assoc.is_established:
                        assoc = ae.associate("127.0.0.1", self.port, ae_title=CALLED)
                    if assoc.is_established:
                        break
                    time.sleep(0.2)
                if not assoc.is_established:
                    answer = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "closed"
                    self.tally.add(Result(kind, f"not associated: {answer}", True, detail))
                    continue
                response = assoc.send_c_store(path)
                last_used = time.monotonic()
                if "Status" not in response:  # pynetdicom marks an abort by the peer a moment later
                    settled = time.monotonic() + 5
                    while not assoc.is_aborted and assoc.is_established and time.monotonic() < settled:
                        time.sleep(0.05)
                if "Status" in response:
                    status = int(response.Status)
                    ok = not (status == 0 and kind in BROKEN_KINDS)
                    self.tally.add(Result(kind, f"0x{status:04X}", ok, detail))
                elif assoc.is_aborted:
                    self.tally.add(Result(kind, "aborted", True, detail))
                else:
                    state = f"established={assoc.is_established} released={assoc.is_released}"
                    self.tally.add(Result(kind, "no answer", False, f"case {index}: {detail}; {state}"))
            except Exception as exc:  # a harness failure is a result too, never a silent skip
                self.tally.add(Result(kind, f"harness error {type(exc).__name__}", False, str(exc)[:200]))
            finally:
                path.unlink(missing_ok=True)
        if assoc is not None and assoc.is_established:
            assoc.release()

    # raw PDUs over a socket

    def run_pdu_case(self, index: int, kind: str) -> None:
        rng = case_rng(self.seed, index)
        try:
            messages, needs_association, detail = make_pdu_case(kind, rng)
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                if needs_association:
                    sock.sendall(associate_rq(contexts=[(1, CT_IMAGE_STORAGE, [ExplicitVRLittleEndian])]))
                    answer = _wait_accepted(sock)
                    if answer != "accepted":
                        self.tally.add(Result(kind, f"not associated: {answer}", True, detail))
                        return
                for message in messages:
                    sock.sendall(message)
                types, closed, statuses = _answer_then_close(sock)
            outcome, ok = raw_outcome(types, closed, statuses)
            self.tally.add(Result(kind, outcome, ok, detail))
        except ConnectionRefusedError:
            self.tally.add(Result(kind, "connection refused", False, "listener not answering"))
        except OSError as exc:  # reset while we were still sending: the listener closed on us
            self.tally.add(Result(kind, "closed", True, f"{type(exc).__name__} while sending"))

    def run_flood_case(self, index: int) -> None:
        """More associations at once than the listener serves: the extra ones are rejected, none hangs."""
        kind = "association_flood"
        rng = case_rng(self.seed, index)
        count = rng.randrange(17, 40)  # more than max_associations (16)
        sockets = []
        try:
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                sock.sendall(associate_rq())
                sockets.append(sock)
            replies = collections.Counter()
            for sock in sockets:
                sock.settimeout(10)
                head = sock.recv(1)
                replies[{b"\x02": "accepted", b"\x03": "rejected"}.get(head, "other")] += 1
            ok = replies["rejected"] >= 1 and replies["other"] == 0
            counts = f"{count} at once: {replies['accepted']} accepted, {replies['rejected']} rejected"
            self.tally.add(Result(kind, "the extra ones rejected" if ok else counts, ok, counts))
        finally:
            for sock in sockets:
                sock.close()

    def run_stall_case(self, index: int) -> None:
        rng = case_rng(self.seed, index)
        variant = rng.choice(["before_association", "inside_associate_rq", "inside_p_data", "trickle_p_data"])
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                if variant == "inside_associate_rq":
                    sock.sendall(associate_rq()[:20])
                elif variant in ("inside_p_data", "trickle_p_data"):
                    sock.sendall(associate_rq())
                    answer = _wait_accepted(sock)
                    if answer != "accepted":
                        self.tally.add(Result("stall", f"not associated: {answer}", True, variant))
                        return
                    sock.sendall(b"\x04\x00" + struct.pack(">I", 5000) + b"\x00" * 10)
                started = time.monotonic()
                deadline = started + STALL_DEADLINE_S
                closed = False
                while time.monotonic() < deadline and not closed:
                    if variant == "trickle_p_data":
                        try:
                            sock.send(b"\x00")
                        except OSError:
                            closed = True
                            break
                    _, closed, _ = read_until_closed(sock, time.monotonic() + 0.5)
            elapsed = time.monotonic() - started
            self.tally.add(
                Result("stall", f"closed after {elapsed:.0f} s" if closed else "still open", closed, variant)
            )
        except ConnectionRefusedError:
            self.tally.add(Result("stall", "connection refused", False, variant))


def _wait_accepted(sock: socket.socket) -> str:
    """Read the answer to our A-ASSOCIATE-RQ: "accepted", "rejected", "aborted" or "closed"."""
    sock.settimeout(10)
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            return "closed"
        head += chunk
    pdu_type, _, length = struct.unpack(">BBI", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(min(length - len(body), 65536))
        if not chunk:
            return "closed"
        body += chunk
    if pdu_type == 0x03:  # result, source, reason (PS3.8 9.3.4)
        return "rejected " + {(2, 3, 2): "(local limit)", (1, 1, 3): "(calling AE)"}.get(tuple(body[1:4]), "")
    return {0x02: "accepted", 0x07: "aborted"}.get(pdu_type, f"PDU 0x{pdu_type:02X}")


def _answer_then_close(sock: socket.socket) -> tuple[list[int], bool, list[int]]:
    """Give the listener a moment to answer what we sent, then end our side and read until it closes."""
    types, closed, statuses = read_until_closed(sock, time.monotonic() + 0.05)
    if closed:
        return types, closed, statuses
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        return types, True, statuses
    more_types, closed, more_statuses = read_until_closed(sock, time.monotonic() + CASE_DEADLINE_S)
    return types + more_types, closed, statuses + more_statuses


def make_pdu_case(kind: str, rng: random.Random) -> tuple[list[bytes], bool, str]:
    """(byte strings to send, whether an association is set up first, description) for a PDU case."""
    good = associate_rq()
    if kind == "associate_truncated":
        cut = rng.randrange(1, len(good))
        return [good[:cut]], False, f"at {cut} of {len(good)}"
    if kind == "associate_garbled":
        mutated = bytearray(good)
        for _ in range(rng.randint(1, 12)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        return [bytes(mutated)], False, "flipped"
    if kind == "associate_bad_lengths":
        variant = rng.choice(["context_long", "context_short", "user_long", "abstract_long", "version", "pdu_short"])
        body = good[6:]
        if variant == "version":
            return [pdu(0x01, struct.pack(">H", rng.choice([0, 2, 0xFFFF])) + body[2:])], False, variant
        if variant == "pdu_short":
            return [pdu(0x01, body, length=rng.randrange(0, len(body)))], False, variant
        target = {"context_long": 0x20, "context_short": 0x20, "user_long": 0x50, "abstract_long": 0x30}[variant]
        index = body.find(bytes([target, 0]), 68)
        mutated = bytearray(body)
        old = struct.unpack(">H", body[index + 2 : index + 4])[0]
        new = old + rng.randrange(1, 500) if variant != "context_short" else max(0, old - rng.randrange(1, 20))
        mutated[index + 2 : index + 4] = struct.pack(">H", new & 0xFFFF)
        return [pdu(0x01, bytes(mutated))], False, variant
    if kind == "associate_oversized":
        if rng.random() < 0.5:
            return [pdu(0x01, good[6:], length=rng.choice([0xFFFFFFFF, 0x7FFFFFFF, 50_000_000]))], False, "claim"
        contexts = [(2 * i + 1, f"1.2.3.{i}", [ExplicitVRLittleEndian] * 20) for i in range(rng.choice([128, 127]))]
        return [associate_rq(contexts=contexts)], False, "many contexts"
    if kind == "associate_unknown_ae":
        return [associate_rq(calling=rng.choice(["INTRUDER", "", " ", "\x00\x01", "A" * 16]))], False, "calling AE"
    if kind == "pdu_type_unknown":
        pdu_type = rng.choice([0x00, 0x08, 0x09, 0x10, 0x7F, 0xFF])
        return [pdu(pdu_type, rng.randbytes(rng.randrange(0, 200)))], False, f"type 0x{pdu_type:02X}"
    if kind == "random_stream":
        return [rng.randbytes(rng.randrange(1, 5000))], False, "random"
    if kind == "pdata_before_association":
        return [p_data([(1, 0x03, c_store_command(1, "1.2.3"))])], False, "P-DATA first"
    if kind == "release_or_abort_mid_message":
        command = p_data([(1, 0x03, c_store_command(1, new_uid(rng)))])
        half = p_data([(1, 0x00, rng.randbytes(500))])
        ending = rng.choice([pdu(0x05, bytes(4)), pdu(0x07, bytes(4)), associate_rq()])
        return [command, half, ending], True, {0x05: "release", 0x07: "abort", 0x01: "associate"}[ending[0]]
    if kind == "pdata_oversized_claim":
        return [pdu(0x04, rng.randbytes(100), length=rng.choice([0xFFFFFFF0, 0x10000000]))], True, "claim"
    if kind == "pdata_bad_lengths":
        variant = rng.choice(["pdv_too_long", "pdv_zero", "pdv_one", "pdu_shorter", "unknown_context", "no_pdvs"])
        fragment = b"\x03" + c_store_command(1, new_uid(rng))
        if variant == "pdv_too_long":
            body = struct.pack(">IB", len(fragment) + 1000, 1) + fragment
        elif variant == "pdv_zero":
            body = struct.pack(">IB", 0, 1)
        elif variant == "pdv_one":
            body = struct.pack(">IB", 1, 1) + b"\x03"
        elif variant == "pdu_shorter":
            body = struct.pack(">IB", len(fragment) + 1, 1) + fragment
            return [pdu(0x04, body, length=len(body) - rng.randrange(1, 10))], True, variant
        elif variant == "unknown_context":
            body = struct.pack(">IB", len(fragment) + 1, rng.choice([0, 2, 99, 255])) + fragment
        else:
            body = b""
        return [pdu(0x04, body)], True, variant
    if kind == "dimse_garbage":
        variant = rng.choice(
            ["garbage_command", "unknown_command", "c_find", "no_affected_uid", "data_before_command", "echo_with_data"]
        )
        if variant == "garbage_command":
            fragments = [(1, 0x03, rng.randbytes(rng.randrange(1, 300)))]
        elif variant == "unknown_command":
            fragments = [(1, 0x03, command_set([(0x0100, _us(0x0FFF)), (0x0110, _us(1)), (0x0800, _us(0x0101))]))]
        elif variant == "c_find":
            find = command_set(
                [(0x0002, _uid("1.2.840.10008.5.1.4.1.2.1.1")), (0x0100, _us(0x0020)), (0x0110, _us(1))]
                + [(0x0700, _us(0)), (0x0800, _us(0x0000))]
            )
            fragments = [(1, 0x03, find), (1, 0x02, b"\x10\x00\x10\x00\x00\x00\x00\x00")]
        elif variant == "no_affected_uid":
            fragments = [(1, 0x03, command_set([(0x0100, _us(0x0001)), (0x0110, _us(1)), (0x0800, _us(0x0000))]))]
            fragments.append((1, 0x02, b"\x08\x00\x16\x00\x00\x00\x00\x00"))
        elif variant == "data_before_command":
            fragments = [(1, 0x02, rng.randbytes(100)), (1, 0x03, c_store_command(1, new_uid(rng)))]
        else:
            echo = command_set([(0x0002, _uid(VERIFICATION)), (0x0100, _us(0x0030)), (0x0110, _us(1))])
            fragments = [(1, 0x03, echo + b"\x00\x00\x00\x08\x02\x00\x00\x00\x00\x00"), (1, 0x02, rng.randbytes(50))]
        return [p_data([fragment]) for fragment in fragments], True, variant
    raise ValueError(f"unknown PDU kind {kind!r}")


# --- set-up: database, listener, templates --------------------------------------------------------------


def make_templates(work: Path, phantom: Path | None) -> tuple[list[Path], list[Path]]:
    """Phantom CT: 4 small slices to mutate, and a clean 10-slice series for the final check.

    `phantom`: the output of an earlier `gatekeeper phantom` run with at least two series; None: make one.
    """
    if phantom is None:
        phantom = work / "phantom"
    if not phantom.exists():
        subprocess.run(
            [GATEKEEPER, "phantom", "--out", str(phantom), "--series", "2", "--slices", "10", "--seed", "14"]
            + ["--matrix", "64", "--quiet"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    folders = sorted(p for p in phantom.iterdir() if p.is_dir())
    return sorted(folders[0].glob("CT*.dcm"))[:4], sorted(folders[1].glob("CT*.dcm"))


@dataclass
class RunningListener:
    process: subprocess.Popen[bytes]
    port: int
    database_url: str
    log_path: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_listener(work: Path, admin_url: str) -> RunningListener:
    name = f"gatekeeper_fuzz_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    storage = work / "var"
    shutil.rmtree(storage, ignore_errors=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEKEEPER_")}
    env.update(
        GATEKEEPER_DATABASE_URL=database_url,
        GATEKEEPER_STORAGE_DIR=str(storage),
        GATEKEEPER_PORT=str(port),
        GATEKEEPER_ALLOWED_AE_TITLES=f"{CALLING},STORESCU",
        GATEKEEPER_ALLOWED_NETWORKS="127.0.0.0/8",
        GATEKEEPER_QUIET_PERIOD_S="3600",
        GATEKEEPER_MIN_FREE_DISK_BYTES="0",
        GATEKEEPER_MAX_DISK_USED_FRACTION="1.0",
        GATEKEEPER_MAX_INSTANCE_BYTES=str(MAX_INSTANCE_BYTES),
        GATEKEEPER_MAX_INFLATED_BYTES=str(MAX_INFLATED_BYTES),
        GATEKEEPER_ACSE_TIMEOUT_S=str(TIMEOUT_S),
        GATEKEEPER_NETWORK_TIMEOUT_S=str(TIMEOUT_S),
    )
    from alembic import command

    from service.commands import db as db_cli

    command.upgrade(db_cli.alembic_config(database_url), "head")  # in this process: no second interpreter start
    log_path = work / "listener.log"
    process = subprocess.Popen([GATEKEEPER, "listen"], env=env, stdout=subprocess.DEVNULL, stderr=log_path.open("wb"))
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the listener did not start: {log_path.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the listener did not open its port within 60 s") from None
            time.sleep(0.1)
    return RunningListener(process, port, database_url, log_path)


def clean_series_stored(listener: RunningListener, files: list[Path], work: Path) -> tuple[bool, str]:
    """Send a clean series (new UIDs) with storescu; True when every instance was acknowledged and indexed."""
    from pydicom.uid import generate_uid

    out = work / "clean"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    series_uid = generate_uid()
    for i, path in enumerate(files):
        dataset = dcmread(path)
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        dataset.save_as(out / f"CT{i:04d}.dcm")
    sent = subprocess.run(
        [STORESCU, "-v", "-aet", "STORESCU", "-aec", CALLED, "127.0.0.1", str(listener.port)]
        + [str(p) for p in sorted(out.iterdir())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    successes = (sent.stdout + sent.stderr).count("Received Store Response (Success)")
    with psycopg.connect(listener.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM instance JOIN series ON series.id = instance.series_id "
            "WHERE series.series_instance_uid = %s",
            (series_uid,),
        ).fetchone()
    indexed = int(row[0]) if row else 0
    ok = sent.returncode == 0 and successes == len(files) == indexed
    return ok, f"storescu exit {sent.returncode}, {successes}/{len(files)} acknowledged, {indexed} indexed"


class PeakRss:
    """Samples the listener's resident memory every 100 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


# --- the run --------------------------------------------------------------------------------------------


def plan(cases: int, seed: int) -> tuple[list[tuple[int, str]], list[tuple[int, str]], list[int], list[int]]:
    """Which case index is which kind: data-set cases, PDU cases, stall cases, flood cases."""
    rng = random.Random(seed)
    stalls = max(2, round(cases * STALL_SHARE))
    floods = max(1, round(cases * FLOOD_SHARE))
    kinds = list(DATA_SET_KINDS) + list(PDU_KINDS)
    weights = list(DATA_SET_KINDS.values()) + list(PDU_KINDS.values())
    data_set, pdus = [], []
    rest = cases - stalls - floods
    for index in range(rest):
        kind = rng.choices(kinds, weights)[0]
        (data_set if kind in DATA_SET_KINDS else pdus).append((index, kind))
    return data_set, pdus, list(range(rest, rest + stalls)), list(range(rest + stalls, cases))


def run(cases: int, seed: int, work: Path, admin_url: str, workers: int, phantom: Path | None) -> dict[str, Any]:
    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    template_files, clean_files = make_templates(work, phantom)
    templates = Templates(template_files)
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True  # send each case's bytes as they are in its file
    listener = start_listener(work, admin_url)
    rss = PeakRss(listener.process.pid)
    tally = Tally()
    fuzzer = Fuzzer(port=listener.port, templates=templates, work=work, seed=seed, tally=tally)
    data_set_cases, pdu_cases, stall_cases, flood_cases = plan(cases, seed)
    tasks: list[Callable[[], None]] = [
        (lambda batch=data_set_cases[i : i + DATA_SET_BATCH]: fuzzer.run_data_set_batch(batch))
        for i in range(0, len(data_set_cases), DATA_SET_BATCH)
    ]
    tasks += [(lambda index=index, kind=kind: fuzzer.run_pdu_case(index, kind)) for index, kind in pdu_cases]
    random.Random(seed).shuffle(tasks)
    died_at = None
    fuzz_started = time.monotonic()
    print(f"set-up {fuzz_started - started:.1f} s; fuzzing {cases} cases", file=sys.stderr)
    try:
        # Stalls (each holds an association for the timeout) run beside the rest, 4 at a time; floods
        # (which take every association slot) after everything else, one at a time.
        with ThreadPoolExecutor(max_workers=4) as stall_pool:
            stalling = stall_pool.map(fuzzer.run_stall_case, stall_cases)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for done, _ in enumerate(pool.map(lambda task: task(), tasks)):
                    if listener.process.poll() is not None:
                        died_at = done
                        break
            print(f"data sets and PDUs done after {time.monotonic() - fuzz_started:.1f} s", file=sys.stderr)
            list(stalling)
        print(f"stalls done after {time.monotonic() - fuzz_started:.1f} s", file=sys.stderr)
        for index in flood_cases:
            if died_at is None and listener.process.poll() is None:
                fuzzer.run_flood_case(index)
        fuzz_s = time.monotonic() - fuzz_started
        print(f"floods done after {fuzz_s:.1f} s", file=sys.stderr)
        alive = listener.process.poll() is None
        clean_ok, clean_detail = clean_series_stored(listener, clean_files, work) if alive else (False, "listener dead")
        alive_after = listener.process.poll() is None
    finally:
        peak_rss = rss.stop()
        exit_code = listener.process.poll()
        if exit_code is None:
            listener.process.terminate()
            exit_code = listener.process.wait(timeout=60)
        with psycopg.connect(admin_url, autocommit=True) as conn:
            name = make_url(listener.database_url).database
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    log_text = listener.log_path.read_text(errors="replace")
    return summarize(
        tally,
        seed=seed,
        cases=cases,
        alive=alive and alive_after and died_at is None,
        exit_code=exit_code,
        clean=(clean_ok, clean_detail),
        fuzz_s=fuzz_s,
        wall_s=time.monotonic() - started,
        peak_rss=peak_rss,
        log_text=log_text,
    )


def summarize(
    tally: Tally,
    *,
    seed: int,
    cases: int,
    alive: bool,
    exit_code: int | None,
    clean: tuple[bool, str],
    fuzz_s: float,
    wall_s: float,
    peak_rss: int,
    log_text: str,
) -> dict[str, Any]:
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    statuses: collections.Counter[str] = collections.Counter()
    failures = []
    for result in tally.results:
        by_kind[result.kind][result.outcome] += 1
        if re.fullmatch(r"0x[0-9A-F]{4}", result.outcome):
            statuses[result.outcome] += 1
        for status in re.findall(r"0x[0-9A-F]{4}", result.outcome) if result.outcome.startswith("status") else []:
            statuses[status] += 1
        if not result.ok:
            failures.append({"kind": result.kind, "outcome": result.outcome, "detail": result.detail})
    unforeseen = len(re.findall(r"could not check instance", log_text))
    return {
        "command": " ".join(sys.argv),
        "seed": seed,
        "cases": cases,
        "cases_run": len(tally.results),
        "kinds": sorted([*DATA_SET_KINDS, *PDU_KINDS, "stall", "association_flood"]),
        "by_kind": {kind: dict(counter) for kind, counter in sorted(by_kind.items())},
        "statuses": dict(sorted(statuses.items())),
        "crashes": 0 if alive else 1,
        "listener_exit_code_after_sigterm": exit_code,
        "failures": failures,
        "clean_series_stored": clean[0],
        "clean_series_detail": clean[1],
        "fuzz_seconds": round(fuzz_s, 1),
        "wall_seconds": round(wall_s, 1),
        "listener_peak_rss_mb": round(peak_rss / 1e6),
        "listener_log": {
            "unforeseen_check_errors": unforeseen,
            "tracebacks": log_text.count("Traceback (most recent call last)"),
            "association_threads_ended_by_an_exception": log_text.count("Exception in thread"),
            "error_lines": sum(1 for line in log_text.splitlines() if " ERROR " in line),
        },
    }


def passed(summary: dict[str, Any]) -> bool:
    return (
        summary["crashes"] == 0
        and not summary["failures"]
        and summary["clean_series_stored"]
        and summary["cases_run"] == summary["cases"]
        and summary["listener_exit_code_after_sigterm"] == 0
    )


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"`{summary['command']}`: {summary['cases_run']} of {summary['cases']} cases, seed {summary['seed']}, "
        f"fuzzing {summary['fuzz_seconds']} s, wall {summary['wall_seconds']} s; crashes {summary['crashes']}; "
        f"failures {len(summary['failures'])}; clean series afterwards: {summary['clean_series_detail']}; "
        f"listener peak RSS {summary['listener_peak_rss_mb']} MB; exit code after SIGTERM "
        f"{summary['listener_exit_code_after_sigterm']}.",
        "",
        "| kind | cases | outcomes |",
        "|---|---:|---|",
    ]
    for kind, outcomes in summary["by_kind"].items():
        text = ", ".join(f"{name} ×{count}" for name, count in sorted(outcomes.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {kind} | {sum(outcomes.values())} | {text} |")
    lines += ["", "C-STORE statuses: " + ", ".join(f"{s} ×{n}" for s, n in summary["statuses"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL admin URL; a fresh database is made for the run and dropped after",
    )
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary folder)")
    parser.add_argument("--workers", type=int, default=3, help="cases in flight at once (default 3)")
    parser.add_argument("--json", type=Path, help="also write the full results here")
    parser.add_argument(
        "--phantom", type=Path, help="an earlier `gatekeeper phantom` output with 2+ series (default: make one)"
    )
    args = parser.parse_args(argv)
    if args.cases < 10:
        parser.error("--cases must be at least 10")
    work = args.work or Path(tempfile.mkdtemp(prefix="gatekeeper-fuzz-"))
    summary = run(args.cases, args.seed, work, args.database_url, args.workers, args.phantom)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown(summary))
    for failure in summary["failures"][:20]:
        print(f"FAILED {failure}", file=sys.stderr)
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if passed(summary) else 1


if __name__ == "__main__":
    sys.exit(main())
