"""Returned contours and the training pool: what a person contoured comes back and teaches the models.

When the treatment planning system or the PACS sends back an RT Structure Set or a Segmentation,
the listener stores it like any instance and completes its series into state `stored` (nothing
more happens inside C-STORE). The listener's assembler round then gives every such instance a
`ContourObject` row (status `pending`) and queues the pipeline's *contour* stage for its series
(`service.pipeline.queue_contours`, `service.pipeline.match_contours`), which comes here:

1. **Match** (`find_contoured_series`): the CT series the object refers to — by its referenced
   SeriesInstanceUID (RTSTRUCT: Referenced Frame of Reference → RT Referenced Study → RT Referenced
   Series; SEG: ReferencedSeriesSequence), else by the series holding its referenced SOP
   instances, else by its Frame of Reference when exactly one worklisted series has it. The newest
   version we hold counts; it must be on the worklist (`worklisted`, `claimed`, `done`) or already
   `contoured`.
2. **Find the liver** (`liver_structure`): the first name of `Settings.liver_structure_names`
   (compared without letter case and surrounding blanks) among the ROI names (RTSTRUCT) or segment
   labels (SEG); a SEG segment of type SCT 10200004 (Liver) also counts.
3. **Rasterise** onto the CT grid: rt-utils for RT Structure Sets (`rasterise_rtstruct`; contours
   without a Contour Image Sequence are placed on the slice whose plane holds them), highdicom for
   Segmentations (`rasterise_seg`). The mask is bool [slice, row, column] in volume order.
4. **Pool**: the mask file, a `PoolEntry`, the series and its worklist item `contoured` (through
   `service.lifecycle.transition`). A later contour for the same CT series supersedes the earlier
   one: both rows are kept, the earlier marked `superseded` (contour and pool entry).

Objects that cannot be used are kept with a status and a reason (`ContourStatus`: unmatched,
no_liver, empty, unreadable) and never crash a worker; `gatekeeper contours list` shows them.

The package, one module per step: `matching` (1), `reading` (2, 3; also the segmenter's training
data reads liver contours through it), `registration` (the assembler round's rows and queue
claims), `stage` (the contour stage, 4), `pool` (mask files, listings; the `pool_entry` table) and
`export` (`gatekeeper pool export`, the layout the segmenter's trainer reads).

No patient data in logs or events here: ids, UIDs, states, ROI names and counts only.
"""

from service.contours.common import ContourProblem
from service.contours.export import POOL_EXPORT_VERSION, build_pool_seg, export_pool
from service.contours.matching import (
    CONTOUR_SOP_CLASSES,
    CONTOURABLE_STATES,
    ContourReferences,
    contour_references,
    find_contoured_series,
)
from service.contours.pool import (
    POOL_DIR,
    PoolMask,
    contour_listing,
    load_pool_mask,
    mask_path,
    pool_entries,
    pool_listing,
)
from service.contours.reading import (
    LIVER_SCT_CODE,
    ct_headers,
    liver_structure,
    normalise_structure_name,
    rasterise,
    rasterise_rtstruct,
    rasterise_seg,
    read_liver_mask,
)
from service.contours.registration import (
    claim_due_contour_series,
    register_received_contours,
    release_contour_claim,
)
from service.contours.stage import process_contour, process_contour_series

__all__ = [
    "CONTOURABLE_STATES",
    "CONTOUR_SOP_CLASSES",
    "LIVER_SCT_CODE",
    "POOL_DIR",
    "POOL_EXPORT_VERSION",
    "ContourProblem",
    "ContourReferences",
    "PoolMask",
    "build_pool_seg",
    "claim_due_contour_series",
    "contour_listing",
    "contour_references",
    "ct_headers",
    "export_pool",
    "find_contoured_series",
    "liver_structure",
    "load_pool_mask",
    "mask_path",
    "normalise_structure_name",
    "pool_entries",
    "pool_listing",
    "process_contour",
    "process_contour_series",
    "rasterise",
    "rasterise_rtstruct",
    "rasterise_seg",
    "read_liver_mask",
    "register_received_contours",
    "release_contour_claim",
]
