"""What every step of the contour stage shares: the problem a contour object ends in, and tolerant element access."""

from __future__ import annotations

from typing import Any

from service.db.tables import ContourStatus


class ContourProblem(Exception):
    """A contour object cannot go into the pool; `status` says how it ends, the message why (no patient data)."""

    def __init__(self, status: ContourStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def sequence_items(ds: Any, keyword: str) -> list[Any]:
    """The items of sequence `keyword` of `ds`; empty when `ds` is None or the element is missing or not a sequence."""
    value = getattr(ds, keyword, None) if ds is not None else None
    try:
        return list(value) if value is not None else []
    except TypeError:
        return []


def element_uid(ds: Any, keyword: str) -> str | None:
    """The UID in element `keyword` of `ds` without surrounding blanks; None when it is missing or empty."""
    value = getattr(ds, keyword, None)
    text = str(value).strip() if value is not None else ""
    return text or None
