"""Scoring speed of the detector: PyTorch eager vs the fused ONNX Runtime scorer, same inputs.

    gatekeeper bench score [--model DIR] [--threads N] [--quick]     (the CPU benchmark; see run_cli)
    python -m models.detector bench --model DIR [--device cpu|cuda] [--seconds 5]   (GPU run helper)

`gatekeeper bench score` prints, on this machine: items/s of PyTorch eager fp32, of the fused ONNX
Runtime graph (fp32) and of PyTorch bf16 autocast at each batch size, with their ratios; the bf16
scores' deviation from fp32; the model's GFLOP per item (conv and matmul operations counted by
`torch.utils.flop_counter`) and the achieved GFLOP/s next to this machine's fp32 matmul peak
measured in the same run; and the end-to-end time to score a 300-slice 512² series (DICOM read +
preprocessing + scoring, the model's ONNX files through `service.inference`, as `gatekeeper score`).

An item is a slice for a format-1 model (slice recipe: `scorer.onnx`, `service.inference.Detector`)
and a 32² multi-window patch for a format-2 model (patch recipe: `patch_scorer.onnx`,
`service.inference.PatchDetector`; a slice is ≈ 100–200 body patches, the end-to-end series says how
many); both engines get the same random inputs.

A model folder without `weights.pt` (the shipped one) is rebuilt from `model.json` (family, size,
condition) with fresh weights, exported to a temporary ONNX file and timed that way: the work per
item, and so the timing, does not depend on the weight values. With `weights.pt`, a format-2
model's own `patch_scorer.onnx` (the served graph) is timed against the same weights in torch.
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
from models.detector.networks_patch import LOCAL_SIGMA_PX, PATCH, PatchScorer, build_patch_networks
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
    model_dir: Path, device: str = "cpu", seconds: float = 3.0, batches: Sequence[int] | None = None
) -> dict[str, Any]:
    """Items/s of torch eager and ONNX Runtime (CUDA provider when this build has it) on `device`.

    Items are slices (format 1, default batches 16, 64) or patches (format 2, default 512, 4096 on a GPU,
    64, 512 on the CPU). A model without weights.pt is timed with fresh weights (`scorer_for_bench`)."""
    import onnxruntime as ort

    meta = json.loads((model_dir / "model.json").read_text())
    patch = meta.get("format") == PATCH_FORMAT
    dev = torch.device(device)
    scorer: torch.nn.Module
    if patch:
        scorer = patch_scorer_for_bench(model_dir)[0].to(dev)
        feeds, onnx_name = patch_feeds(int(meta.get("channels", 3))), meta["files"]["patch_scorer"]
        batches = batches or ((512, 4096) if dev.type == "cuda" else (64, 512))
    else:
        scorer = scorer_for_bench(model_dir)[0].to(dev)
        feeds, onnx_name = slice_feeds(int(meta["size"])), "scorer.onnx"
        batches = batches or (16, 64)
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers()
        else ["CPUExecutionProvider"]
    )
    session = ort.InferenceSession(str(model_dir / onnx_name), providers=providers)
    result: dict[str, Any] = {
        "device": str(dev),
        "ort_provider": session.get_providers()[0],
        "item": "patch" if patch else "slice",
        "rates": {},
    }
    if dev.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(dev)
    rng = np.random.default_rng(0)
    for b in batches:
        arrays = feeds(b, rng)
        tensors = [torch.from_numpy(v).to(dev) for v in arrays.values()]

        def torch_run(tensors: list[torch.Tensor] = tensors) -> None:
            with torch.inference_mode():
                scorer(*tensors)[0].cpu()

        def ort_run(arrays: dict[str, np.ndarray] = arrays) -> None:
            session.run(None, arrays)

        rates = {
            "torch_eager": _rate(torch_run, b, seconds),
            f"ort_{result['ort_provider']}": _rate(ort_run, b, seconds),
        }
        result["rates"][b] = {k: round(v, 1) for k, v in rates.items()}
        log.info("bench batch %d: %s %s/s", b, result["rates"][b], "patches" if patch else "slices")
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


#: model.json format of the patch recipe (`service.inference.PATCH_FORMAT`).
PATCH_FORMAT = 2


def patch_scorer_for_bench(model_dir: Path) -> tuple[PatchScorer, bool]:
    """A format-2 model's torch PatchScorer: G_ema, E, D from weights.pt when present, else the same
    networks from model.json (channels, condition) with fresh weights (seed 0). Returns (scorer in eval
    mode, True when the weights are fresh)."""
    meta = json.loads((model_dir / "model.json").read_text())
    channels = int(meta.get("channels", 3))
    conditioned = bool(meta.get("conditioned", True))
    fresh = not (model_dir / "weights.pt").is_file()
    if fresh:
        torch.manual_seed(0)
    nets = build_patch_networks(channels, conditioned=conditioned, z_dim=int(meta.get("z_dim", 64)))
    if not fresh:
        weights = torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=False)
        nets.G.load_state_dict(weights["G_ema"])
        nets.E.load_state_dict(weights["E"])
        nets.D.load_state_dict(weights["D"])
    scorer = PatchScorer(
        nets.G,
        nets.E,
        nets.D,
        kappa=float(meta.get("kappa", 1.0)),
        score=str(meta.get("patch_score", "mean")),
        sigma=float(meta.get("local_sigma_px") or LOCAL_SIGMA_PX),
    )
    return scorer.eval(), fresh


Feeds = Callable[[int, np.random.Generator], dict[str, np.ndarray]]


def slice_feeds(size: int) -> Feeds:
    """Random inputs of the slice scorer for a batch: image, position, body mask (in call order)."""

    def make(b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            "image": rng.uniform(-1, 1, (b, 1, size, size)).astype(np.float32),
            "position": rng.uniform(0, 1, b).astype(np.float32),
            "mask": (rng.uniform(size=(b, 1, size, size)) > 0.3).astype(np.float32),
        }

    return make


def patch_feeds(channels: int) -> Feeds:
    """Random inputs of the patch scorer for a batch: patches [b, C, 32, 32], cond [b, 3] (in call order)."""

    def make(b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {
            "patches": rng.uniform(-1, 1, (b, channels, PATCH, PATCH)).astype(np.float32),
            "cond": rng.uniform(0, 1, (b, 3)).astype(np.float32),
        }

    return make


def gflop_per_item(scorer: torch.nn.Module, feeds: Feeds) -> float:
    """Conv and matmul GFLOP of one item's score (multiply-add = 2 FLOP), counted on a batch of 2."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = [torch.from_numpy(v) for v in feeds(2, np.random.default_rng(0)).values()]
    counter = FlopCounterMode(display=False)
    with counter:  # not under inference_mode: the counter's module tracker needs autograd
        scorer(*inputs)
    return counter.get_total_flops() / 2 / 1e9


