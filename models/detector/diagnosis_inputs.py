"""What the diagnosis (`models.detector.diagnose`) and each family's part of it share: one phantom
series to diagnose (`Case`), what a detector made of it (`Scored`), and the ONNX sessions and reading
every family needs. Each family scores a case in its own `diagnosis.py`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Case:
    """One phantom series: its folder, anomaly type ("normal" if none), affected slices and anomaly SEG."""

    folder: Path
    kind: str
    affected: tuple[int, ...]
    seg: Path | None


@dataclass
class Scored:
    """What the detector made of one series (model grid, head → feet)."""

    case: Case
    images: np.ndarray  # [k, S, S] model input in [-1, 1]
    body: np.ndarray  # [k, S, S] bool
    positions: np.ndarray  # [k]
    scores: np.ndarray  # [k] normalised slice scores
    reconstructions: np.ndarray  # [k, S, S]
    residual_maps: np.ndarray  # [k, S, S]
    series_score: float
    anomaly: np.ndarray | None  # [k, S, S] bool, for anomalous series


def encoder_and_generator(model_dir: Path, meta: dict[str, Any]) -> tuple[Any, Any]:
    """ONNX Runtime sessions (CPU) of the model's encoder.onnx and generator.onnx, as model.json names them."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    files, cpu = meta["files"], ["CPUExecutionProvider"]
    encoder = ort.InferenceSession(str(model_dir / files["encoder"]), options, providers=cpu)
    generator = ort.InferenceSession(str(model_dir / files["generator"]), options, providers=cpu)
    return encoder, generator


def read_case(case: Case) -> Any:
    """The one CT series in the case's folder (`service.dicom_series.CTSeries`).

    Raises:
        ValueError: not exactly one CT series there.
    """
    from service.dicom_series import read_ct_series

    series = read_ct_series(case.folder)
    if len(series) != 1:
        raise ValueError(f"{case.folder}: expected one CT series, found {len(series)}")
    return series[0]
