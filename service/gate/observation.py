"""Measuring one series: segment it, measure everything the signals and rules need, once.

`observe` gives an `Observation` (no calibration needed); `signal_values` turns it into each signal's
series value and per-slice profile against the references fitted on normals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from service.gate.findings import DetectorEvidence
from service.gate.reference import Reference, liver_hu_outside
from service.gate.signals import (
    DEFAULT_BANDS,
    body_composition,
    end_ratio,
    fluid_rim,
    liver_extent_mm,
    liver_hu_histogram,
    metal_pixels,
    pairwise_agreement,
    probability_pieces,
)
from service.gate.views import DEFAULT_VIEWS, view_probabilities

if TYPE_CHECKING:
    from service.dicom_series import CTSeries
    from service.segmentation import Segmentation, Segmenter


@dataclass
class Observation:
    """Everything the signals need from one series, measured once.

    Profiles are per slice (head → feet). `liver_features` are the segmenter's features on the slices of
    its liver (`liver_slices`); `liver_hu_hist` counts eroded-liver voxels per slice in `HU_BINS`.
    """

    num_slices: int
    slice_spacing_mm: float
    gan_score: float = float("nan")
    gan_profile: np.ndarray | None = None
    entropy: float = float("nan")
    entropy_profile: np.ndarray | None = None
    liver_slices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    liver_features: np.ndarray | None = None
    tta_dice: float = float("nan")
    tta_profile: np.ndarray | None = None
    liver_volume_ml: float = 0.0
    liver_extent_mm: float = 0.0
    liver_outside_fraction: float = 0.0
    liver_pieces: int = 0
    metal_profile: np.ndarray | None = None
    liver_hu_hist: np.ndarray | None = None
    fluid_fraction: float = float("nan")
    fluid_profile: np.ndarray | None = None
    body_area_cm2: float = 0.0
    bone_fraction: float = 0.0
    end_ratio: tuple[float, float] = (0.0, 0.0)


def observe(
    *,
    series: CTSeries,
    segmenter: Segmenter,
    detector: DetectorEvidence | None,
    views: Sequence[str] = DEFAULT_VIEWS,
    bands: Mapping[str, Any] | None = None,
) -> tuple[Segmentation, Observation, list[np.ndarray]]:
    """Segment `series` and measure everything the signals and rules need.

    Returns (the main segmentation, the observation, the test-time views' probability maps [m, S, S] of
    the slices from the liver's first to its last slice ± the network's context and 2). Views are skipped
    when the main segmentation finds no liver (nothing to agree on).
    """
    bands = dict(DEFAULT_BANDS, **(bands or {}))
    volume, framing = segmenter.prepare(series)
    probs, features = segmenter.probabilities_of_volume(volume)
    segmentation = segmenter.segmentation_from(series, probs, features, framing)
    k = series.num_slices
    pixel_mm = float(np.mean(framing.spacing_mm))
    obs = Observation(num_slices=k, slice_spacing_mm=series.slice_spacing_mm)
    if detector is not None:
        obs.gan_score = float(detector.score)
        if len(detector.slice_scores) == k:
            obs.gan_profile = np.asarray(detector.slice_scores, np.float64)
    obs.entropy = float(segmentation.entropy)
    obs.entropy_profile = np.asarray(segmentation.slice_entropy, np.float64)
    mask = segmentation.mask
    obs.liver_slices = np.flatnonzero(mask.any(axis=(1, 2)))
    if features is not None and obs.liver_slices.size:
        obs.liver_features = features[obs.liver_slices].astype(np.float32)
    obs.liver_volume_ml = float(segmentation.liver_volume_ml)
    obs.liver_extent_mm = liver_extent_mm(mask, obs.slice_spacing_mm)
    obs.end_ratio = end_ratio(mask)
    above = probs > segmenter.threshold
    obs.liver_outside_fraction, obs.liver_pieces = probability_pieces(above)
    obs.metal_profile = metal_pixels(series.hu, float(bands["metal_hu"])).astype(np.float64)
    hu_small = framing.to_field(series.hu)
    obs.body_area_cm2, obs.bone_fraction = body_composition(hu_small, pixel_mm)
    # Densities in and around the liver on a 3×3 in-plane mean: noise (a low-dose scan) a third as large,
    # while a lesion or a rim of fluid of a centimetre (3–4 pixels here) survives.
    hu_small = ndimage.uniform_filter(hu_small, size=(1, 3, 3))
    extra: list[np.ndarray] = []
    if mask.any():
        liver_small = framing.mask_to_field(mask)
        obs.liver_hu_hist = liver_hu_histogram(hu_small, liver_small)
        obs.fluid_fraction, obs.fluid_profile = fluid_rim(
            hu_small, liver_small, pixel_mm, bands["fluid_hu"], float(bands["fluid_rim_mm"])
        )
        # The views only where the liver is (± the network's context): half the cost on a long series.
        margin = segmenter.input.context_slices + 2
        lo, hi = max(0, int(obs.liver_slices[0]) - margin), min(k, int(obs.liver_slices[-1]) + margin + 1)
        extra = view_probabilities(segmenter, volume[lo:hi], views)
        if extra:
            agreement, part = pairwise_agreement([above[lo:hi]] + [p > segmenter.threshold for p in extra])
            obs.tta_dice, obs.tta_profile = agreement, np.zeros(k)
            obs.tta_profile[lo:hi] = part
    return segmentation, obs, extra


def signal_values(obs: Observation, reference: Reference | None) -> dict[str, tuple[float, np.ndarray | None]]:
    """Each signal's series value and per-slice profile (None where it has none); NaN = not measured."""
    nan = float("nan")
    out: dict[str, tuple[float, np.ndarray | None]] = {}
    out["gan_score"] = (obs.gan_score, None)
    peak = float(np.max(obs.gan_profile)) if obs.gan_profile is not None and obs.gan_profile.size else nan
    out["gan_peak"] = (peak, obs.gan_profile)
    has_liver = obs.liver_slices.size > 0
    entropy_profile = obs.entropy_profile
    out["entropy"] = (obs.entropy if has_liver else nan, entropy_profile)
    maha, maha_profile = nan, None
    if reference is not None and obs.liver_features is not None and has_liver:
        d = reference.mahalanobis(obs.liver_features)
        maha = float(d.mean())
        maha_profile = np.zeros(obs.num_slices)
        maha_profile[obs.liver_slices] = d
    out["mahalanobis"] = (maha, maha_profile)
    out["tta_dice"] = (obs.tta_dice, obs.tta_profile)
    out["liver_volume"] = (obs.liver_volume_ml if has_liver else nan, None)
    out["liver_extent"] = (obs.liver_extent_mm if has_liver else nan, None)
    out["liver_pieces"] = (obs.liver_outside_fraction if has_liver else nan, None)
    metal = float(obs.metal_profile.sum()) if obs.metal_profile is not None else nan
    out["metal"] = (metal, obs.metal_profile)
    if reference is not None:
        out["liver_hu"] = liver_hu_outside(obs.liver_hu_hist, reference.liver_hu_band)
    else:
        out["liver_hu"] = (nan, None)
    out["fluid_border"] = (obs.fluid_fraction, obs.fluid_profile)
    return out
