"""The gate's decision: every piece of evidence on one series, each calibrated on normals, fused into one route.

This module owns the fusion (issue 15). The pipeline segments every series, then asks the gate:

    gate = Gate.load(folder)                       # gate.json (+ the files it names), or Gate.rules_only()
    assessment = gate.assess(series=ct, segmenter=segmenter, detector=evidence, geometry_findings=findings)
    assessment.segmentation                        # the segmenter's result (sent, or kept as a draft)
    assessment.decision.manual                     # True: worklist; False: the SEG goes to the PACS
    assessment.decision.findings                   # every signal, its value, threshold, slices, plain words

Evidence (`SIGNALS`; each measured by `observe` + `signal_values`, one number per series plus, where it has
one, a profile along the slices that says where):

* `gan_score`, `gan_peak` — the GAN detector's series score and its largest slice score;
* `entropy` — the segmenter's mean binary entropy around its liver;
* `mahalanobis` — mean Mahalanobis distance of the segmenter's bottleneck features on the liver slices to
  the normal series' liver slices (mean and shrunk-covariance precision in the reference `.npz`);
* `tta_dice` — the smallest pairwise Dice between the segmentation and test-time views of the same series
  (left-right flip, a small shift: each view is one more pass of the segmenter at its 128² input);
* `liver_volume`, `liver_extent` — the liver's volume (ml) and cranio-caudal extent (mm), two-sided;
* `liver_pieces` — the share of the thresholded probability outside its largest 3-D connected piece;
* `metal` — pixels above `bands.metal_hu` (2,000 HU; normal bodies stay below ~1,355 HU; stents
  2,400–2,800, hip prostheses more);
* `liver_hu` — the share of (eroded) liver voxels outside the normal liver's HU band (3×3 mean);
* `fluid_border` — the share of a 10 mm rim around the liver, inside the body, at fluid density.

Off-target rules (plain thresholds in gate.json `rules`, each its own `RouteReason`): not an abdominal
CT (the body's median cross-section is small, as in a head or a limb, or bone makes up too much of it,
as in a head), no liver in the field of view, a liver cut by the first or the last slice. The rules that
existed stay: ingest geometry findings, and (only in `Gate.rules_only()` unless gate.json asks for it)
the detector's own flag.

Fusion (`fuse`): each signal's value is transformed (log for positive, skewed ones) and turned into a
z-score against the normal validation series (median, and the larger of 1.4826·MAD and the standard
deviation as the scale, with a floor so that a signal constant on normals — metal — does not fire on noise); its tail probability is the Gaussian
upper tail (both tails for volume and extent). The fused statistic is −log10 of the smallest tail
probability across the signals. Why: the pieces of evidence see different failures (metal sees a stent,
fluid_border sees ascites, tta_dice sees the segmenter's instability), so an OR over calibrated signals
keeps each one's sensitivity, where an average would dilute a single strong signal among many quiet
ones. The cut is Bonferroni's −log10(false_flag_rate / number of signals), raised to the empirical
(1 − false_flag_rate) quantile of the leave-one-out fused statistic on the calibration normals when
that is higher (the Gaussian tails are an approximation; the normals have the last word). Nothing is
fitted on labelled failures. The calibration (`calibrate`) and the thresholds live in a versioned
`gate.json` (`models/gate/default/gate.json`, written by `gatekeeper calibrate gate`).

No patient data here: values, slice indices and UIDs only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage, special

from service import imaging
from service.db.tables import RouteReason

if TYPE_CHECKING:
    from service.dicom_series import CTSeries
    from service.segmentation import Segmentation, Segmenter

log = logging.getLogger(__name__)

GATE_FORMAT = 1
KIND = "ct-gatekeeper-gate"
REFERENCE_FILE = "reference.npz"

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
#: How each signal is made comparable: (transform, tails, smallest scale in transformed units).
#: `log1m` is log(1 − x): a Dice near 1 is usual, so a low Dice is the upper tail.
SIGNAL_MODEL: dict[str, tuple[str, str, float]] = {
    "gan_score": ("log1p", "upper", 0.1),  # heavy-tailed on normals (0.2–50 on the 256² phantom)
    "gan_peak": ("log1p", "upper", 0.1),
    "entropy": ("log", "upper", 0.05),
    "mahalanobis": ("log", "upper", 0.02),
    "tta_dice": ("log1m", "upper", 0.1),
    "liver_volume": ("log", "both", 0.05),
    "liver_extent": ("identity", "both", 5.0),
    "liver_pieces": ("identity", "upper", 0.005),
    "metal": ("log1p", "upper", 1.0),
    "liver_hu": ("identity", "upper", 0.01),
    "fluid_border": ("identity", "upper", 0.01),
}
TRANSFORMS: dict[str, tuple[Callable[[float], float], Callable[[float], float]]] = {
    "identity": (lambda x: x, lambda y: y),
    "log": (lambda x: math.log(max(x, 1e-9)), math.exp),
    "log1p": (lambda x: math.log1p(max(x, 0.0)), math.expm1),
    "log1m": (lambda x: math.log(max(1.0 - x, 1e-4)), lambda y: 1.0 - math.exp(y)),
}
DECREASING = {"log1m"}  # transforms under which a *smaller* value is more unusual
TAILS = ("upper", "both")

#: Defaults written by `calibrate` (physical bands and plain rules, not fitted).
DEFAULT_BANDS: dict[str, Any] = {"metal_hu": 2000.0, "fluid_hu": [-10.0, 30.0], "fluid_rim_mm": 10.0}
DEFAULT_RULES: dict[str, Any] = {
    "detector_flag": False,  # the GAN score is one of the fused signals; its own flag is not a rule
    "not_abdomen": {"min_body_area_cm2": 200.0, "max_bone_fraction": 0.15},
    "liver_partial": {"max_end_ratio": 0.3},
}
#: Test-time views: "shift" moves the image by `SHIFT_FRACTION` of the input size (rows and columns),
#: "zoom" enlarges it by `ZOOM` about the centre, "flip" mirrors it left-right. The shipped segmenter is
#: not mirror-invariant (it learnt that the liver lies on the patient's right: Dice 0.5–0.8 between a
#: normal series and its mirror image), so "flip" is not a default view.
DEFAULT_VIEWS: tuple[str, ...] = ("shift", "zoom")
VIEWS = ("flip", "shift", "zoom")
SHIFT_FRACTION = 0.05
ZOOM = 1.1
HU_BINS = np.arange(-300.0, 505.0, 5.0)  # liver HU histograms: 5 HU bins from −300 to 500 (+ under/overflow)
BONE_HU = 300.0
BODY_HU = -500.0
SLICE_QUANTILE = 99.0  # a slice is "where" a signal is when its profile exceeds the normals' 99th percentile


# --- what the pipeline and the web app read ------------------------------------------------------------


@dataclass(frozen=True)
class DetectorEvidence:
    """What the GAN detector said about the series (from its `SeriesScore`)."""

    score: float
    threshold: float
    slice_scores: tuple[float, ...] = ()  # per slice, in the series' slice order (head → feet)
    model_version: str = ""


@dataclass(frozen=True)
class Finding:
    """One piece of evidence on one series.

    Attributes:
        signal: its name (a key of `SIGNALS`, or a rule's name such as "geometry", "no_liver").
        value: the measured value (units in `words`).
        threshold: the value above which it fires (calibrated on normals), NaN for plain rules; for a
            signal where a low value is unusual (`tta_dice`) or both tails are (`liver_volume`), the value
            beyond which it fires on the side the value lies (see `words`).
        fired: whether it sends the series to manual contouring on its own or through the fusion.
        slices: first and last slice index (0-based, head → feet) where it is strongest; None if global.
        words: one sentence a dosimetrist reads, e.g. "segmentations disagree on slices 40–52
            (pairwise Dice 0.81; normal ≥ 0.93)".
        p_value: the signal's tail probability among normal series (NaN for rules and unmeasured signals).
    """

    signal: str
    value: float
    threshold: float
    fired: bool
    slices: tuple[int, int] | None
    words: str
    p_value: float = float("nan")

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["value"] = _finite_or_none(self.value)
        out["threshold"] = _finite_or_none(self.threshold)
        out["p_value"] = _finite_or_none(self.p_value, digits=12)
        out["slices"] = list(self.slices) if self.slices is not None else None
        return out


@dataclass(frozen=True)
class GateDecision:
    """Where the series goes and why.

    Attributes:
        manual: True → the worklist (the segmentation is kept as a draft, not sent).
        reason: the route reason when manual (the first rule or signal that fired), else None.
        findings: every signal computed, fired or not, in `SIGNALS` order then the rules.
        fused: the fused statistic (see gate.json `fusion`); None for a rules-only gate.
        fused_threshold: its threshold; None for a rules-only gate.
        gate_version: the gate.json version ("rules-only" without one).
    """

    manual: bool
    reason: RouteReason | None
    findings: tuple[Finding, ...]
    fused: float | None
    fused_threshold: float | None
    gate_version: str

    def fired(self) -> list[Finding]:
        return [f for f in self.findings if f.fired]

    def as_json(self) -> dict[str, Any]:
        return {
            "manual": self.manual,
            "reason": self.reason.value if self.reason is not None else None,
            "fused": _finite_or_none(self.fused),
            "fused_threshold": _finite_or_none(self.fused_threshold),
            "gate_version": self.gate_version,
            "findings": [f.as_json() for f in self.findings],
        }


@dataclass
class Assessment:
    """The segmenter's result on a series and the gate's decision on it."""

    segmentation: Segmentation
    decision: GateDecision
    extra_segmentations: list[Segmentation] = field(default_factory=list)  # test-time views, for the evidence
    observation: Observation | None = None  # the raw measurements (for calibration and evaluation)


def _finite_or_none(x: float | None, digits: int = 6) -> float | None:
    if x is None or not np.isfinite(x):
        return None
    return round(float(x), digits)


# --- measuring: one series → an Observation (no calibration needed) ----------------------------------


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


def _zoom(volume: np.ndarray, factor: float) -> np.ndarray:
    """Each slice of [k, S, S] enlarged by `factor` about its centre (linear; outside: 0), same shape."""
    size = volume.shape[-1]
    centre = (size - 1) / 2.0
    matrix = np.array([1.0, 1.0 / factor, 1.0 / factor])
    offset = np.array([0.0, centre * (1 - 1 / factor), centre * (1 - 1 / factor)])
    out: np.ndarray = ndimage.affine_transform(volume, matrix, offset=offset, order=1, mode="constant", cval=0.0)
    return out


def _views(segmenter: Segmenter, volume: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
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
        extra = _views(segmenter, volume[lo:hi], views)
        if extra:
            agreement, part = pairwise_agreement([above[lo:hi]] + [p > segmenter.threshold for p in extra])
            obs.tta_dice, obs.tta_profile = agreement, np.zeros(k)
            obs.tta_profile[lo:hi] = part
    return segmentation, obs, extra


# --- references fitted on normals: Mahalanobis and the liver's HU band ---------------------------------


@dataclass
class Reference:
    """What signals compare against, fitted on the calibration normals (stored in the reference .npz)."""

    mahalanobis_mean: np.ndarray
    mahalanobis_precision: np.ndarray
    liver_hu_band: tuple[float, float]

    def mahalanobis(self, features: np.ndarray) -> np.ndarray:
        d = features.astype(np.float64) - self.mahalanobis_mean
        out: np.ndarray = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.mahalanobis_precision, d), 0.0))
        return out


def fit_mahalanobis(features: np.ndarray, shrink: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(mean, precision) of features [n, F] with the covariance shrunk towards its mean variance.

    Raises:
        ValueError: fewer than 2 rows.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [n >= 2, F], got {features.shape}.")
    f = features.astype(np.float64)
    mean = f.mean(0)
    cov = np.cov(f, rowvar=False)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    return mean, np.linalg.inv(cov)


def hu_band(hist: np.ndarray, low_q: float = 0.005, high_q: float = 0.995) -> tuple[float, float]:
    """The HU band holding the central 99 % of the voxels of a histogram over `HU_BINS` (+ under/overflow)."""
    total = hist.sum()
    if total == 0:
        raise ValueError("liver HU histogram is empty: no normal series had a liver")
    cum = np.cumsum(hist) / total
    edges = np.concatenate([[HU_BINS[0] - 5.0], HU_BINS])  # left edge of each bin (underflow: below −300)
    lo = float(edges[int(np.searchsorted(cum, low_q))])
    hi = float(edges[min(int(np.searchsorted(cum, high_q)) + 1, len(edges) - 1)])
    return lo, hi


def liver_hu_outside(hist: np.ndarray | None, band: tuple[float, float]) -> tuple[float, np.ndarray | None]:
    """(share of eroded-liver voxels outside `band`, per-slice share) from per-slice histograms."""
    if hist is None or hist.sum() == 0:
        return float("nan"), None
    edges = np.concatenate([[-np.inf], HU_BINS])  # bin b holds [edges[b], edges[b+1])
    right = np.concatenate([HU_BINS, [np.inf]])
    inside = (edges >= band[0]) & (right <= band[1])
    per = hist.sum(axis=1)
    out = (hist[:, ~inside]).sum(axis=1)
    profile = np.where(per > 0, out / np.maximum(per, 1), 0.0)
    return float(out.sum() / per.sum()), profile


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


# --- calibration and fusion --------------------------------------------------------------------------


@dataclass(frozen=True)
class SignalSpec:
    """One signal's calibration (gate.json `signals.NAME`).

    The tail probability of a value x: z = (T(x) − center) / scale, upper tail (both tails when `tails`
    is "both") of a standard normal. `threshold` (and `threshold_low` for two-sided signals) is where
    it fires inside the fused gate, `threshold_alone` where it would fire as the only signal at the
    gate's false-flag rate; `slice_threshold` marks the slices where its profile is unusual.
    """

    name: str
    transform: str
    tails: str
    center: float
    scale: float
    n: int
    threshold: float
    threshold_low: float | None
    threshold_alone: float
    threshold_alone_low: float | None
    slice_threshold: float | None

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any], where: str) -> SignalSpec:
        """Raises ValueError naming the field that is missing or wrong."""
        for key in ("transform", "tails", "center", "scale", "n", "threshold", "threshold_alone"):
            if key not in d:
                raise ValueError(f"{where}: field 'signals.{name}.{key}' missing")
        if d["transform"] not in TRANSFORMS:
            raise ValueError(
                f"{where}: signals.{name}.transform {d['transform']!r}; expected one of {list(TRANSFORMS)}"
            )
        if d["tails"] not in TAILS:
            raise ValueError(f"{where}: signals.{name}.tails {d['tails']!r}; expected one of {list(TAILS)}")
        if not (isinstance(d["scale"], int | float) and d["scale"] > 0):
            raise ValueError(f"{where}: signals.{name}.scale must be a number > 0, got {d['scale']!r}")
        for key in ("center", "threshold", "threshold_alone"):
            if not isinstance(d[key], int | float) or not math.isfinite(d[key]):
                raise ValueError(f"{where}: signals.{name}.{key} must be a finite number, got {d[key]!r}")
        if d["tails"] == "both":
            for key in ("threshold_low", "threshold_alone_low"):
                if not isinstance(d.get(key), int | float):
                    raise ValueError(f"{where}: field 'signals.{name}.{key}' missing (two-sided signal)")

        def opt(key: str) -> float | None:
            return None if d.get(key) is None else float(d[key])

        return cls(
            name=name,
            transform=str(d["transform"]),
            tails=str(d["tails"]),
            center=float(d["center"]),
            scale=float(d["scale"]),
            n=int(d["n"]),
            threshold=float(d["threshold"]),
            threshold_low=opt("threshold_low"),
            threshold_alone=float(d["threshold_alone"]),
            threshold_alone_low=opt("threshold_alone_low"),
            slice_threshold=opt("slice_threshold"),
        )

    def z(self, value: float) -> float:
        return (TRANSFORMS[self.transform][0](value) - self.center) / self.scale

    def tail_probability(self, value: float) -> float:
        """The share of normal series expected at least this unusual (1.0 for NaN: not measured)."""
        if not math.isfinite(value):
            return 1.0
        return tail_probability(self.z(value), self.tails)

    def value_at(self, z: float) -> float:
        return float(TRANSFORMS[self.transform][1](self.center + z * self.scale))


def tail_probability(z: float, tails: str) -> float:
    """Standard-normal upper tail of z (both tails: of |z|, doubled, at most 1)."""
    if tails == "both":
        return min(1.0, float(special.erfc(abs(z) / math.sqrt(2.0))))
    return float(0.5 * special.erfc(z / math.sqrt(2.0)))


def z_for(p: float, tails: str) -> float:
    """The z whose tail probability is p (inverse of `tail_probability`)."""
    q = p / 2 if tails == "both" else p
    return float(-special.ndtri(q))


def fuse(p_values: Sequence[float]) -> float:
    """The fused statistic: −log10 of the smallest tail probability (0 when nothing was measured)."""
    finite = [p for p in p_values if math.isfinite(p)]
    if not finite:
        return 0.0
    return float(-math.log10(max(min(finite), 1e-300)))


def robust_center_scale(t: np.ndarray, floor: float) -> tuple[float, float]:
    """(median, scale) of transformed values; the scale is the larger of 1.4826 · MAD and the standard
    deviation (so that a small calibration set with a few wide normals does not get tails that are too
    thin), and at least `floor`."""
    center = float(np.median(t))
    sd = float(np.std(t, ddof=1)) if t.size > 1 else 0.0
    return center, max(1.4826 * float(np.median(np.abs(t - center))), sd, floor)


def calibrate(
    observations: Sequence[Observation],
    *,
    false_flag_rate: float,
    shrink: float = 0.1,
) -> tuple[dict[str, Any], Reference]:
    """Fit the references and every signal's calibration on normal series; return (gate.json fields, reference).

    Leave-one-series-out throughout: each normal's Mahalanobis distance and liver-HU share are measured
    against references fitted without it, and the empirical cut uses fused statistics whose centres and
    scales were fitted without it, so that the normals do not look more typical than an unseen one.

    Raises:
        ValueError: fewer than 5 observations with a liver, or a false-flag rate outside (0, 0.5).
    """
    if not 0 < false_flag_rate < 0.5:
        raise ValueError(f"false_flag_rate must be in (0, 0.5), got {false_flag_rate}")
    usable = [o for o in observations if o.liver_slices.size > 0]
    if len(usable) < 5:
        raise ValueError(f"calibration needs >= 5 normal series with a liver, got {len(usable)}")
    feats = [o.liver_features for o in usable]
    have_features = all(f is not None and len(f) > 0 for f in feats)
    hists = [o.liver_hu_hist for o in usable]
    pooled: np.ndarray = np.sum([h.sum(axis=0) for h in hists if h is not None], axis=0)
    band = hu_band(pooled)
    dim = 0
    if have_features:
        all_f = np.concatenate([f for f in feats if f is not None])
        mean, precision = fit_mahalanobis(all_f, shrink)
        dim = all_f.shape[1]
    else:
        mean, precision = np.zeros(1), np.eye(1)
    reference = Reference(mean, precision, band)

    # Each normal's signal values, measured against references fitted without it.
    values: list[dict[str, tuple[float, np.ndarray | None]]] = []
    for i, o in enumerate(usable):
        others = [f for j, f in enumerate(feats) if j != i and f is not None]
        own_hist = hists[i]
        loo_hist = pooled - own_hist.sum(axis=0) if own_hist is not None else pooled
        loo_band = hu_band(loo_hist) if loo_hist.sum() else band
        if have_features:
            m, prec = fit_mahalanobis(np.concatenate(others), shrink)
            loo_ref = Reference(m, prec, loo_band)
        else:
            loo_ref = Reference(mean, precision, loo_band)
        values.append(signal_values(o, loo_ref))

    m_signals = [s for s in SIGNALS if sum(math.isfinite(v[s][0]) for v in values) >= 5]
    specs: dict[str, dict[str, Any]] = {}
    transformed: dict[str, np.ndarray] = {}
    for name in m_signals:
        transform, tails, floor = SIGNAL_MODEL[name]
        t = np.array([TRANSFORMS[transform][0](v[name][0]) for v in values if math.isfinite(v[name][0])])
        center, scale = robust_center_scale(t, floor)
        transformed[name] = np.array(
            [TRANSFORMS[transform][0](v[name][0]) if math.isfinite(v[name][0]) else np.nan for v in values]
        )
        profiles: list[np.ndarray] = [q for v in values if (q := v[name][1]) is not None]
        slice_threshold = None
        if profiles:
            pooled_profile = np.concatenate([q[q > 0] if name != "gan_peak" else q for q in profiles])
            if pooled_profile.size:
                slice_threshold = float(np.percentile(pooled_profile, SLICE_QUANTILE))
        if name == "metal":
            slice_threshold = 0.0
        raw = [v[name][0] for v in values if math.isfinite(v[name][0])]
        specs[name] = {
            "transform": transform,
            "tails": tails,
            "center": center,
            "scale": scale,
            "scale_floor": floor,
            "n": len(t),
            "slice_threshold": slice_threshold,
            "normals": {
                "min": float(np.min(raw)),
                "p50": float(np.median(raw)),
                "p95": float(np.percentile(raw, 95)),
                "max": float(np.max(raw)),
            },
        }

    n_signals = len(m_signals)
    bonferroni = -math.log10(false_flag_rate / n_signals)
    # Leave-one-out fused statistic of each normal.
    loo_fused = []
    for i in range(len(usable)):
        ps = []
        for name in m_signals:
            t = transformed[name]
            if not np.isfinite(t[i]):
                continue
            rest = np.delete(t, i)
            rest = rest[np.isfinite(rest)]
            c, s = robust_center_scale(rest, SIGNAL_MODEL[name][2])
            ps.append(tail_probability((t[i] - c) / s, SIGNAL_MODEL[name][1]))
        loo_fused.append(fuse(ps))
    empirical = float(np.quantile(loo_fused, 1.0 - false_flag_rate))
    threshold = max(bonferroni, empirical)
    p_cut = 10.0**-threshold
    for name in m_signals:
        spec = specs[name]
        tails = spec["tails"]
        probe = SignalSpec(
            name, spec["transform"], tails, spec["center"], spec["scale"], spec["n"], 0, None, 0, None, None
        )
        z_in, z_alone = z_for(p_cut, tails), z_for(false_flag_rate, tails)
        # value_at(+z) is the unusual side for every transform (for log1m a low Dice); value_at(−z) the other.
        spec["threshold"], spec["threshold_alone"] = probe.value_at(z_in), probe.value_at(z_alone)
        if tails == "both":
            spec["threshold_low"], spec["threshold_alone_low"] = probe.value_at(-z_in), probe.value_at(-z_alone)
    loo_rate = float(np.mean(np.array(loo_fused) > threshold))
    config = {
        "signals": specs,
        "fusion": {
            "rule": "min_tail_probability",
            "statistic": "-log10(smallest tail probability across signals)",
            "signals": n_signals,
            "bonferroni_threshold": bonferroni,
            "empirical_threshold": empirical,
            "threshold": threshold,
            "loo_false_flag_rate": loo_rate,
        },
        "false_flag_rate": false_flag_rate,
        "bands": {**DEFAULT_BANDS, "liver_hu": [band[0], band[1]]},
        "reference": {"mahalanobis_shrink": shrink, "feature_dim": dim, "series": len(usable)},
    }
    return config, reference


def content_version(config: Mapping[str, Any]) -> str:
    """The gate's version: the first 16 hex digits of the SHA-256 of gate.json's content without `version`."""
    body = {k: v for k, v in config.items() if k != "version"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=float).encode()).hexdigest()[:16]


def write_gate(
    folder: Path, config: dict[str, Any], reference: Reference, *, command: str, data: Mapping[str, Any]
) -> Path:
    """Write gate.json and its reference .npz to `folder`; returns gate.json's path."""
    folder.mkdir(parents=True, exist_ok=True)
    ref_path = folder / REFERENCE_FILE
    with open(ref_path, "wb") as f:
        np.savez_compressed(
            f,
            mahalanobis_mean=reference.mahalanobis_mean.astype(np.float64),
            mahalanobis_precision=reference.mahalanobis_precision.astype(np.float32),
        )
    full = {
        "format": GATE_FORMAT,
        "kind": KIND,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "data": dict(data),
        "views": list(DEFAULT_VIEWS),
        "rules": json.loads(json.dumps(DEFAULT_RULES)),
        **config,
    }
    full["reference"] = {**config.get("reference", {}), "file": REFERENCE_FILE, "sha256": _sha256(ref_path)}
    full["version"] = content_version(full)
    path = folder / "gate.json"
    path.write_text(json.dumps(full, indent=1, default=float) + "\n")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def validate_config(config: Mapping[str, Any], where: str) -> dict[str, SignalSpec]:
    """Check a calibrated gate.json; return its signal specs.

    Raises:
        ValueError: a field is missing or wrong (the message names it).
    """
    for key in ("signals", "fusion", "false_flag_rate", "bands", "rules", "views", "reference"):
        if key not in config:
            raise ValueError(f"{where}: field {key!r} missing")
    if not isinstance(config["signals"], dict):
        raise ValueError(f"{where}: field 'signals' must be an object of signal name → calibration")
    specs = {}
    for name, d in config["signals"].items():
        if name not in SIGNALS:
            raise ValueError(f"{where}: signals.{name}: unknown signal; expected some of {list(SIGNALS)}")
        specs[name] = SignalSpec.from_json(name, d, where)
    fusion = config["fusion"]
    if fusion.get("rule") != "min_tail_probability":
        raise ValueError(f"{where}: fusion.rule {fusion.get('rule')!r}; expected 'min_tail_probability'")
    if not isinstance(fusion.get("threshold"), int | float) or not fusion["threshold"] > 0:
        raise ValueError(f"{where}: fusion.threshold must be a number > 0, got {fusion.get('threshold')!r}")
    if not isinstance(config["false_flag_rate"], int | float) or not 0 < config["false_flag_rate"] < 0.5:
        raise ValueError(f"{where}: false_flag_rate must be in (0, 0.5), got {config['false_flag_rate']!r}")
    for view in config["views"]:
        if view not in VIEWS:
            raise ValueError(f"{where}: views: unknown view {view!r}; expected some of {list(VIEWS)}")
    bands = config["bands"]
    for key in ("liver_hu", "fluid_hu"):
        b = bands.get(key)
        if not (isinstance(b, list) and len(b) == 2 and b[0] < b[1]):
            raise ValueError(f"{where}: bands.{key} must be [low, high] HU with low < high, got {b!r}")
    if not isinstance(bands.get("metal_hu"), int | float):
        raise ValueError(f"{where}: field 'bands.metal_hu' missing")
    ref = config["reference"]
    for key in ("file", "sha256"):
        if key not in ref:
            raise ValueError(f"{where}: field 'reference.{key}' missing")
    rules = config["rules"]
    for rule, keys in (
        ("not_abdomen", ("min_body_area_cm2", "max_bone_fraction")),
        ("liver_partial", ("max_end_ratio",)),
    ):
        for key in keys:
            if not isinstance(rules.get(rule, {}).get(key), int | float):
                raise ValueError(f"{where}: field 'rules.{rule}.{key}' missing or not a number")
    return specs


# --- words ---------------------------------------------------------------------------------------------


def slice_run(profile: np.ndarray | None, threshold: float | None) -> tuple[int, int] | None:
    """The run of consecutive slices above `threshold` around the profile's peak; None if the peak is not above."""
    if profile is None or threshold is None or profile.size == 0:
        return None
    peak = int(np.argmax(profile))
    if not profile[peak] > threshold:
        return None
    lo = hi = peak
    while lo > 0 and profile[lo - 1] > threshold:
        lo -= 1
    while hi < profile.size - 1 and profile[hi + 1] > threshold:
        hi += 1
    return lo, hi


def _where(slices: tuple[int, int] | None) -> str:
    if slices is None:
        return ""
    a, b = slices
    return f" on slice {a}" if a == b else f" on slices {a}–{b}"


def _num(x: float, unit: str = "") -> str:
    if not math.isfinite(x):
        return "n/a"
    if unit == "%":
        return f"{100 * x:.0f} %" if abs(x) >= 0.01 or x == 0 else f"{100 * x:.1f} %"
    if abs(x) >= 100:
        s = f"{x:,.0f}"
    elif abs(x) < 0.1:
        s = f"{x:.3f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.2f}"
    return s + (f" {unit}" if unit else "")


def signal_words(
    name: str, value: float, spec: SignalSpec | None, slices: tuple[int, int] | None, extra: Mapping[str, Any]
) -> str:
    """One sentence on a signal in plain words: what was seen, where, the value and the normal range."""
    if not math.isfinite(value):
        return {
            "gan_score": "GAN anomaly score not available (no detector result)",
            "gan_peak": "GAN slice scores not available",
            "tta_dice": "segmentation agreement not measured (no liver found)",
        }.get(name, f"{name.replace('_', ' ')} not measured (no liver found)")
    where = _where(slices)

    def normal(unit: str = "") -> str:
        if spec is None:
            return ""
        if spec.tails == "both" and spec.threshold_low is not None:
            return f"normal {_num(spec.threshold_low)}–{_num(spec.threshold, unit)}"
        sign = "≥" if spec.transform in DECREASING else "≤"
        return f"normal {sign} {_num(spec.threshold, unit)}"

    n = normal()
    if name == "gan_score":
        return f"GAN anomaly score {_num(value)} ({n})"
    if name == "gan_peak":
        return f"GAN anomaly score peaks{where} at {_num(value)} ({n})"
    if name == "entropy":
        return f"the segmenter is unsure around the liver{where} (mean entropy {_num(value)}; {n})"
    if name == "mahalanobis":
        return f"the image looks unlike the normal series to the segmenter{where} (feature distance {_num(value)}; {n})"
    if name == "tta_dice":
        verb = "disagree" if spec is not None and value < spec.threshold else "agree"
        n2 = f"normal ≥ {spec.threshold:.2f}" if spec is not None else ""
        return f"segmentations {verb}{where} (pairwise Dice {value:.2f}; {n2})"
    if name == "liver_volume":
        return f"liver volume {_num(value, 'ml')} ({normal('ml')})"
    if name == "liver_extent":
        return f"the liver spans {_num(value, 'mm')} head to feet ({normal('mm')})"
    if name == "liver_pieces":
        pieces = int(extra.get("pieces", 0))
        return (
            f"the liver probability falls into {pieces} piece{'s' if pieces != 1 else ''} "
            f"({_num(value, '%')} outside the largest; {normal('%')})"
        )
    if name == "metal":
        metal_hu = float(extra.get("metal_hu", DEFAULT_BANDS["metal_hu"]))
        return f"metal-density pixels (> {metal_hu:,.0f} HU){where}: {value:,.0f} ({normal()})"
    if name == "liver_hu":
        band = extra.get("liver_hu_band")
        b = f" ({band[0]:.0f} to {band[1]:.0f} HU)" if band else ""
        return f"liver tissue outside the normal liver's density{b}{where}: {_num(value, '%')} of the liver ({normal('%')})"
    if name == "fluid_border":
        band = extra.get("fluid_hu", DEFAULT_BANDS["fluid_hu"])
        return (
            f"fluid-density tissue ({band[0]:.0f} to {band[1]:.0f} HU) along the liver's border{where}: "
            f"{_num(value, '%')} of its rim ({normal('%')})"
        )
    return f"{name} {_num(value)} ({n})"


# --- the gate ------------------------------------------------------------------------------------------


class Gate:
    """A loaded gate: its calibration (gate.json) and the fusion rule.

    `Gate.rules_only()` is the gate before any calibration: the detector's own flag, no liver found,
    and the geometry findings decide (the behaviour before issue 15): one segmentation, no views, no
    off-target rules. A calibrated gate (`Gate.load`) adds the test-time views, every signal, the fusion
    and the off-target rules. A series that cannot be read never reaches the gate (the pipeline routes
    it `unreadable`).
    """

    def __init__(self, config: dict[str, Any], folder: Path | None = None, reference: Reference | None = None) -> None:
        self.config = config
        self.folder = folder
        self.version = str(config.get("version", "rules-only"))
        self.calibrated = bool(config.get("signals"))
        self.specs: dict[str, SignalSpec] = (
            validate_config(config, str(folder or "gate.json")) if self.calibrated else {}
        )
        self.reference = reference
        self.rules: dict[str, Any] = config.get("rules", {})
        self.bands: dict[str, Any] = dict(DEFAULT_BANDS, **config.get("bands", {}))
        self.views: tuple[str, ...] = tuple(config.get("views", ()))
        fusion = config.get("fusion", {})
        self.fused_threshold: float | None = float(fusion["threshold"]) if self.calibrated else None
        self._versions_checked = False

    @classmethod
    def rules_only(cls) -> Gate:
        return cls({"format": GATE_FORMAT, "kind": KIND, "version": "rules-only", "signals": {}})

    @classmethod
    def load(cls, folder: Path | str) -> Gate:
        """The gate in `folder` (gate.json and the files it names).

        Raises:
            FileNotFoundError: no gate.json in `folder`, or the reference file it names is missing.
            ValueError: a field is missing or wrong, the reference file's SHA-256 differs from gate.json's,
                or `version` is not the hash of the content (the message names the field).
        """
        path = Path(folder) / "gate.json"
        config: dict[str, Any] = json.loads(path.read_text())
        for key in ("format", "kind", "version"):
            if key not in config:
                raise ValueError(f"{path}: field {key!r} missing")
        if config["format"] != GATE_FORMAT:
            raise ValueError(f"{path}: format {config['format']!r}; this gatekeeper reads format {GATE_FORMAT}")
        if config["kind"] != KIND:
            raise ValueError(f"{path}: kind {config['kind']!r}; expected {KIND!r}")
        reference = None
        if config.get("signals"):
            validate_config(config, str(path))
            if config["version"] != content_version(config):
                raise ValueError(
                    f"{path}: field 'version' {config['version']!r} is not the hash of the content "
                    f"({content_version(config)!r}); recalibrate with `gatekeeper calibrate gate` instead of editing"
                )
            reference = read_reference(Path(folder), config)
        return cls(config, Path(folder), reference)

    def assess(
        self,
        *,
        series: CTSeries,
        segmenter: Segmenter,
        detector: DetectorEvidence | None,
        geometry_findings: Sequence[dict[str, Any]] = (),
        min_liver_ml: float = 50.0,
    ) -> Assessment:
        """Segment `series`, measure the evidence and decide its route.

        Order of the reason when several fire: not an abdominal CT, no liver, liver partly covered,
        geometry, the detector's own flag (rules-only gate), the fused evidence (`RouteReason.GATE`).
        """
        if not self.calibrated:
            return self._assess_rules_only(series, segmenter, detector, geometry_findings, min_liver_ml)
        self._check_versions(segmenter, detector)
        segmentation, obs, _ = observe(
            series=series, segmenter=segmenter, detector=detector, views=self.views, bands=self.bands
        )
        findings, p_values = self.signal_findings(obs)
        fused = fuse(p_values)
        assert self.fused_threshold is not None
        fused_fired = fused > self.fused_threshold
        reasons: list[RouteReason] = []
        rule_findings = self.rule_findings(obs, segmentation, detector, geometry_findings, min_liver_ml, reasons)
        if fused_fired:
            reasons.append(RouteReason.GATE)
        reason = reasons[0] if reasons else None
        decision = GateDecision(
            reason is not None, reason, tuple(findings + rule_findings), fused, self.fused_threshold, self.version
        )
        return Assessment(segmentation=segmentation, decision=decision, observation=obs)

    def _check_versions(self, segmenter: Segmenter, detector: DetectorEvidence | None) -> None:
        """Warn (once per gate) when the models differ from those the gate was calibrated with."""
        if self._versions_checked:
            return
        self._versions_checked = True
        calibrated_seg = (self.config.get("segmenter") or {}).get("version")
        calibrated_det = (self.config.get("detector") or {}).get("version")
        if calibrated_seg and getattr(segmenter, "version", calibrated_seg) != calibrated_seg:
            log.warning(
                "gate %s was calibrated with segmenter %s, not %s: recalibrate (`gatekeeper calibrate gate`)",
                self.version,
                calibrated_seg,
                segmenter.version,
            )
        if calibrated_det and detector is not None and detector.model_version not in ("", calibrated_det):
            log.warning(
                "gate %s was calibrated with detector %s, not %s: recalibrate (`gatekeeper calibrate gate`)",
                self.version,
                calibrated_det,
                detector.model_version,
            )

    def signal_findings(self, obs: Observation) -> tuple[list[Finding], list[float]]:
        """A finding per calibrated signal and its tail probability (fired: below the fused cut)."""
        assert self.fused_threshold is not None
        p_cut = 10.0**-self.fused_threshold
        values = signal_values(obs, self.reference)
        extra = {
            "pieces": obs.liver_pieces,
            "metal_hu": self.bands["metal_hu"],
            "liver_hu_band": self.bands.get("liver_hu"),
            "fluid_hu": self.bands["fluid_hu"],
        }
        findings, p_values = [], []
        for name in SIGNALS:
            spec = self.specs.get(name)
            if spec is None:
                continue
            value, profile = values[name]
            p = spec.tail_probability(value)
            fired = p < p_cut
            p_values.append(p)
            slices = slice_run(profile, spec.slice_threshold)
            threshold = spec.threshold
            if spec.tails == "both" and spec.threshold_low is not None and spec.z(value) < 0:
                threshold = spec.threshold_low
            findings.append(
                Finding(
                    name,
                    value,
                    threshold,
                    fired,
                    slices,
                    signal_words(name, value, spec, slices, extra),
                    p if math.isfinite(value) else float("nan"),
                )
            )
        return findings, p_values

    def rule_findings(
        self,
        obs: Observation,
        segmentation: Segmentation,
        detector: DetectorEvidence | None,
        geometry_findings: Sequence[dict[str, Any]],
        min_liver_ml: float,
        reasons: list[RouteReason],
    ) -> list[Finding]:
        """The plain rules (off-target, geometry, the detector's flag when gate.json asks); appends reasons."""
        out: list[Finding] = []
        rule = self.rules.get("not_abdomen", DEFAULT_RULES["not_abdomen"])
        min_area, max_bone = float(rule["min_body_area_cm2"]), float(rule["max_bone_fraction"])
        small, bony = obs.body_area_cm2 < min_area, obs.bone_fraction > max_bone
        if small or bony:
            why = (
                f"body cross-section {obs.body_area_cm2:.0f} cm² (an abdomen ≥ {min_area:.0f} cm²)"
                if small
                else f"bone is {100 * obs.bone_fraction:.0f} % of the body (an abdomen ≤ {100 * max_bone:.0f} %)"
            )
            out.append(Finding("not_abdomen", obs.body_area_cm2, min_area, True, None, f"not an abdominal CT: {why}"))
            reasons.append(RouteReason.NOT_ABDOMEN)
        missing = no_liver_finding(segmentation, min_liver_ml)
        if missing is not None:
            out.append(missing)
            reasons.append(RouteReason.NO_LIVER)
        else:
            max_end = float(self.rules.get("liver_partial", DEFAULT_RULES["liver_partial"])["max_end_ratio"])
            top, bottom = obs.end_ratio
            if max(top, bottom) > max_end:
                first = top >= bottom
                k = obs.num_slices - 1
                out.append(
                    Finding(
                        "liver_partial",
                        max(top, bottom),
                        max_end,
                        True,
                        (0, 0) if first else (k, k),
                        f"the liver is only partly covered: cut by the {'first' if first else 'last'} slice, "
                        f"which holds {100 * max(top, bottom):.0f} % of its largest cross-section "
                        f"(a complete liver ≤ {100 * max_end:.0f} %)",
                    )
                )
                reasons.append(RouteReason.LIVER_PARTIAL)
        if geometry_findings:
            out.append(geometry_finding(geometry_findings))
            reasons.append(RouteReason.GEOMETRY)
        if detector is not None and self.rules.get("detector_flag", False) and detector.score > detector.threshold:
            out.append(
                Finding(
                    "gan",
                    detector.score,
                    detector.threshold,
                    True,
                    None,
                    f"GAN anomaly score {detector.score:.2f} (the detector's own flag: normal ≤ {detector.threshold:.2f})",
                )
            )
            reasons.append(RouteReason.ANOMALY)
        return out

    def _assess_rules_only(
        self,
        series: CTSeries,
        segmenter: Segmenter,
        detector: DetectorEvidence | None,
        geometry_findings: Sequence[dict[str, Any]],
        min_liver_ml: float,
    ) -> Assessment:
        """The behaviour before issue 15: geometry, the detector's flag, no liver."""
        segmentation = segmenter.segment(series)
        findings: list[Finding] = []
        reason: RouteReason | None = None
        if geometry_findings:
            findings.append(geometry_finding(geometry_findings))
            reason = reason or RouteReason.GEOMETRY
        if detector is not None:
            flagged = detector.score > detector.threshold
            findings.append(
                Finding(
                    "gan",
                    detector.score,
                    detector.threshold,
                    flagged,
                    None,
                    f"GAN anomaly score {detector.score:.2f} (normal ≤ {detector.threshold:.2f})",
                )
            )
            if flagged:
                reason = reason or RouteReason.ANOMALY
        missing = no_liver_finding(segmentation, min_liver_ml)
        if missing is not None:
            findings.append(missing)
            reason = reason or RouteReason.NO_LIVER
        decision = GateDecision(reason is not None, reason, tuple(findings), None, None, self.version)
        return Assessment(segmentation=segmentation, decision=decision)


def geometry_finding(geometry_findings: Sequence[dict[str, Any]]) -> Finding:
    """The rule finding for the ingest's geometry findings (their codes in words)."""
    codes = ", ".join(str(f.get("code")) for f in geometry_findings)
    return Finding(
        "geometry",
        float(len(geometry_findings)),
        float("nan"),
        True,
        None,
        f"the series' geometry is irregular ({codes})",
    )


def no_liver_finding(segmentation: Segmentation, min_liver_ml: float) -> Finding | None:
    """The `no_liver` rule's finding when the segmenter found less than `min_liver_ml` of liver, else None."""
    if segmentation.mask.any() and segmentation.liver_volume_ml >= min_liver_ml:
        return None
    return Finding(
        "no_liver",
        segmentation.liver_volume_ml,
        min_liver_ml,
        True,
        None,
        f"no liver in the field of view ({segmentation.liver_volume_ml:.0f} ml found)",
    )


def read_reference(folder: Path, config: Mapping[str, Any]) -> Reference:
    """The reference .npz gate.json names, checked against its SHA-256.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: its SHA-256 differs from `reference.sha256`, or an array is missing or misshapen.
    """
    ref = config["reference"]
    path = folder / str(ref["file"])
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference file named in gate.json (reference.file) not found")
    if _sha256(path) != ref["sha256"]:
        raise ValueError(f"{path}: SHA-256 differs from gate.json's reference.sha256 (file changed after calibration)")
    with np.load(path) as z:
        for key in ("mahalanobis_mean", "mahalanobis_precision"):
            if key not in z:
                raise ValueError(f"{path}: array {key!r} missing")
        mean = z["mahalanobis_mean"].astype(np.float64)
        precision = z["mahalanobis_precision"].astype(np.float64)
    if precision.shape != (mean.size, mean.size):
        raise ValueError(
            f"{path}: mahalanobis_precision has shape {precision.shape}; expected {(mean.size, mean.size)}"
        )
    band = config["bands"]["liver_hu"]
    return Reference(mean, precision, (float(band[0]), float(band[1])))


def file_version(path: Path) -> str:
    """The first 16 hex digits of the SHA-256 of gate.json: its version."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
