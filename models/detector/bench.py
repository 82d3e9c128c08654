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

Which scorer, which inputs and which series steps: the model.json's family
(`models.detector.family`, each family's `bench.py`); what they share: `models.detector.bench_engine`.

A model folder without `weights.pt` (the shipped one) is rebuilt from `model.json` (family, size,
condition) with fresh weights, exported to a temporary ONNX file and timed that way: the work per
item, and so the timing, does not depend on the weight values. With `weights.pt`, a format-2
model's own `patch_scorer.onnx` (the served graph) is timed against the same weights in torch.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.detector.bench_engine import rate
from models.detector.family import family_of, read_meta
from models.detector.interface import BenchRecipe
from service.errors import UsageError
from service.model_paths import DEFAULT_DETECTOR_DIR

log = logging.getLogger(__name__)


def _bench_recipe(model_dir: Path, meta: dict[str, Any]) -> BenchRecipe:
    """The benchmark of the family `model_dir`'s model.json names.

    Raises:
        ValueError: an unknown family, or one without a benchmark (message names the folder).
    """
    family = family_of(meta)
    if family.bench is None:
        raise ValueError(f"{model_dir}: the {family.name} family has no scoring benchmark")
    return family.bench


def bench(
    model_dir: Path, device: str = "cpu", seconds: float = 3.0, batches: Sequence[int] | None = None
) -> dict[str, Any]:
    """Items/s of torch eager and ONNX Runtime (CUDA provider when this build has it) on `device`.

    Items and default batches are the family's (`BenchRecipe.torch_and_onnx`): slices (16, 64) or patches
    (512, 4096 on a GPU, 64, 512 on the CPU). A model without weights.pt is timed with fresh weights."""
    import onnxruntime as ort

    meta = read_meta(model_dir)
    recipe = _bench_recipe(model_dir, meta)
    dev = torch.device(device)
    scorer, feeds, onnx_name, default_batches = recipe.torch_and_onnx(model_dir, meta, dev)
    batches = batches or default_batches
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers()
        else ["CPUExecutionProvider"]
    )
    session = ort.InferenceSession(str(model_dir / onnx_name), providers=providers)
    result: dict[str, Any] = {
        "device": str(dev),
        "ort_provider": session.get_providers()[0],
        "item": recipe.item,
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
            "torch_eager": rate(torch_run, b, seconds),
            f"ort_{result['ort_provider']}": rate(ort_run, b, seconds),
        }
        result["rates"][b] = {k: round(v, 1) for k, v in rates.items()}
        log.info(
            "bench batch %d: %s %s/s",
            b,
            result["rates"][b],
            f"{recipe.item}es" if recipe.item == "patch" else f"{recipe.item}s",
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
    """Every number of `gatekeeper bench score` (see the module docstring) as one dict, by the model's family.

    Raises:
        ValueError, KeyError: an unknown family or a model.json field missing.
    """
    if threads:
        torch.set_num_threads(threads)
    meta = read_meta(model_dir)
    return _bench_recipe(model_dir, meta).score(
        model_dir,
        meta,
        batches=batches,
        seconds=seconds,
        series_slices=series_slices,
        matrix=matrix,
        threads=threads,
        matmul_n=matmul_n,
    )


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


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of `gatekeeper bench score`."""
    model_dir = args.model or DEFAULT_DETECTOR_DIR
    if not (model_dir / "model.json").is_file():
        raise UsageError(f"no model.json in {model_dir}")
    try:
        meta = json.loads((model_dir / "model.json").read_text())
    except ValueError as exc:
        raise UsageError(f"{model_dir}/model.json: {exc}") from None
    try:
        recipe = _bench_recipe(model_dir, meta)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    text = args.batches if args.batches is not None else ",".join(str(b) for b in recipe.default_batches)
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
        batches = list(recipe.quick_batches)
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
