"""Stage *segment* in forward mode: the series C-STOREd to the external auto-segmentation node."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from service import metrics
from service.celery_app import DONE, Next
from service.db.tables import RouteReason, SeriesEvent, utc_now
from service.lifecycle import SeriesState, transition
from service.pipeline.store import instance_paths, series_row, to_worklist
from service.pipeline.withholding import withhold
from service.settings import Settings

log = logging.getLogger(__name__)

S = SeriesState


def forward(*, sessions: sessionmaker[Session], settings: Settings, series_id: int) -> Next:
    """Stage *segment* in forward mode: send the series to the external auto-segmentation node.

    Input: state `segmenting`. Every stored instance of the series version is sent by C-STORE over
    one association to `forward_ae_title` at `forward_host`:`forward_port`
    (`service.pacs_export.send_files`); the node segments and delivers its results itself. Output:

    - every instance stored (warnings included): `delivered`, event "forwarded" with the
      destination and the number of instances;
    - a permanent failure (e.g. the node does not know our AE title, 0xA9xx): `export_failed`
      with the reason;
    - a transient failure (node down or busy, timeout, 0xA7xx): nothing changes but a
      "forward_failed" event. Retried by the sweeper, as every stage is: it queues the stage again
      after `pipeline_stuck_after_s`, and after `pipeline_max_requeues` re-queues sends the
      series to the worklist (event "gave_up") so that a person segments it. No Celery retry.

    Shadow mode: nothing is sent; the series ends `withheld` (no shadow review: there is no
    contour to review). No stored instances: `worklisted` ("unreadable"). There is no `Export` row, so `gatekeeper
    exports retry` does not apply. A repeat after a crash sends the instances again with their
    own SOP Instance UIDs, which a DICOM node stores as the same objects.
    """
    from service.dicom_send import Outcome, forward_destination, send_files

    with sessions() as session:
        series = series_row(session, series_id)
        if series is None:
            return DONE
        if series.superseded or series.state != S.SEGMENTING.value:
            log.info("series id %s is %s; nothing to forward", series_id, series.state)
            return DONE
        series_instance_uid = series.series_instance_uid
        paths = sorted(instance_paths(session=session, storage_dir=settings.storage_dir, series_id=series_id).values())
    if not paths:
        with sessions.begin() as session:
            to_worklist(
                session=session,
                series_id=series_id,
                source=S.SEGMENTING,
                reason=RouteReason.UNREADABLE,
                detail={"problem": "no stored instances"},
                event="rerouted",
            )
        return DONE
    if settings.mode == "shadow":
        withhold(
            sessions=sessions,
            settings=settings,
            series_id=series_id,
            series_instance_uid=series_instance_uid,
            review=False,  # no contour to review: the external node never saw the series
            detail={"forward": "not sent", "instances": len(paths)},
        )
        return DONE
    destination = forward_destination(settings)
    result = send_files(paths=paths, destination=destination, settings=settings)
    metrics.record_stage("forward", result.duration_s)
    detail = {"destination": result.destination, "instances": len(paths), "duration_s": result.duration_s}
    with sessions.begin() as session:
        if result.outcome == Outcome.DELIVERED:
            moved = transition(
                session=session,
                series_id=series_id,
                source=S.SEGMENTING,
                target=S.DELIVERED,
                event="forwarded",
                detail={**detail, "reason": result.reason},
            )
        elif result.outcome == Outcome.PERMANENT:
            moved = transition(
                session=session,
                series_id=series_id,
                source=S.SEGMENTING,
                target=S.EXPORT_FAILED,
                detail={**detail, "reason": result.reason},
            )
        else:
            moved = False
            session.add(
                SeriesEvent(
                    series_id=series_id,
                    kind="forward_failed",
                    created_at=utc_now(),
                    detail={**detail, "reason": result.reason},
                )
            )
    if result.outcome == Outcome.TRANSIENT:
        log.warning(
            "series id %s: forward to %s failed, the sweeper will retry: %s", series_id, destination, result.reason
        )
    elif moved and result.outcome == Outcome.DELIVERED:
        log.info("series id %s: %d instances forwarded to %s", series_id, len(paths), destination)
    elif moved:
        log.error("series id %s: forward to %s failed for good: %s", series_id, destination, result.reason)
    return DONE
