"""Stage *export*, last step: a series follows the final state of its exports (`delivered` or `export_failed`)."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import Export, ExportState
from service.lifecycle import SeriesState, transition

log = logging.getLogger(__name__)

S = SeriesState


def export_settled(*, sessions: sessionmaker[Session], export_id: int, worker: str | None = None) -> None:
    """Stage *export*, last step: the series of export `export_id` follows the final state of its exports.

    `worker`: the node name of the worker that settled the export (None: the sweeper), for the event.

    A series may have several exports (`export_format` "both": the SEG and the RT Structure Set).
    Input: state `exporting` (or `export_failed`, after an operator's retry). Output: `delivered`
    when the PACS took every one of them; `export_failed` when every one has settled and any failed
    for good. While any is pending: nothing (the last one to settle moves the series).
    """
    with sessions.begin() as session:
        export = session.get(Export, export_id)
        if export is None or export.series_id is None:
            return
        series_id = export.series_id
        exports = session.execute(
            select(Export.id, Export.state, Export.last_status, Export.last_reason)
            .where(Export.series_id == series_id)
            .order_by(Export.id)
        ).all()
        states = {state for _, state, _, _ in exports}
        sources: tuple[SeriesState, ...]
        if states == {ExportState.DELIVERED.value}:
            target, sources = S.DELIVERED, (S.EXPORTING, S.EXPORT_FAILED)
        elif ExportState.PENDING.value not in states:
            target, sources = S.EXPORT_FAILED, (S.EXPORTING,)
        else:
            return
        moved = transition(
            session=session,
            series_id=series_id,
            source=sources,
            target=target,
            detail={
                "exports": [
                    {"export_id": eid, "state": state, "status": status, "reason": reason}
                    for eid, state, status, reason in exports
                ],
                "worker": worker,
            },
        )
    if moved:
        log.info("series id %s: %s (exports %s)", series_id, target.value, ", ".join(str(e[0]) for e in exports))
