"""A picture to check what the GAN learned: samples along the body axis and reconstructions.

    python -m models.detector samples --model DIR [--data DIR] --out samples.png

Row 1–2: G_ema samples at positions 0 … 1 (two latents). With --data: validation slices (top),
their izi_f reconstructions G(E(x)) (middle) and |x − G(E(x))| (bottom). Look for the liver.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models.detector.stylegan2.export import load_scorer


def render(model_dir: Path, out: Path, data: Path | None = None, columns: int = 8, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scorer = load_scorer(model_dir, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    pos = torch.linspace(0, 1, columns)
    rows: list[tuple[str, np.ndarray]] = []
    with torch.no_grad():
        for r in range(2):
            z = torch.randn(1, scorer.G.z_dim, generator=g).repeat(columns, 1)
            rows.append((f"G(z{r}, position 0→1)", scorer.G(z, pos)[:, 0].numpy()))
        if data is not None:
            import json

            from models.detector.data import load_dataset

            meta = json.loads((model_dir / "model.json").read_text())
            ds = load_dataset(data, int(meta["size"]), jobs=1, max_series=2)
            s = ds.validation[0]
            idx = np.linspace(0, s.num_slices - 1, columns).astype(int)
            x = torch.from_numpy(s.images[idx].astype(np.float32))[:, None]
            p = torch.from_numpy(s.naive_positions()[idx]) if meta["position"]["method"] == "naive" else None
            if p is None:
                from service import imaging

                raw = torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=False)
                from models.detector.stylegan2.networks import BodyPartRegressor

                net = BodyPartRegressor(int(meta["size"]))
                net.load_state_dict(raw["P"])
                fitted = imaging.fit_series_positions(
                    net.eval()(torch.from_numpy(s.images.astype(np.float32))[:, None]).numpy(),
                    s.locations_mm,
                    float(meta["position"]["mm_per_unit"]),
                )
                lo, hi = meta["position"]["lo"], meta["position"]["hi"]
                p = torch.from_numpy(((fitted - lo) / (hi - lo)).astype(np.float32)[idx])
            recon = scorer.G(scorer.E(x, p), p)
            rows += [
                ("validation slices", x[:, 0].numpy()),
                ("G(E(x))", recon[:, 0].numpy()),
                ("|x − G(E(x))|", (x - recon).abs()[:, 0].numpy() - 1.0),
            ]
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns, 1.7 * len(rows)), squeeze=False)
    for r, (title, imgs) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.imshow(imgs[c], cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.detector samples")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    render(a.model, a.out, a.data)
    return 0
