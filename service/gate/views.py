"""Test-time views: the segmenter run again on a shifted, zoomed or mirrored copy of the prepared volume.

Their agreement with the main segmentation is the `tta_dice` signal (`pairwise_agreement`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from service.segmentation import Segmenter

#: Test-time views: "shift" moves the image by `SHIFT_FRACTION` of the input size (rows and columns),
#: "zoom" enlarges it by `ZOOM` about the centre, "flip" mirrors it left-right. The shipped segmenter is
#: not mirror-invariant (it learnt that the liver lies on the patient's right: Dice 0.5–0.8 between a
#: normal series and its mirror image), so "flip" is not a default view.
DEFAULT_VIEWS: tuple[str, ...] = ("shift", "zoom")
VIEWS = ("flip", "shift", "zoom")
SHIFT_FRACTION = 0.05
ZOOM = 1.1


def _zoom(volume: np.ndarray, factor: float) -> np.ndarray:
    """Each slice of [k, S, S] enlarged by `factor` about its centre (linear; outside: 0), same shape."""
    size = volume.shape[-1]
    centre = (size - 1) / 2.0
    matrix = np.array([1.0, 1.0 / factor, 1.0 / factor])
    offset = np.array([0.0, centre * (1 - 1 / factor), centre * (1 - 1 / factor)])
    out: np.ndarray = ndimage.affine_transform(volume, matrix, offset=offset, order=1, mode="constant", cval=0.0)
    return out


def view_probabilities(segmenter: Segmenter, volume: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    """The liver probability of each test-time view of the prepared volume, mapped back to the original."""
    out = []
    size = volume.shape[-1]
    shift = max(1, round(SHIFT_FRACTION * size))
    for name in names:
        if name == "flip":
            p, _ = segmenter.probabilities_of_volume(np.ascontiguousarray(volume[:, :, ::-1]))
            out.append(p[:, :, ::-1])
        elif name == "shift":
            moved = np.zeros_like(volume)
            moved[:, shift:, shift:] = volume[:, :-shift, :-shift]
            p, _ = segmenter.probabilities_of_volume(moved)
            back = np.zeros_like(p)
            back[:, :-shift, :-shift] = p[:, shift:, shift:]
            out.append(back)
        elif name == "zoom":
            p, _ = segmenter.probabilities_of_volume(_zoom(volume, ZOOM))
            out.append(_zoom(p, 1.0 / ZOOM))
        else:
            raise ValueError(f"views: unknown view {name!r}; expected one of {VIEWS}")
    return out
