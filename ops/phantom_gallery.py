"""Draw docs/phantom_gallery.png: each anomaly type next to the same patient's normal slice.

For every anomaly the same synthetic patient is scanned twice with the same geometry — once
normal, once with the anomaly — and the slice where the anomaly's ground-truth mask is largest
is shown side by side, with the mask outlined in red on the right.

    .venv/bin/python ops/phantom_gallery.py [--out docs/phantom_gallery.png] [--seed 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from service.imaging import ABDOMEN_WINDOW, apply_window  # noqa: E402
from service.phantom.anatomy import Patient  # noqa: E402
from service.phantom.anomalies import ANOMALY_TYPES, make_anomaly  # noqa: E402
from service.phantom.canvas import Label  # noqa: E402
from service.phantom.scanner import RESCALE_INTERCEPT, Scanner, plan_geometry  # noqa: E402


def gallery(seed: int, out: Path, slices: int = 60) -> None:
    fig, axes = plt.subplots(2, len(ANOMALY_TYPES), figsize=(3.0 * len(ANOMALY_TYPES), 6.4))
    for col, name in enumerate(ANOMALY_TYPES):
        patient = Patient(seed + col)
        rng = np.random.default_rng([seed, col])
        anomaly = make_anomaly(name, patient, rng)
        geometry = plan_geometry(patient, rng, num_slices=slices, matrix=512, anomaly=anomaly)
        abnormal = Scanner(patient, geometry, anomaly, noise_sigma=12.0, seed=seed)
        best = (-1, 0, None, None)
        for i in range(geometry.num_slices):
            stored, labels, mask = abnormal.acquire(i)
            area = 0 if mask is None else int(mask.sum())
            if name in ("low_dose", "contrast_phase"):  # whole-series anomalies: show the liver
                area = int((labels == Label.LIVER).sum())
            if area > best[0]:
                best = (area, i, stored, mask)
        _, index, stored, mask = best
        normal_patient = Patient(seed + col)
        normal = Scanner(normal_patient, geometry, None, noise_sigma=12.0, seed=seed)
        normal_stored, _, _ = normal.acquire(index)
        for row, (pixels, outline) in enumerate(((normal_stored, None), (stored, mask))):
            ax = axes[row, col]
            hu = pixels.astype(np.float32) + RESCALE_INTERCEPT
            ax.imshow(apply_window(hu, ABDOMEN_WINDOW), cmap="gray", vmin=0, vmax=1)
            if outline is not None and name not in ("low_dose", "contrast_phase"):
                ax.contour(outline, levels=[0.5], colors="red", linewidths=0.7)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(f"normal (u={geometry.u_positions[index]:.2f})", fontsize=9)
        axes[1, col].set_title(name, fontsize=11, color="darkred")
    fig.suptitle(
        "Synthetic abdominal CT: same patient and slice, normal (top) and with each anomaly "
        "(bottom; red = ground-truth mask). Window C50/W400.",
        fontsize=11,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/phantom_gallery.png"))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    gallery(args.seed, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
