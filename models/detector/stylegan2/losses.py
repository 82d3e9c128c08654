"""Losses of the detector, as small named functions (after rosinality's stylegan2 and f-AnoGAN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_logistic_loss(real_logit: torch.Tensor, fake_logit: torch.Tensor) -> torch.Tensor:
    """Discriminator's non-saturating logistic loss: softplus(D(fake)) + softplus(−D(real))."""
    return F.softplus(fake_logit).mean() + F.softplus(-real_logit).mean()


def g_nonsaturating_loss(fake_logit: torch.Tensor) -> torch.Tensor:
    """Generator's non-saturating loss: softplus(−D(G(z)))."""
    return F.softplus(-fake_logit).mean()


def r1_penalty(real_logit: torch.Tensor, real_image: torch.Tensor) -> torch.Tensor:
    """‖∇ₓ D(x)‖² on real images (Mescheder et al. 2018); `real_image` must require grad."""
    (grad,) = torch.autograd.grad(real_logit.sum(), real_image, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def diff_augment(x: torch.Tensor, policy: str = "translation,cutout") -> torch.Tensor:
    """DiffAugment (Zhao et al. 2020), applied identically in spirit to real and fake batches.

    `translation`: shift by up to 1/8 of the size with zero (= −1, air-ish) padding; `cutout`: blank a
    random square of half the size. Intensity changes are left out on purpose: a shifted HU level
    is one of the anomalies the detector must see.
    """
    if not policy:
        return x
    n, _, h, w = x.shape
    for op in policy.split(","):
        if op == "translation":
            shift = max(1, h // 8)
            tx = torch.randint(-shift, shift + 1, (n, 1, 1), device=x.device)
            ty = torch.randint(-shift, shift + 1, (n, 1, 1), device=x.device)
            gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
            gy = (gy[None] + ty).clamp(-1, h)
            gx = (gx[None] + tx).clamp(-1, w)
            padded = F.pad(x + 1.0, (1, 1, 1, 1)) - 1.0  # pad with −1
            idx = (gy + 1) * (w + 2) + (gx + 1)
            x = padded.flatten(1).gather(1, idx.flatten(1)).reshape(n, 1, h, w)
        elif op == "cutout":
            ch, cw = h // 2, w // 2
            oy = torch.randint(0, h - ch + 1, (n, 1, 1), device=x.device)
            ox = torch.randint(0, w - cw + 1, (n, 1, 1), device=x.device)
            gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
            inside = (gy[None] >= oy) & (gy[None] < oy + ch) & (gx[None] >= ox) & (gx[None] < ox + cw)
            x = x * (~inside[:, None]).to(x.dtype)
        elif op:
            raise ValueError(f"unknown DiffAugment op {op!r}; expected translation or cutout.")
    return x


def izif_loss(
    x: torch.Tensor, recon: torch.Tensor, feat_x: torch.Tensor, feat_recon: torch.Tensor, kappa: float
) -> torch.Tensor:
    """f-AnoGAN izi_f: pixel MSE + κ · discriminator-feature MSE (Schlegl et al. 2019)."""
    return F.mse_loss(recon, x) + kappa * F.mse_loss(feat_recon, feat_x)


def bpr_losses(scores: torch.Tensor, metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Body-part-regression losses for [B, m] scores of m slices per series ordered head → feet.

    Order loss (Yan et al. 2018): −log σ(s_{j+1} − s_j). Distance loss: each step of the score
    equals the step of `metric` (distance in mm / mm_per_unit), smooth-L1 — Yan's equal-step
    loss made metric with the known slice spacing.
    """
    ds = scores[:, 1:] - scores[:, :-1]
    dm = metric[:, 1:] - metric[:, :-1]
    order = -F.logsigmoid(ds).mean()
    distance = F.smooth_l1_loss(ds, dm, beta=0.01)
    return order, distance
