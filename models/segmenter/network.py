"""The segmentation network: a compact 2.5-D U-Net, plain PyTorch ops so it exports to ONNX.

Input: `[N, C, S, S]` — C neighbouring axial slices (the slice to segment in the middle),
windowed to [0, 1]. Output in training mode: liver logits `[N, 2, S, S]` (background, liver).
The export wrapper (`SegmenterExport`) gives softmax probabilities plus the bottleneck features
(global average of the deepest block, `[N, F]`), which the gate evaluation uses for the
Mahalanobis baseline (the published failure detector for liver segmentation).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3×3 convolutions, each followed by group norm and SiLU."""
    groups = max(1, cout // 8)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.SiLU(),
    )


class UNet(nn.Module):
    """U-Net with `depth` poolings; channels double per level from `base`.

    Raises:
        ValueError: `in_channels` < 1, `base` < 4 or `depth` not in 2…5.
    """

    def __init__(self, *, in_channels: int = 3, base: int = 16, depth: int = 4, num_classes: int = 2) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
        if base < 4:
            raise ValueError(f"base must be >= 4 channels, got {base}.")
        if not 2 <= depth <= 5:
            raise ValueError(f"depth must be 2..5, got {depth}.")
        widths = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_block(in_channels, widths[0])])
        self.down.extend(_block(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.merge = nn.ModuleList(_block(2 * widths[i], widths[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.feature_dim = widths[-1]

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, classes, S, S], bottleneck features [N, F])."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        features = x.mean(dim=(2, 3))
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x), features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


class SegmenterExport(nn.Module):
    """What `segmenter.onnx` computes: image stack in, liver probability and bottleneck features out."""

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.net.forward_with_features(image)
        return torch.softmax(logits, dim=1)[:, 1], features
