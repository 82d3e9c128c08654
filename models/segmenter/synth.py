"""Domain randomisation for the liver segmenter (`train segmenter --recipe synth`), after SynthSeg.

Billot et al. (Medical Image Analysis 2023) trained on label maps alone, with every label's intensity,
the resolution, noise and bias drawn at random far beyond what a scanner makes, and segmented real
scans of any contrast. Here the label maps are the phantom's *tissue* maps (`service.phantom.anatomy`):

1. `render_bank` renders, once per run, thousands of 3-slice tissue stacks from phantom patients whose
   anatomy is varied beyond the phantom's own (liver size, left lobe, lower tip, stronger smooth
   deformation), each with a random slice spacing of 1–5 mm, at 2 mm pixels in a 512-mm field.
2. `Randomiser.batch` turns stacks into training slices on the fly (torch, a few ms a batch): HU per
   tissue drawn for a random contrast phase (non-contrast, arterial, portal-venous, delayed) or fully at
   random, texture of random strength, metal, a smooth bias field, a random acquisition blur (pixel
   size and kernel, ≈ 0.5–3 mm), noise of random level and texture, a random reconstruction circle or a
   cropped field of view; then the serving framing (`service.segmentation.frame_series`: fixed pixel
   size, body-centred) with a random scale, rotation, shift and elastic warp; a random gamma after the
   window. A quarter of the slices keep the phantom's own portal-venous appearance.

Nothing here reads a real scan: the real cases are for evaluation only.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from service.phantom.anatomy import Patient
from service.phantom.canvas import TISSUE_HU, Canvas, Label, Tissue
from service.segmentation import FRAMING_MARGIN, SegmenterInput

log = logging.getLogger(__name__)

#: The bank's grid: 256² pixels of 2 mm (a 512-mm field holds every phantom body).
BANK_GRID = 256
BANK_SPACING_MM = 2.0
#: Texture is stored as int8 of this many steps per unit of the phantom's unit-variance texture field.
TEXTURE_SCALE = 40.0
NUM_TISSUES = max(int(t) for t in Tissue) + 1
NOT_BODY = (Tissue.AIR, Tissue.TABLE_SHELL, Tissue.TABLE_FOAM)

T = Tissue
#: HU ranges per contrast phase for the tissues contrast changes; the rest come from `COMMON_HU`.
PHASE_HU: dict[str, dict[Tissue, tuple[float, float]]] = {
    "non_contrast": {
        T.LIVER: (40, 75),
        T.SPLEEN: (38, 55),
        T.LIVER_VESSEL: (28, 50),
        T.AORTA: (28, 50),
        T.IVC: (28, 50),
        T.BLOOD_POOL: (28, 50),
        T.MYOCARDIUM: (35, 55),
        T.KIDNEY_CORTEX: (25, 42),
        T.KIDNEY_MEDULLA: (22, 40),
        T.PANCREAS: (30, 50),
        T.STOMACH_WALL: (30, 50),
        T.BOWEL_WALL: (30, 50),
        T.LUNG_VESSEL: (28, 50),
    },
    "arterial": {
        T.LIVER: (55, 95),
        T.SPLEEN: (80, 160),
        T.LIVER_VESSEL: (70, 180),
        T.AORTA: (200, 450),
        T.IVC: (60, 150),
        T.BLOOD_POOL: (180, 400),
        T.MYOCARDIUM: (100, 170),
        T.KIDNEY_CORTEX: (150, 300),
        T.KIDNEY_MEDULLA: (50, 110),
        T.PANCREAS: (90, 160),
        T.STOMACH_WALL: (70, 130),
        T.BOWEL_WALL: (70, 140),
        T.LUNG_VESSEL: (150, 380),
    },
    "portal_venous": {
        T.LIVER: (85, 160),
        T.SPLEEN: (95, 155),
        T.LIVER_VESSEL: (130, 230),
        T.AORTA: (120, 230),
        T.IVC: (110, 210),
        T.BLOOD_POOL: (110, 210),
        T.MYOCARDIUM: (85, 135),
        T.KIDNEY_CORTEX: (140, 230),
        T.KIDNEY_MEDULLA: (120, 210),
        T.PANCREAS: (75, 135),
        T.STOMACH_WALL: (55, 105),
        T.BOWEL_WALL: (55, 115),
        T.LUNG_VESSEL: (100, 210),
    },
    "delayed": {
        T.LIVER: (60, 110),
        T.SPLEEN: (65, 115),
        T.LIVER_VESSEL: (75, 145),
        T.AORTA: (75, 145),
        T.IVC: (75, 145),
        T.BLOOD_POOL: (75, 145),
        T.MYOCARDIUM: (65, 115),
        T.KIDNEY_CORTEX: (100, 190),
        T.KIDNEY_MEDULLA: (110, 220),
        T.URINE: (5, 500),
        T.PANCREAS: (55, 105),
        T.STOMACH_WALL: (45, 95),
        T.BOWEL_WALL: (45, 95),
        T.LUNG_VESSEL: (75, 145),
    },
}
#: HU ranges of the tissues contrast leaves alone (or that vary between patients and scanners anyway).
COMMON_HU: dict[Tissue, tuple[float, float]] = {
    T.AIR: (-1000, -990), T.SKIN: (10, 60), T.FAT: (-135, -65), T.MUSCLE: (35, 72), T.LUNG: (-910, -740),
    T.URINE: (-5, 25), T.STOMACH_CONTENT: (-5, 40), T.GAS: (-1000, -850), T.BOWEL_CONTENT: (-5, 45),
    T.STOOL: (-60, 60), T.BILE: (-5, 25), T.BONE_CORTEX: (450, 1500), T.BONE_MARROW: (80, 400), T.DISC: (55, 115),
    T.CSF: (0, 20), T.CARTILAGE: (80, 170), T.TABLE_SHELL: (80, 400), T.TABLE_FOAM: (-950, -650),
    T.METAL: (2000, 3071), T.LESION: (15, 85), T.ASCITES: (0, 22), T.LESION_CORE: (0, 40),
}  # fmt: skip
#: Soft tissues whose HU the fully random mode draws independently (SynthSeg's random intensities).
SOFT_TISSUES = (
    T.LIVER, T.SPLEEN, T.LIVER_VESSEL, T.AORTA, T.IVC, T.BLOOD_POOL, T.MYOCARDIUM, T.KIDNEY_CORTEX,
    T.KIDNEY_MEDULLA, T.PANCREAS, T.STOMACH_WALL, T.BOWEL_WALL, T.MUSCLE, T.LUNG_VESSEL,
)  # fmt: skip


@dataclass
class SynthBank:
    """Tissue stacks to randomise: tissue [N, 3, G, G] uint8, texture [N, 3, G, G] int8, liver [N, G, G]
    (the middle slice's liver), patient [N] (which phantom patient)."""

    tissue: np.ndarray
    texture: np.ndarray
    liver: np.ndarray
    patient: np.ndarray

    def __post_init__(self) -> None:
        n = self.tissue.shape[0]
        if self.tissue.ndim != 4 or self.tissue.shape[1] != 3:
            raise ValueError(f"SynthBank.tissue must be [N, 3, G, G], got {self.tissue.shape}.")
        if self.texture.shape != self.tissue.shape or self.liver.shape != (n, *self.tissue.shape[2:]):
            raise ValueError("SynthBank.texture and .liver must match .tissue's shape.")

    def __len__(self) -> int:
        return int(self.tissue.shape[0])

    def save(self, path: Path) -> None:
        np.savez(path, tissue=self.tissue, texture=self.texture, liver=self.liver, patient=self.patient)

    @classmethod
    def load(cls, path: Path) -> SynthBank:
        with np.load(path) as z:
            return cls(z["tissue"], z["texture"], z["liver"], z["patient"])


def varied_patient(seed: int) -> Patient:
    """A phantom patient whose liver and deformation vary more than the phantom's own (shape, lobes, tip)."""
    rng = np.random.default_rng([seed, 0x5E9])
    p = Patient(seed)
    p.liver_scale *= float(rng.uniform(0.85, 1.2))
    p.liver_left_lobe = float(rng.uniform(0.3, 1.7))
    p.u_liver_end = float(np.clip(p.u_liver_end + rng.normal(0.0, 0.035), p.u_dome_right + 0.18, 0.55))
    p.deform_mm *= float(rng.uniform(1.0, 2.6))
    return p


def _render_patient(args: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`per_patient` stacks of one varied patient: (tissue, texture, liver) for `SynthBank`."""
    seed, per_patient = args
    rng = np.random.default_rng([seed, 0xBA4C])
    p = varied_patient(seed)
    g = BANK_GRID
    coords = ((np.arange(g) - (g - 1) / 2.0) * BANK_SPACING_MM).astype(np.float32)
    p.bind(coords, coords)
    gx = np.broadcast_to(coords[None, :], (g, g))
    gy = np.broadcast_to(coords[:, None], (g, g))
    tissue = np.zeros((per_patient, 3, g, g), np.uint8)
    texture = np.zeros((per_patient, 3, g, g), np.int8)
    liver = np.zeros((per_patient, g, g), bool)
    lo, hi = p.u_dome_right - 0.06, p.u_liver_end + 0.06
    for j in range(per_patient):
        u = float(rng.uniform(lo, hi)) if rng.uniform() < 0.8 else float(rng.uniform(0.0, 0.85))
        du = float(rng.uniform(1.0, 5.0)) / p.length_mm
        for c, level in enumerate((u - du, u, u + du)):  # head → feet, as `context_stack` orders them
            s_mm = level * p.length_mm
            dx, dy = p.deformation(s_mm)
            canvas = Canvas(
                x=gx + dx, y=gy + dy, x0=float(coords[0]), y0=float(coords[0]), spacing=BANK_SPACING_MM,
                margin=3.0 * p.deform_mm,
            )  # fmt: skip
            field, _ = p.render(level, canvas)
            tissue[j, c] = canvas.tissue
            texture[j, c] = np.clip(np.rint(field * TEXTURE_SCALE), -127, 127).astype(np.int8)
            if c == 1:
                liver[j] = canvas.label == Label.LIVER
    return tissue, texture, liver


def render_bank(patient_seeds: list[int], per_patient: int, *, jobs: int = 1) -> SynthBank:
    """Render `per_patient` 3-slice tissue stacks of each varied phantom patient (`varied_patient`)."""
    work = [(s, per_patient) for s in patient_seeds]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            parts = list(pool.map(_render_patient, work, chunksize=1))
    else:
        parts = [_render_patient(w) for w in work]
    return SynthBank(
        tissue=np.concatenate([p[0] for p in parts]),
        texture=np.concatenate([p[1] for p in parts]),
        liver=np.concatenate([p[2] for p in parts]),
        patient=np.repeat(np.asarray(patient_seeds, np.int32), per_patient),
    )


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _range_table(ranges: dict[Tissue, tuple[float, float]], base: torch.Tensor) -> torch.Tensor:
    """[2, NUM_TISSUES] (low, high) HU: `ranges` where given, the phantom's value ± 15 HU elsewhere."""
    table = torch.stack([base - 15.0, base + 15.0])
    for tissue, (lo, hi) in ranges.items():
        table[0, tissue], table[1, tissue] = lo, hi
    return table


def draw_hu(gen: torch.Generator, n: int, realistic: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(HU [n, NUM_TISSUES], texture amplitude [n, NUM_TISSUES]) for n slices.

    `realistic` [n] bool: the phantom's own portal-venous table with its small jitter. Otherwise a random
    phase (`PHASE_HU` over `COMMON_HU`) or, one time in five, every soft tissue uniform in -10 … 250 HU
    with the liver in 20 … 200 HU; one time in ten with oral contrast (150–450 HU) in stomach and bowel.
    """
    base = torch.zeros(NUM_TISSUES)
    amp = torch.zeros(NUM_TISSUES)
    for tissue, (pv, _, tex) in TISSUE_HU.items():
        base[tissue], amp[tissue] = pv, tex
    wild = {t: (-10.0, 250.0) for t in SOFT_TISSUES} | {T.LIVER: (20.0, 200.0)}
    tables = [_range_table({**COMMON_HU, **PHASE_HU[p]}, base) for p in PHASE_HU]
    tables.append(_range_table({**COMMON_HU, **PHASE_HU["portal_venous"], **wild}, base))
    table = torch.stack(tables)  # [phases + 1, 2, NUM_TISSUES]
    choice = torch.randint(len(PHASE_HU), (n,), generator=gen)
    choice = torch.where(torch.rand(n, generator=gen) < 0.2, len(PHASE_HU), choice)
    lo, hi = table[choice, 0], table[choice, 1]
    hu = lo + (hi - lo) * torch.rand(n, NUM_TISSUES, generator=gen)
    oral = torch.rand(n, generator=gen) < 0.1
    oral_hu = _uniform(gen, n, 150.0, 450.0)
    for tissue in (T.STOMACH_CONTENT, T.BOWEL_CONTENT):
        hu[:, tissue] = torch.where(oral, oral_hu, hu[:, tissue])
    plain = base.repeat(n, 1) + torch.randn(n, NUM_TISSUES, generator=gen) * 4.0
    hu = torch.where(realistic[:, None], plain, hu)
    gain = torch.where(realistic, torch.ones(n), _uniform(gen, n, 0.4, 3.0))
    return hu, amp.repeat(n, 1) * gain[:, None]


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x [n, c, H, W] blurred per sample with sigma [n] pixels (separable; sigma 0 leaves it unchanged)."""
    n, c, h, w = x.shape
    radius = 5
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    s = sigma.clamp(min=1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None, :] / s) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n·c, 2r+1]
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), k[:, None, :, None], groups=n * c)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c)
    return flat.reshape(n, c, h, w)


