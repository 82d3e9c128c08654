"""Deterministic DICOM UIDs: the same inputs give the same UID, on every machine, every time.

Objects that we may create again — a phantom series regenerated from its seeds, the SEG of one
series version made again by the same model — must keep their UIDs, so that sending them twice
updates one object in the PACS instead of creating a second one.
"""

from __future__ import annotations

import hashlib

# Separates the parts before hashing, so that ("ab", "c") and ("a", "bc") give different UIDs.
_PART_SEPARATOR = "\x1f"


def derived_uid(namespace: str, *parts: object) -> str:
    """A UID of the form "2.25." + a 128-bit number (PS3.5 B.2) derived from `namespace` and `parts`.

    The number is the first 128 bits of SHA-256 of the namespace and the parts' `str()`, joined by
    a unit separator. Different namespaces keep different kinds of object apart even when their
    parts are equal. The result has at most 45 characters (the limit for a UI value is 64).
    """
    digest = hashlib.sha256(_PART_SEPARATOR.join([namespace, *map(str, parts)]).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"
