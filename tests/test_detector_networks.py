"""Detector networks: the plain-op modulated conv is StyleGAN2's, and PyTorch vs ONNX Runtime agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from models.detector.stylegan2.export import export_onnx  # noqa: E402
from models.detector.stylegan2.networks import BodyPartRegressor, ModulatedConv2d, Scorer, build_networks  # noqa: E402

torch.set_num_threads(1)  # fastest on a shared 2-core machine


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def test_modulated_conv_equals_grouped_conv_form() -> None:
    torch.manual_seed(0)
    conv = ModulatedConv2d(8, 6, 3, 16)
    x, w = torch.randn(3, 8, 10, 10), torch.randn(3, 16)
    # StyleGAN2's reference: per-sample weights W'·s, demodulated, as one grouped convolution.
    s = conv.modulation(w)
    weight = conv.weight[None] * conv.scale * s[:, None, :, None, None]
    weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
    ref = F.conv2d(x.reshape(1, -1, 10, 10), weight.reshape(-1, 8, 3, 3), padding=1, groups=3).reshape(3, 6, 10, 10)
    torch.testing.assert_close(conv(x, w), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["dcgan", "stylegan2"])
def test_onnx_runtime_matches_pytorch_on_fresh_inputs(family: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    size = 64
    nets = build_networks(family, size)
    nets.G.noise_mode = "const"
    for m in (nets.G, nets.D, nets.E):  # move BatchNorm statistics and noise strengths off their init values
        for name, buf in m.named_buffers():
            if "running_var" in name:
                buf.uniform_(0.5, 2.0)
            elif "running_mean" in name:
                buf.normal_(0, 0.3)
        for name, p in m.named_parameters():
            if "strength" in name:
                p.data.fill_(0.3)
    scorer = Scorer(nets.G, nets.E, nets.D, kappa=0.7)
    grid = [0.1, 0.4, 0.7]
    table = [[0.2, 0.3, 0.25], [0.05, 0.08, 0.06], [0.01, 0.02, 0.015], [0.004, 0.006, 0.005]]
    scorer.set_position_normalisation(grid, table)
    position = BodyPartRegressor(size)
    export_onnx(scorer, position, size, 128, tmp_path)

    rng = np.random.default_rng(7)  # fresh inputs, another batch size than the export's
    n = 5
    x = rng.uniform(-1, 1, (n, 1, size, size)).astype(np.float32)
    pos = np.array([0.0, 0.25, 0.55, 0.7, 0.95], np.float32)  # below, inside and above the grid
    mask = (rng.uniform(size=(n, 1, size, size)) > 0.4).astype(np.float32)
    z = rng.standard_normal((n, 128)).astype(np.float32)
    cpu = ["CPUExecutionProvider"]
    run = lambda name, feeds: ort.InferenceSession(str(tmp_path / name), providers=cpu).run(None, feeds)  # noqa: E731
    scorer.eval()
    with torch.no_grad():
        xt, pt, mt, zt = (torch.from_numpy(v) for v in (x, pos, mask, z))
        expected = {
            "scorer.onnx": [t.numpy() for t in scorer(xt, pt, mt)],
            "encoder.onnx": [scorer.E(xt, pt).numpy()],
            "generator.onnx": [scorer.G(zt, pt).numpy()],
            "discriminator.onnx": [scorer.D(xt, pt).numpy(), scorer.D.features(xt).numpy()],
            "position.onnx": [position.eval()(xt).numpy()],
        }
    feeds = {
        "scorer.onnx": {"image": x, "position": pos, "mask": mask},
        "encoder.onnx": {"image": x, "position": pos},
        "generator.onnx": {"z": z, "position": pos},
        "discriminator.onnx": {"image": x, "position": pos},
        "position.onnx": {"image": x},
    }
    for name, want in expected.items():
        got = run(name, feeds[name])
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape, name
            assert _rel_err(g, w) < 1e-4, f"{name}: relative error {_rel_err(g, w):.2e}"
    # The fused score really is residual + κ · feature term, each normalised by its statistics at the
    # slice's position (linear interpolation on the grid, clamped at its ends).
    score, residual, feature, _ = expected["scorer.onnx"]
    st = [np.interp(pos, grid, row) for row in table]
    np.testing.assert_allclose(score, (residual - st[0]) / st[1] + 0.7 * (feature - st[2]) / st[3], rtol=1e-4)


def test_unconditioned_generator_ignores_position() -> None:
    torch.manual_seed(2)
    for family in ("dcgan", "stylegan2"):
        G = build_networks(family, 64, conditioned=False).G.eval()
        G.noise_mode = "const"
        z = torch.randn(2, 128)
        with torch.no_grad():
            torch.testing.assert_close(G(z, torch.zeros(2)), G(z, torch.ones(2)))
        G = build_networks(family, 64, conditioned=True).G.eval()
        G.noise_mode = "const"
        with torch.no_grad():
            assert not torch.allclose(G(z, torch.zeros(2)), G(z, torch.ones(2)))
