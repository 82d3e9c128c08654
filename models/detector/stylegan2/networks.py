"""Networks of the slice-position-conditioned anomaly detector (plain PyTorch ops, ONNX-exportable).

Two families behind one interface (`build_networks`):

* `stylegan2` — a StyleGAN2-style generator: a mapping network takes the latent z together with
  an embedding of the slice position; modulated/demodulated convolutions (written as
  "modulate input → shared conv → demodulate output", which equals the grouped-conv form and
  exports with a dynamic batch), per-layer noise inputs, skip (toRGB) outputs. A residual
  discriminator with minibatch-stddev and a projection term for the position.
* `dcgan` — a compact f-AnoGAN-style conditioned DCGAN, the CPU-trainable default.

Every generator is `G(z, position) → image`, every discriminator `D(image, position) → logit` with
`D.features(image)` the feature vector used for the feature-matching residual (taken before the
minibatch-stddev layer, so it does not depend on the other slices in a batch), every encoder
`E(image, position) → z`. Images are [N, 1, S, S] in [-1, 1], positions [N] (≈ 0 head … 1 feet).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.detector.config import NETWORK_FAMILIES, SIZES

SQRT2 = math.sqrt(2.0)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2) * SQRT2


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate (weights scaled at run time)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias_init: float = 0.0,
        lr_mul: float = 1.0,
        activation: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return _lrelu(out) if self.activation else out


class EqualConv2d(nn.Module):
    """Conv layer with equalized learning rate."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        *,
        bias: bool = True,
        activation: bool = False,
        downsample: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.scale = 1.0 / math.sqrt(in_channels * kernel * kernel)
        self.padding = kernel // 2
        self.activation = activation
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)
        if self.downsample:
            out = F.avg_pool2d(out, 2)
        return _lrelu(out) if self.activation else out


class PositionEmbedding(nn.Module):
    """Slice position [N] → embedding [N, dim]: Fourier features then a linear layer.

    With `inputs` > 1 the condition is a small vector [N, inputs] (the patch recipe's slice position
    and patch centre x, y), each scalar with its own Fourier features. With `conditioned=False` the
    embedding is zero (the unconditioned ablation) and the condition is ignored, so both variants
    share one interface.
    """

    freqs: torch.Tensor  # buffer [frequencies]

    def __init__(self, dim: int, *, frequencies: int = 6, conditioned: bool = True, inputs: int = 1) -> None:
        super().__init__()
        self.register_buffer("freqs", (2.0 ** torch.arange(frequencies, dtype=torch.float32)) * math.pi)
        self.linear = EqualLinear(inputs * (2 * frequencies + 1), dim)
        self.conditioned = conditioned
        self.inputs = inputs

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        p = pos.reshape(-1, self.inputs).to(self.freqs.dtype)
        if not self.conditioned:
            p = p * 0.0
        if self.inputs == 1:
            angles = p * self.freqs[None, :]
        else:
            angles = (p[:, :, None] * self.freqs[None, None, :]).flatten(1)
        feats = torch.cat([p, torch.sin(angles), torch.cos(angles)], dim=1)
        out: torch.Tensor = self.linear(feats)
        return out if self.conditioned else out * 0.0


def _pixel_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(torch.mean(x * x, dim=1, keepdim=True) + 1e-8)


# --- StyleGAN2-style ---------------------------------------------------------------------------------


