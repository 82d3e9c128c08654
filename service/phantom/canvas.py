"""What a phantom slice is painted on: the tissues and their HU per contrast phase, the ground-truth
labels, smooth random fields, and the `Canvas` that holds one slice's tissue and label maps.

`service.phantom.anatomy` paints a patient's organs onto a `Canvas`; `service.phantom.anomalies`
paints anomalies over them; `service.phantom.scanner` turns the tissue map into HU with `hu_lookup`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    """What a pixel is made of; each has a HU value per contrast phase (see `TISSUE_HU`)."""

    AIR = 0
    SKIN = 1
    FAT = 2
    MUSCLE = 3
    LUNG = 4
    LUNG_VESSEL = 5
    BLOOD_POOL = 6
    MYOCARDIUM = 7
    LIVER = 8
    LIVER_VESSEL = 9
    SPLEEN = 10
    KIDNEY_CORTEX = 11
    KIDNEY_MEDULLA = 12
    URINE = 13
    AORTA = 14
    IVC = 15
    STOMACH_WALL = 16
    STOMACH_CONTENT = 17
    GAS = 18
    BOWEL_WALL = 19
    BOWEL_CONTENT = 20
    STOOL = 21
    PANCREAS = 22
    BILE = 23
    BONE_CORTEX = 24
    BONE_MARROW = 25
    DISC = 26
    CSF = 27
    CARTILAGE = 28
    TABLE_SHELL = 29
    TABLE_FOAM = 30
    METAL = 31
    LESION = 32
    ASCITES = 33
    LESION_CORE = 34  # necrotic centre of a heterogeneous tumour


#: HU per tissue: (portal-venous phase, non-contrast phase, texture amplitude in HU).
#: Normal series are portal-venous; the `contrast_phase` anomaly renders non-contrast.
TISSUE_HU: dict[Tissue, tuple[float, float, float]] = {
    Tissue.AIR: (-1000, -1000, 0),
    Tissue.SKIN: (35, 35, 4),
    Tissue.FAT: (-100, -100, 8),
    Tissue.MUSCLE: (55, 50, 6),
    Tissue.LUNG: (-855, -855, 25),
    Tissue.LUNG_VESSEL: (120, 40, 10),
    Tissue.BLOOD_POOL: (150, 42, 4),
    Tissue.MYOCARDIUM: (105, 48, 5),
    Tissue.LIVER: (110, 60, 5),
    Tissue.LIVER_VESSEL: (175, 45, 6),
    Tissue.SPLEEN: (120, 50, 5),
    Tissue.KIDNEY_CORTEX: (180, 35, 6),
    Tissue.KIDNEY_MEDULLA: (155, 32, 6),  # nephrographic by ~70 s
    Tissue.URINE: (8, 8, 3),
    Tissue.AORTA: (165, 45, 4),
    Tissue.IVC: (145, 42, 5),
    Tissue.STOMACH_WALL: (75, 42, 5),
    Tissue.STOMACH_CONTENT: (15, 15, 6),
    Tissue.GAS: (-990, -990, 5),
    Tissue.BOWEL_WALL: (80, 42, 6),
    Tissue.BOWEL_CONTENT: (25, 25, 10),
    Tissue.STOOL: (5, 5, 60),
    Tissue.PANCREAS: (100, 45, 8),
    Tissue.BILE: (8, 8, 3),
    Tissue.BONE_CORTEX: (1000, 1000, 90),
    Tissue.BONE_MARROW: (230, 230, 40),
    Tissue.DISC: (90, 90, 8),
    Tissue.CSF: (15, 15, 3),
    Tissue.CARTILAGE: (140, 140, 15),
    Tissue.TABLE_SHELL: (180, 180, 0),
    Tissue.TABLE_FOAM: (-880, -880, 0),
    Tissue.METAL: (3000, 3000, 0),
    Tissue.LESION: (60, 35, 8),
    Tissue.ASCITES: (8, 8, 3),
    Tissue.LESION_CORE: (22, 20, 10),
}


class Label(IntEnum):
    """Ground-truth structures; the value is the segment number in the ground-truth DICOM-SEG."""

    LIVER = 1
    SPLEEN = 2
    KIDNEY_RIGHT = 3
    KIDNEY_LEFT = 4
    AORTA = 5
    IVC = 6
    STOMACH = 7
    BOWEL = 8
    BONE = 9
    LUNG = 10
    URINARY_BLADDER = 11
    GALLBLADDER = 12
    HEART = 13
    PANCREAS = 14


def hu_lookup(phase: str) -> tuple[np.ndarray, np.ndarray]:
    """(HU per tissue, texture amplitude per tissue) as float32 arrays for a contrast phase.

    Raises:
        ValueError: for a phase other than 'portal_venous' or 'non_contrast'.
    """
    column = {"portal_venous": 0, "non_contrast": 1}.get(phase)
    if column is None:
        raise ValueError(f"phase must be 'portal_venous' or 'non_contrast', got {phase!r}.")
    hu = np.zeros(256, np.float32)
    tex = np.zeros(256, np.float32)
    for tissue, values in TISSUE_HU.items():
        hu[tissue] = values[column]
        tex[tissue] = values[2]
    return hu, tex


class SmoothField:
    """A smooth random 3-D scalar field with unit variance, evaluated one axial slice at a time.

    Built from Gaussian radial basis functions on a regular lattice (spacing `step_xy` mm in-plane,
    `step_z` mm along the body) with iid normal weights. A slice costs two small matrix products.
    """

    def __init__(
        self, rng: np.random.Generator, half_extent: float, z_extent: float, step_xy: float, step_z: float
    ) -> None:
        self.cx = np.arange(-half_extent - 2 * step_xy, half_extent + 2 * step_xy + 1e-6, step_xy)
        self.cz = np.arange(-2 * step_z, z_extent + 2 * step_z + 1e-6, step_z)
        self.step_xy = step_xy
        self.step_z = step_z
        self.coef = rng.standard_normal((self.cz.size, self.cx.size, self.cx.size)).astype(np.float32)

    def _basis(self, coords: np.ndarray) -> np.ndarray:
        """Row-normalised basis matrix (len(coords) × lattice size) for in-plane coordinates in mm."""
        b = np.exp(-0.5 * ((coords[:, None] - self.cx[None, :]) / self.step_xy) ** 2)
        basis: np.ndarray = (b / np.linalg.norm(b, axis=1, keepdims=True)).astype(np.float32)
        return basis

    def bind(self, y_mm: np.ndarray, x_mm: np.ndarray) -> None:
        """Fix the pixel grid (row and column coordinates in mm) that `at` evaluates on."""
        self._basis_y = self._basis(np.asarray(y_mm, np.float64))
        self._basis_x = self._basis(np.asarray(x_mm, np.float64))

    def at(self, s_mm: float) -> np.ndarray:
        """The field on the bound grid, on the slice `s_mm` below the top of the model."""
        s_mm = float(np.clip(s_mm, self.cz[0], self.cz[-1]))  # beyond the lattice the field is flat
        wz = np.exp(-0.5 * ((s_mm - self.cz) / self.step_z) ** 2)
        wz = (wz / np.linalg.norm(wz)).astype(np.float32)
        plane = np.tensordot(wz, self.coef, axes=1)
        on_grid: np.ndarray = self._basis_y @ plane @ self._basis_x.T
        return on_grid


@dataclass
class Canvas:
    """The two maps being painted for one slice, plus the (deformed) coordinates of every pixel.

    `x` and `y` are the patient coordinates of each pixel in mm relative to the body centre,
    after the patient's smooth deformation; painting later overrides painting earlier.
    """

    x: np.ndarray
    y: np.ndarray
    x0: float  # x of column 0 (undeformed), mm
    y0: float  # y of row 0 (undeformed), mm
    spacing: float  # mm per pixel
    margin: float  # largest deformation, mm
    tissue: np.ndarray = field(init=False)
    label: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.tissue = np.zeros(self.x.shape, np.uint8)
        self.label = np.zeros(self.x.shape, np.uint8)

    def box(self, cx: float, cy: float, half_x: float, half_y: float) -> tuple[slice, slice] | None:
        """Pixel rows/columns that can hold a shape within ±half_x, ±half_y mm of (cx, cy)."""
        m = self.margin + 2 * self.spacing
        c0 = max(0, int((cx - half_x - m - self.x0) / self.spacing))
        c1 = min(self.x.shape[1], int((cx + half_x + m - self.x0) / self.spacing) + 2)
        r0 = max(0, int((cy - half_y - m - self.y0) / self.spacing))
        r1 = min(self.x.shape[0], int((cy + half_y + m - self.y0) / self.spacing) + 2)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def ellipse(
        self, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Squared normalised radius of a rotated ellipse on its bounding box (< 1 is inside)."""
        if rx <= 0.3 or ry <= 0.3:
            return None
        half = max(rx, ry)
        box = self.box(cx, cy, half, half)
        if box is None:
            return None
        dx = self.x[box] - cx
        dy = self.y[box] - cy
        if angle:
            c, s = np.cos(angle), np.sin(angle)
            dx, dy = c * dx + s * dy, -s * dx + c * dy
        return box, (dx / rx) ** 2 + (dy / ry) ** 2

    def paint(self, box: tuple[slice, slice], where: np.ndarray, tissue: Tissue, label: int | None = None) -> None:
        """Set `tissue` (and `label`, if given) on the pixels of `box` where `where` is true."""
        self.tissue[box][where] = tissue
        if label is not None:
            self.label[box][where] = label

    def paint_ellipse(
        self,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        tissue: Tissue,
        label: int | None = None,
        angle: float = 0.0,
        inside: np.ndarray | None = None,
    ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Paint a filled ellipse, optionally only where the full-size mask `inside` is true."""
        shape = self.ellipse(cx, cy, rx, ry, angle)
        if shape is None:
            return None
        box, r2 = shape
        where = r2 < 1.0
        if inside is not None:
            where &= inside[box]
        self.paint(box, where, tissue, label)
        return box, r2
