"""Stage *route*, and the routing decision as data: `ROUTING_RULES` on a series' `RouteFacts`.

The first rule whose condition holds on the facts — the gate's decision among them — sends the
series to the worklist (or, for a series the liver model does not apply to, withholds it) with that
reason; when none holds it goes to the PACS. Changing the route is a change of that table, in this
module only. `decide_route` is used by the score stage (an unreadable series), by `route` (forward
mode) and by the segment stage (after the gate's decision).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service import metrics
from service.celery_app import DONE, Next
from service.db.tables import Route, RouteReason, SeriesScore
from service.gate import GateDecision
from service.lifecycle import SeriesState, transition
from service.pipeline.store import series_row, to_worklist
from service.settings import Settings

log = logging.getLogger(__name__)

S = SeriesState


#: Route reasons of a series the liver model does not apply to (no liver in the field of view, the
#: liver only partly covered, not an abdominal CT): `Settings.off_target_routing` says where they go.
#: Values, so that a reason the gate adds is recognised by its name.
OFF_TARGET_REASONS = frozenset({"no_liver", "liver_partial", "not_abdomen"})


@dataclass(frozen=True)
class RouteFacts:
    """What the route is decided on, for one series version.

    Attributes:
        geometry_findings: the ingest geometry check's findings (`Series.geometry_findings`).
        unreadable: why the series could not be read or scored; None when it could.
        flagged: whether the detector's series score is above its threshold; None before scoring.
        gate: the gate's decision after segmentation (`service.gate`); None without one (before
            segmentation, an unreadable series, forward mode where our segmenter does not run).
            With a decision, the gate has weighed the geometry and the detector itself: the rules
            on them apply only without one.
        liver_found: whether the segmenter found at least `min_liver_ml` of liver; None before
            segmentation. A safety net under the gate: an empty SEG is never sent.
        off_target_routing: `Settings.off_target_routing`, "worklist" or "withhold".
    """

    geometry_findings: Sequence[dict[str, Any]] = ()
    unreadable: str | None = None
    flagged: bool | None = None
    gate: GateDecision | None = None
    liver_found: bool | None = None
    off_target_routing: str = "worklist"


@dataclass(frozen=True)
class RouteRule:
    """Send a series to `route` with `reason` when `applies(facts)` holds.

    `reason` is a `RouteReason`, or a function of the facts that gives it (the gate's reason).
    `route` None: withheld — kept with its reason, nothing sent, not on the worklist.
    """

    reason: RouteReason | Callable[[RouteFacts], RouteReason | None]
    applies: Callable[[RouteFacts], bool]
    meaning: str
    route: Route | None = Route.WORKLIST


def _gate_manual(f: RouteFacts) -> bool:
    return f.gate is not None and f.gate.manual


def _gate_reason(f: RouteFacts) -> RouteReason | None:
    return f.gate.reason if f.gate is not None else None


def off_target_reason(f: RouteFacts) -> RouteReason | None:
    """Why the liver model does not apply to the series (a reason in `OFF_TARGET_REASONS`), or None.

    From the gate's reason, then its fired findings (a rule or signal named like the reason), then
    `liver_found` False ("no_liver").
    """
    names: list[str] = []
    if f.gate is not None and f.gate.manual:
        names += [f.gate.reason.value] if f.gate.reason is not None else []
        names += [finding.signal for finding in f.gate.findings if finding.fired]
    if f.liver_found is False:
        names.append(RouteReason.NO_LIVER.value)
    for name in names:
        if name in OFF_TARGET_REASONS and name in {r.value for r in RouteReason}:
            return RouteReason(name)
    return None


#: The routing decision. The first rule that applies sends the series where it says with its reason;
#: when none applies the series is auto-segmented and its SEG sent to the PACS.
ROUTING_RULES: tuple[RouteRule, ...] = (
    RouteRule(
        RouteReason.GEOMETRY,
        lambda f: f.gate is None and bool(f.geometry_findings),
        "no gate decision (unreadable, forward mode): ingest found gaps, mixed orientations, a localizer ...",
    ),
    RouteRule(
        RouteReason.UNREADABLE,
        lambda f: f.unreadable is not None,
        "the series could not be read or scored (one slice, undecodable pixels, not CT ...)",
    ),
    RouteRule(
        RouteReason.ANOMALY,
        lambda f: f.gate is None and f.flagged is True,
        "no gate decision (forward mode): the detector's series score is above the model's threshold",
    ),
    RouteRule(
        off_target_reason,
        lambda f: f.off_target_routing == "withhold" and off_target_reason(f) is not None,
        "the liver model does not apply (no liver in view, liver partly covered, not an abdominal CT) and "
        "off_target_routing is 'withhold': kept with its reason, nothing sent, not on the worklist",
        route=None,
    ),
    RouteRule(
        _gate_reason,
        _gate_manual,
        "the gate (evidence calibrated on normal series, and its rules) says a person must contour it",
    ),
    RouteRule(
        RouteReason.NO_LIVER,
        lambda f: f.liver_found is False,
        "the segmenter found no liver: nothing to deliver (never an empty SEG), a person must look",
    ),
)


def decide_route(facts: RouteFacts) -> tuple[Route | None, RouteReason | None]:
    """(route, reason) of the first rule in `ROUTING_RULES` that applies, else (Route.AUTO, None).

    route `Route.WORKLIST`: manual contouring; None: withheld (an off-target series with
    `off_target_routing` "withhold"). A gate that says manual without a reason gives "anomaly".
    """
    for rule in ROUTING_RULES:
        if rule.applies(facts):
            reason = rule.reason(facts) if callable(rule.reason) else rule.reason
            return rule.route, reason or RouteReason.ANOMALY
    return Route.AUTO, None


# --- stage: route ----------------------------------------------------------------------------------


def route(*, sessions: sessionmaker[Session], settings: Settings, series_id: int, model_version: str) -> Next:
    """Stage *route*: where a scored series goes next.

    Input: state `scored` with a `SeriesScore` of `model_version`. Output, internal mode: `segmenting`
    and the segment stage to queue — every readable series is segmented, and the gate decides its
    route after (`segment`). Forward mode (`segmentation_mode` "forward", our segmenter does not
    run): by `ROUTING_RULES` on the geometry and the detector's flag, `segmenting` (the forward
    stage) or `worklisted` with a `WorklistItem`, one "routed" event.
    """
    with sessions.begin() as session:
        series = series_row(session, series_id)
        if series is None or series.state != S.SCORED.value:
            return DONE
        result = session.scalar(
            select(SeriesScore).where(SeriesScore.series_id == series_id, SeriesScore.model_version == model_version)
        )
        if result is None:
            log.error("series id %s is scored but has no score of model %s", series_id, model_version)
            return DONE
        summary = {
            "score": round(result.score, 4),
            "threshold": round(result.threshold, 4),
            "model_version": model_version,
            "detector_version": model_version,
        }
        if settings.segmentation_mode == "internal":
            moved = transition(
                session=session, series_id=series_id, source=S.SCORED, target=S.SEGMENTING, detail=summary
            )
            if moved:
                log.info("series id %s: segmenting (the gate decides after)", series_id)
            return Next("segment", series_id) if moved else DONE
        facts = RouteFacts(geometry_findings=list(series.geometry_findings or []), flagged=result.flagged)
        chosen, reason = decide_route(facts)
        if chosen == Route.WORKLIST and reason is not None:
            detail = dict(summary)
            if reason == RouteReason.GEOMETRY:
                detail["findings"] = [f.get("code") for f in facts.geometry_findings]
            moved = to_worklist(session=session, series_id=series_id, source=S.SCORED, reason=reason, detail=detail)
            nxt = DONE
        else:
            chosen = Route.AUTO
            moved = transition(
                session=session,
                series_id=series_id,
                source=S.SCORED,
                target=S.SEGMENTING,
                event="routed",
                detail={"route": Route.AUTO.value, **summary},
                values={"route": Route.AUTO.value, "route_reason": None},
            )
            nxt = Next("segment", series_id)
    if not moved:
        return DONE
    if chosen == Route.AUTO:
        metrics.record_route(chosen.value, None)
    log.info("series id %s routed to %s%s", series_id, chosen.value, f" ({reason.value})" if reason else "")
    return nxt