class MappingNetwork(nn.Module):
    """(z, position) → w: pixel-normalised z concatenated with the position embedding, then an MLP."""

    def __init__(self, z_dim: int, w_dim: int, *, layers: int = 4, pos_dim: int = 32, conditioned: bool = True) -> None:
        super().__init__()
        self.embed = PositionEmbedding(pos_dim, conditioned=conditioned)
        dims = [z_dim + pos_dim] + [w_dim] * layers
        self.net = nn.Sequential(*[EqualLinear(a, b, lr_mul=0.01, activation=True) for a, b in zip(dims, dims[1:])])

    def forward(self, z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        e = self.embed(pos)
        w: torch.Tensor = self.net(torch.cat([_pixel_norm(z), _pixel_norm(e) if self.embed.conditioned else e], dim=1))
        return w


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution, in the plain-op form: (x·s) ⊛ W, then × demodulation."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        w_dim: int,
        *,
        demodulate: bool = True,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.scale = 1.0 / math.sqrt(in_channels * kernel * kernel)
        self.modulation = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.demodulate = demodulate
        self.upsample = upsample
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        s = self.modulation(w)  # [N, in]
        weight = self.weight * self.scale
        x = x * s[:, :, None, None]
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            # Σ_{i,k} (W_oik s_i)² = Σ_i s_i² Σ_k W_oik²  — exact, and [N, out] only.
            d = torch.rsqrt(torch.matmul(s * s, weight.pow(2).sum(dim=(2, 3)).t()) + 1e-8)
            out = out * d[:, :, None, None]
        return out


class NoiseInjection(nn.Module):
    """Per-pixel noise scaled by a learned strength; `mode` random (training), const (scoring), none."""

    const_noise: torch.Tensor  # buffer [1, 1, resolution, resolution]

    def __init__(self, resolution: int) -> None:
        super().__init__()
        self.strength = nn.Parameter(torch.zeros(()))
        self.register_buffer("const_noise", torch.randn(1, 1, resolution, resolution))

    def forward(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "random":
            noise = torch.randn(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device, dtype=x.dtype)
            return x + self.strength * noise
        if mode == "const":
            return x + self.strength * self.const_noise
        return x


class StyledConv(nn.Module):
    def __init__(
        self, in_channels: int, out_channels: int, w_dim: int, resolution: int, *, upsample: bool = False
    ) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, upsample=upsample)
        self.noise = NoiseInjection(resolution)
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str) -> torch.Tensor:
        return _lrelu(self.noise(self.conv(x, w), noise_mode) + self.bias)


