"""The series lifecycle, owned here: the states of a series version, which may follow which, and `transition`.

Every change of `Series.state` anywhere in the product — ingest (assembly, queue), the pipeline,
an operator's export retry, a dosimetrist's worklist action — goes through `transition`, which

- refuses a change `ALLOWED_TRANSITIONS` does not declare (`TransitionError`, nothing changed),
- changes the row only if it is still in one of the expected states and is not a superseded
  version (so two processes never both move it, and nobody works on an outdated version),
- sets `state_changed_at` and writes a `SeriesEvent` in the same transaction.

A new series version is created in `INITIAL_STATE` by ingest (`service.ingest.storage`).

```
receiving ─► complete ─► queued ─► scoring ─► scored ─► segmenting ─► exporting ─► delivered
    │            │          ▲  │       │         │           │  │         │  ▲
    ▼            └──────────┼──┘       ▼         ▼           ▼  ▼         ▼  │
  stored                    │     worklisted ◄───┴───────────┘ withheld  export_failed
                            │       ▲    │              (shadow mode; off-target series)
                            │       │    ▼
                            │      claimed ─► done
```

worklisted, claimed, done ─► contoured ⟲ : a returned liver contour was matched (`service.contours`);
a later contour for the same series moves it again (contoured ─► contoured).

No patient data goes into events: internal ids, DICOM UIDs, states, scores and user ids only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from service.db.session import rows_changed
from service.db.tables import Series, SeriesEvent, utc_now

log = logging.getLogger(__name__)


class SeriesState(StrEnum):
    """Where a series version is in its life; stored as a string in `Series.state`."""

    RECEIVING = "receiving"  # instances are arriving; the quiet period has not passed
    COMPLETE = "complete"  # the quiet period passed; the series is not yet handed on
    QUEUED = "queued"  # handed to the pipeline; no worker has taken it yet
    STORED = "stored"  # complete, but not an image series for the pipeline (SEG, RT Structure Set)
    # The pipeline (service/pipeline/): score → segment → the gate decides: the PACS or the worklist.
    SCORING = "scoring"  # a score worker is running the detector on it
    SCORED = "scored"  # scores stored (`SeriesScore`); the route is being decided
    SEGMENTING = "segmenting"  # a worker is running the segmenter and the gate (forward mode: sending it)
    EXPORTING = "exporting"  # the SEG is written and being delivered to the PACS (`Export`)
    DELIVERED = "delivered"  # the PACS accepted the SEG
    EXPORT_FAILED = "export_failed"  # delivery failed permanently; an operator may retry the export
    # Shadow mode (`Settings.mode` "shadow", service/shadow.py): routed auto and segmented, but the
    # contour was kept here and nothing was sent to the PACS or the forward node. Also a series the
    # liver model does not apply to, with `Settings.off_target_routing` "withhold" (route None, its
    # reason in `route_reason`): kept, nothing sent, not on the worklist.
    WITHHELD = "withheld"
    # The worklist (service/web/): a dosimetrist contours the series by hand.
    WORKLISTED = "worklisted"  # on the manual-contouring worklist (`WorklistItem`)
    CLAIMED = "claimed"  # a dosimetrist has claimed the worklist item
    DONE = "done"  # the dosimetrist marked the item done
    # Returned contours (service/contours/): the TPS or PACS sent back a liver contour for it.
    CONTOURED = "contoured"  # a returned contour was matched; the series is in the training pool


S = SeriesState

#: The state a new series version is created in.
INITIAL_STATE = S.RECEIVING

#: Which state may follow which, with who makes the change. Anything else is a programming error.
ALLOWED_TRANSITIONS: dict[SeriesState, frozenset[SeriesState]] = {
    # ingest: the quiet period passed (or an operator forced completion)
    S.RECEIVING: frozenset({S.COMPLETE, S.STORED}),
    # ingest: the message for the pipeline's first stage went to the broker. `scoring` straight from
    # `complete`: a worker took the message before the publisher recorded that it sent it.
    S.COMPLETE: frozenset({S.QUEUED, S.SCORING}),
    # queued again: the message was sent again (broker restarted, message lost)
    S.QUEUED: frozenset({S.QUEUED, S.SCORING}),
    # pipeline
    S.SCORING: frozenset({S.SCORED, S.WORKLISTED}),  # worklisted: unreadable, or stuck too often
    S.SCORED: frozenset({S.SEGMENTING, S.WORKLISTED}),
    # delivered / export_failed straight from segmenting: forward mode, or no PACS configured
    # withheld: shadow mode, the SEG / RT Structure Set (or the forward) not sent; or an off-target
    # series withheld (`off_target_routing` "withhold")
    S.SEGMENTING: frozenset({S.EXPORTING, S.DELIVERED, S.EXPORT_FAILED, S.WORKLISTED, S.WITHHELD}),
    S.EXPORTING: frozenset({S.DELIVERED, S.EXPORT_FAILED}),
    S.EXPORT_FAILED: frozenset({S.EXPORTING, S.DELIVERED}),  # an operator's `exports retry`
    # worklist: claim; release or mark done
    S.WORKLISTED: frozenset({S.CLAIMED, S.CONTOURED}),
    S.CLAIMED: frozenset({S.WORKLISTED, S.DONE, S.CONTOURED}),
    # returned contours: a liver contour for a worklisted series came back (worklisted or claimed:
    # nobody marked the item done first); contoured again: a later contour superseded the first
    S.DONE: frozenset({S.CONTOURED}),
    S.CONTOURED: frozenset({S.CONTOURED}),
}

#: States in which the pipeline still owes the series some work (the pipeline's sweeper watches them).
WORKING_STATES = (S.SCORING, S.SCORED, S.SEGMENTING)
#: States a series ends its automatic journey in.
FINAL_STATES = (S.DELIVERED, S.EXPORT_FAILED, S.WORKLISTED, S.CLAIMED, S.DONE, S.STORED, S.WITHHELD, S.CONTOURED)


class TransitionError(ValueError):
    """A state change that `ALLOWED_TRANSITIONS` does not allow, e.g. 'delivered -> scoring'."""


def check_transition(source: SeriesState | Iterable[SeriesState], target: SeriesState) -> tuple[SeriesState, ...]:
    """The source states as a tuple, after checking each may be followed by `target`.

    Raises:
        TransitionError: a source → target pair that `ALLOWED_TRANSITIONS` does not allow.
    """
    sources = (source,) if isinstance(source, SeriesState) else tuple(source)
    if not sources:
        raise TransitionError(f"series state change to {target.value} names no source state")
    for state in sources:
        if target not in ALLOWED_TRANSITIONS.get(state, frozenset()):
            raise TransitionError(f"series state change {state.value} -> {target.value} is not allowed")
    return sources


def transition(
    *,
    session: Session,
    series_id: int,
    source: SeriesState | Iterable[SeriesState],
    target: SeriesState,
    event: str | None = None,
    detail: dict[str, Any] | None = None,
    values: dict[str, Any] | None = None,
    where: Sequence[ColumnElement[bool]] = (),
) -> bool:
    """Move series version `series_id` from `source` to `target` in `session`'s transaction.

    The row changes only if it is (still) in one of the `source` states, is not superseded, and
    every extra condition in `where` holds; then `state_changed_at` is set and a `SeriesEvent` of
    kind `event` (default: the target state's name) with `detail` (no patient data) is added.
    `values` are further columns to set with it. Returns False, changing nothing, otherwise:
    another process moved it first, the message is a duplicate, or the version was superseded.

    Raises:
        TransitionError: a source → target pair that `ALLOWED_TRANSITIONS` does not allow.
    """
    sources = check_transition(source, target)
    now = utc_now()
    changed = rows_changed(
        session.execute(
            update(Series)
            .where(
                Series.id == series_id,
                Series.state.in_([s.value for s in sources]),
                Series.superseded.is_(False),
                *where,
            )
            .values(state=target.value, state_changed_at=now, **(values or {}))
            .execution_options(synchronize_session=False)
        )
    )
    if changed:
        session.add(SeriesEvent(series_id=series_id, kind=event or target.value, detail=detail or {}, created_at=now))
        log.debug("series id %s: %s -> %s", series_id, "/".join(s.value for s in sources), target.value)
    return bool(changed)
