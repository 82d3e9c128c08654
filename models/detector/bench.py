"""Scoring speed of the detector: PyTorch eager vs the fused ONNX Runtime scorer, same slices.

    gatekeeper bench score [--model DIR] [--threads N] [--quick]     (the CPU benchmark; see run_cli)
    python -m models.detector bench --model DIR [--device cpu|cuda] [--seconds 5]   (GPU run helper)

`gatekeeper bench score` prints, on this machine: slices/s of PyTorch eager fp32, of the fused
ONNX Runtime graph (fp32) and of PyTorch bf16 autocast at each batch size, with their ratios; the
bf16 scores' deviation from fp32; the model's GFLOP per slice (conv and matmul operations counted
by `torch.utils.flop_counter`) and the achieved GFLOP/s next to this machine's fp32 matmul peak
measured in the same run; and the end-to-end time to score a 300-slice 512² series (DICOM read +
preprocessing + scoring, the shipped ONNX files through `service.inference.Detector`).

A model folder without `weights.pt` (the shipped one) is rebuilt from `model.json` (family, size,
condition) with fresh weights, exported to a temporary ONNX file and timed that way: the work per
slice, and so the timing, does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.detector.export import export_graph, load_scorer
from models.detector.networks import Scorer, build_networks
from service.errors import UsageError
from service.model_paths import DEFAULT_DETECTOR_DIR

log = logging.getLogger(__name__)


def _rate(fn: Callable[[], object], batch: int, seconds: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


def bench(
    model_dir: Path, device: str = "cpu", seconds: float = 3.0, batches: Sequence[int] = (16, 64)
) -> dict[str, Any]:
    import onnxruntime as ort

    meta = json.loads((model_dir / "model.json").read_text())
    size = int(meta["size"])
    dev = torch.device(device)
    scorer = load_scorer(model_dir, dev)
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers()
        else ["CPUExecutionProvider"]
    )
    session = ort.InferenceSession(str(model_dir / "scorer.onnx"), providers=providers)
    result: dict[str, Any] = {"device": str(dev), "ort_provider": session.get_providers()[0], "size": size, "rates": {}}
    if dev.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(dev)
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.uniform(-1, 1, (b, 1, size, size)).astype(np.float32)
        p = rng.uniform(0, 1, b).astype(np.float32)
        m = (rng.uniform(size=(b, 1, size, size)) > 0.3).astype(np.float32)
        xt, pt, mt = (torch.from_numpy(v).to(dev) for v in (x, p, m))

        def torch_run(xt: torch.Tensor = xt, pt: torch.Tensor = pt, mt: torch.Tensor = mt) -> None:
            with torch.inference_mode():
                scorer(xt, pt, mt)[0].cpu()

        def ort_run(feeds: dict[str, np.ndarray] = {"image": x, "position": p, "mask": m}) -> None:  # noqa: B006 — read only
            session.run(None, feeds)

        rates = {
            "torch_eager": _rate(torch_run, b, seconds),
            f"ort_{result['ort_provider']}": _rate(ort_run, b, seconds),
        }
        result["rates"][b] = {k: round(v, 1) for k, v in rates.items()}
        log.info(
            "bench batch %d: %s slices/s (300-slice series: %s s)",
            b,
            result["rates"][b],
            {k: round(300 / v, 2) for k, v in rates.items()},
        )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.detector bench")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args(argv)
    log.info("bench result: %s", json.dumps(bench(a.model, a.device, a.seconds)))
    return 0


# --- gatekeeper bench score ------------------------------------------------------------------------------

TARGET_ORT_SPEEDUP = 1.3
TARGET_SERIES_SECONDS = 15.0
#: bf16 is acceptable when the score terms stay within this relative distance of fp32.
REDUCED_PRECISION_TOLERANCE = 0.01


def scorer_for_bench(model_dir: Path) -> tuple[Scorer, bool]:
    """The model's torch Scorer: from weights.pt when present, else the same architecture from model.json
    with fresh weights (seed 0). Returns (scorer in eval mode, True when the weights are fresh)."""
    if (model_dir / "weights.pt").is_file():
        return load_scorer(model_dir, torch.device("cpu")), False
    meta = json.loads((model_dir / "model.json").read_text())
    torch.manual_seed(0)
    nets = build_networks(
        meta["family"],
        int(meta["size"]),
        z_dim=int(meta.get("z_dim", 128)),
        conditioned=bool(meta.get("conditioned", True)),
    )
    nets.G.noise_mode = "const"
    scorer = Scorer(nets.G, nets.E, nets.D, kappa=float(meta.get("kappa", 1.0)))
    norm = meta.get("normalisation")
    if norm:
        scorer.set_position_normalisation(
            norm["position_grid"],
            [norm["mu_residual"], norm["sigma_residual"], norm["mu_feature"], norm["sigma_feature"]],
        )
    return scorer.eval(), True


def gflop_per_slice(scorer: Scorer, size: int) -> float:
    """Conv and matmul GFLOP of one slice score (multiply-add = 2 FLOP), counted on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(2, 1, size, size) * 2 - 1
    counter = FlopCounterMode(display=False)
    with counter:  # not under inference_mode: the counter's module tracker needs autograd
        scorer(x, torch.rand(2), torch.ones(2, 1, size, size))
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
    scorer: Scorer, onnx_path: Path, size: int, batches: Sequence[int], seconds: float, threads: int | None
) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]]]:
    """Slices/s per batch and engine, and the agreement of ORT and bf16 with torch fp32.

    Engines: `torch_fp32` (eager, inference_mode), `ort_fp32` (the fused ONNX graph of the same
    weights, CPU provider), `torch_bf16` (eager under torch.autocast(bfloat16)).
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
        x = rng.uniform(-1, 1, (b, 1, size, size)).astype(np.float32)
        p = rng.uniform(0, 1, b).astype(np.float32)
        m = (rng.uniform(size=(b, 1, size, size)) > 0.3).astype(np.float32)
        xt, pt, mt = (torch.from_numpy(v) for v in (x, p, m))
        feeds = {"image": x, "position": p, "mask": m}

        def torch_fp32() -> tuple[torch.Tensor, ...]:
            with torch.inference_mode():
                terms: tuple[torch.Tensor, ...] = scorer(xt, pt, mt)
                return terms

        def torch_bf16() -> tuple[torch.Tensor, ...]:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                terms: tuple[torch.Tensor, ...] = scorer(xt, pt, mt)
                return terms

        def ort_fp32() -> list[np.ndarray]:
            outputs: list[np.ndarray] = session.run(None, feeds)
            return outputs

        rates[b] = {
            "torch_fp32": _rate(torch_fp32, b, seconds),
            "ort_fp32": _rate(ort_fp32, b, seconds),
            "torch_bf16": _rate(torch_bf16, b, seconds),
        }
        reference = [t.float().numpy() for t in torch_fp32()[:3]]  # score, residual term, feature term
        low = [t.float().numpy() for t in torch_bf16()[:3]]
        onnx = ort_fp32()[:3]
        agreement[b] = {
            "ort_terms_max_rel": max(_max_relative(onnx[i], reference[i]) for i in (1, 2)),
            "bf16_terms_max_rel": max(_max_relative(low[i], reference[i]) for i in (1, 2)),
            "bf16_score_max_abs": float(np.max(np.abs(low[0] - reference[0]))),
        }
        log.info("batch %d: %s slices/s", b, {k: round(v, 1) for k, v in rates[b].items()})
    return rates, agreement


def series_end_to_end(model_dir: Path, slices: int, matrix: int) -> dict[str, Any]:
    """Seconds to read, preprocess and score one generated `slices`-slice series with the model's ONNX
    files, exactly as `gatekeeper score` does (`service.inference.Detector`, ONNX Runtime CPU provider
    with its default threads). Generating the series is not timed."""
    import tempfile

    from service import dicom_series, imaging
    from service.inference import Detector
    from service.phantom.generate import SeriesSpec, generate_series

    with tempfile.TemporaryDirectory(prefix="gk-bench-") as tmp:
        t0 = time.perf_counter()
        generate_series(
            SeriesSpec(folder="series", patient_seed=7, series_seed=8, num_slices=slices, matrix=matrix), Path(tmp)
        )
        generated = time.perf_counter() - t0
        t0 = time.perf_counter()
        detector = Detector(model_dir, providers=["CPUExecutionProvider"])
        session_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        (group,) = dicom_series.ct_series_in(dicom_series.scan_tree(Path(tmp) / "series"))
        series = dicom_series.load_series(group)
        t1 = time.perf_counter()
        images, masks = imaging.preprocess_slices(series.hu, detector.size, detector.window)
        t2 = time.perf_counter()
        positions = detector.positions(images, series.locations_mm)
        scores, _ = detector.score_arrays(images, masks, positions)
        imaging.aggregate_slice_scores(scores, detector.aggregation)
        t3 = time.perf_counter()
    return {
        "slices": slices,
        "matrix": matrix,
        "generate_s": round(generated, 1),
        "session_start_s": round(session_seconds, 2),
        "read_s": round(t1 - t0, 2),
        "preprocess_s": round(t2 - t1, 2),
        "score_s": round(t3 - t2, 2),
        "total_s": round(t3 - t0, 2),
    }


def bench_score(
    model_dir: Path,
    *,
    batches: Sequence[int],
    seconds: float,
    series_slices: int,
    matrix: int,
    threads: int | None,
    matmul_n: int = 2048,
) -> dict[str, Any]:
    """Every number of `gatekeeper bench score` (see the module docstring) as one dict."""
    import os
    import platform
    import tempfile

    import onnxruntime as ort

    if threads:
        torch.set_num_threads(threads)
    meta = json.loads((model_dir / "model.json").read_text())
    size = int(meta["size"])
    scorer, fresh = scorer_for_bench(model_dir)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    result: dict[str, Any] = {
        "model": str(model_dir),
        "family": meta.get("family"),
        "size": size,
        "conditioned": meta.get("conditioned", True),
        "fresh_weights": fresh,
        "machine": {
            "cpu": cpu,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "ort_threads": threads or "default",
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
        },
        "gflop_per_slice": round(gflop_per_slice(scorer, size), 3),
        "matmul_peak_gflops": round(matmul_peak(matmul_n, min(3.0, 2 * seconds)), 1),
        "matmul_n": matmul_n,
    }
    with tempfile.TemporaryDirectory(prefix="gk-bench-onnx-") as tmp:
        onnx_path = Path(tmp) / "scorer.onnx"
        x = torch.rand(2, 1, size, size) * 2 - 1
        export_graph(
            scorer,
            (x, torch.rand(2), torch.ones(2, 1, size, size)),
            onnx_path,
            ["image", "position", "mask"],
            ["score", "residual", "feature", "residual_map"],
        )
        rates, agreement = engine_rates(scorer, onnx_path, size, batches, seconds, threads)
    result["rates"] = {b: {k: round(v, 2) for k, v in r.items()} for b, r in rates.items()}
    result["agreement"] = agreement
    result["series"] = series_end_to_end(model_dir, series_slices, matrix)
    return result


def format_table(r: dict[str, Any]) -> str:
    """The benchmark as Markdown: setup lines, a rate table with ratios, target lines."""
    m = r["machine"]
    peak = r["matmul_peak_gflops"]
    lines = [
        f"Detector scoring benchmark: {r['model']} ({r['family']}, {r['size']} px, "
        f"{'conditioned' if r['conditioned'] else 'unconditioned'})",
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']} (threads: {m['torch_threads']}), "
        f"onnxruntime {m['onnxruntime']} (threads: {m['ort_threads']}).",
        "Weights: "
        + (
            "fresh, the same architecture as model.json (no weights.pt; timing does not depend on weight values)"
            if r["fresh_weights"]
            else "the model's weights.pt"
        )
        + ".",
        f"Work: {r['gflop_per_slice']:.3f} GFLOP per slice (conv + matmul). fp32 matmul peak of this machine: "
        f"{peak:.0f} GFLOP/s ({r['matmul_n']}² torch.mm, best of repeats).",
        "",
        "| batch | engine | slices/s | GFLOP/s | % of matmul peak | vs PyTorch eager fp32 |",
        "|---|---|---|---|---|---|",
    ]
    names = {
        "torch_fp32": "PyTorch eager fp32",
        "ort_fp32": "ONNX Runtime fp32 (fused scorer)",
        "torch_bf16": "PyTorch eager bf16 autocast",
    }
    for b, rates in r["rates"].items():
        base = rates["torch_fp32"]
        for key, label in names.items():
            gf = rates[key] * r["gflop_per_slice"]
            lines.append(
                f"| {b} | {label} | {rates[key]:.1f} | {gf:.0f} | {100 * gf / peak:.0f} % | {rates[key] / base:.2f}× |"
            )
    lines.append("")
    for b, rates in r["rates"].items():
        ratio = rates["ort_fp32"] / rates["torch_fp32"]
        verdict = "met" if ratio >= TARGET_ORT_SPEEDUP else "missed"
        lines.append(f"ORT / eager fp32 at batch {b}: {ratio:.2f}× (target ≥ {TARGET_ORT_SPEEDUP}×: {verdict})")
    for b, rates in r["rates"].items():
        a = r["agreement"][b]
        ok = a["bf16_terms_max_rel"] <= REDUCED_PRECISION_TOLERANCE
        lines.append(
            f"bf16 / eager fp32 at batch {b}: {rates['torch_bf16'] / rates['torch_fp32']:.2f}×; score terms "
            f"within {100 * a['bf16_terms_max_rel']:.2g} % of fp32 "
            f"(max |Δscore| {a['bf16_score_max_abs']:.3g}) "
            f"— {'within' if ok else 'outside'} the 1 % tolerance"
            f"{'' if ok else ', so not usable'}; ORT vs torch fp32 terms within "
            f"{100 * a['ort_terms_max_rel']:.2g} %"
        )
    s = r["series"]
    if s["slices"] >= 300:
        verdict = "met" if s["total_s"] <= TARGET_SERIES_SECONDS else "missed"
    else:
        verdict = "not comparable: fewer slices"
    lines += [
        "",
        f"{s['slices']}-slice {s['matrix']}² series end to end (the model's ONNX files, as "
        "`gatekeeper score`): "
        f"read {s['read_s']:.2f} s + preprocess {s['preprocess_s']:.2f} s + position and score "
        f"{s['score_s']:.2f} s = {s['total_s']:.2f} s (target ≤ {TARGET_SERIES_SECONDS:g} s for 300 slices: "
        f"{verdict}); session start {s['session_start_s']:.2f} s once per worker, not counted; "
        f"generating the series took {s['generate_s']:.0f} s, not counted.",
    ]
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of `gatekeeper bench score`."""
    model_dir = args.model or DEFAULT_DETECTOR_DIR
    if not (model_dir / "model.json").is_file():
        raise UsageError(f"no model.json in {model_dir}")
    try:
        batches = [int(b) for b in args.batches.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batches must be comma-separated integers, got {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise UsageError(f"--batches must be positive integers, got {args.batches!r}")
    if not args.seconds > 0:
        raise UsageError(f"--seconds must be > 0, got {args.seconds}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.quick:
        batches, seconds, slices, matrix, matmul_n = [2], 0.3, 16, 64, 256
    else:
        seconds, slices, matrix, matmul_n = args.seconds, args.series_slices, args.matrix, 2048
    if slices < 2 or not 64 <= matrix <= 1024:
        raise UsageError("--series-slices must be >= 2 and --matrix within 64..1024")
    result = bench_score(
        model_dir,
        batches=batches,
        seconds=seconds,
        series_slices=slices,
        matrix=matrix,
        threads=args.threads,
        matmul_n=matmul_n,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    return 0