class ToImage(nn.Module):
    """Skip output: a modulated 1×1 conv (no demodulation) to one channel, added to the upsampled skip."""

    def __init__(self, in_channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, 1, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 1, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        out: torch.Tensor = self.conv(x, w) + self.bias
        if skip is not None:
            out = out + F.interpolate(skip, scale_factor=2.0, mode="bilinear", align_corners=False)
        return out


def _style_channels(size: int) -> dict[int, int]:
    return {r: c for r, c in {4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 32, 256: 16}.items() if r <= size}


class StyleGenerator(nn.Module):
    """StyleGAN2-style generator G(z, position) → image [N, 1, size, size]."""

    def __init__(self, size: int, *, z_dim: int = 128, w_dim: int = 128, conditioned: bool = True) -> None:
        super().__init__()
        ch = _style_channels(size)
        self.size, self.z_dim = size, z_dim
        self.noise_mode = "random"
        self.mapping = MappingNetwork(z_dim, w_dim, conditioned=conditioned)
        self.const = nn.Parameter(torch.randn(1, ch[4], 4, 4))
        self.conv4 = StyledConv(ch[4], ch[4], w_dim, 4)
        self.img4 = ToImage(ch[4], w_dim)
        self.ups = nn.ModuleList()
        self.convs = nn.ModuleList()
        self.imgs = nn.ModuleList()
        r = 8
        while r <= size:
            self.ups.append(StyledConv(ch[r // 2], ch[r], w_dim, r, upsample=True))
            self.convs.append(StyledConv(ch[r], ch[r], w_dim, r))
            self.imgs.append(ToImage(ch[r], w_dim))
            r *= 2

    def synthesis(self, w: torch.Tensor) -> torch.Tensor:
        x = self.const.expand(w.shape[0], -1, -1, -1)
        x = self.conv4(x, w, self.noise_mode)
        img: torch.Tensor = self.img4(x, w, None)
        for up, conv, to_img in zip(self.ups, self.convs, self.imgs):
            x = conv(up(x, w, self.noise_mode), w, self.noise_mode)
            img = to_img(x, w, img)
        return img

    def forward(self, z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.synthesis(self.mapping(z, pos))


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = EqualConv2d(in_channels, in_channels, 3, activation=True)
        self.conv2 = EqualConv2d(in_channels, out_channels, 3, activation=True, downsample=True)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = (self.conv2(self.conv1(x)) + self.skip(F.avg_pool2d(x, 2))) / SQRT2
        return out


class _ProjectionHead(nn.Module):
    """From 4×4 features: [minibatch-stddev] → conv → FC → h; logit = ψ(h) + ⟨embed(position), h⟩."""

    def __init__(self, channels: int, *, mbstd: bool, conditioned: bool, cond_inputs: int = 1) -> None:
        super().__init__()
        self.mbstd = mbstd
        self.conv = EqualConv2d(channels + (1 if mbstd else 0), channels, 3, activation=True)
        self.fc = EqualLinear(channels * 16, channels, activation=True)
        self.out = EqualLinear(channels, 1)
        self.embed = PositionEmbedding(channels, conditioned=conditioned, inputs=cond_inputs)

    def _stddev(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.training and n % 4 == 0:
            y = x.reshape(4, n // 4, c, h, w)
            s = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8).mean(dim=(1, 2, 3)).repeat(4)
            return torch.cat([x, s.reshape(n, 1, 1, 1).expand(n, 1, h, w)], dim=1)
        # Evaluation/export: the whole batch is one group (batch-size independent graph).
        s = torch.sqrt(x.var(dim=0, unbiased=False) + 1e-8).mean()
        return torch.cat([x, torch.zeros_like(x[:, :1]) + s], dim=1)

    def forward(self, feats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self._stddev(feats) if self.mbstd else feats
        h = self.fc(self.conv(x).flatten(1))
        logit: torch.Tensor = self.out(h).squeeze(1) + (self.embed(pos) * h).sum(dim=1)
        return logit


class ResDiscriminator(nn.Module):
    """Residual discriminator D(image, position) → logit, with minibatch-stddev and a projection term."""

    def __init__(self, size: int, *, conditioned: bool = True) -> None:
        super().__init__()
        ch = _style_channels(size)
        ch = {r: max(c, 32) for r, c in ch.items()}
        self.from_image = EqualConv2d(1, ch[size], 1, activation=True)
        blocks = []
        r = size
        while r > 4:
            blocks.append(ResBlock(ch[r], ch[r // 2]))
            r //= 2
        self.blocks = nn.Sequential(*blocks)
        self.head = _ProjectionHead(ch[4], mbstd=True, conditioned=conditioned)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 4×4 feature map before minibatch-stddev, flattened [N, C·16]."""
        f: torch.Tensor = self.blocks(self.from_image(x))
        return f.flatten(1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        f = self.blocks(self.from_image(x))
        logit: torch.Tensor = self.head(f, pos)
        return logit


# --- Compact conditioned DCGAN ------------------------------------------------------------------------


def _dc_channels(size: int) -> dict[int, int]:
    return {r: c for r, c in {4: 128, 8: 128, 16: 64, 32: 32, 64: 16, 128: 16, 256: 8}.items() if r <= size}


class DCGenerator(nn.Module):
    """Conditioned DCGAN generator: [z, embed(position)] → 4×4 → (upsample, conv, BN, LReLU)× → tanh.

    `channels` image channels, `cond_inputs` conditioning scalars and `widths` (feature channels per
    resolution) default to the slice recipe's; the patch recipe passes its own.
    """

    def __init__(
        self,
        size: int,
        *,
        z_dim: int = 128,
        conditioned: bool = True,
        channels: int = 1,
        cond_inputs: int = 1,
        widths: dict[int, int] | None = None,
    ) -> None:
        super().__init__()
        ch = _dc_channels(size) if widths is None else widths
        self.size, self.z_dim = size, z_dim
        self.noise_mode = "none"  # interface parity with StyleGenerator; DCGAN has no noise inputs
        self.embed = PositionEmbedding(32, conditioned=conditioned, inputs=cond_inputs)
        self.fc = nn.Linear(z_dim + 32, ch[4] * 16)
        self.c4 = ch[4]
        layers: list[nn.Module] = [nn.BatchNorm2d(ch[4]), nn.LeakyReLU(0.2)]
        r = 8
        while r <= size:
            layers += [
                nn.Upsample(scale_factor=2.0, mode="nearest"),
                nn.Conv2d(ch[r // 2], ch[r], 3, padding=1),
                nn.BatchNorm2d(ch[r]),
                nn.LeakyReLU(0.2),
            ]
            r *= 2
        layers += [nn.Conv2d(ch[size], channels, 3, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.fc(torch.cat([z, self.embed(pos)], dim=1))
        img: torch.Tensor = self.net(x.reshape(-1, self.c4, 4, 4))
        return img


class DCDiscriminator(nn.Module):
    """Conditioned DCGAN discriminator: strided convs to 4×4, then the projection head (no mbstd)."""

    def __init__(
        self,
        size: int,
        *,
        conditioned: bool = True,
        channels: int = 1,
        cond_inputs: int = 1,
        widths: dict[int, int] | None = None,
    ) -> None:
        super().__init__()
        ch = _dc_channels(size) if widths is None else widths
        layers: list[nn.Module] = [nn.Conv2d(channels, ch[size], 3, padding=1), nn.LeakyReLU(0.2)]
        r = size
        while r > 4:
            layers += [nn.Conv2d(ch[r], ch[r // 2], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            r //= 2
        self.body = nn.Sequential(*layers)
        self.head = _ProjectionHead(ch[4], mbstd=False, conditioned=conditioned, cond_inputs=cond_inputs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f: torch.Tensor = self.body(x)
        return f.flatten(1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logit: torch.Tensor = self.head(self.body(x), pos)
        return logit


# --- Encoder and body-part regression -----------------------------------------------------------------


class Encoder(nn.Module):
    """f-AnoGAN izi_f encoder E(image, position) → z: strided convs, then an MLP that also sees the position."""

    def __init__(
        self,
        size: int,
        *,
        z_dim: int = 128,
        conditioned: bool = True,
        width: int = 64,
        channels: int = 1,
        cond_inputs: int = 1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, c, r = channels, max(16, width // 4), size
        while r > 4:
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
            c_in, c, r = c, min(c * 2, width * 2), r // 2
        self.body = nn.Sequential(*layers)
        self.embed = PositionEmbedding(32, conditioned=conditioned, inputs=cond_inputs)
        self.head = nn.Sequential(nn.Linear(c_in * 16 + 32, 128), nn.LeakyReLU(0.2), nn.Linear(128, z_dim))

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        z: torch.Tensor = self.head(torch.cat([self.body(x).flatten(1), self.embed(pos)], dim=1))
        return z


class BodyPartRegressor(nn.Module):
    """Yan et al. 2018 body-part regression: one slice → one scalar that grows from head to feet.

    Works on a 64² version of the slice whatever the model size (position needs no fine detail).
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.pool = max(1, size // 64)
        chans = [1, 16, 32, 64, 64]
        layers: list[nn.Module] = []
        for a, b in zip(chans, chans[1:]):
            layers += [
                nn.Conv2d(a, b, 3, padding=1),
                nn.LeakyReLU(0.2),
                nn.Conv2d(b, b, 3, padding=1),
                nn.LeakyReLU(0.2),
                nn.AvgPool2d(2),
            ]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        raw: torch.Tensor = self.out(self.body(x).mean(dim=(2, 3)))
        return raw.squeeze(1)


@dataclass
class Networks:
    G: StyleGenerator | DCGenerator
    D: ResDiscriminator | DCDiscriminator
    E: Encoder


def build_networks(family: str, size: int, *, z_dim: int = 128, conditioned: bool = True) -> Networks:
    """The generator, discriminator and encoder of one family at one size.

    Raises:
        ValueError: unknown family or unsupported size.
    """
    if family not in NETWORK_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(NETWORK_FAMILIES)}, got {family!r}.")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(map(str, SIZES))}, got {size}.")
    if family == "stylegan2":
        return Networks(
            StyleGenerator(size, z_dim=z_dim, conditioned=conditioned),
            ResDiscriminator(size, conditioned=conditioned),
            Encoder(size, z_dim=z_dim, conditioned=conditioned),
        )
    return Networks(
        DCGenerator(size, z_dim=z_dim, conditioned=conditioned),
        DCDiscriminator(size, conditioned=conditioned),
        Encoder(size, z_dim=z_dim, conditioned=conditioned, width=32),
    )


class Scorer(nn.Module):
    """The fused slice scorer: (images, positions, body masks) → scores, both terms, residual maps.

    score = (r − μ_r(p))/σ_r(p) + κ·(f − μ_f(p))/σ_f(p) with r the mean squared residual
    |x − G(E(x))|² inside the body mask and f the mean squared difference of discriminator
    features. μ and σ are measured on validation normals as functions of the slice position p
    (a table over a uniform position grid, linearly interpolated, clamped at the ends — a lung-base
    slice is compared with lung-base slices); a constant table is the plain global normalisation.
    The residual map is |x − G(E(x))| inside the mask.
    """

    norm_grid: torch.Tensor  # buffer [grid_size], uniform positions
    norm_table: torch.Tensor  # buffer [4, grid_size]: μ_r, σ_r, μ_f, σ_f at each grid position

    def __init__(
        self,
        G: StyleGenerator | DCGenerator,
        E: Encoder,
        D: ResDiscriminator | DCDiscriminator,
        *,
        kappa: float = 1.0,
        grid_size: int = 2,
    ) -> None:
        super().__init__()
        self.G, self.E, self.D = G, E, D
        self.kappa = float(kappa)
        self.register_buffer("norm_grid", torch.linspace(0.0, 1.0, grid_size))
        self.register_buffer("norm_table", torch.tensor([[0.0], [1.0], [0.0], [1.0]]).repeat(1, grid_size))

    def set_normalisation(self, mu_r: float, sigma_r: float, mu_f: float, sigma_f: float) -> None:
        """The same μ, σ at every position (global normalisation)."""
        values = torch.tensor([mu_r, max(sigma_r, 1e-12), mu_f, max(sigma_f, 1e-12)], dtype=torch.float32)
        self.norm_table.copy_(values[:, None].expand_as(self.norm_table))

    def set_position_normalisation(self, grid: Sequence[float], table: Sequence[Sequence[float]]) -> None:
        """μ_r, σ_r, μ_f, σ_f (rows of `table`) at the uniformly spaced positions `grid`.

        Raises:
            ValueError: the grid is not uniform and increasing with ≥ 2 points, or the table's shape differs.
        """
        g = torch.as_tensor(grid, dtype=torch.float32)
        t = torch.as_tensor(table, dtype=torch.float32)
        steps = g[1:] - g[:-1] if g.numel() > 1 else torch.zeros(0)
        if g.numel() < 2 or not bool((steps > 0).all()) or float(steps.max() - steps.min()) > 1e-4 * float(steps.max()):
            raise ValueError(f"normalisation grid must be uniform and increasing with >= 2 points, got {g.tolist()}.")
        if tuple(t.shape) != (4, g.numel()):
            raise ValueError(f"normalisation table must be 4 x {g.numel()}, got {tuple(t.shape)}.")
        t[1] = t[1].clamp(min=1e-12)
        t[3] = t[3].clamp(min=1e-12)
        self.norm_grid = g.to(self.norm_grid.device)
        self.norm_table = t.to(self.norm_table.device)

    def statistics(self, pos: torch.Tensor) -> torch.Tensor:
        """[N, 4] μ_r, σ_r, μ_f, σ_f at each position (linear interpolation on the grid, clamped)."""
        grid = self.norm_grid
        step = grid[1] - grid[0]
        p = torch.minimum(torch.maximum(pos.reshape(-1, 1), grid[:1]), grid[-1:])
        weights = torch.relu(1.0 - torch.abs(p - grid[None, :]) / step)
        return torch.matmul(weights, self.norm_table.t())

    def terms(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Unnormalised (residual term, feature term, residual map)."""
        recon = self.G(self.E(x, pos), pos)
        diff = (x - recon) * mask
        area = mask.sum(dim=(1, 2, 3)).clamp(min=1.0)
        residual = (diff * diff).sum(dim=(1, 2, 3)) / area
        feature = (self.D.features(x) - self.D.features(recon)).pow(2).mean(dim=1)
        return residual, feature, diff.abs()

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        residual, feature, residual_map = self.terms(x, pos, mask)
        st = self.statistics(pos)
        score = (residual - st[:, 0]) / st[:, 1] + self.kappa * (feature - st[:, 2]) / st[:, 3]
        return score, residual, feature, residual_map
