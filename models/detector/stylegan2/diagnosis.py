"""The slice recipe's part of `gatekeeper evaluate detector --diagnose`: its encoder, generator and
scorer on one phantom series, on its own input grid."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from models.detector.diagnosis_inputs import Case, Scored, encoder_and_generator, read_case
from models.detector.evaluation.localisation import anomaly_mask_on_grid
from service import imaging
from service.inference import Detector


def score_case(case: Case, detector: Detector) -> Scored:
    """Run the detector (encoder, generator, scorer) on one phantom series."""
    ct = read_case(case)
    images, body = imaging.preprocess_slices(ct.hu, detector.size, detector.window)
    positions = detector.positions(images, ct.locations_mm)
    scores, maps = detector.score_arrays(images, body, positions)
    encoder, generator = encoder_and_generator(detector.model_dir, detector.meta)
    reconstructions = np.empty_like(images)
    for i in range(0, len(images), detector.batch):
        x = np.ascontiguousarray(images[i : i + detector.batch, None])
        p = np.ascontiguousarray(positions[i : i + detector.batch], np.float32)
        z = encoder.run(None, {"image": x, "position": p})[0]
        reconstructions[i : i + detector.batch] = generator.run(None, {"z": z, "position": p})[0][:, 0]
    anomaly = anomaly_mask_on_grid(case.seg, ct.sop_instance_uids, detector.size) if case.seg is not None else None
    return Scored(
        case=case,
        images=images,
        body=body,
        positions=positions,
        scores=scores,
        reconstructions=reconstructions,
        residual_maps=maps,
        series_score=imaging.aggregate_slice_scores(scores, detector.aggregation),
        anomaly=anomaly,
    )


def case_scorer(model_dir: Path) -> tuple[Callable[[Case], Scored], str]:
    """The detector in `model_dir` opened once: (score one case, its series aggregation)."""
    detector = Detector(model_dir, batch=16)
    return (lambda case: score_case(case, detector)), detector.aggregation
