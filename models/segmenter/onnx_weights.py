"""The torch U-Net of an exported segmenter, rebuilt from its `segmenter.onnx` (for fine-tuning).

A registered segmenter is its ONNX file and model.json; no torch checkpoint needs to travel with
it. The exporter (`models.segmenter.train.export`, TorchScript-based, constant folding on) keeps the
convolution weights under their state-dict names (`net.down.0.0.weight` …) and turns each
GroupNorm's affine weight and bias into the constant of a `Mul` and an `Add` after its
InstanceNormalization, in the order the network runs them — which is the order of the GroupNorm
modules in `UNet` (down blocks, then merge blocks). `unet_from_onnx` puts them back and checks that
the rebuilt network computes what the ONNX file computes (ONNX Runtime vs torch on random input).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.segmenter.network import SegmenterExport, UNet
from service.segmentation import SegmenterInput, read_model_json

log = logging.getLogger(__name__)

#: Largest relative difference between ONNX Runtime and the rebuilt torch network that is accepted.
PARITY_TOLERANCE = 1e-3


def _initializers(path: Path) -> tuple[dict[str, np.ndarray], list[Any]]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    values = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    return values, list(model.graph.node)


def _norm_constants(values: dict[str, np.ndarray], nodes: list[Any], op: str) -> list[np.ndarray]:
    """The unnamed per-channel constants `[C, 1, 1]` of every `op` node, in graph order."""
    out = []
    for node in nodes:
        if node.op_type != op:
            continue
        for name in node.input:
            value = values.get(name)
            if value is not None and not name.startswith("net.") and value.ndim == 3 and value.shape[1:] == (1, 1):
                out.append(value)
    return out


def unet_from_onnx(model_dir: Path) -> tuple[UNet, SegmenterInput, dict[str, Any]]:
    """(network in train mode, its input spec, model.json) of the segmenter in `model_dir`.

    Raises:
        ValueError: the ONNX file is not one our exporter wrote for this network (missing or
            mis-shaped weights), or the rebuilt network disagrees with it beyond `PARITY_TOLERANCE`.
    """
    import onnxruntime as ort

    meta = read_model_json(model_dir)
    spec = SegmenterInput.from_json(meta["input"])
    network = meta.get("network") or {}
    net = UNet(in_channels=spec.channels, base=int(network.get("base", 16)), depth=int(network.get("depth", 4)))
    path = Path(model_dir) / meta["file"]
    values, nodes = _initializers(path)
    state = net.state_dict()
    norms = [name for name, module in net.named_modules() if isinstance(module, nn.GroupNorm)]
    weights, biases = _norm_constants(values, nodes, "Mul"), _norm_constants(values, nodes, "Add")
    if len(weights) != len(norms) or len(biases) != len(norms):
        raise ValueError(
            f"{path}: {len(weights)} GroupNorm scales and {len(biases)} shifts found; the network has {len(norms)}"
        )
    loaded: dict[str, torch.Tensor] = {}
    for key in state:
        module, _, field = key.rpartition(".")
        if module in norms:
            index = norms.index(module)
            value = (weights if field == "weight" else biases)[index].reshape(-1)
        elif f"net.{key}" in values:
            value = values[f"net.{key}"]
        else:
            raise ValueError(f"{path}: no weight for {key}; not exported by this gatekeeper's segmenter exporter")
        if tuple(value.shape) != tuple(state[key].shape):
            raise ValueError(f"{path}: {key} is {tuple(value.shape)}; the network expects {tuple(state[key].shape)}")
        loaded[key] = torch.from_numpy(np.array(value, np.float32))
    net.load_state_dict(loaded)
    net.eval()
    x = torch.rand(2, spec.channels, spec.size, spec.size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = SegmenterExport(net)(x)[0].numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probability"], {"image": x.numpy()})
    error = float(np.abs(got[0] - ref).max() / (np.abs(ref).max() + 1e-12))
    if error > PARITY_TOLERANCE:
        raise ValueError(f"{path}: the rebuilt network differs from the ONNX file by {error:.2e} (relative)")
    log.info("segmenter %s rebuilt from %s (ONNX parity %.1e)", meta["version"], path, error)
    net.train()
    return net, spec, meta
