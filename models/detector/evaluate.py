"""`gatekeeper evaluate detector`: the detector against its baselines on a labelled phantom split.

Uses the same ONNX Runtime path as `gatekeeper score` (no torch). Needs the phantom
`manifest.json` for ground truth (anomaly type per series, affected slice indices) and each
anomalous series' `ground_truth/anomaly.seg.dcm` (read with highdicom) for localisation.

A *method* is anything that gives, for one `CTSeries`, per-slice scores, a series score and
(optionally) per-slice evidence maps on a square grid in the slice's own image geometry
(`Scored`). Detectors of either model format are methods (`SliceModel`: format 1, the slice recipe,
maps on its input grid; `PatchModel`: format 2, the patch recipe, its `PATCH_MAP_SIZE`² z-maps), so
is the autoencoder baseline (`AutoencoderModel`); `load_method` picks the class from model.json.
Methods, all scored on the same series in one run, in this report order:

* `detector` — the model under test (`--model`, format 1 or 2);
* `twin` — the conditioned GAN trained with exactly the ablation's recipe (`--ablation-twin`, optional):
  when the detector was trained elsewhere (a GPU run) and its unconditioned twin cannot be
  trained here, the condition is tested on a matched pair (same data, seed, family and budget), and
  the ablation target reads `twin − ablation` instead of `detector − ablation`;
* `ablation` — the same GAN trained without the position condition (`--ablation`, optional;
  `gatekeeper train detector --unconditioned`);
* comparison models (`--compare NAME=DIR`, repeatable, optional): any other detector (e.g. the
  shipped format-1 model `models/detector/default` next to a new format-2 one) or autoencoder folder;
* `autoencoder` — an autoencoder's reconstruction residual (`--autoencoder`, optional;
  `gatekeeper train autoencoder`, plain or `--noise coarse`, the coarse-noise denoising autoencoder);
* `hu_histogram` — a HU-histogram statistic (always), fitted here on the normal training series of
  `--train-data` (default: the same phantom run's `train` split; its threshold on the `validation`
  split), with the detector's slice positions and series aggregation
  (`models.detector.baselines.HistogramBaseline`).

Writes to `--out`: report.json, report.md and PNG plots linked from it — ROC curves per anomaly
type (every method), slice-score profiles along the body axis for example series, evidence
heat-maps of the top affected slice of example anomalous series (every method with maps). Reported
per method: series AUROC and AUPRC per anomaly type and overall with bootstrap 95 % CIs, the paired
bootstrap CI of the AUROC difference to the detector, slice-level AUROC, the false-flag rate of the
unseen normals at the method's own threshold (set on validation normals), the scoring time, and
localisation:

    on the highest-scoring affected slice (affected = the anomaly mask, mapped to the method's map
    grid the way preprocessing resizes the image, is not empty), the argmax of the evidence map
    smoothed with a Gaussian (σ = 1 px), searched inside the body mask, lies in the anomaly mask
    dilated by 2 px ("hit_rate", one per series). "chance" is the fraction of the body inside that
    dilated mask (a random body pixel's hit probability). The same test on every affected slice
    gives "slice_hit_rate" (the fraction of anomalous slices localised).

Map grids: the slice recipe's input size, the patch recipe's `PATCH_MAP_SIZE` (128), the
autoencoder's size; the body mask is `imaging.preprocess_slices`' at that grid.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from scipy import ndimage

from models.detector.metrics import (
    auprc,
    auroc,
    bootstrap_ci,
    paired_bootstrap_difference,
    roc_curve,
    threshold_at_false_flag_rate,
)
from service import imaging
from service.errors import UsageError

if TYPE_CHECKING:
    from models.detector.baselines import AutoencoderBaseline, HistogramBaseline
    from service.dicom_series import CTSeries
    from service.inference import Detector, PatchDetector

log = logging.getLogger(__name__)

#: Method keys with fixed roles, in report order, with the names the report shows (`--compare`
#: methods come after the ablation, under their own names).
METHOD_LABELS = {
    "detector": "GAN detector",
    "twin": "GAN, conditioned (ablation's recipe)",
    "ablation": "GAN, unconditioned",
    "autoencoder": "conv autoencoder",
    "hu_histogram": "HU histogram",
}
#: Keys a `--compare` name may not take (the fixed roles and the matched-pair difference).
RESERVED_NAMES = (*METHOD_LABELS, "twin_minus_ablation")
#: The anomaly types the product promises to catch, and the targets of issue 12 (detector v2).
TARGET_TYPES = ("stent", "tumor", "fluid")
TARGET_AUROC = 0.95
TARGET_FALSE_FLAG_RATE = 0.05
TARGET_SLICE_LOCALISATION = 0.85
#: Localisation: Gaussian smoothing of the evidence map and dilation of the mask, in map pixels.
LOCALISATION_SIGMA_PX = 1.0
LOCALISATION_DILATION_PX = 2


def register(what: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = what.add_parser(
        "detector",
        help="evaluate an exported detector and its baselines on a phantom split",
        description="Score the test series of a phantom run (manifest.json) with the detector (model.json "
        "format 1 or 2), the HU-histogram baseline and optionally the unconditioned ablation, its "
        "conditioned twin, comparison models and the autoencoder; write report.json, report.md and PNG "
        "plots to --out.",
    )
    d.add_argument("--data", required=True, type=Path, help="phantom run folder with manifest.json")
    d.add_argument("--model", required=True, type=Path, help="model folder (model.json + ONNX files)")
    d.add_argument("--out", required=True, type=Path, help="report folder")
    d.add_argument("--split", default="test", help="manifest split to evaluate (default test)")
    d.add_argument(
        "--ablation",
        type=Path,
        default=None,
        help="model folder of the unconditioned ablation (gatekeeper train detector --unconditioned)",
    )
    d.add_argument(
        "--ablation-twin",
        type=Path,
        default=None,
        help="the conditioned model trained with exactly the ablation's command except --unconditioned; "
        "the ablation is then judged against it (use when --model was trained differently)",
    )
    d.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="another detector (either format) or autoencoder folder scored as a comparison method, e.g. "
        "shipped=models/detector/default; repeatable; NAME defaults to the folder's name",
    )
    d.add_argument(
        "--autoencoder",
        type=Path,
        default=None,
        help="model folder of the autoencoder baseline (gatekeeper train autoencoder [--noise coarse])",
    )
    d.add_argument(
        "--train-data",
        type=Path,
        default=None,
        help="normal series to fit the HU-histogram baseline on: a phantom run (its train split; "
        "threshold on its validation split) or any DICOM tree (default: --data)",
    )
    d.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    d.add_argument(
        "--diagnose",
        action="store_true",
        help="instead of the evaluation: diagnose what hides anomalies from the detector (model input, "
        "reconstruction and residual at the lesion, scores against the normals' band, scan range) on every "
        "phantom series under --data (models/detector/diagnose.py)",
    )
    d.set_defaults(func=run)


def parse_compare(values: list[str]) -> list[tuple[str, Path]]:
    """`--compare` values ("NAME=DIR" or "DIR") → [(name, folder)] in the order given.

    Raises:
        ValueError: a name that is not a plain identifier, is one of `RESERVED_NAMES`, or is used twice.
    """
    out: list[tuple[str, Path]] = []
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or "/" in name:
            folder, name = value, Path(value.rstrip("/")).name
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name):
            raise ValueError(f"--compare {value!r}: name {name!r} must start with a letter (letters, digits, _ . -)")
        if name in RESERVED_NAMES:
            raise ValueError(f"--compare {value!r}: {name!r} is a fixed method name; give NAME=DIR")
        if name in (n for n, _ in out):
            raise ValueError(f"--compare: name {name!r} used twice; give NAME=DIR")
        out.append((name, Path(folder)))
    return out


# --- localisation -------------------------------------------------------------------------------------


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


# --- methods: anything that scores a CTSeries per slice, with evidence maps ------------------------------


class SeriesInputs:
    """One series and what several methods share: preprocessed slices per (size, window) and the
    anomaly mask per map grid, each computed once."""

    def __init__(self, series: CTSeries, seg: Path | None) -> None:
        self.series = series
        self.seg = seg
        self._slices: dict[tuple[int, imaging.Window], tuple[np.ndarray, np.ndarray]] = {}
        self._truth: dict[int, np.ndarray] = {}

    def slices(self, size: int, window: imaging.Window) -> tuple[np.ndarray, np.ndarray]:
        """`imaging.preprocess_slices(series.hu, size, window)`: images [k, S, S] and body masks."""
        key = (size, window)
        if key not in self._slices:
            self._slices[key] = imaging.preprocess_slices(self.series.hu, size, window)
        return self._slices[key]

    def anomaly(self, size: int) -> np.ndarray:
        """The anomaly mask on the `size`² grid [k, S, S] (all False for a series without one)."""
        if size not in self._truth:
            k = self.series.num_slices
            self._truth[size] = (
                np.zeros((k, size, size), bool)
                if self.seg is None
                else anomaly_mask_on_grid(self.seg, self.series.sop_instance_uids, size)
            )
        return self._truth[size]


@dataclass
class Scored:
    """One method's output on one series.

    Attributes:
        slice_scores: [k] per slice, head → feet (≈ 0 typical, larger = more unusual).
        series_score: the method's own series score (compared with its threshold).
        positions: [k] the slice positions the method conditioned on (None: it has none).
        maps: [k, S, S] evidence maps in the slice's image geometry on the S² grid (None: no maps).
        grid: S; window: the window of the images shown under the maps (`SeriesInputs.slices`).
    """

    slice_scores: np.ndarray
    series_score: float
    positions: np.ndarray | None
    maps: np.ndarray | None
    grid: int
    window: imaging.Window


class Method(Protocol):
    """What the evaluation needs of a scoring method."""

    label: str
    threshold: float | None
    aggregation: str  # the report's description of the series aggregation
    meta: dict[str, Any]
    source: str  # the model folder or data it came from

    def score(self, inputs: SeriesInputs) -> Scored: ...


def describe(meta: dict[str, Any]) -> str:
    """A short description of a model from its model.json, for the report."""
    from models.detector.baselines import AUTOENCODER_KIND

    if meta.get("kind") == AUTOENCODER_KIND:
        return "coarse-noise DAE" if meta.get("noise", {}).get("kind") == "coarse" else "conv autoencoder"
    if meta.get("format") == 2:
        pre = meta["preprocessing"]
        windows = "+".join(w["name"] for w in pre.get("windows", []))
        family, score = meta.get("family", "dcgan"), meta.get("patch_score", "mean")
        return f"patch recipe {family}, {score} score, {pre['patch']}² patches at {pre['spacing_mm']:g} mm, {windows}"
    return f"slice recipe, {meta.get('family')} {meta.get('size')}²"


def _training(meta: dict[str, Any]) -> dict[str, Any]:
    t = meta.get("training", {})
    return {
        k: t[k]
        for k in ("command", "device_name", "steps", "train_seconds", "wall_seconds", "seconds")
        if t.get(k) is not None
    }


class SliceModel:
    """A format-1 detector (slice recipe): maps on its input grid."""

    def __init__(self, detector: Detector, label: str, source: str) -> None:
        self.detector, self.label, self.source = detector, label, source
        self.threshold: float | None = detector.threshold
        self.aggregation = detector.aggregation
        self.series_aggregation = detector.aggregation
        self.meta = detector.meta

    def positions(self, series: CTSeries) -> np.ndarray:
        images = imaging.slice_images(series.hu, self.detector.size, self.detector.window)
        return self.detector.positions(images, series.locations_mm)

    def score(self, inputs: SeriesInputs) -> Scored:
        d = self.detector
        images, masks = inputs.slices(d.size, d.window)
        positions = d.positions(images, inputs.series.locations_mm)
        scores, maps = d.score_arrays(images, masks, positions)
        total = imaging.aggregate_slice_scores(scores, d.aggregation)
        return Scored(scores, total, positions, maps, d.size, d.window)


class PatchModel:
    """A format-2 detector (patch recipe): its own series score (top slices within the training
    positions' range), `PATCH_MAP_SIZE`² z-maps in the slice's image geometry."""

    def __init__(self, detector: PatchDetector, label: str, source: str) -> None:
        from service.inference import PATCH_AGGREGATION

        self.detector, self.label, self.source = detector, label, source
        self.threshold: float | None = detector.threshold
        self.aggregation = f"{PATCH_AGGREGATION} of in-range slices"
        self.series_aggregation = PATCH_AGGREGATION  # for a baseline that borrows the detector's aggregation
        self.meta = detector.meta

    def positions(self, series: CTSeries) -> np.ndarray:
        return self.detector.positions(series)

    def score(self, inputs: SeriesInputs) -> Scored:
        from service.inference import PATCH_MAP_SIZE

        verdict = self.detector.score_series(inputs.series, keep_maps=True)
        scores = np.array([s.score for s in verdict.slices], np.float64)
        positions = np.array([s.position for s in verdict.slices], np.float32)
        assert verdict.residual_maps is not None  # keep_maps=True
        return Scored(
            scores,
            verdict.score,
            positions,
            uncovered_to_slice_minimum(verdict.residual_maps),
            PATCH_MAP_SIZE,
            imaging.ABDOMEN_WINDOW,
        )


def uncovered_to_slice_minimum(maps: np.ndarray) -> np.ndarray:
    """Patch z-maps [k, S, S] as served (0 where no patch lies) with those pixels set to the slice's
    lowest z, so that an uncovered body pixel (the body's rim between patch centres) is never the
    evidence peak while every covered pixel below 0 still is evidence. An exact 0.0 z is taken for "no
    patch" (a float z-score is exactly 0 with probability 0)."""
    out = maps.astype(np.float32, copy=True)
    for i in range(out.shape[0]):
        covered = out[i] != 0.0
        if covered.any():
            out[i][~covered] = out[i][covered].min()
    return out


class AutoencoderModel:
    """An autoencoder baseline (plain or coarse-noise denoising): maps on its input grid."""

    def __init__(self, autoencoder: AutoencoderBaseline, label: str, source: str) -> None:
        self.autoencoder, self.label, self.source = autoencoder, label, source
        self.threshold: float | None = autoencoder.threshold
        self.aggregation = autoencoder.aggregation
        self.meta = autoencoder.meta

    def score(self, inputs: SeriesInputs) -> Scored:
        ae = self.autoencoder
        images, masks = inputs.slices(ae.size, ae.window)
        scores, maps = ae.score_arrays(images, masks)
        total = imaging.aggregate_slice_scores(scores, ae.aggregation)
        return Scored(scores, total, None, maps, ae.size, ae.window)


DetectorMethod = SliceModel | PatchModel


def load_method(model_dir: Path, label: str | None = None) -> SliceModel | PatchModel | AutoencoderModel:
    """The method in `model_dir`: a detector of either format or an autoencoder, from its model.json.

    `label` defaults to the model's description (`describe`).

    Raises:
        FileNotFoundError: no model.json there. ValueError: an invalid model.json (message names it).
    """
    from models.detector.baselines import AUTOENCODER_KIND, AutoencoderBaseline
    from service.inference import Detector, load_detector

    meta = json.loads((Path(model_dir) / "model.json").read_text())
    label = label or describe(meta)
    if meta.get("kind") == AUTOENCODER_KIND:
        return AutoencoderModel(AutoencoderBaseline(model_dir), label, str(model_dir))
    detector = load_detector(model_dir)
    if isinstance(detector, Detector):
        return SliceModel(detector, label, str(model_dir))
    return PatchModel(detector, label, str(model_dir))


def patch_version(meta: dict[str, Any]) -> str:
    """Which patch recipe a format-2 model.json describes: v2 (GAN), v3 (AAE, noise per window) or v4 (AAE,
    coarse noise in HU)."""
    if meta.get("family") != "aae":
        return "patch v2"
    return "patch v4" if float((meta.get("aae_noise") or {}).get("hu_std") or 0) > 0 else "patch v3"


def load_detector_method(model_dir: Path, label: str, option: str) -> DetectorMethod:
    """`load_method` for an option that needs a GAN detector.

    Raises:
        ValueError: `model_dir` holds an autoencoder (message names `option`).
    """
    method = load_method(model_dir, label)
    if isinstance(method, AutoencoderModel):
        raise ValueError(f"{option} {model_dir} is an autoencoder, not a detector")
    return method


# --- the HU-histogram baseline, fitted here -------------------------------------------------------------


def fit_histogram_baseline(root: Path, detector: DetectorMethod, *, seed: int = 0) -> HistogramBaseline:
    """Fit `HistogramBaseline` on the normal training series under `root`; threshold on its validation ones.

    Slice positions come from `detector` (its position method), the aggregation is the detector's
    (for a patch detector: the top-3 mean over all slices).

    Raises:
        ValueError: no usable normal training series under `root`.
    """
    from models.detector.baselines import HistogramBaseline, hu_histograms
    from models.detector.data import normal_splits
    from service import dicom_series

    groups = dicom_series.ct_series_in(dicom_series.scan_tree(root))
    splits, _ = normal_splits(root, groups, seed)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "validation": []}
    for g in groups:
        split = splits.get(g.series_instance_uid)
        if split not in parts:
            continue
        try:
            series = dicom_series.load_series(g)
        except dicom_series.SeriesError as exc:
            log.warning("HU histogram: skipping %s", exc)
            continue
        parts[split].append((hu_histograms(series.hu), detector.positions(series)))
    if not parts["train"]:
        raise ValueError(
            f"{root}: no normal training series to fit the HU-histogram baseline on (phantom split "
            "'train', or any CT series when there is no manifest.json); give --train-data"
        )
    model = HistogramBaseline.fit(
        [f for f, _ in parts["train"]], [p for _, p in parts["train"]], aggregation=detector.series_aggregation
    )
    if parts["validation"]:
        scores = [model.series_score(model.slice_scores(f, p)) for f, p in parts["validation"]]
        model.threshold = threshold_at_false_flag_rate(np.array(scores), TARGET_FALSE_FLAG_RATE)
    log.info(
        "HU histogram fitted on %d series (%d slices), threshold %s from %d validation series",
        model.train_series,
        model.train_slices,
        model.threshold,
        len(parts["validation"]),
    )
    return model


# --- scoring every series with every method -------------------------------------------------------------


@dataclass
class Panel:
    """One method's evidence on its localisation slice of an example series (the heat-map figure)."""

    label: str
    image: np.ndarray  # the slice, preprocessed [S, S]
    residual: np.ndarray  # the method's map [S, S]
    anomaly: np.ndarray  # the anomaly mask on the grid [S, S]
    localisation: dict[str, Any]


@dataclass
class Example:
    """What the plots show of one series: the detector's profile, every map method's heat map."""

    folder: str
    type: str
    slice_scores: np.ndarray
    affected: list[int]
    panels: list[Panel] = field(default_factory=list)


@dataclass
class Run:
    """Everything one evaluation computed; `report` is what report.json holds."""

    report: dict[str, Any]
    examples: list[Example] = field(default_factory=list)


def _method_summary(rows: list[dict[str, Any]], name: str, threshold: float | None, n_boot: int) -> dict[str, Any]:
    normal = np.array([r["scores"][name] for r in rows if r["type"] == "normal"])
    types = sorted({r["type"] for r in rows} - {"normal"})
    out: dict[str, Any] = {"threshold": threshold, "per_type": {}}
    for kind in types + ["all"]:
        pos = np.array([r["scores"][name] for r in rows if r["type"] != "normal" and kind in ("all", r["type"])])
        out["per_type"][kind] = {
            "n": int(pos.size),
            "auroc": round(auroc(normal, pos), 4),
            "auroc_ci95": bootstrap_ci(auroc, normal, pos, n_boot),
            "auprc": round(auprc(normal, pos), 4),
            "sensitivity_at_threshold": None if threshold is None else round(float(np.mean(pos > threshold)), 4),
        }
    out["false_flag_rate_normals"] = (
        None if threshold is None or normal.size == 0 else round(float(np.mean(normal > threshold)), 4)
    )
    slice_neg = [r["slice_scores"][name] for r in rows if r["type"] == "normal"]
    slice_pos = [np.asarray(r["slice_scores"][name])[r["affected"]] for r in rows if r["affected"]]
    out["slice_auroc"] = round(
        auroc(
            np.concatenate(slice_neg) if slice_neg else np.zeros(0),
            np.concatenate(slice_pos) if slice_pos else np.zeros(0),
        ),
        4,
    )
    located = [r for r in rows if r["localisation"].get(name) is not None]
    if located:
        out["localisation"] = {}
        for kind in types + ["all"]:
            sel = [r["localisation"][name] for r in located if kind in ("all", r["type"])]
            if sel:
                affected = sum(s["slices_affected"] for s in sel)
                out["localisation"][kind] = {
                    "n": len(sel),
                    "hit_rate": round(float(np.mean([s["hit"] for s in sel])), 4),
                    "chance": round(float(np.mean([s["chance"] for s in sel])), 4),
                    "slices": affected,
                    "slice_hit_rate": round(sum(s["slices_hit"] for s in sel) / affected, 4) if affected else None,
                }
    else:
        out["localisation"] = None
    return out


def _difference(rows: list[dict[str, Any]], first: str, second: str, n_boot: int) -> dict[str, Any]:
    """first − second: paired bootstrap of the series AUROC, per anomaly type and overall."""
    types = sorted({r["type"] for r in rows} - {"normal"})
    out: dict[str, Any] = {}
    neg = [r for r in rows if r["type"] == "normal"]
    for kind in types + ["all"]:
        pos = [r for r in rows if r["type"] != "normal" and kind in ("all", r["type"])]
        diff, ci = paired_bootstrap_difference(
            [r["scores"][first] for r in neg],
            [r["scores"][first] for r in pos],
            [r["scores"][second] for r in neg],
            [r["scores"][second] for r in pos],
            n_boot,
        )
        out[kind] = {"difference": round(diff, 4), "ci95": ci, "excludes_zero": bool(ci[0] > 0 or ci[1] < 0)}
    return out


def _differences(rows: list[dict[str, Any]], names: list[str], n_boot: int) -> dict[str, Any]:
    """detector − every other method, and twin − ablation when both were scored."""
    out = {name: _difference(rows, "detector", name, n_boot) for name in names if name != "detector"}
    if "twin" in names and "ablation" in names:
        out["twin_minus_ablation"] = _difference(rows, "twin", "ablation", n_boot)
    return out


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    main = report["methods"]["detector"]
    out = []
    kinds = list(TARGET_TYPES) + sorted(set(main["per_type"]) - set(TARGET_TYPES) - {"all"})
    for kind in kinds:
        m = main["per_type"].get(kind)
        out.append(
            {
                "target": f"series AUROC >= {TARGET_AUROC} on {kind}",
                "value": None if m is None else m["auroc"],
                "ci95": None if m is None else m["auroc_ci95"],
                "met": None if m is None else bool(m["auroc"] >= TARGET_AUROC),
            }
        )
    ffr = main["false_flag_rate_normals"]
    out.append(
        {
            "target": f"false-flag rate <= {TARGET_FALSE_FLAG_RATE:.0%} of unseen normal series",
            "value": ffr,
            "ci95": None,
            "met": None if ffr is None else bool(ffr <= TARGET_FALSE_FLAG_RATE),
        }
    )
    loc = (main.get("localisation") or {}).get("all")
    rate = None if loc is None else loc["slice_hit_rate"]
    out.append(
        {
            "target": f"localisation >= {TARGET_SLICE_LOCALISATION:.0%} of anomalous slices (evidence peak "
            "inside the dilated mask)",
            "value": rate,
            "ci95": None,
            "met": None if rate is None else bool(rate >= TARGET_SLICE_LOCALISATION),
        }
    )
    twin = "twin_minus_ablation" in report["differences"]
    d = report["differences"].get("twin_minus_ablation" if twin else "ablation", {}).get("all")
    pair = "the matched conditioned twin" if twin else "conditioned"
    out.append(
        {
            "target": f"{pair} better than the unconditioned ablation (paired 95 % CI of the AUROC "
            "difference, all anomalies, above 0)",
            "value": None if d is None else d["difference"],
            "ci95": None if d is None else d["ci95"],
            "met": None if d is None else bool(d["ci95"][0] > 0),
        }
    )
    baselines = [k for k in report["methods"] if k not in ("detector", "twin", "ablation")]
    for name in baselines:
        diffs = {k: v for k, v in report["differences"][name].items() if k != "all"}
        worst = min(diffs, key=lambda k: diffs[k]["ci95"][0]) if diffs else None
        out.append(
            {
                "target": f"better than {report['methods'][name]['label']} on every anomaly type (paired 95 % "
                "CI of the AUROC difference above 0)",
                "value": None if worst is None else diffs[worst]["difference"],
                "ci95": None if worst is None else diffs[worst]["ci95"],
                "worst_type": worst,
                "met": None if worst is None else bool(diffs[worst]["ci95"][0] > 0),
            }
        )
    return out


def evaluate(
    data: Path,
    model: Path,
    split: str = "test",
    n_boot: int = 1000,
    *,
    ablation: Path | None = None,
    autoencoder: Path | None = None,
    train_data: Path | None = None,
    ablation_twin: Path | None = None,
    compare: list[tuple[str, Path]] | None = None,
) -> Run:
    """Score the `split` series of the phantom run `data` with every method; return the report and plot data.

    `model`, `ablation`, `ablation_twin` are detector folders of either model format; `compare`
    [(name, folder)] further detectors or autoencoders; `autoencoder` an autoencoder folder.

    Raises:
        OSError: a model, the manifest or a series cannot be read.
        ValueError: no series in the split, a model.json is invalid, a detector option names an
            autoencoder, or no normal training series for the HU histogram (messages name the folder).
    """
    from models.detector.baselines import AutoencoderBaseline, hu_histograms
    from service import dicom_series

    manifest = json.loads((data / "manifest.json").read_text())
    entries = [e for e in manifest["series"] if e.get("split") == split]
    if not entries:
        raise ValueError(f"{data}/manifest.json has no series in split {split!r}")
    if ablation_twin is not None and ablation is None:
        raise ValueError("--ablation-twin needs --ablation (the twin is the ablation's conditioned counterpart)")
    detector = load_detector_method(model, METHOD_LABELS["detector"], "--model")
    if isinstance(detector, PatchModel):
        detector.label += f" ({patch_version(detector.meta)})"
    methods: dict[str, Method] = {"detector": detector}
    if ablation_twin is not None:
        methods["twin"] = load_detector_method(ablation_twin, METHOD_LABELS["twin"], "--ablation-twin")
        if not methods["twin"].meta.get("conditioned", True):
            raise ValueError(f"--ablation-twin {ablation_twin} is unconditioned (model.json conditioned: false)")
    if ablation is not None:
        methods["ablation"] = load_detector_method(ablation, METHOD_LABELS["ablation"], "--ablation")
        if methods["ablation"].meta.get("conditioned", True):
            log.warning("--ablation %s is a conditioned model (model.json conditioned: true)", ablation)
    for name, folder in compare or []:
        compared = load_method(folder)
        compared.label = f"{name} ({compared.label})"
        methods[name] = compared
    if autoencoder is not None:
        ae = AutoencoderBaseline(autoencoder)
        methods["autoencoder"] = AutoencoderModel(ae, describe(ae.meta), str(autoencoder))
    t0 = time.monotonic()
    histogram = fit_histogram_baseline(train_data or data, detector)
    fit_seconds = time.monotonic() - t0
    names = [*methods, "hu_histogram"]
    seconds = dict.fromkeys(names, 0.0)

    rows: list[dict[str, Any]] = []
    examples: dict[str, Example] = {}
    t0 = time.monotonic()
    for n, e in enumerate(entries, 1):
        groups = dicom_series.ct_series_in(dicom_series.scan_tree(data / e["folder"]))
        matching = [g for g in groups if g.series_instance_uid == e["series_instance_uid"]]
        if len(matching) != 1:
            raise ValueError(f"{data / e['folder']}: series {e['series_instance_uid']} not found")
        series = dicom_series.load_series(matching[0])
        kind = e["anomaly"]["type"] if e.get("anomaly") else "normal"
        affected = sorted(e["anomaly"]["slices"]) if e.get("anomaly") else []
        inputs = SeriesInputs(series, data / e["folder"] / e["anomaly"]["seg"] if affected else None)
        example = None
        if kind not in examples:
            example = examples[kind] = Example(e["folder"], kind, np.zeros(0), affected)
        slice_scores: dict[str, np.ndarray] = {}
        series_scores: dict[str, float] = {}
        localisation: dict[str, dict[str, Any] | None] = {}
        main_positions = None
        for name, method in methods.items():
            t1 = time.monotonic()
            scored = method.score(inputs)
            seconds[name] += time.monotonic() - t1
            slice_scores[name], series_scores[name] = scored.slice_scores, scored.series_score
            if name == "detector":
                main_positions = scored.positions
                if example is not None:
                    example.slice_scores = scored.slice_scores
            located = None
            if affected and scored.maps is not None:
                images, masks = inputs.slices(scored.grid, scored.window)
                truth = inputs.anomaly(scored.grid)
                located = localise(scored.slice_scores, scored.maps, truth, masks)
                if located is not None and example is not None:
                    t = located["slice"]
                    example.panels.append(Panel(method.label, images[t], scored.maps[t], truth[t], located))
            localisation[name] = located
            del scored
        assert main_positions is not None  # "detector" is always a method, and detectors have positions
        t1 = time.monotonic()
        slice_scores["hu_histogram"] = histogram.slice_scores(hu_histograms(series.hu), main_positions)
        series_scores["hu_histogram"] = histogram.series_score(slice_scores["hu_histogram"])
        seconds["hu_histogram"] += time.monotonic() - t1
        rows.append(
            {
                "folder": e["folder"],
                "type": kind,
                "affected": affected,
                "slice_scores": slice_scores,
                "scores": series_scores,
                "localisation": localisation,
            }
        )
        if n % 10 == 0 or n == len(entries):
            log.info("evaluated %d/%d series (%.0f s)", n, len(entries), time.monotonic() - t0)
    total_seconds = time.monotonic() - t0

    main_meta = detector.meta
    report: dict[str, Any] = {
        "data": str(data),
        "model": str(model),
        "split": split,
        "threshold": detector.threshold,
        "aggregation": detector.aggregation,
        "provider": detector.detector.provider,
        "recipe": main_meta.get("recipe", "patch" if main_meta.get("format") == 2 else "slice"),
        "model_format": main_meta.get("format"),
        "description": describe(main_meta),
        "family": main_meta.get("family"),
        "size": main_meta.get("size", main_meta.get("patch")),
        "conditioned": main_meta.get("conditioned", True),
        "series": len(rows),
        "normal_series": sum(r["type"] == "normal" for r in rows),
        "seconds": round(total_seconds, 1),
        "bootstrap": n_boot,
        "methods": {},
    }
    for name in names:
        threshold = histogram.threshold if name == "hu_histogram" else methods[name].threshold
        summary = _method_summary(rows, name, threshold, n_boot)
        if name == "hu_histogram":
            summary |= {"label": METHOD_LABELS[name], "aggregation": histogram.aggregation}
            summary["model"] = str(train_data or data)
        else:
            m = methods[name]
            summary |= {"label": m.label, "aggregation": m.aggregation, "model": m.source}
            summary["description"] = describe(m.meta)
            summary["training"] = _training(m.meta)
        summary["scoring_seconds"] = round(seconds[name], 2)
        report["methods"][name] = summary
    main = report["methods"]["detector"]
    # The fields of the first report format (main detector only), kept for readers of report.json.
    report["per_type"] = main["per_type"]
    report["slice_auroc"] = main["slice_auroc"]
    report["false_flag_rate_normals"] = main["false_flag_rate_normals"]
    report["differences"] = _differences(rows, names, n_boot)
    report["targets"] = _targets(report)
    report["hu_histogram_fit"] = histogram.as_dict() | {
        "data": str(train_data or data),
        "seconds": round(fit_seconds, 1),
    }
    report["position_quality_validation"] = main_meta.get("metrics", {}).get("position_quality_validation", {})
    report["model_training"] = {k: main_meta.get("training", {}).get(k) for k in ("command", "device_name", "steps")}
    report["rows"] = [
        {
            "folder": r["folder"],
            "type": r["type"],
            "scores": {k: round(float(v), 5) for k, v in r["scores"].items()},
            "score": round(float(r["scores"]["detector"]), 5),
            "flagged": bool(r["scores"]["detector"] > detector.threshold),
            "localisation": {k: v for k, v in r["localisation"].items() if v is not None},
        }
        for r in rows
    ]
    return Run(report, list(examples.values()))


# --- report.md and plots --------------------------------------------------------------------------------


def _ci(m: dict[str, Any]) -> str:
    lo, hi = m["auroc_ci95"]
    return f"{m['auroc']:.3f} ({lo:.3f}–{hi:.3f})"


def _verdict(met: bool | None) -> str:
    return {True: "**met**", False: "**missed**", None: "not evaluated"}[met]


def report_markdown(report: dict[str, Any], plots: list[str]) -> str:
    """report.md: targets, comparison of methods, differences, operating points, localisation, plots."""
    methods = report["methods"]
    names = list(methods)
    kinds = list(methods["detector"]["per_type"])
    description = report.get("description") or f"{report['family']}, {report['size']} px"
    lines = [
        f"# Detector evaluation — {report['split']} split of {report['data']}",
        "",
        f"Model `{report['model']}` ({description}, "
        f"{'position-conditioned' if report['conditioned'] else 'unconditioned'}), aggregation "
        f"`{report['aggregation']}`, threshold {report['threshold']:.4g}; {report['series']} series "
        f"({report['normal_series']} normal) scored by every method in {report['seconds']} s "
        f"({report['provider']}). CIs: {report['bootstrap']} bootstrap resamples.",
        "",
        "## Targets",
        "",
    ]
    for t in report["targets"]:
        if t["value"] is None:
            lines.append(f"- {t['target']}: {_verdict(None)}")
            continue
        ci = f" (95 % CI {t['ci95'][0]:.3f}–{t['ci95'][1]:.3f})" if t["ci95"] else ""
        worst = f" (weakest type: {t['worst_type']})" if t.get("worst_type") else ""
        lines.append(f"- {t['target']}: {t['value']:.3f}{ci}{worst} — {_verdict(t['met'])}")
    lines += [
        "",
        "## Series AUROC by method (95 % bootstrap CI)",
        "",
        "| anomaly | n | " + " | ".join(methods[k]["label"] for k in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for kind in kinds:
        n = methods["detector"]["per_type"][kind]["n"]
        lines.append(f"| {kind} | {n} | " + " | ".join(_ci(methods[k]["per_type"][kind]) for k in names) + " |")
    others = [k for k in names if k != "detector"]
    lines += [
        "",
        "## AUROC difference: detector − method (paired bootstrap 95 % CI; * = CI excludes 0)",
        "",
        "| anomaly | " + " | ".join(f"− {methods[k]['label']}" for k in others) + " |",
        "|---|" + "---|" * len(others),
    ]
    for kind in kinds:
        cells = []
        for k in others:
            d = report["differences"][k][kind]
            star = "*" if d["excludes_zero"] else ""
            cells.append(f"{d['difference']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}){star}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    if "twin_minus_ablation" in report["differences"]:
        lines += [
            "",
            "## The position condition on a matched pair: twin − ablation (paired bootstrap 95 % CI)",
            "",
            f"Both trained by the same command except `--unconditioned`: "
            f"`{(methods['twin'].get('training') or {}).get('command')}`.",
            "",
            "| anomaly | conditioned − unconditioned |",
            "|---|---|",
        ]
        for kind in kinds:
            d = report["differences"]["twin_minus_ablation"][kind]
            star = "*" if d["excludes_zero"] else ""
            lines.append(f"| {kind} | {d['difference']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f}){star} |")
    lines += [
        "",
        "## Operating point (each method at its own threshold, set on validation normals)",
        "",
        "| method | aggregation | threshold | false-flag rate (unseen normals) | sensitivity (all anomalies) "
        "| slice AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for k in names:
        m = methods[k]
        thr = "—" if m["threshold"] is None else f"{m['threshold']:.4g}"
        ffr = "—" if m["false_flag_rate_normals"] is None else f"{m['false_flag_rate_normals']:.2f}"
        sens = m["per_type"]["all"]["sensitivity_at_threshold"]
        lines.append(
            f"| {m['label']} | {m['aggregation']} | {thr} | {ffr} | "
            f"{'—' if sens is None else f'{sens:.2f}'} | {m['slice_auroc']:.3f} |"
        )
    located = [k for k in names if methods[k].get("localisation")]
    if located:
        lines += [
            "",
            "## Localisation",
            "",
            "Fraction of anomalous series where the argmax of the evidence map (Gaussian-smoothed, "
            f"σ = {LOCALISATION_SIGMA_PX:g} px, inside the body) on the highest-scoring affected slice lies "
            f"in the injected mask dilated by {LOCALISATION_DILATION_PX} px, on each method's map grid "
            "(slice recipe and autoencoder: their input size; patch recipe: its 128² z-map in the image "
            "geometry); chance = fraction of the body inside that dilated mask; [slices] = the same test on "
            "every affected slice (fraction of anomalous slices localised). The HU histogram has no map.",
            "",
            "| anomaly | n | " + " | ".join(f"{methods[k]['label']} (chance) [slices]" for k in located) + " |",
            "|---|---|" + "---|" * len(located),
        ]
        for kind in methods[located[0]]["localisation"]:
            cells = []
            for k in located:
                loc = methods[k]["localisation"].get(kind)
                if loc is None:
                    cells.append("—")
                    continue
                per_slice = "—" if loc.get("slice_hit_rate") is None else f"{loc['slice_hit_rate']:.2f}"
                cells.append(f"{loc['hit_rate']:.2f} ({loc['chance']:.2f}) [{per_slice}]")
            n = methods[located[0]]["localisation"][kind]["n"]
            lines.append(f"| {kind} | {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cost (training budget and scoring time of this run)",
        "",
        "| method | model | training wall time (s) | steps | scoring time (s) |",
        "|---|---|---|---|---|",
    ]
    for k in names:
        m = methods[k]
        training = m.get("training") or {}
        wall = training.get("wall_seconds", training.get("train_seconds"))
        steps = training.get("steps", "—")
        steps_text = ", ".join(f"{a} {b}" for a, b in steps.items()) if isinstance(steps, dict) else str(steps)
        lines.append(
            f"| {m['label']} | `{m.get('model')}` | {'—' if wall is None else wall} | {steps_text} | "
            f"{m.get('scoring_seconds', '—')} |"
        )
    main = methods["detector"]
    lines += [
        "",
        "## Detector detail",
        "",
        "| anomaly | n | series AUROC (95 % CI) | AUPRC | sensitivity at threshold |",
        "|---|---|---|---|---|",
    ]
    for kind, m in main["per_type"].items():
        lines.append(f"| {kind} | {m['n']} | {_ci(m)} | {m['auprc']:.3f} | {m['sensitivity_at_threshold']:.2f} |")
    lines += [
        "",
        f"Slice-level AUROC: {main['slice_auroc']:.3f}. False-flag rate of unseen normal series at the "
        f"threshold: {main['false_flag_rate_normals']:.2f}.",
        "",
    ]
    fit = report["hu_histogram_fit"]
    lines += [
        f"HU histogram: {len(fit['hu_bin_edges']) + 1} HU bins × {fit['position_bins']} position bins (the "
        f"detector's positions), fitted on {fit['train_series']} normal series ({fit['train_slices']} slices) "
        f"of {fit['data']} in {fit['seconds']} s.",
        "",
    ]
    quality = report.get("position_quality_validation") or {}
    if quality:
        lines += [
            "Slice position vs the phantom's true body-axis position (validation series, after a linear fit):",
            "",
            "| position | Pearson r | RMSE |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v['pearson_r']:.3f} | {v['rmse_after_linear_fit']:.3f} |" for k, v in quality.items()]
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        captions = {
            "roc.png": "Series-level ROC curves per anomaly type, every method",
            "profiles.png": "Detector slice scores along the body axis (head → feet) for example series; "
            "red: affected slices, dashed: series threshold",
            "heatmaps.png": "Evidence maps (residual or z-map) of each method's highest-scoring affected slice "
            "(cyan: injected mask, ×: argmax of the smoothed map)",
        }
        for p in plots:
            lines += [f"{captions.get(p, p)}:", "", f"![{p}]({p})", ""]
    return "\n".join(lines)


def write_plots(report: dict[str, Any], examples: list[Example], out: Path) -> list[str]:
    """roc.png, profiles.png, heatmaps.png in `out`; returns the file names written."""
    from matplotlib.figure import Figure

    written = []
    methods = report["methods"]
    rows = report["rows"]
    kinds = list(methods["detector"]["per_type"])
    cols = min(4, len(kinds))
    nrows = -(-len(kinds) // cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * nrows), layout="constrained")
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for name, m in methods.items():
            neg = [r["scores"][name] for r in rows if r["type"] == "normal"]
            pos = [r["scores"][name] for r in rows if r["type"] != "normal" and kind in ("all", r["type"])]
            fpr, tpr = roc_curve(np.array(neg), np.array(pos))
            ax.plot(fpr, tpr, label=f"{name} {m['per_type'][kind]['auroc']:.2f}")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls=":")
        ax.set_title(f"{kind} (n={methods['detector']['per_type'][kind]['n']})", fontsize=9)
        ax.set_xlabel("false-positive rate", fontsize=8)
        ax.set_ylabel("true-positive rate", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower right")
    # Panels name the methods by their short keys; the labels (long for --compare models) once, below.
    fig.supxlabel("\n".join(f"{name}: {m['label']}" for name, m in methods.items()), fontsize=7, ha="left", x=0.01)
    fig.savefig(out / "roc.png", dpi=110)
    written.append("roc.png")

    if examples:
        fig = Figure(figsize=(8, 1.9 * len(examples)), layout="constrained")
        for i, ex in enumerate(examples):
            ax = fig.add_subplot(len(examples), 1, i + 1)
            ax.plot(np.arange(ex.slice_scores.size), ex.slice_scores, lw=1.0, color="k")
            for run_start, run_end in _runs(ex.affected):
                ax.axvspan(run_start - 0.5, run_end + 0.5, color="tab:red", alpha=0.25, lw=0)
            ax.axhline(report["threshold"], color="tab:blue", ls="--", lw=0.8, label="series threshold")
            if i == 0:
                ax.legend(fontsize=7, loc="upper left")
            ax.set_title(f"{ex.type}: {ex.folder}", fontsize=8)
            ax.set_ylabel("slice score", fontsize=7)
            ax.tick_params(labelsize=7)
        ax.set_xlabel("slice (head → feet)", fontsize=8)
        fig.savefig(out / "profiles.png", dpi=110)
        written.append("profiles.png")

    located = [ex for ex in examples if ex.panels]
    if located:
        cols = 1 + max(len(ex.panels) for ex in located)
        fig = Figure(figsize=(2.6 * cols, 2.6 * len(located)), layout="constrained")
        for i, ex in enumerate(located):
            first = ex.panels[0]
            ax = fig.add_subplot(len(located), cols, i * cols + 1)
            ax.imshow(first.image, cmap="gray", vmin=-1, vmax=1)
            ax.contour(first.anomaly, levels=[0.5], colors="cyan", linewidths=0.7)
            ax.set_title(f"{ex.type}, slice {first.localisation['slice']}", fontsize=8)
            ax.axis("off")
            for j, panel in enumerate(ex.panels):
                loc = panel.localisation
                r, c = loc["argmax"]
                ax = fig.add_subplot(len(located), cols, i * cols + 2 + j)
                ax.imshow(ndimage.gaussian_filter(panel.residual.astype(np.float64), LOCALISATION_SIGMA_PX), cmap="hot")
                ax.contour(panel.anomaly, levels=[0.5], colors="cyan", linewidths=0.7)
                ax.plot([c], [r], marker="x", color="lime", ms=8, mew=2)
                verdict = "hit" if loc["hit"] else "miss"
                ax.set_title(f"{textwrap.fill(panel.label, 30)}\nslice {loc['slice']}: {verdict}", fontsize=6)
                ax.axis("off")
        fig.savefig(out / "heatmaps.png", dpi=110)
        written.append("heatmaps.png")
    return written


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs (first, last) of sorted slice indices."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def write_report(run: Run, out: Path) -> None:
    """report.json, the plots and report.md (which links them) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(run.report, indent=1))
    plots = write_plots(run.report, run.examples, out)
    (out / "report.md").write_text(report_markdown(run.report, plots))


def run(args: argparse.Namespace) -> int:
    if args.diagnose:
        import shlex
        import sys

        from models.detector import diagnose

        if not args.data.is_dir():
            raise UsageError(f"--data {args.data} is not a folder")
        try:
            diagnose.run(
                data=args.data, model=args.model, out=args.out, command=shlex.join(["gatekeeper", *sys.argv[1:]])
            )
        except (OSError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        print((args.out / "report.md").read_text())
        return 0
    if args.bootstrap < 10:
        raise UsageError(f"--bootstrap must be >= 10, got {args.bootstrap}")
    try:
        import matplotlib  # noqa: F401 — the plots need it; say so before an hour of scoring
    except ImportError:
        raise UsageError("the evaluation plots need matplotlib: pip install -e '.[train]'") from None
    try:
        result = evaluate(
            args.data,
            args.model,
            args.split,
            args.bootstrap,
            ablation=args.ablation,
            autoencoder=args.autoencoder,
            train_data=args.train_data,
            ablation_twin=args.ablation_twin,
            compare=parse_compare(args.compare),
        )
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    write_report(result, args.out)
    print((args.out / "report.md").read_text())
    return 0
