"""Logging setup for every gatekeeper process.

Log lines carry internal ids and DICOM UIDs only — never patient names, ids, birth dates or
accession numbers. Library warnings can quote the attribute values they complain about (highdicom:
`The string "DOE JANE" is unlikely to represent the intended person name ...`), so the ones known
to do that are silenced, every warning goes through the `py.warnings` logger, and a filter there
replaces whatever a warning puts in quotes by `"…"`.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import TextIO

#: Warnings that quote a DICOM attribute value (a person name, an id); silenced wherever raised.
#: highdicom: `The string "<name>" is unlikely to represent the intended person name ...` (caret-less names).
PHI_WARNINGS = (r"(?s)The string .* is unlikely to represent the intended person name",)
_QUOTED = re.compile(r"\"[^\"\n]*\"|'[^'\n]*'")
REDACTED = '"…"'


class RedactQuotedValues(logging.Filter):
    """Replaces every quoted string in a record's message by `"…"` (for `py.warnings`, whose messages
    are library text that may quote attribute values)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _QUOTED.sub(REDACTED, record.getMessage())
        record.args = None
        return True


def silence_phi_warnings() -> None:
    """Route warnings to the `py.warnings` logger with quoted values redacted, and drop the known
    warnings that quote patient data (`PHI_WARNINGS`). Idempotent."""
    for message in PHI_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    logging.captureWarnings(True)
    logger = logging.getLogger("py.warnings")
    if not any(isinstance(f, RedactQuotedValues) for f in logger.filters):
        logger.addFilter(RedactQuotedValues())


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever `sys.stderr` is at the time of the record (tests swap it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ assigns it; the property ignores that
        pass


def configure_logging(level: int = logging.INFO) -> None:
    """Send log records to stderr as `time level logger: message`, once per process; warnings are
    logged too, never with the values they quote (`silence_phi_warnings`)."""
    silence_phi_warnings()
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
