"""The pipeline, wired in one place: a completed series → score → segment → the gate decides → export, or worklist.

Stages (each a function in its module below; the Celery tasks in `service.pipeline.tasks` only call them):

=========  ===========================  =================================================  ==============
stage      input (series state)         output                                             queue
=========  ===========================  =================================================  ==============
start      `queued` (ingest sent it)    `scoring`: waits for a score worker                 pipeline_queue
score      `scoring`                    `SeriesScore` (per-slice scores, top residual       score_queue
                                        maps) and `scored`; then **route** at once.
                                        Unreadable: `worklisted` ("unreadable")
route      `scored`                     `segmenting`: every readable series is segmented    (inline)
                                        and the gate decides after. Forward mode (no
                                        segmenter of ours): `ROUTING_RULES` on the
                                        detector's flag and the geometry, `segmenting` or
                                        `worklisted`
segment    `segmenting`                 the segmenter's liver and the gate's decision        segment_queue
                                        (`service.gate`, `Gate.assess`), then by
                                        `ROUTING_RULES`: auto → the liver DICOM-SEG and/or
                                        RT Structure Set under `results/` (`export_format`),
                                        an `Export` row per object, `exporting`; manual →
                                        a draft SEG under `results/` (stored, never sent),
                                        `worklisted` with the decision and its findings;
                                        off-target with `off_target_routing` "withhold" →
                                        `withheld` with its reason. Forward mode: the
                                        series C-STOREd to the external node, `delivered`
                                        or `export_failed` (`forward`)
export     `exporting`                  each object sent (the `deliver_seg` task); once all  export_queue
                                        settled: `delivered` (all delivered) or
                                        `export_failed` (any failed)
contour    a `stored` RTSTRUCT / SEG    each pending `ContourObject` of it matched to its  pipeline_queue
           series (a returned contour)  worklisted CT series, the liver rasterised, a
                                        `PoolEntry`, the CT series `contoured`; or the
                                        object kept with a status and reason
                                        (`service.contours`). Queued by `queue_contours`
=========  ===========================  =================================================  ==============

The modules, in the order a series meets them:

- `starting` — stage *start*;
- `scoring` — stage *score* (then *route*);
- `routing` — stage *route*, and `ROUTING_RULES` with `RouteFacts` and `decide_route`;
- `segmenting` — stage *segment* (internal mode): the gate decides, a draft is kept on the worklist route;
- `auto_route` — the auto route's end of *segment*: the SEG / RT Structure Set, their exports;
- `forwarding` — stage *segment* in forward mode;
- `withholding` — shadow mode's end of the auto route;
- `exporting` — stage *export*, last step (`export_settled`);
- `contouring` — stage *contour* (returned contours);
- `sweeper` — the sweeper (`sweep`);
- `store` — what the stages read and write (the series row, stored files, results folder, worklist);
- `tasks` — the Celery tasks, the worker's models and the listener's jobs (not imported here).

The route is decided by `ROUTING_RULES`, a table: the first rule whose condition holds on the
series' `RouteFacts` — the gate's decision among them — sends it to the worklist (or, for a
series the liver model does not apply to, withholds it) with that reason; when none holds it goes
to the PACS. Changing the route is a change of that table.

The events say which models decided: "routed" (to the worklist), "exporting", "withheld" and
"export_failed" hold the gate's decision (`GateDecision.as_json`) and the gate, segmenter and
detector versions.

Every state change goes through `service.lifecycle.transition` (the lifecycle's one owner), which
checks the declared transitions, changes the row only if it is still in the expected state (so two
workers never both move it), sets `state_changed_at` and writes a `SeriesEvent`. What to queue
next is a `service.celery_app.Next`; the tasks publish it after the stage's commit. The database is the truth: a message may be lost or
delivered twice, a worker may die mid-stage; `sweep` (`sweeper`, run by the listener's assembler thread every
`pipeline_sweep_interval_s`) queues a stage again when its series has stayed in it longer than
`pipeline_stuck_after_s`, and `SeriesScore`'s unique (series, model version) and the SEG's
deterministic SOP Instance UID make a repeated stage harmless.

No patient data (names, ids, birth dates, accession numbers) goes into events, logs or task
arguments here: internal ids, DICOM UIDs, scores and states only.
"""

from service.celery_app import DONE, Next
from service.pipeline.contouring import match_contours, queue_contours
from service.pipeline.exporting import export_settled
from service.pipeline.forwarding import forward
from service.pipeline.routing import (
    OFF_TARGET_REASONS,
    ROUTING_RULES,
    RouteFacts,
    RouteRule,
    decide_route,
    off_target_reason,
    route,
)
from service.pipeline.scoring import score
from service.pipeline.segmenting import segment
from service.pipeline.starting import start
from service.pipeline.store import (
    draft_path,
    instance_paths,
    load_stored_series,
    results_dir,
    save_top_residual_maps,
)
from service.pipeline.sweeper import STAGE_OF_STATE, SweepReport, sweep
from service.pipeline.withholding import withhold

__all__ = [
    "DONE",
    "OFF_TARGET_REASONS",
    "ROUTING_RULES",
    "STAGE_OF_STATE",
    "Next",
    "RouteFacts",
    "RouteRule",
    "SweepReport",
    "decide_route",
    "draft_path",
    "export_settled",
    "forward",
    "instance_paths",
    "load_stored_series",
    "match_contours",
    "off_target_reason",
    "queue_contours",
    "results_dir",
    "route",
    "save_top_residual_maps",
    "score",
    "segment",
    "start",
    "sweep",
    "withhold",
]
