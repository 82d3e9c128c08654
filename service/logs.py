"""Logging setup for every gatekeeper process.

Log lines carry internal ids and DICOM UIDs only — never patient names, ids, birth dates or
accession numbers.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever `sys.stderr` is at the time of the record (tests swap it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it; the property ignores that
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Send log records to stderr as `time level logger: message`, once per process."""
    root = logging.getLogger()
    if any(getattr(h, "_gatekeeper", False) for h in root.handlers):
        root.setLevel(level)
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler._gatekeeper = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # highdicom narrates every attribute it copies at INFO; keep its warnings only.
    logging.getLogger("highdicom").setLevel(max(level, logging.WARNING))