def gflop_per_slice(scorer: Scorer, size: int) -> float:
    """Conv and matmul GFLOP of one slice score of the slice recipe (see `gflop_per_item`)."""
    return gflop_per_item(scorer, slice_feeds(size))


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
        log.info("batch %d: %s items/s", b, {k: round(v, 1) for k, v in rates[b].items()})
    return rates, agreement


def _generated_series(tmp: Path, slices: int, matrix: int) -> float:
    """Write the benchmark's phantom series to `tmp`/series; return the seconds it took (not counted)."""
    from service.phantom.generate import SeriesSpec, generate_series

    t0 = time.perf_counter()
    generate_series(SeriesSpec(folder="series", patient_seed=7, series_seed=8, num_slices=slices, matrix=matrix), tmp)
    return time.perf_counter() - t0


def series_end_to_end(model_dir: Path, slices: int, matrix: int) -> dict[str, Any]:
    """Seconds to read, preprocess and score one generated `slices`-slice series with the model's ONNX
    files, exactly as `gatekeeper score` does (`service.inference.Detector` for format 1,
    `PatchDetector` for format 2, ONNX Runtime CPU provider with its default threads). Generating the
    series is not timed; starting the sessions is timed apart (once per worker)."""
    import tempfile

    from service import dicom_series, imaging
    from service.inference import Detector, PatchDetector

    meta = json.loads((model_dir / "model.json").read_text())
    with tempfile.TemporaryDirectory(prefix="gk-bench-") as tmp:
        generated = _generated_series(Path(tmp), slices, matrix)
        t0 = time.perf_counter()
        detector = (PatchDetector if meta.get("format") == PATCH_FORMAT else Detector)(
            model_dir, providers=["CPUExecutionProvider"]
        )
        session_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        (group,) = dicom_series.ct_series_in(dicom_series.scan_tree(Path(tmp) / "series"))
        series = dicom_series.load_series(group)
        t_read = time.perf_counter()
        extra: dict[str, Any] = {}
        if isinstance(detector, PatchDetector):  # the steps of PatchDetector.score_series, timed one by one
            positions = detector.positions(series)
            t_pre = time.perf_counter()
            fields, masks, boxes = imaging.preprocess_patch_series(
                series.hu, series.pixel_spacing_mm, detector.geometry
            )
            t_score = time.perf_counter()
            z, slice_index, _ = detector.patch_z_scores(fields, masks, boxes, positions)
            slice_scores = imaging.slice_scores_from_patches(z, slice_index, series.num_slices)
            imaging.series_score_in_range(slice_scores, positions, detector.position_low, detector.position_high)
            t_end = time.perf_counter()
            extra = {
                "position_s": round(t_pre - t_read, 2),
                "patches": int(z.size),
                "patches_per_slice": round(z.size / series.num_slices, 1),
            }
        else:
            images, masks = imaging.preprocess_slices(series.hu, detector.size, detector.window)
            t_pre, t_score = t_read, time.perf_counter()  # preprocessing, then position and score
            positions = detector.positions(images, series.locations_mm)
            scores, _ = detector.score_arrays(images, masks, positions)
            imaging.aggregate_slice_scores(scores, detector.aggregation)
            t_end = time.perf_counter()
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


