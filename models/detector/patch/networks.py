"""Networks of the patch recipe (v2): a small conditioned DCGAN on 32² multi-window CT patches.

The building blocks are the slice recipe's (`networks.py`: `DCGenerator`, `DCDiscriminator`,
`Encoder`, `PositionEmbedding`), given C image channels (the CT windows of
`service.imaging.PATCH_WINDOWS`) and a condition of three scalars per patch instead of one:
(slice position along the body, patch centre x, y in the body's bounding box), each in [0, 1].

* `G(z [N, 64], cond [N, 3]) → patch [N, C, 32, 32]` in [-1, 1] (4 → 8 → 16 → 32);
* `D(patch, cond) → logit [N]`, `D.features(patch)` the 4×4 feature map flattened (izi_f's f);
* `E(patch, cond) → z` (izi_f encoder);
* `PatchScorer(patch, cond) → (score, residual, feature, residual_map)`: the raw per-patch anomaly
  score r + κ·f with r the mean squared pixel residual over the patch and f the mean squared
  discriminator-feature residual, and |x − G(E(x))| averaged over channels [N, 1, 32, 32]. The z-score
  normalisation (per position × location bin) is applied outside the graph, from model.json
  (`service.imaging.patch_z_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.detector.stylegan2.networks import DCDiscriminator, DCGenerator, Encoder

#: Patch side in pixels the networks are built for.
PATCH = 32
#: Latent size of the patch generator.
Z_DIM = 64
#: Conditioning scalars: slice position, patch centre x, patch centre y.
COND_INPUTS = 3
#: Feature channels per resolution: slimmer than the slice recipe's so that 2 CPU cores train it and
#: score a 300-slice series (≈ 100 body patches per slice) in about a minute.
WIDTHS = {4: 128, 8: 64, 16: 32, 32: 16}


@dataclass
class PatchNetworks:
    G: DCGenerator
    D: DCDiscriminator
    E: Encoder


def build_patch_networks(channels: int, *, conditioned: bool = True, z_dim: int = Z_DIM) -> PatchNetworks:
    """The generator, discriminator and encoder of the patch recipe for `channels` CT windows.

    Raises:
        ValueError: `channels` < 1.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}.")
    c, n = conditioned, COND_INPUTS
    return PatchNetworks(
        DCGenerator(PATCH, z_dim=z_dim, conditioned=c, channels=channels, cond_inputs=n, widths=WIDTHS),
        DCDiscriminator(PATCH, conditioned=c, channels=channels, cond_inputs=n, widths=WIDTHS),
        Encoder(PATCH, z_dim=z_dim, conditioned=c, width=32, channels=channels, cond_inputs=n),
    )


#: Gaussian σ (px) of the `local` score's smoothing: 2.25 mm at 1.5 mm pixels, below the smallest
#: finding the phantom draws (a 1-cm lesion) and enough to average the CT noise of ~20 pixels.
LOCAL_SIGMA_PX = 1.5
#: Border (px) of the patch the `local` score ignores: there the reconstruction has no context on one side;
#: with the default stride 16 the inner 24² squares of neighbouring patches overlap, so no pixel is missed.
LOCAL_BORDER_PX = 4


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius 3σ."""
    r = max(1, int(3 * sigma + 0.5))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


class PatchScorer(nn.Module):
    """The fused patch scorer: (patches [N, C, 32, 32], cond [N, 3]) → raw score [N], residual [N],
    feature [N], residual map [N, 1, 32, 32].

    raw score = residual + κ·feature, with feature = mean of (D.features(x) − D.features(G(E(x))))²
    and residual, by `score`:

    * `local` (v3): the largest value, over the CT windows and the patch's inner pixels (a
      `LOCAL_BORDER_PX` border left out), of |x − G(E(x))| smoothed with a Gaussian of σ = `sigma`
      (default `LOCAL_SIGMA_PX`): a 2-cm lesion in a 5-cm patch or a few metal pixels are not averaged away,
      and the smoothing averages out the CT noise a reconstruction cannot (and should not) predict;
      residual map = that smoothed |residual|, largest over the windows;
    * `mean` (v2): the mean over channels and pixels of (x − G(E(x)))²; residual map = the mean over
      channels of |x − G(E(x))|.

    Higher = less like the normals at this body position and location; it becomes a z-score against
    the validation normals outside the graph.
    """

    def __init__(
        self,
        G: DCGenerator,
        E: Encoder,
        D: DCDiscriminator,
        *,
        kappa: float = 1.0,
        score: str = "mean",
        sigma: float = LOCAL_SIGMA_PX,
    ) -> None:
        super().__init__()
        if score not in ("local", "mean"):
            raise ValueError(f"PatchScorer.score must be 'local' or 'mean', got {score!r}.")
        if not 0 < sigma <= 8:
            raise ValueError(f"PatchScorer.sigma must be in (0, 8] px, got {sigma}.")
        self.G, self.E, self.D = G, E, D
        self.kappa = float(kappa)
        self.score = score
        self.sigma = float(sigma)
        k = gaussian_kernel(self.sigma)
        self.radius = (k.numel() - 1) // 2
        self.row_kernel: torch.Tensor
        self.col_kernel: torch.Tensor
        self.register_buffer("row_kernel", k.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("col_kernel", k.view(1, 1, -1, 1), persistent=False)

    def smooth(self, x: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur of [N, C, H, W] per channel (edges replicated)."""
        n, c, h, w = x.shape
        r = self.radius
        flat = x.reshape(-1, 1, h, w)
        flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), self.row_kernel)
        flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), self.col_kernel)
        return flat.reshape(n, c, h, w)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        recon = self.G(self.E(x, cond), cond)
        diff = x - recon
        feature = (self.D.features(x) - self.D.features(recon)).pow(2).mean(dim=1)
        if self.score == "local":
            smoothed = self.smooth(diff).abs().amax(dim=1, keepdim=True)
            b = LOCAL_BORDER_PX
            residual = smoothed[:, :, b:-b, b:-b].amax(dim=(1, 2, 3))
            residual_map = smoothed
        else:
            residual = (diff * diff).mean(dim=(1, 2, 3))
            residual_map = diff.abs().mean(dim=1, keepdim=True)
        score = residual + self.kappa * feature
        return score, residual, feature, residual_map
