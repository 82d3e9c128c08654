"""The signals and what they measure on arrays: each function one measurement, no calibration needed.

`SIGNALS` names the calibrated evidence in the order findings list it; the functions below measure the
raw quantities behind it on a series' HU values, the segmenter's masks and probabilities (`observe`
in `service.gate.observation` calls them on one series).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from service import imaging

#: The calibrated signals, in the order findings list them.
SIGNALS: tuple[str, ...] = (
    "gan_score",
    "gan_peak",
    "entropy",
    "mahalanobis",
    "tta_dice",
    "liver_volume",
    "liver_extent",
    "liver_pieces",
    "metal",
    "liver_hu",
    "fluid_border",
)
#: Physical bands (not fitted; `calibrate` writes them into gate.json `bands`): metal above `metal_hu`,
#: fluid between `fluid_hu`, in a rim `fluid_rim_mm` wide around the liver.
DEFAULT_BANDS: dict[str, Any] = {"metal_hu": 2000.0, "fluid_hu": [-10.0, 30.0], "fluid_rim_mm": 10.0}
HU_BINS = np.arange(-300.0, 505.0, 5.0)  # liver HU histograms: 5 HU bins from −300 to 500 (+ under/overflow)
BONE_HU = 300.0
BODY_HU = -500.0


def metal_pixels(hu: np.ndarray, metal_hu: float) -> np.ndarray:
    """Pixels above `metal_hu` on each slice of `hu` [k, rows, cols] (int64 [k])."""
    counts: np.ndarray = (hu > metal_hu).sum(axis=(1, 2)).astype(np.int64)
    return counts


def pairwise_agreement(masks: Sequence[np.ndarray]) -> tuple[float, np.ndarray]:
    """(smallest pairwise Dice over the views, per-slice disagreement) of bool masks [k, S, S].

    A slice's disagreement is its largest pairwise count of pixels in one view but not the other, as a
    share of the first view's largest liver cross-section (so that small slices at the liver's ends do
    not look unstable for a few pixels). With fewer than two views: (NaN, zeros).
    """
    k = masks[0].shape[0]
    if len(masks) < 2:
        return float("nan"), np.zeros(k)
    largest = max(int(masks[0].sum(axis=(1, 2)).max()), 1)
    worst, profile = 1.0, np.zeros(k)
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            a, b = masks[i], masks[j]
            total = int(a.sum()) + int(b.sum())
            d = 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
            worst = min(worst, d)
            profile = np.maximum(profile, np.logical_xor(a, b).sum(axis=(1, 2)) / largest)
    return worst, profile


def probability_pieces(probability_mask: np.ndarray) -> tuple[float, int]:
    """(share of the thresholded probability outside its largest 3-D piece, pieces ≥ 1 % of it)."""
    labels, n = ndimage.label(probability_mask, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return 0.0, 0
    sizes = np.bincount(labels.ravel())[1:]
    total = int(sizes.sum())
    return 1.0 - int(sizes.max()) / total, int((sizes >= 0.01 * total).sum())


def liver_extent_mm(mask: np.ndarray, slice_spacing_mm: float) -> float:
    """Cranio-caudal extent of a mask [k, rows, cols]: first to last slice with liver, in mm."""
    idx = np.flatnonzero(mask.any(axis=(1, 2)))
    return 0.0 if idx.size == 0 else float((idx[-1] - idx[0] + 1) * slice_spacing_mm)


def end_ratio(mask: np.ndarray) -> tuple[float, float]:
    """The liver's area on the first and on the last slice, each as a share of its largest cross-section."""
    areas = mask.sum(axis=(1, 2)).astype(np.float64)
    top = float(areas.max()) if areas.size else 0.0
    if top <= 0:
        return 0.0, 0.0
    return float(areas[0] / top), float(areas[-1] / top)


def body_composition(hu_small: np.ndarray, pixel_mm: float) -> tuple[float, float]:
    """(median body cross-section in cm², median share of the body above `BONE_HU`) over slices with a body.

    `hu_small` is HU [k, S, S] at `pixel_mm` per pixel. The body is `imaging.body_mask` at −500 HU (the
    largest region, holes filled): a head is ~150–250 cm² and one fifth bone, a thigh less, an adult
    abdomen 450–1,000 cm² with a few per cent of bone. (0, 0) when no slice holds a body.
    """
    areas, bone = [], []
    for s in hu_small:
        body = imaging.body_mask(s, BODY_HU)
        n = int(body.sum())
        if n < 20:
            continue
        areas.append(n * pixel_mm**2 / 100.0)
        bone.append(float((s[body] > BONE_HU).mean()))
    if not areas:
        return 0.0, 0.0
    return float(np.median(areas)), float(np.median(bone))


def liver_hu_histogram(hu_small: np.ndarray, liver_small: np.ndarray, erode: int = 2) -> np.ndarray:
    """Counts [k, len(HU_BINS) + 1] of liver voxels per slice, the liver eroded by `erode` pixels in-plane
    (its border mixes with its surroundings); first/last bins: under/overflow."""
    cross = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool)
    core = ndimage.binary_erosion(liver_small, structure=cross, iterations=erode)
    out = np.zeros((hu_small.shape[0], len(HU_BINS) + 1), np.int32)
    for i in np.flatnonzero(core.any(axis=(1, 2))):
        out[i] = np.bincount(np.searchsorted(HU_BINS, hu_small[i][core[i]]), minlength=len(HU_BINS) + 1)
    return out


def fluid_rim(
    hu_small: np.ndarray, liver_small: np.ndarray, pixel_mm: float, band: Sequence[float], rim_mm: float
) -> tuple[float, np.ndarray]:
    """(share of the rim at fluid density, per-slice share) — the rim: `rim_mm` wide, from 2 pixels outside the
    liver (the densities are 3×3 means: the first ring mixes with the liver), in the body.

    Per slice in 2-D, at the network's size; slices without liver have 0.
    """
    k = hu_small.shape[0]
    profile = np.zeros(k)
    if not liver_small.any():
        return float("nan"), profile
    steps = max(1, round(rim_mm / max(pixel_mm, 1e-3)))
    cross = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool)
    grown = ndimage.binary_dilation(liver_small, structure=cross, iterations=steps + 2)
    near = ndimage.binary_dilation(liver_small, structure=cross, iterations=2)
    body = hu_small > BODY_HU
    rim = grown & ~near & body  # from 2 pixels out: the 3×3 mean mixes the liver into the first ring
    fluid = rim & (hu_small >= band[0]) & (hu_small <= band[1])
    rim_n, fluid_n = rim.sum(axis=(1, 2)), fluid.sum(axis=(1, 2))
    has = rim_n > 0
    profile[has] = fluid_n[has] / rim_n[has]
    total = int(rim_n.sum())
    return (float(fluid_n.sum() / total) if total else float("nan")), profile