def _machine(threads: int | None) -> dict[str, Any]:
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
    import tempfile

    if threads:
        torch.set_num_threads(threads)
    meta = json.loads((model_dir / "model.json").read_text())
    if meta.get("format") == PATCH_FORMAT:
        return _bench_score_patch(
            model_dir,
            meta,
            batches=batches,
            seconds=seconds,
            series_slices=series_slices,
            matrix=matrix,
            threads=threads,
            matmul_n=matmul_n,
        )
    size = int(meta["size"])
    scorer, fresh = scorer_for_bench(model_dir)
    result: dict[str, Any] = {
        "model": str(model_dir),
        "format": meta.get("format", 1),
        "item": "slice",
        "family": meta.get("family"),
        "size": size,
        "conditioned": meta.get("conditioned", True),
        "fresh_weights": fresh,
        "machine": _machine(threads),
        "gflop_per_slice": round(gflop_per_slice(scorer, size), 3),
        "matmul_peak_gflops": round(matmul_peak(matmul_n, min(3.0, 2 * seconds)), 1),
        "matmul_n": matmul_n,
    }
    result["gflop_per_item"] = result["gflop_per_slice"]
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
        rates, agreement = engine_rates(scorer, onnx_path, slice_feeds(size), batches, seconds, threads)
    result["rates"] = {b: {k: round(v, 2) for k, v in r.items()} for b, r in rates.items()}
    result["agreement"] = agreement
    result["series"] = series_end_to_end(model_dir, series_slices, matrix)
    return result


def _bench_score_patch(
    model_dir: Path,
    meta: dict[str, Any],
    *,
    batches: Sequence[int],
    seconds: float,
    series_slices: int,
    matrix: int,
    threads: int | None,
    matmul_n: int,
) -> dict[str, Any]:
    """`bench_score` of a format-2 (patch recipe) model: the items are patches."""
    import tempfile

    scorer, fresh = patch_scorer_for_bench(model_dir)
    channels = int(meta.get("channels", 3))
    feeds = patch_feeds(channels)
    pre = meta["preprocessing"]
    result: dict[str, Any] = {
        "model": str(model_dir),
        "format": PATCH_FORMAT,
        "item": "patch",
        "family": meta.get("family"),
        "recipe": "patch",
        "patch": PATCH,
        "channels": channels,
        "spacing_mm": pre.get("spacing_mm"),
        "stride": pre.get("stride"),
        "conditioned": meta.get("conditioned", True),
        "fresh_weights": fresh,
        "machine": _machine(threads),
        "gflop_per_item": round(gflop_per_item(scorer, feeds), 5),
        "matmul_peak_gflops": round(matmul_peak(matmul_n, min(3.0, 2 * seconds)), 1),
        "matmul_n": matmul_n,
    }
    with tempfile.TemporaryDirectory(prefix="gk-bench-onnx-") as tmp:
        if fresh:
            onnx_path = Path(tmp) / "patch_scorer.onnx"
            sample = [torch.from_numpy(v) for v in feeds(2, np.random.default_rng(1)).values()]
            export_graph(
                scorer, tuple(sample), onnx_path, ["patches", "cond"], ["score", "residual", "feature", "residual_map"]
            )
            result["onnx"] = "exported here from the fresh weights"
        else:
            onnx_path = model_dir / meta["files"]["patch_scorer"]
            result["onnx"] = f"the model's {onnx_path.name} (the served graph)"
        rates, agreement = engine_rates(scorer, onnx_path, feeds, batches, seconds, threads)
    result["rates"] = {b: {k: round(v, 2) for k, v in r.items()} for b, r in rates.items()}
    result["agreement"] = agreement
    result["series"] = series_end_to_end(model_dir, series_slices, matrix)
    result["gflop_per_slice"] = round(result["gflop_per_item"] * result["series"]["patches_per_slice"], 3)
    return result


