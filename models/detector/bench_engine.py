"""What every detector family's scoring benchmark shares: item rates of torch eager, ONNX Runtime and
bf16 on the same random inputs, the work per item, this machine's matmul peak, and the end-to-end
time of one generated series scored as `gatekeeper score` does. The families' own parts:
`models/detector/<family>/bench.py`; the command: `models.detector.bench`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.dicom_series import CTSeries

log = logging.getLogger(__name__)

#: Random inputs of a scorer for a batch (b, rng) → {input name: array}, in call order.
Feeds = Callable[[int, np.random.Generator], dict[str, np.ndarray]]


def rate(fn: Callable[[], object], batch: int, seconds: float) -> float:
    """Items/s of `fn` (one batch of `batch` items per call) over `seconds`, after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


def gflop_per_item(scorer: torch.nn.Module, feeds: Feeds) -> float:
    """Conv and matmul GFLOP of one item's score (multiply-add = 2 FLOP), counted on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = [torch.from_numpy(v) for v in feeds(2, np.random.default_rng(0)).values()]
    counter = FlopCounterMode(display=False)
    with counter:  # not under inference_mode: the counter's module tracker needs autograd
        scorer(*inputs)
    return counter.get_total_flops() / 2 / 1e9


def matmul_peak(n: int, seconds: float) -> float:
    """This machine's fp32 matrix-multiply rate in GFLOP/s (best of repeated n×n products, torch)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def _max_relative(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / |b| over elements (b the reference)."""
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def engine_rates(
    scorer: torch.nn.Module,
    onnx_path: Path,
    feeds: Feeds,
    batches: Sequence[int],
    seconds: float,
    threads: int | None,
) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]]]:
    """Items/s per batch and engine, and the agreement of ORT and bf16 with torch fp32, on the same inputs.

    Engines: `torch_fp32` (eager, inference_mode), `ort_fp32` (the fused ONNX graph of the same
    weights, CPU provider), `torch_bf16` (eager under torch.autocast(bfloat16)). The scorer's first
    three outputs are (score, residual term, feature term), in both recipes.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    rates: dict[int, dict[str, float]] = {}
    agreement: dict[int, dict[str, float]] = {}
    for b in batches:
        arrays = feeds(b, rng)
        tensors = [torch.from_numpy(v) for v in arrays.values()]

        def torch_fp32(tensors: list[torch.Tensor] = tensors) -> tuple[torch.Tensor, ...]:
            with torch.inference_mode():
                terms: tuple[torch.Tensor, ...] = scorer(*tensors)
                return terms

        def torch_bf16(tensors: list[torch.Tensor] = tensors) -> tuple[torch.Tensor, ...]:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                terms: tuple[torch.Tensor, ...] = scorer(*tensors)
                return terms

        def ort_fp32(arrays: dict[str, np.ndarray] = arrays) -> list[np.ndarray]:
            outputs: list[np.ndarray] = session.run(None, arrays)
            return outputs

        rates[b] = {
            "torch_fp32": rate(torch_fp32, b, seconds),
            "ort_fp32": rate(ort_fp32, b, seconds),
            "torch_bf16": rate(torch_bf16, b, seconds),
        }
        reference = [t.float().numpy() for t in torch_fp32()[:3]]  # score, residual term, feature term
        low = [t.float().numpy() for t in torch_bf16()[:3]]
        onnx = ort_fp32()[:3]
        agreement[b] = {
            "ort_terms_max_rel": max(_max_relative(onnx[i], reference[i]) for i in (1, 2)),
            "bf16_terms_max_rel": max(_max_relative(low[i], reference[i]) for i in (1, 2)),
            "bf16_score_max_abs": float(np.max(np.abs(low[0] - reference[0]))),
        }
        log.info("batch %d: %s items/s", b, {k: round(v, 1) for k, v in rates[b].items()})
    return rates, agreement


def generated_series(tmp: Path, slices: int, matrix: int) -> float:
    """Write the benchmark's phantom series to `tmp`/series; return the seconds it took (not counted)."""
    from service.phantom.generate import SeriesSpec, generate_series

    t0 = time.perf_counter()
    generate_series(SeriesSpec(folder="series", patient_seed=7, series_seed=8, num_slices=slices, matrix=matrix), tmp)
    return time.perf_counter() - t0


#: One family's scoring of a loaded series, timed step by step: (detector, series, start) → (end of
#: preprocessing start, scoring start, end, extra fields); see `series_end_to_end`.
SeriesSteps = Callable[[Any, CTSeries, float], tuple[float, float, float, dict[str, Any]]]


def series_end_to_end(
    model_dir: Path, slices: int, matrix: int, open_detector: Callable[[Path], Any], steps: SeriesSteps
) -> dict[str, Any]:
    """Seconds to read, preprocess and score one generated `slices`-slice series with the model's ONNX
    files, exactly as `gatekeeper score` does (`open_detector`: the family's `service.inference` class
    on the ONNX Runtime CPU provider with its default threads; `steps`: its scoring, step by step).
    Generating the series is not timed; starting the sessions is timed apart (once per worker)."""
    import tempfile

    from service import dicom_series

    with tempfile.TemporaryDirectory(prefix="gk-bench-") as tmp:
        generated = generated_series(Path(tmp), slices, matrix)
        t0 = time.perf_counter()
        detector = open_detector(model_dir)
        session_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        (group,) = dicom_series.ct_series_in(dicom_series.scan_tree(Path(tmp) / "series"))
        series = dicom_series.load_series(group)
        t_read = time.perf_counter()
        t_pre, t_score, t_end, extra = steps(detector, series, t_read)
    return {
        "slices": slices,
        "matrix": matrix,
        "generate_s": round(generated, 1),
        "session_start_s": round(session_seconds, 2),
        "read_s": round(t_read - t0, 2),
        "preprocess_s": round(t_score - t_pre, 2),
        "score_s": round(t_end - t_score, 2),
        "total_s": round(t_end - t0, 2),
        **extra,
    }


def machine(threads: int | None) -> dict[str, Any]:
    """The machine and library versions the rates were measured with."""
    import os
    import platform

    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ort_threads": threads or "default",
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
    }
