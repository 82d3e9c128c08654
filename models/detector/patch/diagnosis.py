"""The patch recipe's part of `gatekeeper evaluate detector --diagnose`: on the slice's image grid at
`PATCH_MAP_SIZE`², the input in the liver window, the reconstruction tiled from the patches' G(E(x))
and the residual map tiled from the scorer's own map, both mapped from the body-centred field back
onto the image."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.detector.diagnosis_inputs import Case, Scored, encoder_and_generator, read_case
from models.detector.evaluation.localisation import anomaly_mask_on_grid
from service import imaging
from service.inference import PATCH_MAP_SIZE, PatchDetector

#: The patch recipe's series score: the mean of the top 3 slices within the training range.
SERIES_AGGREGATION = "top3_mean"


def score_case(case: Case, detector: PatchDetector) -> Scored:
    """Run a patch-recipe detector (format 2) on one phantom series; everything on the image grid at
    `PATCH_MAP_SIZE`² (see `models.detector.diagnose`)."""

    ct = read_case(case)
    size, geometry = PATCH_MAP_SIZE, detector.geometry
    liver = next((w for w in detector.meta["preprocessing"]["windows"] if w["name"] == "liver"), None)
    window = imaging.Window(float(liver["center_hu"]), float(liver["width_hu"])) if liver else detector.windows[0]
    channel = detector.windows.index(window) if window in detector.windows else 0
    images, body = imaging.preprocess_slices(ct.hu, size, window)
    positions = detector.positions(ct)
    fields, masks, boxes = imaging.preprocess_patch_series(ct.hu, ct.pixel_spacing_mm, geometry)
    z, slice_index, centres = detector.patch_z_scores(fields, masks, boxes, positions)
    scores = imaging.slice_scores_from_patches(z, slice_index, ct.hu.shape[0])
    scores = np.where(np.isfinite(scores), scores, 0.0)
    encoder, generator = encoder_and_generator(detector.model_dir, detector.meta)
    f, h = geometry.field_px, geometry.patch // 2
    reconstructions = np.zeros_like(images)
    residual_maps = np.zeros_like(images)
    for k in range(ct.hu.shape[0]):
        sel = np.flatnonzero(slice_index == k)
        if not sel.size:
            continue
        hu = np.stack([fields[k, r - h : r + h, c - h : c + h] for r, c in centres[sel]])
        x = np.ascontiguousarray(imaging.window_channels(hu, detector.windows), np.float32)
        cond = np.ascontiguousarray(imaging.patch_conditions(float(positions[k]), centres[sel], boxes[k]), np.float32)
        recon = generator.run(None, {"z": encoder.run(None, {"patches": x, "cond": cond})[0], "cond": cond})[0]
        maps = detector.scorer.run(["residual_map"], {"patches": x, "cond": cond})[0][:, 0]
        total, count = np.zeros((f, f), np.float32), np.zeros((f, f), np.float32)
        peak = np.full((f, f), np.nan, np.float32)
        for (r, c), patch, m in zip(centres[sel], recon[:, channel], maps):
            total[r - h : r + h, c - h : c + h] += patch
            count[r - h : r + h, c - h : c + h] += 1
            view = peak[r - h : r + h, c - h : c + h]
            np.fmax(view, m, out=view)
        field_recon = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        reconstructions[k] = (
            imaging.field_map_to_image(field_recon + 1.0, ct.hu[k], ct.pixel_spacing_mm, geometry, size) - 1.0
        )
        residual_maps[k] = imaging.field_map_to_image(peak, ct.hu[k], ct.pixel_spacing_mm, geometry, size)
    anomaly = anomaly_mask_on_grid(case.seg, ct.sop_instance_uids, size) if case.seg is not None else None
    series_score, _ = imaging.series_score_in_range(scores, positions, detector.position_low, detector.position_high)
    return Scored(
        case=case,
        images=images,
        body=body,
        positions=positions,
        scores=scores,
        reconstructions=reconstructions,
        residual_maps=residual_maps,
        series_score=float(series_score),
        anomaly=anomaly,
    )


def case_scorer(model_dir: Path) -> tuple[Callable[[Case], Scored], str]:
    """The detector in `model_dir` opened once: (score one case, its series aggregation)."""
    detector = PatchDetector(model_dir)
    return (lambda case: score_case(case, detector)), SERIES_AGGREGATION