def format_table(r: dict[str, Any]) -> str:
    """The benchmark as Markdown: setup lines, a rate table with ratios, target lines."""
    m = r["machine"]
    peak = r["matmul_peak_gflops"]
    item = r.get("item", "slice")
    s = r["series"]
    if item == "patch":
        title = (
            f"Detector scoring benchmark: {r['model']} (patch recipe, {r['patch']}² patches × {r['channels']} "
            f"windows at {r['spacing_mm']} mm, stride {r['stride']}, "
            f"{'conditioned' if r['conditioned'] else 'unconditioned'})"
        )
        work = (
            f"Work: {r['gflop_per_item']:.4f} GFLOP per patch (conv + matmul); {s['patches_per_slice']:.0f} body "
            f"patches per slice in the end-to-end series = {r['gflop_per_slice']:.2f} GFLOP per slice. "
        )
        weights = (
            "fresh, the same networks as model.json (no weights.pt; timing does not depend on weight values)"
            if r["fresh_weights"]
            else "the model's weights.pt"
        ) + f"; ONNX graph: {r['onnx']}"
    else:
        title = (
            f"Detector scoring benchmark: {r['model']} ({r['family']}, {r['size']} px, "
            f"{'conditioned' if r['conditioned'] else 'unconditioned'})"
        )
        work = f"Work: {r['gflop_per_slice']:.3f} GFLOP per slice (conv + matmul). "
        weights = (
            "fresh, the same architecture as model.json (no weights.pt; timing does not depend on weight values)"
            if r["fresh_weights"]
            else "the model's weights.pt"
        )
    lines = [
        title,
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']} (threads: {m['torch_threads']}), "
        f"onnxruntime {m['onnxruntime']} (threads: {m['ort_threads']}).",
        f"Weights: {weights}.",
        work + f"fp32 matmul peak of this machine: {peak:.0f} GFLOP/s ({r['matmul_n']}² torch.mm, best of repeats).",
        "",
        f"| batch{' (patches)' if item == 'patch' else ''} | engine | {'patches' if item == 'patch' else 'slices'}/s "
        "| GFLOP/s | % of matmul peak "
        "| vs PyTorch eager fp32 |",
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
            gf = rates[key] * r["gflop_per_item"]
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
    if s["slices"] >= 300:
        verdict = "met" if s["total_s"] <= TARGET_SERIES_SECONDS else "missed"
    else:
        verdict = "not comparable: fewer slices"
    if item == "patch":
        steps = (
            f"read {s['read_s']:.2f} s + position {s['position_s']:.2f} s + preprocess (patch fields) "
            f"{s['preprocess_s']:.2f} s + patch scores {s['score_s']:.2f} s ({s['patches']} patches)"
        )
    else:
        steps = (
            f"read {s['read_s']:.2f} s + preprocess {s['preprocess_s']:.2f} s + position and score {s['score_s']:.2f} s"
        )
    lines += [
        "",
        f"{s['slices']}-slice {s['matrix']}² series end to end (the model's ONNX files, as `gatekeeper score`): "
        f"{steps} = {s['total_s']:.2f} s (target ≤ {TARGET_SERIES_SECONDS:g} s for 300 slices: "
        f"{verdict}); session start {s['session_start_s']:.2f} s once per worker, not counted; "
        f"generating the series took {s['generate_s']:.0f} s, not counted.",
    ]
    return "\n".join(lines)


#: Default batch sizes per item: slices (format 1) and patches (format 2, ≈ 1 and 4 slices' worth).
DEFAULT_BATCHES = {"slice": "1,16,64", "patch": "64,512"}


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of `gatekeeper bench score`."""
    model_dir = args.model or DEFAULT_DETECTOR_DIR
    if not (model_dir / "model.json").is_file():
        raise UsageError(f"no model.json in {model_dir}")
    try:
        meta = json.loads((model_dir / "model.json").read_text())
    except ValueError as exc:
        raise UsageError(f"{model_dir}/model.json: {exc}") from None
    item = "patch" if meta.get("format") == PATCH_FORMAT else "slice"
    text = args.batches if args.batches is not None else DEFAULT_BATCHES[item]
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UsageError(f"--batches must be comma-separated integers, got {text!r}") from None
    if not batches or min(batches) < 1:
        raise UsageError(f"--batches must be positive integers, got {text!r}")
    if not args.seconds > 0:
        raise UsageError(f"--seconds must be > 0, got {args.seconds}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.quick:
        batches = [2] if item == "slice" else [16]
        seconds, slices, matrix, matmul_n = 0.3, 16, 64, 256
    else:
        seconds, slices, matrix, matmul_n = args.seconds, args.series_slices, args.matrix, 2048
    if slices < 2 or not 64 <= matrix <= 1024:
        raise UsageError("--series-slices must be >= 2 and --matrix within 64..1024")
    try:
        result = bench_score(
            model_dir,
            batches=batches,
            seconds=seconds,
            series_slices=slices,
            matrix=matrix,
            threads=args.threads,
            matmul_n=matmul_n,
        )
    except (KeyError, ValueError) as exc:
        raise UsageError(f"{model_dir}: {exc}") from None
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    return 0
