"""A synthetic abdomen: one seeded patient whose anatomy can be sliced at any level.

The model lives in the DICOM patient coordinate system (LPS, mm): +x to the patient's left,
+y to the patient's back, +z to the head. The body's long axis is parameterised by the
*anatomical position* u in [0, 1]: u = 0 is the lower chest (heart and lung bases), u = 1 the
femoral heads. Every organ has a z-range in u, a cross-section that changes along it, and a
shape deformed by a smooth random field, so no two patients — and no two levels — look alike.

Rendering one slice fills two maps on a `Canvas`: a *tissue* map (what HU the pixel gets) and a
*label* map (the ground-truth organ, in `LABELS`). HU come from a per-phase lookup table, so a
contrast-phase change is a table swap, and the label map is exact by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def _profile(u: float, u0: float, u1: float) -> float:
    """0 outside [u0, u1], rising to 1 in the middle like an ellipsoid's cross-section."""
    if not u0 < u < u1:
        return 0.0
    t = (u - u0) / (u1 - u0)
    return float(np.sqrt(max(0.0, 1.0 - (2.0 * t - 1.0) ** 2)))


def _lerp(u: float, knots: Sequence[float], values: Sequence[float]) -> float:
    return float(np.interp(u, knots, values))


BODY_KNOTS = [0.0, 0.15, 0.30, 0.45, 0.60, 0.75, 0.90, 1.0]
BODY_HALF_WIDTH = [158, 160, 152, 146, 150, 165, 174, 172]  # lean adult, mm
BODY_HALF_DEPTH = [112, 112, 108, 103, 101, 103, 106, 106]


