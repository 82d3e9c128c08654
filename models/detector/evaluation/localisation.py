"""Localisation: the injected anomaly's mask on a method's map grid, and whether the evidence peak hits it.

On the highest-scoring affected slice, the argmax of the evidence map smoothed with a Gaussian
(σ = `LOCALISATION_SIGMA_PX`), searched inside the body mask, must lie in the anomaly mask dilated
by `LOCALISATION_DILATION_PX` ("hit"); "chance" is the fraction of the body inside that dilated mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from service import imaging

#: Localisation: Gaussian smoothing of the evidence map and dilation of the mask, in map pixels.
LOCALISATION_SIGMA_PX = 1.0
LOCALISATION_DILATION_PX = 2


def anomaly_mask_on_grid(seg_path: Path, sop_instance_uids: tuple[str, ...], size: int) -> np.ndarray:
    """The injected anomaly's mask [k, size, size] (bool) in the series' slice order, on the model grid.

    Each slice of the DICOM-SEG is resized like the image (`imaging.resize`: area average when
    shrinking) and a model pixel counts as anomalous when any part of it was.

    Raises:
        OSError, ValueError: the SEG cannot be read or does not reference these slices.
    """
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    mask = (
        seg.get_pixels_by_source_instance(
            source_sop_instance_uids=list(sop_instance_uids), segment_numbers=[1], assert_missing_frames_are_empty=True
        )[..., 0]
        > 0
    )
    out = np.zeros((mask.shape[0], size, size), bool)
    for i in np.flatnonzero(mask.any(axis=(1, 2))):
        out[i] = imaging.resize(mask[i].astype(np.float32), (size, size)) > 1e-3
    return out


def _peak_hit(residual: np.ndarray, anomaly: np.ndarray, body: np.ndarray) -> tuple[bool, float, tuple[int, int]]:
    """(peak of the smoothed map inside the body lies in the dilated mask, chance, peak) on one slice."""
    smooth = ndimage.gaussian_filter(residual.astype(np.float64), LOCALISATION_SIGMA_PX)
    inside = body if body.any() else np.ones_like(body)
    smooth[~inside] = -np.inf
    r, c = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    region = ndimage.binary_dilation(anomaly, structure=np.ones((3, 3), bool), iterations=LOCALISATION_DILATION_PX)
    return bool(region[r, c]), float((region & inside).sum() / inside.sum()), (int(r), int(c))


def localise(
    slice_scores: np.ndarray, residual_maps: np.ndarray, anomaly: np.ndarray, body: np.ndarray
) -> dict[str, Any] | None:
    """Does the top evidence region of the highest-scoring affected slice hit the anomaly?

    `slice_scores` [k], `residual_maps`, `anomaly` and `body` [k, S, S] on the map grid. Returns
    {"slice", "hit", "chance", "argmax", "slices_affected", "slices_hit"} (see the module docstring;
    the last two count every affected slice), or None when no slice is affected.
    """
    affected = np.flatnonzero(anomaly.any(axis=(1, 2)))
    if affected.size == 0:
        return None
    t = int(affected[np.argmax(np.asarray(slice_scores)[affected])])
    hit, chance, argmax = _peak_hit(residual_maps[t], anomaly[t], body[t])
    slices_hit = sum(_peak_hit(residual_maps[i], anomaly[i], body[i])[0] for i in affected)
    return {
        "slice": t,
        "hit": hit,
        "chance": chance,
        "argmax": argmax,
        "slices_affected": int(affected.size),
        "slices_hit": int(slices_hit),
    }
