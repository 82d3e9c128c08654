"""Quick scoring throughput of an exported detector: PyTorch (eager) vs ONNX Runtime, same slices.

    python -m models.detector bench --model DIR [--device cpu|cuda] [--seconds 5]

Logs slices/s per engine and batch size, and the model-only time for a 300-slice series. Used by
the GPU run (ops/gpu_train_detector.sh); `gatekeeper bench score` is the full CPU benchmark.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from models.detector.networks import Scorer, build_networks

log = logging.getLogger(__name__)


def load_scorer(model_dir: Path, device: torch.device) -> Scorer:
    """The torch Scorer of an exported model, rebuilt from its weights.pt."""
    weights = torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=False)
    a = weights["args"]
    nets = build_networks(a["family"], int(a["size"]), conditioned=not a["unconditioned"])
    nets.G.load_state_dict(weights["G_ema"])
    nets.E.load_state_dict(weights["E"])
    nets.D.load_state_dict(weights["D"])
    nets.G.noise_mode = "const"
    scorer = Scorer(nets.G, nets.E, nets.D, kappa=float(a["kappa"]))
    if "norm_grid" in weights:
        scorer.set_position_normalisation(weights["norm_grid"].tolist(), weights["norm_table"].tolist())
    else:  # weights.pt of the first format: global normalisation only
        scorer.set_normalisation(*[float(v) for v in weights["norm"]])
    return scorer.eval().to(device)


def _rate(fn: Callable[[], object], batch: int, seconds: float) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


def bench(model_dir: Path, device: str = "cpu", seconds: float = 3.0, batches: Sequence[int] = (16, 64)) -> dict:
    import onnxruntime as ort

    meta = json.loads((model_dir / "model.json").read_text())
    size = int(meta["size"])
    dev = torch.device(device)
    scorer = load_scorer(model_dir, dev)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] \
        if "CUDAExecutionProvider" in ort.get_available_providers() else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(model_dir / "scorer.onnx"), providers=providers)
    result: dict = {"device": str(dev), "ort_provider": session.get_providers()[0], "size": size, "rates": {}}
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

        def ort_run(feeds: dict = {"image": x, "position": p, "mask": m}) -> None:  # noqa: B006 — read only
            session.run(None, feeds)

        rates = {"torch_eager": _rate(torch_run, b, seconds),
                 f"ort_{result['ort_provider']}": _rate(ort_run, b, seconds)}
        result["rates"][b] = {k: round(v, 1) for k, v in rates.items()}
        log.info("bench batch %d: %s slices/s (300-slice series: %s s)", b, result["rates"][b],
                 {k: round(300 / v, 2) for k, v in rates.items()})
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.detector bench")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args(argv)
    log.info("bench result: %s", json.dumps(bench(a.model, a.device, a.seconds)))
    return 0
