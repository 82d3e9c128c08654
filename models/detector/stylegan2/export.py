"""Export of a trained detector: ONNX graphs (opset 17, dynamic batch) and `model.json`.

Files written to the model folder (serving reads every number it needs from `model.json`):

* `scorer.onnx`   — image [N,1,S,S], position [N], mask [N,1,S,S] → score [N], residual [N],
  feature [N], residual_map [N,1,S,S]  (encoder + generator + discriminator fused, normalisation inside)
* `encoder.onnx`  — image, position → z [N, z_dim]
* `generator.onnx` — z, position → image
* `discriminator.onnx` — image, position → logit [N], features [N, F]
* `position.onnx` — image → raw body-part-regression output [N] (only with position method `bpr`)
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from models.detector.onnx_graph import DiscriminatorWithFeatures, export_graph
from models.detector.stylegan2.networks import BodyPartRegressor, Scorer, build_networks

log = logging.getLogger(__name__)


def export_onnx(scorer: Scorer, position_net: nn.Module | None, size: int, z_dim: int, out: Path) -> list[Path]:
    """Write the ONNX files of one detector to `out`; return their paths. Works from any device."""
    out.mkdir(parents=True, exist_ok=True)
    scorer = copy.deepcopy(scorer).cpu().eval()
    scorer.G.noise_mode = "const"
    n = 2
    x = torch.rand(n, 1, size, size) * 2 - 1
    pos = torch.rand(n)
    mask = (torch.rand(n, 1, size, size) > 0.3).float()
    z = torch.randn(n, z_dim)
    paths = [out / "scorer.onnx", out / "encoder.onnx", out / "generator.onnx", out / "discriminator.onnx"]
    export_graph(
        scorer,
        (x, pos, mask),
        paths[0],
        ["image", "position", "mask"],
        ["score", "residual", "feature", "residual_map"],
    )
    export_graph(scorer.E, (x, pos), paths[1], ["image", "position"], ["z"])
    export_graph(scorer.G, (z, pos), paths[2], ["z", "position"], ["image"])
    export_graph(DiscriminatorWithFeatures(scorer.D), (x, pos), paths[3], ["image", "position"], ["logit", "features"])
    if position_net is not None:
        paths.append(out / "position.onnx")
        export_graph(copy.deepcopy(position_net).cpu(), (x,), paths[-1], ["image"], ["raw_position"])
    return paths


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


def reexport(model_dir: Path) -> list[Path]:
    """Write every ONNX file of a model folder again from its `weights.pt` (e.g. after a run that
    brought back only the scorer). The graphs are those `train` exports; `model.json` is unchanged.
    """
    import json

    meta = json.loads((model_dir / "model.json").read_text())
    scorer = load_scorer(model_dir, torch.device("cpu"))
    weights = torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=False)
    position = None
    if weights.get("P") is not None:
        position = BodyPartRegressor(int(meta["size"]))
        position.load_state_dict(weights["P"])
    return export_onnx(scorer, position, int(meta["size"]), int(meta["z_dim"]), model_dir)