class Patient:
    """One synthetic patient: every random choice about anatomy is made here, from `seed`.

    `size` scales the skeleton and organs (0.6 ≈ a small child, 1.0 an adult, 1.1 a tall adult);
    `fat_mm` is the subcutaneous fat thickness (≈ 5 mm lean … 60 mm obese).
    """

    def __init__(self, seed: int, *, size: float | None = None, fat_mm: float | None = None) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}.")
        self.seed = seed
        rng = np.random.default_rng([seed, 0xC7])
        self.size = float(
            size if size is not None else rng.choice([rng.uniform(0.62, 0.85), rng.uniform(0.85, 1.12)], p=[0.15, 0.85])
        )
        if not 0.5 <= self.size <= 1.3:
            raise ValueError(f"size must be within [0.5, 1.3], got {self.size}.")
        default_fat = rng.gamma(3.0, 7.0) * self.size + 4.0
        self.fat_mm = float(np.clip(fat_mm if fat_mm is not None else default_fat, 3.0, 75.0))
        s = self.size
        #: Length of the modelled body segment (lower chest → femoral heads) in mm.
        self.length_mm = 540.0 * s * rng.uniform(0.93, 1.07)

        def j(scale: float) -> float:
            """A jitter, used below only."""
            return float(rng.normal(0.0, scale))

        self.u_dome_right = 0.14 + j(0.012)
        self.u_dome_left = self.u_dome_right + 0.025 + j(0.008)
        self.u_liver_end = 0.42 + j(0.03)
        self.liver_scale = 1.0 + j(0.08)
        self.liver_left_lobe = float(np.clip(1.0 + j(0.25), 0.4, 1.5))
        self.u_spleen = (0.16 + j(0.015), 0.33 + j(0.02))
        self.spleen_scale = 1.0 + j(0.12)
        self.u_stomach = (0.16 + j(0.015), 0.34 + j(0.02))
        self.stomach_fill = float(rng.uniform(0.5, 1.1))
        self.gas_fraction = float(rng.uniform(0.1, 0.45))
        self.u_kidney_left = 0.29 + j(0.015)
        self.u_kidney_right = self.u_kidney_left + 0.025 + j(0.01)
        self.kidney_scale = 1.0 + j(0.07)
        self.u_bifurcation = 0.60 + j(0.02)
        self.u_sacrum = 0.75 + j(0.015)
        self.u_femoral_head = 0.93 + j(0.012)
        self.bladder_fill = float(rng.uniform(0.3, 1.0))
        self.vertebra_period = 31.0 * s * rng.uniform(0.95, 1.05)
        self.vertebra_phase = float(rng.uniform(0, 1))
        self.rib_phase = float(rng.uniform(-8, 8))
        self.aorta_radius = 11.0 * s * rng.uniform(0.9, 1.15)
        self.marrow_hu_shift = float(rng.normal(0, 35))  # bone density differs with age
        self.hu_jitter = {t: float(rng.normal(0, 4)) for t in (Tissue.LIVER, Tissue.SPLEEN, Tissue.MUSCLE, Tissue.FAT)}
        extent = 300.0
        self.deform = (
            SmoothField(rng, extent, self.length_mm, 70.0, 90.0),
            SmoothField(rng, extent, self.length_mm, 70.0, 90.0),
        )
        self.deform_mm = 5.0 * s
        self.texture = SmoothField(rng, extent, self.length_mm, 9.0, 12.0)
        self.vessels = SmoothField(rng, extent, self.length_mm, 6.0, 8.0)
        self.liver_vessels = SmoothField(rng, extent, self.length_mm, 6.0, 8.0)
        self.bowel = SmoothField(rng, extent, self.length_mm, 13.0, 16.0)
        self.gas = SmoothField(rng, extent, self.length_mm, 10.0, 14.0)

    # -- body outline -------------------------------------------------------------------------
    def lean_half_axes(self, u: float) -> tuple[float, float]:
        """Half-width and half-depth (mm) of the muscle wall's outer surface at level u."""
        s = self.size
        return s * _lerp(u, BODY_KNOTS, BODY_HALF_WIDTH), s * _lerp(u, BODY_KNOTS, BODY_HALF_DEPTH)

    def outer_half_axes(self, u: float) -> tuple[float, float, float]:
        """(half-width, anterior half-depth, posterior half-depth) of the skin at level u, mm."""
        a, b = self.lean_half_axes(u)
        f = self.fat_mm
        # Fat collects on the belly and flanks; the back is flattened against the table.
        belly = 1.35 if 0.25 < u < 0.8 else 1.0
        return a + 1.05 * f, b + belly * f, b + 0.45 * f

    def max_half_width(self, u0: float = 0.0, u1: float = 1.0) -> float:
        """The widest the body gets between levels u0 and u1, mm from the midline."""
        return max(self.outer_half_axes(u)[0] for u in np.linspace(u0, u1, 21)) + self.deform_mm

    def table_y(self, u: float) -> float:
        """y of the patient table's top surface (just behind the skin of the back), mm."""
        return self.outer_half_axes(u)[2] + 1.5

    def cavity_half_axes(self, u: float) -> tuple[float, float]:
        """Half-width and half-depth (mm) of the abdominal/thoracic cavity inside the muscle wall."""
        la, lb = self.lean_half_axes(u)
        wall = (11.0 if u < 0.7 else 14.0) * self.size
        return la - wall, lb - wall

    def vertebral_body(self, u: float) -> tuple[float, float, float]:
        """(y of the centre, half-width, half-depth) of the vertebral body at level u, mm."""
        s = self.size
        ia, ib = self.cavity_half_axes(u)
        vb_rx = (17.0 + 7.0 * u) * s
        vb_ry = (14.0 + 5.0 * u) * s
        vb_y = ib - 28.0 * s - vb_ry * 0.4 if u < self.u_sacrum else ib - 20.0 * s
        return min(vb_y, ib - vb_ry - 30.0 * s), vb_rx, vb_ry

    def aorta_center(self, u: float) -> tuple[float, float]:
        """(x, y) of the aorta's centre above the bifurcation, mm."""
        vb_y, _, vb_ry = self.vertebral_body(u)
        x = 8.0 * self.size if u > 0.12 else 22.0 * self.size
        return x, vb_y - vb_ry - self.aorta_radius - 2.0 * self.size

    def liver_right_lobe(self, u: float) -> tuple[float, float, float, float, float] | None:
        """(cx, cy, rx, ry, angle) of the right lobe's ellipse at level u, or None outside the liver.

        The lobe is later clipped by the diaphragm and the abdominal wall, so the real liver is a
        subset of this ellipse.
        """
        u0, u1 = self.u_dome_right - 0.005, self.u_liver_end
        if not u0 < u < u1:
            return None
        ia, ib = self.cavity_half_axes(u)
        t = (u - u0) / (u1 - u0)
        taper = 1.0 if t < 0.45 else 1.0 - 0.78 * ((t - 0.45) / 0.55) ** 1.2
        k = self.liver_scale * taper
        return -(0.40 + 0.14 * t) * ia, (-0.05 + 0.12 * t) * ib, 0.62 * ia * k, 0.86 * ib * k, 0.15

    # -- slicing -----------------------------------------------------------------------------
    def bind(self, y_mm: np.ndarray, x_mm: np.ndarray) -> None:
        """Fix the pixel grid (coordinates relative to the body centre, mm) slices are rendered on."""
        for fld in (*self.deform, self.texture, self.vessels, self.liver_vessels, self.bowel, self.gas):
            fld.bind(y_mm, x_mm)

    def deformation(self, s_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """The patient's smooth in-plane displacement (dx, dy) in mm on the bound grid."""
        return self.deform[0].at(s_mm) * self.deform_mm, self.deform[1].at(s_mm) * self.deform_mm

    def render(self, u: float, canvas: Canvas) -> tuple[np.ndarray, np.ndarray]:
        """Paint the anatomy at level u onto `canvas`; return (texture field, body mask).

        The texture field is a smooth unit-variance field that modulates each tissue's HU; the
        body mask is the inside of the skin.

        Order matters: each structure is painted over those before it, the way organs displace
        fat, and bones are painted last among the hard structures.
        """
        s_mm = u * self.length_mm
        s = self.size
        x, y = canvas.x, canvas.y
        c = canvas

        # Body: skin / subcutaneous fat / muscle wall / cavity, from three nested superellipses.
        n = 2.4
        ax, bant, bpost = self.outer_half_axes(u)
        la, lb = self.lean_half_axes(u)
        ia, ib = self.cavity_half_axes(u)
        px = np.abs(x) ** n
        py = np.abs(y) ** n
        ant = y < 0
        outer = px / ax**n + py * np.where(ant, bant**-n, bpost**-n)
        skin_in = px / (ax - 2.0) ** n + py * np.where(ant, (bant - 2.0) ** -n, (bpost - 2.0) ** -n)
        wall_out = px / la**n + py / lb**n
        cavity = px / ia**n + py / ib**n < 1.0
        full = (slice(None), slice(None))
        c.paint(full, outer < 1.0, Tissue.SKIN)
        c.paint(full, skin_in < 1.0, Tissue.FAT)
        c.paint(full, wall_out < 1.0, Tissue.MUSCLE)
        # Fat planes in the wall: between the flank muscles (obliques, transversus), and the linea
        # alba separating the two rectus muscles in front.
        ma, mb = (la + ia) / 2, (lb + ib) / 2
        plane = np.abs(px / ma**n + py / mb**n - 1.0) < n * 0.8 / ma
        c.paint(full, plane & (np.abs(x) > 0.55 * la) & (wall_out < 1.0), Tissue.FAT)
        c.paint(full, (np.abs(x) < 2.0 * s) & (y < 0) & (wall_out < 1.0), Tissue.FAT)
        c.paint(full, cavity, Tissue.FAT)

        # The table under the back.
        ty = self.table_y(u) + 0.0008 * x**2
        table_zone = np.abs(x) < 215.0 * max(s, 0.9)
        c.paint(full, table_zone & (y > ty) & (y < ty + 3.0), Tissue.TABLE_SHELL)
        c.paint(full, table_zone & (y >= ty + 3.0) & (y < ty + 35.0), Tissue.TABLE_FOAM)
        c.paint(full, table_zone & (y >= ty + 35.0) & (y < ty + 38.0), Tissue.TABLE_SHELL)

        vb_y, vb_rx, vb_ry = self.vertebral_body(u)

        # Thorax above the diaphragm: lungs and heart fill what the domes leave free.
        dome = self._subdiaphragm(u, ia, ib, c)
        if u < self.u_dome_left + 0.14:
            lung = cavity & ~dome
            c.paint(full, lung, Tissue.LUNG, Label.LUNG)
            if u < 0.15:
                hp = _profile(u, -0.2, 0.16)
                shape = c.paint_ellipse(
                    0.18 * ia,
                    -0.30 * ib,
                    0.50 * ia * hp,
                    0.45 * ib * hp,
                    Tissue.MYOCARDIUM,
                    Label.HEART,
                    angle=-0.5,
                    inside=~dome,
                )
                if shape is not None:
                    box, r2 = shape
                    c.paint(box, (r2 < 0.55) & ~dome[box], Tissue.BLOOD_POOL, Label.HEART)
            # Lung vessels: a fine tubular network only inside the lung.
            vessels = np.abs(self.vessels.at(s_mm)) < 0.07
            c.paint(full, lung & vessels, Tissue.LUNG_VESSEL, Label.LUNG)

        abdomen = cavity & dome

        # Liver: big right lobe under the right dome, left lobe across the midline in front.
        u0 = self.u_dome_right - 0.005
        right_lobe = self.liver_right_lobe(u)
        if right_lobe is not None:
            cx, cy, rx, ry, angle = right_lobe
            shape = c.paint_ellipse(cx, cy, rx, ry, Tissue.LIVER, Label.LIVER, angle=angle, inside=abdomen)
            lp = _profile(u, u0 + 0.01, u0 + 0.17) * self.liver_left_lobe
            if lp > 0:
                c.paint_ellipse(
                    0.02 * ia,
                    -0.50 * ib,
                    0.55 * ia * lp,
                    0.32 * ib * min(lp, 1.0),
                    Tissue.LIVER,
                    Label.LIVER,
                    angle=0.25,
                    inside=abdomen,
                )
            # Hepatic and portal vessels inside the liver belong to the liver contour.
            if shape is not None:
                vessels = np.abs(self.liver_vessels.at(s_mm)) < 0.09
                in_liver = c.label == Label.LIVER
                c.paint(full, in_liver & vessels, Tissue.LIVER_VESSEL, Label.LIVER)
            # Gallbladder on the visceral surface (not part of the liver contour).
            gp = _profile(u, u0 + 0.14, u0 + 0.24)
            if gp > 0:
                c.paint_ellipse(
                    -0.25 * ia, -0.05 * ib, 18.0 * s * gp, 15.0 * s * gp, Tissue.BILE, Label.GALLBLADDER, inside=abdomen
                )

        # Stomach, left upper quadrant, gas rising to the front (the patient lies supine).
        sp = _profile(u, *self.u_stomach) * self.stomach_fill
        if sp > 0.05:
            cx, cy = 0.38 * ia, -0.22 * ib
            rx, ry = 0.34 * ia * sp, 0.36 * ib * sp
            shape = c.paint_ellipse(cx, cy, rx, ry, Tissue.STOMACH_WALL, Label.STOMACH, angle=0.4, inside=abdomen)
            if shape is not None:
                box, r2 = shape
                lumen = (r2 < 0.82) & abdomen[box]
                c.paint(box, lumen, Tissue.STOMACH_CONTENT, Label.STOMACH)
                gas_level = cy - ry + 2 * ry * self.gas_fraction
                c.paint(box, lumen & (c.y[box] < gas_level), Tissue.GAS, Label.STOMACH)

        # Spleen, left posterolateral, tucked under the left dome.
        pp = _profile(u, *self.u_spleen) * self.spleen_scale
        if pp > 0.05:
            c.paint_ellipse(
                0.66 * ia,
                0.38 * ib,
                0.22 * ia * pp**0.6,
                0.42 * ib * pp**0.6,
                Tissue.SPLEEN,
                Label.SPLEEN,
                angle=-0.75,
                inside=abdomen,
            )

        # Pancreas lies across the spine in front of the aorta and splenic vein.
        pp = _profile(u, 0.27, 0.345)
        if pp > 0:
            c.paint_ellipse(
                0.12 * ia,
                vb_y - vb_ry - 38.0 * s,
                0.34 * ia,
                11.0 * s * pp,
                Tissue.PANCREAS,
                Label.PANCREAS,
                angle=-0.25,
                inside=abdomen,
            )

        # Kidneys: cortex rim, medulla, a renal sinus with fat and urine facing the midline.
        kl = 112.0 * s * self.kidney_scale / self.length_mm
        for side, u_top, label in (
            (1, self.u_kidney_left, Label.KIDNEY_LEFT),
            (-1, self.u_kidney_right, Label.KIDNEY_RIGHT),
        ):
            kp = _profile(u, u_top, u_top + kl)
            if kp <= 0.05:
                continue
            kx, ky = side * (vb_rx + 42.0 * s), vb_y - 5.0 * s
            shape = c.paint_ellipse(
                kx, ky, 31.0 * s * kp, 22.0 * s * kp, Tissue.KIDNEY_CORTEX, label, angle=side * 0.55, inside=cavity
            )
            if shape is None:
                continue
            box, r2 = shape
            inner = (r2 < 0.55) & cavity[box]
            c.paint(box, inner, Tissue.KIDNEY_MEDULLA, label)
            if kp > 0.6:  # the hilum opens toward the spine and the front
                hx = kx - side * 16.0 * s
                c.paint_ellipse(hx, ky - 6.0 * s, 10.0 * s, 7.0 * s, Tissue.FAT, 0, angle=side * 0.55, inside=cavity)
                c.paint_ellipse(
                    hx + side * 4.0 * s,
                    ky - 5.0 * s,
                    6.0 * s,
                    4.0 * s,
                    Tissue.URINE,
                    label,
                    angle=side * 0.55,
                    inside=cavity,
                )

        # Bowel: loops in whatever space of the lower abdomen is still fat, gas in some of them.
        if 0.30 < u < 0.97:
            free = (c.tissue == Tissue.FAT) & cavity
            inner_cavity = px / (ia - 6.0) ** n + py / (ib - 6.0) ** n < 1.0
            f = self.bowel.at(s_mm)
            density = _profile(u, 0.28, 1.05) ** 0.5
            loops = (np.abs(f) < 0.50 * density) & free & inner_cavity
            lumen = np.abs(f) < 0.41 * density
            gas = self.gas.at(s_mm) > 1.1
            c.paint(full, loops, Tissue.BOWEL_WALL, Label.BOWEL)
            c.paint(full, loops & lumen, Tissue.BOWEL_CONTENT, Label.BOWEL)
            c.paint(full, loops & lumen & gas, Tissue.GAS, Label.BOWEL)
            # Colon: ascending (right) and descending (left) in the flanks, with mottled stool.
            for side, (c0, c1) in ((-1, (0.38, 0.82)), (1, (0.30, 0.80))):
                cp = _profile(u, c0 - 0.03, c1 + 0.03)
                if cp > 0:
                    shape = c.paint_ellipse(
                        side * 0.68 * ia, 0.05 * ib, 24.0 * s, 21.0 * s, Tissue.BOWEL_WALL, Label.BOWEL, inside=cavity
                    )
                    if shape is not None:
                        box, r2 = shape
                        lumen_c = (r2 < 0.75) & cavity[box]
                        c.paint(box, lumen_c, Tissue.STOOL, Label.BOWEL)
                        c.paint(box, lumen_c & (gas[box] | (c.y[box] < 0.05 * ib - 12.0 * s)), Tissue.GAS, Label.BOWEL)

        # Urinary bladder in the pelvis, in front.
        bp = _profile(u, 0.83, 1.08) * self.bladder_fill
        if bp > 0.05:
            c.paint_ellipse(
                0.0,
                -0.35 * ib,
                0.30 * ia * bp**0.5,
                0.42 * ib * bp**0.5,
                Tissue.URINE,
                Label.URINARY_BLADDER,
                inside=cavity,
            )

        # Great vessels: aorta left of midline in front of the spine, IVC to the right.
        if u < self.u_bifurcation:
            c.paint_ellipse(*self.aorta_center(u), self.aorta_radius, self.aorta_radius, Tissue.AORTA, Label.AORTA)
        else:
            spread = (u - self.u_bifurcation) * 240.0 * s
            for side in (-1, 1):
                c.paint_ellipse(
                    side * (6.0 * s + spread),
                    vb_y - vb_ry - 8.0 * s - 0.3 * spread,
                    6.5 * s,
                    6.5 * s,
                    Tissue.AORTA,
                    Label.AORTA,
                )
        if 0.10 < u < self.u_bifurcation + 0.03:
            c.paint_ellipse(-22.0 * s, vb_y - vb_ry - 12.0 * s, 13.0 * s, 9.0 * s, Tissue.IVC, Label.IVC)
        elif u >= self.u_bifurcation + 0.03:
            spread = (u - self.u_bifurcation - 0.03) * 230.0 * s
            for side in (-1, 1):
                c.paint_ellipse(
                    side * (10.0 * s + spread),
                    vb_y - vb_ry - 2.0 * s - 0.2 * spread,
                    8.0 * s,
                    6.0 * s,
                    Tissue.IVC,
                    Label.IVC,
                )

        # Muscles of the back and the psoas, on top of cavity fat.
        for side in (-1, 1):
            c.paint_ellipse(
                side * 36.0 * s, vb_y + vb_ry + 20.0 * s, 30.0 * s, 30.0 * s, Tissue.MUSCLE, inside=wall_out < 1.0
            )
            pp = float(np.clip((u - 0.40) / 0.30, 0, 1)) if u < 0.86 else 0.0
            if pp > 0:
                c.paint_ellipse(
                    side * (vb_rx + 12.0 * s + 20.0 * s * pp),
                    vb_y - 4.0 * s - 10.0 * s * pp,
                    24.0 * s * pp,
                    20.0 * s * pp,
                    Tissue.MUSCLE,
                )

        self._paint_skeleton(u, s_mm, c, vb_y, vb_rx, vb_ry, ia, ib, px, py, n)
        return self.texture.at(s_mm), outer < 1.0

    def _subdiaphragm(self, u: float, ia: float, ib: float, c: Canvas) -> np.ndarray:
        """Pixels below the diaphragm at level u: two domes that widen toward the feet."""
        out = np.zeros(c.x.shape, bool)
        span = 0.13
        for cx, apex in ((-0.35 * ia, self.u_dome_right), (0.35 * ia, self.u_dome_left)):
            t = (u - apex) / span
            if t <= 0:
                continue
            r = np.sqrt(min(t, 4.0))
            shape = c.ellipse(cx, -0.12 * ib, 0.9 * ia * r, 1.0 * ib * r)
            if shape is not None:
                box, r2 = shape
                out[box] |= r2 < 1.0
        if u > self.u_dome_right + 0.05:  # the central tendon: everything under the heart
            shape = c.ellipse(0.0, -0.15 * ib, 0.6 * ia * min(1.0, (u - self.u_dome_right) * 8), 1.1 * ib)
            if shape is not None:
                box, r2 = shape
                out[box] |= r2 < 1.0
        return out

    def _paint_skeleton(
        self,
        u: float,
        s_mm: float,
        c: Canvas,
        vb_y: float,
        vb_rx: float,
        vb_ry: float,
        ia: float,
        ib: float,
        px: np.ndarray,
        py: np.ndarray,
        n: float,
    ) -> None:
        """Vertebrae (bodies, discs, canal, posterior elements), ribs, sacrum, pelvis, femora."""
        s = self.size
        full = (slice(None), slice(None))
        phase = (s_mm / self.vertebra_period + self.vertebra_phase) % 1.0
        if u < self.u_sacrum:
            if phase < 0.18:
                c.paint_ellipse(0.0, vb_y, vb_rx, vb_ry, Tissue.DISC)
            else:
                shape = c.paint_ellipse(0.0, vb_y, vb_rx, vb_ry, Tissue.BONE_CORTEX, Label.BONE)
                if shape is not None:
                    box, r2 = shape
                    c.paint(box, r2 < 0.72, Tissue.BONE_MARROW, Label.BONE)
            canal_y = vb_y + vb_ry + 9.0 * s
            shape = c.paint_ellipse(0.0, canal_y, 14.0 * s, 13.0 * s, Tissue.BONE_CORTEX, Label.BONE)
            c.paint_ellipse(0.0, canal_y, 9.0 * s, 8.5 * s, Tissue.CSF)
            if 0.25 < phase < 0.8:  # spinous and transverse processes, once per vertebra
                c.paint_ellipse(0.0, canal_y + 20.0 * s, 4.5 * s, 14.0 * s, Tissue.BONE_CORTEX, Label.BONE)
                if u > 0.3:
                    for side in (-1, 1):
                        c.paint_ellipse(
                            side * 26.0 * s,
                            canal_y - 2.0 * s,
                            17.0 * s,
                            4.5 * s,
                            Tissue.BONE_CORTEX,
                            Label.BONE,
                            angle=side * 0.2,
                        )
        else:
            # Sacrum: wide, curved backwards, with a thin canal.
            w = 1.0 + 1.8 * min(1.0, (u - self.u_sacrum) / 0.08)
            sy = vb_y + 6.0 * s + (u - self.u_sacrum) * 120.0 * s
            shape = c.paint_ellipse(0.0, sy, vb_rx * w, vb_ry * 0.9, Tissue.BONE_CORTEX, Label.BONE)
            if shape is not None:
                box, r2 = shape
                c.paint(box, r2 < 0.6, Tissue.BONE_MARROW, Label.BONE)
            c.paint_ellipse(0.0, sy + vb_ry * 0.5, 7.0 * s, 4.0 * s, Tissue.CSF)

        # Ribs: each runs from the spine around the flank, descending toward the front; an axial
        # slice cuts each rib where its height matches, giving arcs inside the muscle wall.
        if u < 0.40:
            ra, rb = ia + 7.0 * s, ib + 7.0 * s
            depth = np.abs(px / ra**n + py / rb**n - 1.0)
            band = depth < n * 4.5 * s / ra
            marrow = depth < n * 2.2 * s / ra
            theta = np.abs(np.arctan2(c.x, c.y))  # 0 = behind (spine), pi = in front
            rib_mask = np.zeros(c.x.shape, bool)
            cartilage = np.zeros(c.x.shape, bool)
            for k in range(8):
                s0 = -150.0 * s + self.rib_phase + k * 27.0 * s
                theta_max = 2.75 if k < 5 else (2.1 if k < 6 else 1.5)
                rib_theta = 0.28 + (s_mm - s0) / (48.0 * s)
                rib_theta_lo = rib_theta - 6.0 / (48.0 * s)
                rib_theta_hi = rib_theta + 6.0 / (48.0 * s)
                if rib_theta_hi < 0.28 or rib_theta_lo > theta_max:
                    continue
                on = band & (theta > max(0.28, rib_theta_lo)) & (theta < min(theta_max, rib_theta_hi))
                bony = on & (theta < 2.35)
                rib_mask |= bony
                cartilage |= on & ~bony
            c.paint(full, rib_mask, Tissue.BONE_CORTEX, Label.BONE)
            c.paint(full, rib_mask & marrow, Tissue.BONE_MARROW, Label.BONE)
            c.paint(full, cartilage, Tissue.CARTILAGE)

        # Iliac wings: bony plates from the sacroiliac joint flaring forward and outward, gluteal
        # muscles behind them and the iliacus muscle on their inner face.
        ip = _profile(u, 0.64, 0.92)
        if ip > 0:
            la, lb = self.lean_half_axes(u)
            wall_out = px / la**n + py / lb**n
            reach = 0.55 + 0.45 * np.sqrt(ip)  # the wing is longest at the iliac crest's middle
            for side in (-1, 1):
                x0, y0 = side * (vb_rx + 14.0 * s), vb_y + 8.0 * s  # sacroiliac joint
                x1, y1 = side * 0.80 * ia * reach, vb_y - 0.55 * ib * reach  # towards the iliac spine
                c.paint_ellipse(
                    (x0 + 2 * x1) / 3 + side * 18.0 * s,
                    (y0 + y1) / 2 + 22.0 * s,
                    0.30 * ia,
                    0.30 * ib,
                    Tissue.MUSCLE,
                    angle=side * 0.9,
                    inside=wall_out < 1.0,
                )
                wing_box = c.box((x0 + x1) / 2, (y0 + y1) / 2, abs(x1 - x0) / 2 + 15.0, abs(y1 - y0) / 2 + 15.0)
                if wing_box is None:
                    continue
                dx, dy = x1 - x0, y1 - y0
                length2 = dx * dx + dy * dy
                px_, py_ = c.x[wing_box] - x0, c.y[wing_box] - y0
                along = np.clip((px_ * dx + py_ * dy) / length2, 0.0, 1.0)
                # A gentle curve: the plate bows outwards in its middle.
                bow = 10.0 * s * 4.0 * along * (1.0 - along)
                nx, ny = dy / np.sqrt(length2), -dx / np.sqrt(length2)
                nx, ny = (nx, ny) if nx * side > 0 else (-nx, -ny)
                dist = np.hypot(px_ - along * dx - bow * nx, py_ - along * dy - bow * ny)
                thick = (4.0 + 3.0 * (1.0 - ip)) * s
                inner = (dist < thick + 7.0 * s) & ((px_ - along * dx) * nx + (py_ - along * dy) * ny < 0)
                c.paint(wing_box, inner & (c.tissue[wing_box] == Tissue.FAT), Tissue.MUSCLE)  # iliacus
                c.paint(wing_box, dist < thick, Tissue.BONE_CORTEX, Label.BONE)
                c.paint(wing_box, dist < thick * 0.5, Tissue.BONE_MARROW, Label.BONE)

        # Acetabula and femoral heads at the bottom of the scan.
        fp = _profile(u, self.u_femoral_head - 0.06, self.u_femoral_head + 0.07)
        if fp > 0:
            for side in (-1, 1):
                fx, fy = side * 0.62 * ia, -0.05 * ib
                r = 24.0 * s * fp
                c.paint_ellipse(fx, fy, r + 9.0 * s, r + 9.0 * s, Tissue.BONE_CORTEX, Label.BONE)
                c.paint_ellipse(fx, fy, r + 3.5 * s, r + 3.5 * s, Tissue.CARTILAGE)
                c.paint_ellipse(fx, fy, r, r, Tissue.BONE_CORTEX, Label.BONE)
                c.paint_ellipse(fx, fy, r * 0.82, r * 0.82, Tissue.BONE_MARROW, Label.BONE)
