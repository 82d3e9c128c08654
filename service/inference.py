"""Scoring CT series with the exported detector — ONNX Runtime only, no torch.

Every number comes from the model folder's `model.json` (written by `models/detector/export.py`
and `train.py`): input size, position method and normalisation, series aggregation, threshold.
ONNX Runtime sessions are created once per `Detector`; the CUDA execution provider is used when
this onnxruntime build has it, the CPU provider otherwise, and the provider in use is logged.

Per slice: the slice is preprocessed (`service.imaging.preprocess_slices`), given its position
along the body axis (body-part regression fitted over the series, or 0…1 within the series), and
scored by `scorer.onnx`; the series score aggregates the slice scores and is flagged when it is
above the threshold calibrated on normal validation series.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service import imaging
from service.dicom_series import CTSeries

log = logging.getLogger(__name__)

SUPPORTED_FORMAT = 1
_REQUIRED = ("format", "size", "position", "files", "aggregation", "threshold", "preprocessing")


@dataclass(frozen=True)
class SliceScore:
    sop_instance_uid: str
    position: float  # conditioning position along the body axis (≈ 0 head-most … 1 foot-most of training range)
    score: float  # normalised anomaly score; ≈ 0 typical of validation normals, larger = more unusual


@dataclass
class DetectorVerdict:
    """The detector's verdict on one series; `flagged` means: route to a human, do not auto-segment.

    The pipeline stores it as a `service.db.tables.SeriesScore` row.
    """

    series_instance_uid: str
    score: float
    threshold: float
    flagged: bool
    slices: list[SliceScore]
    residual_maps: np.ndarray | None = field(default=None, repr=False)  # [k, S, S] |x − G(E(x))| in the body

    def as_dict(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid,
            "score": round(self.score, 6),
            "threshold": round(self.threshold, 6),
            "flagged": self.flagged,
            "slices": [
                {"sop_instance_uid": s.sop_instance_uid, "position": round(s.position, 5), "score": round(s.score, 6)}
                for s in self.slices
            ],
        }


def choose_providers(prefer_cuda: bool = True) -> list[str]:
    """CUDA then CPU when this onnxruntime build offers CUDA, else CPU only."""
    available = ort.get_available_providers()
    if prefer_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def read_model_json(model_dir: Path) -> dict[str, Any]:
    """The model description, checked.

    Raises:
        FileNotFoundError: no model.json in `model_dir`.
        ValueError: a required field is missing or the format is not supported (message names it).
    """
    path = Path(model_dir) / "model.json"
    meta: dict[str, Any] = json.loads(path.read_text())
    for key in _REQUIRED:
        if key not in meta:
            raise ValueError(f"{path}: field {key!r} missing")
    if meta["format"] != SUPPORTED_FORMAT:
        raise ValueError(f"{path}: format {meta['format']!r}; this gatekeeper reads format {SUPPORTED_FORMAT}")
    if meta["aggregation"] not in imaging.AGGREGATIONS:
        raise ValueError(f"{path}: aggregation {meta['aggregation']!r} unknown; expected one of {imaging.AGGREGATIONS}")
    if meta["position"].get("method") not in ("bpr", "naive"):
        raise ValueError(f"{path}: position.method must be 'bpr' or 'naive'")
    return meta


def _file_version(path: Path) -> str:
    """The first 16 hex digits of the SHA-256 of a model file."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


class Detector:
    """A loaded detector: ONNX Runtime sessions built once, reused for every series."""

    def __init__(self, model_dir: Path | str, *, providers: Sequence[str] | None = None, batch: int = 32) -> None:
        self.model_dir = Path(model_dir)
        self.meta = read_model_json(self.model_dir)
        self.size = int(self.meta["size"])
        self.threshold = float(self.meta["threshold"])
        self.aggregation = str(self.meta["aggregation"])
        self.position_meta = self.meta["position"]
        self.batch = batch
        pre = self.meta["preprocessing"]
        self.window = imaging.Window(float(pre["window_center_hu"]), float(pre["window_width_hu"]))
        providers = list(providers) if providers is not None else choose_providers()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        files = self.meta["files"]
        self.scorer = ort.InferenceSession(str(self.model_dir / files["scorer"]), options, providers=providers)
        self.position_net = None
        if self.position_meta["method"] == "bpr":
            self.position_net = ort.InferenceSession(
                str(self.model_dir / files["position"]), options, providers=providers
            )
        self.provider = self.scorer.get_providers()[0]
        # The version that results are keyed by: model.json's `version`, else a hash of the scorer file.
        self.version = str(self.meta.get("version") or _file_version(self.model_dir / files["scorer"]))
        log.info(
            "detector %s (%s, %d px, position %s): ONNX Runtime provider %s",
            self.model_dir,
            self.meta.get("family"),
            self.size,
            self.position_meta["method"],
            self.provider,
        )

    def positions(self, images: np.ndarray, locations_mm: np.ndarray) -> np.ndarray:
        """Conditioning position of each slice (images [k, S, S] preprocessed, head → feet)."""
        k = images.shape[0]
        if self.position_net is None:
            return np.linspace(0.0, 1.0, k, dtype=np.float32) if k > 1 else np.zeros(1, np.float32)
        raw = np.concatenate(
            [
                self.position_net.run(None, {"image": images[i : i + self.batch, None]})[0]
                for i in range(0, k, self.batch)
            ]
        )
        fitted = imaging.fit_series_positions(raw, locations_mm, float(self.position_meta["mm_per_unit"]))
        lo, hi = float(self.position_meta["lo"]), float(self.position_meta["hi"])
        return ((fitted - lo) / (hi - lo)).astype(np.float32)

    def score_arrays(
        self, images: np.ndarray, masks: np.ndarray, positions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Slice scores [k] and residual maps [k, S, S] for preprocessed slices."""
        scores, maps = [], []
        for i in range(0, images.shape[0], self.batch):
            score, _, _, residual_map = self.scorer.run(
                None,
                {
                    "image": np.ascontiguousarray(images[i : i + self.batch, None], np.float32),
                    "position": np.ascontiguousarray(positions[i : i + self.batch], np.float32),
                    "mask": np.ascontiguousarray(masks[i : i + self.batch, None], np.float32),
                },
            )
            scores.append(score)
            maps.append(residual_map[:, 0])
        return np.concatenate(scores), np.concatenate(maps)

    def score_series(self, series: CTSeries, *, keep_maps: bool = False) -> DetectorVerdict:
        """Score every slice of `series` and the series as a whole."""
        images, masks = imaging.preprocess_slices(series.hu, self.size, self.window)
        positions = self.positions(images, series.locations_mm)
        scores, maps = self.score_arrays(images, masks, positions)
        total = imaging.aggregate_slice_scores(scores, self.aggregation)
        return DetectorVerdict(
            series_instance_uid=series.series_instance_uid,
            score=total,
            threshold=self.threshold,
            flagged=bool(total > self.threshold),
            slices=[
                SliceScore(uid, float(p), float(s)) for uid, p, s in zip(series.sop_instance_uids, positions, scores)
            ],
            residual_maps=maps if keep_maps else None,
        )