class Randomiser:
    """Training slices from a `SynthBank`: random appearance, acquisition and framing (see the module doc).

    `spec` is the network's input (its size, window and pixel size: the serving framing is reproduced);
    `liver_fraction` of the slices are drawn from stacks with liver, `realistic_fraction` keep the
    phantom's own appearance.

    Raises:
        ValueError: `spec` has no pixel_spacing_mm (the legacy framing cannot be randomised this way).
    """

    def __init__(
        self,
        bank: SynthBank,
        spec: SegmenterInput,
        gen: torch.Generator,
        *,
        liver_fraction: float = 0.75,
        realistic_fraction: float = 0.25,
    ) -> None:
        if spec.pixel_spacing_mm is None:
            raise ValueError("Randomiser needs spec.pixel_spacing_mm (a body-centred field).")
        if spec.context_slices != 1:
            raise ValueError(
                f"Randomiser renders 3-slice stacks; spec.context_slices must be 1, got {spec.context_slices}."
            )
        self.bank = bank
        self.spec = spec
        self.gen = gen
        self.liver_fraction = liver_fraction
        self.realistic_fraction = realistic_fraction
        self.with_liver = np.flatnonzero(bank.liver.any(axis=(1, 2)))
        if self.with_liver.size == 0:
            raise ValueError("the bank holds no stack with liver")
        self.not_body = torch.zeros(NUM_TISSUES, dtype=torch.bool)
        self.not_body[list(NOT_BODY)] = True

    def _indices(self, n: int) -> np.ndarray:
        pick_liver = torch.rand(n, generator=self.gen) < self.liver_fraction
        a = torch.randint(len(self.with_liver), (n,), generator=self.gen).numpy()
        b = torch.randint(len(self.bank), (n,), generator=self.gen).numpy()
        return np.where(pick_liver.numpy(), self.with_liver[a], b)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [n, 3, S, S] windowed to [0, 1], liver [n, S, S] int64) of n random slices."""
        gen, spec = self.gen, self.spec
        idx = self._indices(n)
        tissue = torch.from_numpy(self.bank.tissue[idx]).long()
        texture = torch.from_numpy(self.bank.texture[idx]).float() / TEXTURE_SCALE
        liver = torch.from_numpy(self.bank.liver[idx]).float()
        g = tissue.shape[-1]
        realistic = torch.rand(n, generator=gen) < self.realistic_fraction
        hu_table, amp = draw_hu(gen, n, realistic)
        flat = tissue.reshape(n, -1)
        hu = (hu_table.gather(1, flat) + amp.gather(1, flat) * texture.reshape(n, -1)).reshape(tissue.shape)
        self._metal(hu, tissue, realistic)
        # A smooth bias (cupping, beam hardening, calibration drift): ± up to 25 HU over the field.
        coarse = torch.randn(n, 1, 4, 4, generator=gen) * _uniform(gen, n, 0.0, 25.0)[:, None, None, None]
        hu = (
            hu
            + F.interpolate(coarse, size=(g, g), mode="bicubic", align_corners=True) * (~realistic)[:, None, None, None]
        )
        # Acquisition blur (pixel size and kernel) and the resampling's anti-alias, in bank pixels.
        mm = self._field_spacing(tissue[:, 1], n)
        step = mm / BANK_SPACING_MM
        acquisition = torch.where(realistic, torch.full((n,), 0.25), _uniform(gen, n, 0.15, 1.5))
        hu = _gaussian_blur(hu, torch.sqrt(acquisition**2 + (0.5 * step - 0.5).clamp(min=0) ** 2))
        # Noise: white filtered to a random texture (sharp … smooth kernels), of random level.
        noise = _gaussian_blur(torch.randn(hu.shape, generator=gen), _uniform(gen, n, 0.0, 1.3))
        noise = noise / noise.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
        level = torch.where(
            realistic, _uniform(gen, n, 8.0, 16.0), torch.exp(_uniform(gen, n, math.log(3.0), math.log(45.0)))
        )
        hu = hu + noise * level[:, None, None, None]
        hu = self._field_of_view(hu, n)
        grid = self._grid(tissue[:, 1], hu, mm, n)
        image = F.grid_sample(hu + 1024.0, grid, mode="bilinear", padding_mode="zeros", align_corners=True) - 1024.0
        target = F.grid_sample(liver[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[:, 0]
        x = ((image - spec.window.low) / spec.window.width).clamp(0.0, 1.0)
        gamma = torch.exp(torch.randn(n, generator=gen) * 0.12) * (~realistic) + realistic.float()
        x = x.clamp(min=1e-6) ** gamma[:, None, None, None]
        return x.float(), (target > 0.5).long()

    def _metal(self, hu: torch.Tensor, tissue: torch.Tensor, realistic: torch.Tensor) -> None:
        """Small metal objects (clips, a stent, a port) inside the body of some slices, in place."""
        n, _, g, _ = hu.shape
        yy, xx = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
        for i in range(n):
            if realistic[i] or float(torch.rand(1, generator=self.gen)) > 0.12:
                continue
            inside = torch.nonzero(~self.not_body[tissue[i, 1]])
            for _ in range(int(torch.randint(1, 4, (1,), generator=self.gen))):
                r, c = inside[int(torch.randint(len(inside), (1,), generator=self.gen))]
                radius = 0.5 + 3.0 * float(torch.rand(1, generator=self.gen))
                disk = (yy - r) ** 2 + (xx - c) ** 2 <= radius**2
                hu[i, :, disk] = 2000.0 + 1000.0 * float(torch.rand(1, generator=self.gen))

    def _field_spacing(self, middle: torch.Tensor, n: int) -> torch.Tensor:
        """The field's pixel size (mm) per slice, as `frame_series` would choose it, times a random scale."""
        body = ~self.not_body[middle]
        rows, cols = body.any(2), body.any(1)
        extent = torch.maximum(rows.sum(1), cols.sum(1)).float() * BANK_SPACING_MM
        base = self.spec.pixel_spacing_mm or 1.0
        mm = torch.maximum(torch.full((n,), base), extent * (1.0 + FRAMING_MARGIN) / self.spec.size)
        return mm * torch.exp(torch.randn(n, generator=self.gen) * 0.08)

    def _field_of_view(self, hu: torch.Tensor, n: int) -> torch.Tensor:
        """Some slices get a reconstruction circle (250–500 mm) or a field cut on one side (truncation)."""
        g = hu.shape[-1]
        c = (torch.arange(g, dtype=torch.float32) - (g - 1) / 2.0) * BANK_SPACING_MM
        yy, xx = c[:, None], c[None, :]
        kind = torch.rand(n, generator=self.gen)
        for i in range(n):
            if kind[i] < 0.35:
                radius = 125.0 + 125.0 * float(torch.rand(1, generator=self.gen))
                oy, ox = (torch.randn(2, generator=self.gen) * 20.0).tolist()
                outside = (yy - oy) ** 2 + (xx - ox) ** 2 > radius**2
                hu[i, :, outside] = -1024.0 if float(torch.rand(1, generator=self.gen)) < 0.5 else -2048.0
            elif kind[i] < 0.45:
                edge = 110.0 + 80.0 * float(torch.rand(1, generator=self.gen))
                side = 1.0 if float(torch.rand(1, generator=self.gen)) < 0.5 else -1.0
                hu[i, :, (xx * side > edge).expand(g, g)] = -1024.0
        return hu

    def _grid(self, middle: torch.Tensor, hu: torch.Tensor, mm: torch.Tensor, n: int) -> torch.Tensor:
        """Sampling grid [n, S, S, 2] into the bank: body-centred (the box of what survived the field of
        view), `mm` pixels, a random rotation (±8°), shift (± ~1 cm) and a smooth elastic warp."""
        g, s = hu.shape[-1], self.spec.size
        body = (~self.not_body[middle]) & (hu[:, 1] > -500.0)
        centre = torch.zeros(n, 2)
        for i in range(n):
            r = torch.nonzero(body[i].any(1))
            cc = torch.nonzero(body[i].any(0))
            if len(r) and len(cc):
                centre[i, 0] = (r.min() + r.max()).float() / 2.0
                centre[i, 1] = (cc.min() + cc.max()).float() / 2.0
            else:
                centre[i] = (g - 1) / 2.0
        centre = centre + torch.randn(n, 2, generator=self.gen) * 4.0
        scale = (s - 1) * (mm / BANK_SPACING_MM) / (g - 1)
        angle = (torch.rand(n, generator=self.gen) - 0.5) * math.radians(16)
        cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
        tx = 2.0 * centre[:, 1] / (g - 1) - 1.0
        ty = 2.0 * centre[:, 0] / (g - 1) - 1.0
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, [n, 1, s, s], align_corners=True)
        warp = torch.randn(n, 2, 5, 5, generator=self.gen) * _uniform(self.gen, n, 0.0, 0.025)[:, None, None, None]
        warp = F.interpolate(warp, size=(s, s), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        return grid + warp
