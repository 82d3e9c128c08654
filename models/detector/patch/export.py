"""Export of a patch-recipe detector: its ONNX graphs (opset 17, dynamic batch); `train` writes model.json."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from models.detector.onnx_graph import DiscriminatorWithFeatures, export_graph
from models.detector.patch.networks import PATCH, PatchScorer


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
    export_graph(DiscriminatorWithFeatures(scorer.D), (x, cond), paths[3], ["patches", "cond"], ["logit", "features"])
    if position_net is not None:
        paths.append(out / "position.onnx")
        image = torch.rand(n, 1, position_size, position_size) * 2 - 1
        export_graph(copy.deepcopy(position_net).cpu(), (image,), paths[-1], ["image"], ["raw_position"])
    return paths
