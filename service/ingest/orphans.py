"""Leftovers of failed stores: what the listener removes from `storage_dir/tmp`, and what it keeps.

`InstanceStore.store` writes each instance to `tmp/<random>.part`, syncs it, renames it into place
inside the database transaction that indexes it, and answers success only after that transaction
has committed. So:

- A file still in `tmp/` was never acknowledged: its store failed (the sender got a failure
  status and sends again) or the process died before answering. The listener deletes such files
  once they have not been touched for `Settings.orphan_tmp_age_s`, at start-up and then every
  `orphan_tmp_age_s`, with a log line counting them. The age keeps it off the files that other
  listener processes sharing the folder are writing right now (a live one is seconds old); if a
  store ever took longer than that, its rename fails and it answers 0xA700, and the sender retries.
- A file renamed into place without its index row (under `dicom/` without an `instance` row, or
  under `quarantine/` without a `quarantined_instance` row) is kept where it is, never deleted or
  moved: it is complete and synced, and it may have been acknowledged (a commit made without
  waiting for its WAL flush, lost in a crash of PostgreSQL or of the machine). In the folder of a
  series version still receiving, the store's own recovery indexes it again
  (`InstanceStore.recover_unindexed_files` at start-up, and before the series is completed). Any
  other such file was never acknowledged (its index transaction failed, and the sender got a
  failure status): nothing reads the storage folder except through the index, so it is invisible
  and harmless, and the sender's retry writes the same path again and indexes it. It costs only its
  disk space.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


def remove_orphaned_temporary_files(tmp_dir: Path, *, older_than_s: float, now: float | None = None) -> int:
    """Delete the regular files in `tmp_dir` not modified for `older_than_s` seconds; return how many.

    `now` is a `time.time()` value (default: the current time). A file that disappears meanwhile
    (its store finished) is skipped; one that cannot be deleted is logged and left.
    """
    cutoff = (time.time() if now is None else now) - older_than_s
    removed = 0
    try:
        entries = list(os.scandir(tmp_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime > cutoff:
                continue
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove orphaned temporary file %s: %s", entry.path, exc)
            continue
        removed += 1
    return removed


class OrphanSweeper:
    """Removes orphaned temporary files: once at construction (start-up), then at most every `older_than_s`.

    Called by the listener's assembler thread each round, as its other sweepers.
    """

    def __init__(self, tmp_dir: Path, *, older_than_s: float) -> None:
        if older_than_s <= 0:
            raise ValueError(f"older_than_s is {older_than_s}; expected > 0 seconds")
        self.tmp_dir = tmp_dir
        self.older_than_s = older_than_s
        removed = remove_orphaned_temporary_files(tmp_dir, older_than_s=older_than_s)
        log.info(
            "start-up: removed %s orphaned temporary file(s) older than %.0f s from %s (never acknowledged)",
            removed,
            older_than_s,
            tmp_dir,
        )
        self._next = time.monotonic() + older_than_s

    def __call__(self, now: dt.datetime | None = None) -> int:
        """One round: sweep if `older_than_s` has passed since the last sweep; return how many were removed."""
        if time.monotonic() < self._next:
            return 0
        self._next = time.monotonic() + self.older_than_s
        removed = remove_orphaned_temporary_files(self.tmp_dir, older_than_s=self.older_than_s)
        if removed:
            log.info("removed %s orphaned temporary file(s) from %s (never acknowledged)", removed, self.tmp_dir)
        return removed
