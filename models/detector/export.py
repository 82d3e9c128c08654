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
import warnings
from pathlib import Path

import torch
from torch import nn

from models.detector.networks import BodyPartRegressor, DCDiscriminator, ResDiscriminator, Scorer, build_networks
from models.detector.networks_patch import PATCH, PatchScorer

log = logging.getLogger(__name__)

OPSET = 17


class _DiscriminatorWithFeatures(nn.Module):
    def __init__(self, D: ResDiscriminator | DCDiscriminator) -> None:
        super().__init__()
        self.D = D

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.D(x, pos), self.D.features(x)


def export_graph(
    module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, inputs: list[str], outputs: list[str]
) -> None:
    """Export `module` (eval mode) to `path`: opset 17, the batch axis of every input and output dynamic."""
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in inputs + outputs},
            do_constant_folding=True,
        )
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)


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
    export_graph(_DiscriminatorWithFeatures(scorer.D), (x, pos), paths[3], ["image", "position"], ["logit", "features"])
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


def export_patch_onnx(
    scorer: PatchScorer, position_net: nn.Module | None, channels: int, z_dim: int, position_size: int, out: Path
) -> list[Path]:
    """Write the ONNX files of a patch-recipe detector to `out`; return their paths. Works from any device.

    * `patch_scorer.onnx` — patches [N, C, 32, 32], cond [N, 3] → score [N] (raw r + κ·f), residual [N],
      feature [N], residual_map [N, 1, 32, 32]
    * `encoder.onnx` — patches, cond → z; `generator.onnx` — z, cond → patches;
      `discriminator.onnx` — patches, cond → logit, features
    * `position.onnx` — slice [N, 1, S, S] at the slice recipe's preprocessing → raw body-part-regression
      output (only with position method `bpr`)
    """
    out.mkdir(parents=True, exist_ok=True)
    scorer = copy.deepcopy(scorer).cpu().eval()
    n = 2
    x = torch.rand(n, channels, PATCH, PATCH) * 2 - 1
    cond = torch.rand(n, 3)
    z = torch.randn(n, z_dim)
    paths = [out / "patch_scorer.onnx", out / "encoder.onnx", out / "generator.onnx", out / "discriminator.onnx"]
    export_graph(scorer, (x, cond), paths[0], ["patches", "cond"], ["score", "residual", "feature", "residual_map"])
    export_graph(scorer.E, (x, cond), paths[1], ["patches", "cond"], ["z"])
    export_graph(scorer.G, (z, cond), paths[2], ["z", "cond"], ["patches"])
    export_graph(_DiscriminatorWithFeatures(scorer.D), (x, cond), paths[3], ["patches", "cond"], ["logit", "features"])
    if position_net is not None:
        paths.append(out / "position.onnx")
        image = torch.rand(n, 1, position_size, position_size) * 2 - 1
        export_graph(copy.deepcopy(position_net).cpu(), (image,), paths[-1], ["image"], ["raw_position"])
    return paths
