"""ONNX export shared by every detector family: opset, one graph per module, the discriminator's two heads.

Each family's `export` module writes its own files with `export_graph`; serving reads them through
`model.json` (`onnx_opset` is `OPSET`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from torch import nn

log = logging.getLogger(__name__)

OPSET = 17


class DiscriminatorWithFeatures(nn.Module):
    """A discriminator as one graph with two outputs: its logit and its feature vector (`D.features`)."""

    def __init__(self, D: nn.Module) -> None:
        super().__init__()
        self.D = D

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = cast(Callable[[torch.Tensor], torch.Tensor], self.D.features)  # every family's D has it
        return self.D(x, pos), features(x)


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
