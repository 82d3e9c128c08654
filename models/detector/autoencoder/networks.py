"""The autoencoder family's networks: the plain conv autoencoder, the coarse-noise denoising U-Net
(Kascenas et al. 2022) and the scorer that turns either into slice errors and a residual map.

How they are trained and scored: `models.detector.autoencoder.train`'s docstring.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn


class ConvAutoencoder(nn.Module):
    """Image [N,1,S,S] in [-1, 1] → reconstruction: four stride-2 convs down to S/16, a dense
    bottleneck of `latent` numbers (so it cannot copy its input), and the mirror image up."""

    def __init__(self, size: int, *, latent: int = 128, width: int = 32) -> None:
        super().__init__()
        if size % 16:
            raise ValueError(f"size must be a multiple of 16, got {size}.")
        chans = [1, width, 2 * width, 4 * width, 4 * width]
        down: list[nn.Module] = []
        for a, b in zip(chans, chans[1:]):
            down += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.down = nn.Sequential(*down)
        self.grid = size // 16
        flat = chans[-1] * self.grid * self.grid
        self.to_latent = nn.Linear(flat, latent)
        self.from_latent = nn.Linear(latent, flat)
        up: list[nn.Module] = []
        rev = chans[::-1]
        for i, (a, b) in enumerate(zip(rev, rev[1:])):
            last = i == len(rev) - 2
            up += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(a, b, 3, padding=1)]
            if not last:
                up.append(nn.LeakyReLU(0.2))
        self.up = nn.Sequential(*up)
        self.channels = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.to_latent(self.down(x).flatten(1))
        h = F.leaky_relu(self.from_latent(z), 0.2).reshape(-1, self.channels, self.grid, self.grid)
        return torch.tanh(self.up(h))


#: Gaussian smoothing (σ, px) of the DAE's residual before its slice error takes the body's maximum.
DAE_SMOOTH_SIGMA_PX = 2.0
#: Noise kinds of `--noise`.
NOISE_KINDS = ("none", "coarse")


class DenoisingUNet(nn.Module):
    """Image [N,1,S,S] in [-1, 1] → denoised image: a U-Net (Kascenas et al. 2022's DAE, slimmed for
    2 CPU cores): per level two 3×3 convs with LeakyReLU, 2×2 average pooling down, nearest upsampling
    and a skip connection up, `levels` levels of `width`·2^level channels, a 1×1 conv out (linear)."""

    def __init__(self, size: int, *, width: int = 16, levels: int = 4) -> None:
        super().__init__()
        if levels < 2 or size % 2 ** (levels - 1):
            raise ValueError(f"size must be a multiple of {2 ** (levels - 1)} for {levels} levels, got {size}.")
        chans = [width * 2**i for i in range(levels)]

        def block(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(a, b, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(b, b, 3, padding=1), nn.LeakyReLU(0.2)
            )

        self.down = nn.ModuleList([block(1, chans[0])] + [block(a, b) for a, b in zip(chans, chans[1:])])
        self.up = nn.ModuleList([block(b + a, a) for a, b in zip(chans[:-1], chans[1:])][::-1])
        self.out = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for i, block in enumerate(self.down):
            if i:
                h = F.avg_pool2d(h, 2)
            h = block(h)
            skips.append(h)
        for block, skip in zip(self.up, skips[-2::-1]):
            h = block(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), skip], dim=1))
        out: torch.Tensor = self.out(h)
        return out


def coarse_noise(n: int, size: int, resolution: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """Kascenas et al.'s coarse noise [n, 1, size, size]: N(0, std²) at `resolution`², upsampled
    bilinearly to `size`², rolled by a random offset so the coarse grid does not sit still."""
    coarse = torch.randn(n, 1, resolution, resolution, generator=generator) * std
    noise = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    dr, dc = (int(v) for v in torch.randint(size, (2,), generator=generator))
    return torch.roll(noise, shifts=(dr, dc), dims=(2, 3))


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(round(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


class AutoencoderScorer(nn.Module):
    """(image, body mask) → normalised slice score, raw error, residual map (what `autoencoder.onnx` computes)."""

    norm: torch.Tensor  # buffer [2]

    def __init__(self, ae: ConvAutoencoder) -> None:
        super().__init__()
        self.ae = ae
        self.register_buffer("norm", torch.tensor([0.0, 1.0]))  # μ, σ of the error on validation normals

    def errors(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = (x - self.ae(x)) * mask
        area = mask.sum(dim=(1, 2, 3)).clamp(min=1.0)
        return (diff * diff).sum(dim=(1, 2, 3)) / area, diff.abs()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        error, residual_map = self.errors(x, mask)
        return (error - self.norm[0]) / self.norm[1], error, residual_map


class DenoisingScorer(AutoencoderScorer):
    """(image, body mask) → normalised slice score, raw error, residual map of the coarse-noise DAE:
    error = max inside the body of |x − DAE(x)| smoothed (Gaussian σ = `DAE_SMOOTH_SIGMA_PX`)."""

    kernel: torch.Tensor  # buffer [1, 1, K, K]

    def __init__(self, dae: DenoisingUNet, *, sigma_px: float = DAE_SMOOTH_SIGMA_PX) -> None:
        nn.Module.__init__(self)
        self.ae = dae  # type: ignore[assignment]  # the same role as the plain autoencoder's network
        self.register_buffer("norm", torch.tensor([0.0, 1.0]))
        self.register_buffer("kernel", _gaussian_kernel(sigma_px))

    def errors(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        residual_map = ((x - self.ae(x)) * mask).abs()
        smooth = F.conv2d(residual_map, self.kernel, padding=self.kernel.shape[-1] // 2)
        return (smooth * mask).amax(dim=(1, 2, 3)), residual_map


def build_scorer(args: argparse.Namespace | dict[str, object]) -> AutoencoderScorer:
    """The scorer the options ask for: `--noise none` → conv autoencoder, `coarse` → U-Net DAE."""
    a = vars(args) if isinstance(args, argparse.Namespace) else args
    if a.get("noise", "none") == "coarse":
        return DenoisingScorer(DenoisingUNet(int(str(a["size"]))))
    return AutoencoderScorer(ConvAutoencoder(int(str(a["size"])), latent=int(str(a["latent"]))))
