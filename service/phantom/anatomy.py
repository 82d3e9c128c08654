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
from dataclasses import dataclass

import numpy as np

from service.phantom.canvas import Canvas, Label, SmoothField, Tissue


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


#: The whole canvas, as a `Canvas.paint` box.
FULL = (slice(None), slice(None))


@dataclass(frozen=True)
class Section:
    """The body's cross-section at one level u (mm, relative to the body centre), shared by the painting
    steps of `Patient.render`: the superellipse exponent `n` with |x|^n and |y|^n per pixel, the cavity's
    and the muscle wall's half-axes, the cavity mask and the wall's superellipse value (< 1 inside), and
    the vertebral body (centre y, half-width, half-depth)."""

    u: float
    s_mm: float
    n: float
    px: np.ndarray
    py: np.ndarray
    ia: float
    ib: float
    la: float
    lb: float
    cavity: np.ndarray
    wall_out: np.ndarray
    vb_y: float
    vb_rx: float
    vb_ry: float


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
        section, outer = self._paint_body(u, s_mm, canvas)
        self._paint_table(u, canvas)
        dome = self._subdiaphragm(u, section.ia, section.ib, canvas)
        self._paint_thorax(section, dome, canvas)
        abdomen = section.cavity & dome
        self._paint_liver(section, abdomen, canvas)
        self._paint_upper_abdomen(section, abdomen, canvas)
        self._paint_kidneys(section, canvas)
        self._paint_bowel(section, canvas)
        self._paint_bladder(section, canvas)
        self._paint_great_vessels(section, canvas)
        self._paint_back_muscles(section, canvas)
        self._paint_spine(section, canvas)
        self._paint_ribs(section, canvas)
        self._paint_pelvis(section, canvas)
        return self.texture.at(s_mm), outer < 1.0

    def _paint_body(self, u: float, s_mm: float, c: Canvas) -> tuple[Section, np.ndarray]:
        """Skin, subcutaneous fat, the muscle wall and the cavity, from three nested superellipses;
        return the section's geometry and the skin's superellipse value (< 1 inside the body)."""
        s = self.size
        x, y = c.x, c.y
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
        c.paint(FULL, outer < 1.0, Tissue.SKIN)
        c.paint(FULL, skin_in < 1.0, Tissue.FAT)
        c.paint(FULL, wall_out < 1.0, Tissue.MUSCLE)
        # Fat planes in the wall: between the flank muscles (obliques, transversus), and the linea
        # alba separating the two rectus muscles in front.
        ma, mb = (la + ia) / 2, (lb + ib) / 2
        plane = np.abs(px / ma**n + py / mb**n - 1.0) < n * 0.8 / ma
        c.paint(FULL, plane & (np.abs(x) > 0.55 * la) & (wall_out < 1.0), Tissue.FAT)
        c.paint(FULL, (np.abs(x) < 2.0 * s) & (y < 0) & (wall_out < 1.0), Tissue.FAT)
        c.paint(FULL, cavity, Tissue.FAT)
        vb_y, vb_rx, vb_ry = self.vertebral_body(u)
        section = Section(u, s_mm, n, px, py, ia, ib, la, lb, cavity, wall_out, vb_y, vb_rx, vb_ry)
        return section, outer

    def _paint_table(self, u: float, c: Canvas) -> None:
        """The patient table under the back: two shells around a foam core."""
        x, y = c.x, c.y
        ty = self.table_y(u) + 0.0008 * x**2
        table_zone = np.abs(x) < 215.0 * max(self.size, 0.9)
        c.paint(FULL, table_zone & (y > ty) & (y < ty + 3.0), Tissue.TABLE_SHELL)
        c.paint(FULL, table_zone & (y >= ty + 3.0) & (y < ty + 35.0), Tissue.TABLE_FOAM)
        c.paint(FULL, table_zone & (y >= ty + 35.0) & (y < ty + 38.0), Tissue.TABLE_SHELL)

    def _paint_thorax(self, sec: Section, dome: np.ndarray, c: Canvas) -> None:
        """Above the diaphragm: lungs (with their vessels) and heart fill what the domes leave free."""
        u, ia, ib = sec.u, sec.ia, sec.ib
        if u >= self.u_dome_left + 0.14:
            return
        lung = sec.cavity & ~dome
        c.paint(FULL, lung, Tissue.LUNG, Label.LUNG)
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
        vessels = np.abs(self.vessels.at(sec.s_mm)) < 0.07
        c.paint(FULL, lung & vessels, Tissue.LUNG_VESSEL, Label.LUNG)

    def _paint_liver(self, sec: Section, abdomen: np.ndarray, c: Canvas) -> None:
        """Liver: big right lobe under the right dome, left lobe across the midline in front, its
        vessels (part of the liver contour) and the gallbladder (not part of it)."""
        u, ia, ib, s = sec.u, sec.ia, sec.ib, self.size
        u0 = self.u_dome_right - 0.005
        right_lobe = self.liver_right_lobe(u)
        if right_lobe is None:
            return
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
            vessels = np.abs(self.liver_vessels.at(sec.s_mm)) < 0.09
            in_liver = c.label == Label.LIVER
            c.paint(FULL, in_liver & vessels, Tissue.LIVER_VESSEL, Label.LIVER)
        # Gallbladder on the visceral surface (not part of the liver contour).
        gp = _profile(u, u0 + 0.14, u0 + 0.24)
        if gp > 0:
            c.paint_ellipse(
                -0.25 * ia, -0.05 * ib, 18.0 * s * gp, 15.0 * s * gp, Tissue.BILE, Label.GALLBLADDER, inside=abdomen
            )

    def _paint_upper_abdomen(self, sec: Section, abdomen: np.ndarray, c: Canvas) -> None:
        """Stomach (gas rising to the front: the patient lies supine), spleen and pancreas."""
        u, ia, ib, s = sec.u, sec.ia, sec.ib, self.size
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
                sec.vb_y - sec.vb_ry - 38.0 * s,
                0.34 * ia,
                11.0 * s * pp,
                Tissue.PANCREAS,
                Label.PANCREAS,
                angle=-0.25,
                inside=abdomen,
            )

    def _paint_kidneys(self, sec: Section, c: Canvas) -> None:
        """Kidneys: cortex rim, medulla, a renal sinus with fat and urine facing the midline."""
        u, s, cavity = sec.u, self.size, sec.cavity
        kl = 112.0 * s * self.kidney_scale / self.length_mm
        for side, u_top, label in (
            (1, self.u_kidney_left, Label.KIDNEY_LEFT),
            (-1, self.u_kidney_right, Label.KIDNEY_RIGHT),
        ):
            kp = _profile(u, u_top, u_top + kl)
            if kp <= 0.05:
                continue
            kx, ky = side * (sec.vb_rx + 42.0 * s), sec.vb_y - 5.0 * s
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

    def _paint_bowel(self, sec: Section, c: Canvas) -> None:
        """Bowel loops in whatever space of the lower abdomen is still fat, gas in some of them, and
        the ascending and descending colon in the flanks with mottled stool."""
        u, s_mm, n, ia, ib, s, cavity = sec.u, sec.s_mm, sec.n, sec.ia, sec.ib, self.size, sec.cavity
        if not 0.30 < u < 0.97:
            return
        free = (c.tissue == Tissue.FAT) & cavity
        inner_cavity = sec.px / (ia - 6.0) ** n + sec.py / (ib - 6.0) ** n < 1.0
        f = self.bowel.at(s_mm)
        density = _profile(u, 0.28, 1.05) ** 0.5
        loops = (np.abs(f) < 0.50 * density) & free & inner_cavity
        lumen = np.abs(f) < 0.41 * density
        gas = self.gas.at(s_mm) > 1.1
        c.paint(FULL, loops, Tissue.BOWEL_WALL, Label.BOWEL)
        c.paint(FULL, loops & lumen, Tissue.BOWEL_CONTENT, Label.BOWEL)
        c.paint(FULL, loops & lumen & gas, Tissue.GAS, Label.BOWEL)
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

    def _paint_bladder(self, sec: Section, c: Canvas) -> None:
        """The urinary bladder in the pelvis, in front."""
        bp = _profile(sec.u, 0.83, 1.08) * self.bladder_fill
        if bp > 0.05:
            c.paint_ellipse(
                0.0,
                -0.35 * sec.ib,
                0.30 * sec.ia * bp**0.5,
                0.42 * sec.ib * bp**0.5,
                Tissue.URINE,
                Label.URINARY_BLADDER,
                inside=sec.cavity,
            )

    def _paint_great_vessels(self, sec: Section, c: Canvas) -> None:
        """Aorta left of the midline in front of the spine, IVC to the right; both split into the iliacs."""
        u, s, vb_y, vb_ry = sec.u, self.size, sec.vb_y, sec.vb_ry
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

    def _paint_back_muscles(self, sec: Section, c: Canvas) -> None:
        """Muscles of the back and the psoas, on top of cavity fat."""
        u, s = sec.u, self.size
        for side in (-1, 1):
            c.paint_ellipse(
                side * 36.0 * s,
                sec.vb_y + sec.vb_ry + 20.0 * s,
                30.0 * s,
                30.0 * s,
                Tissue.MUSCLE,
                inside=sec.wall_out < 1.0,
            )
            pp = float(np.clip((u - 0.40) / 0.30, 0, 1)) if u < 0.86 else 0.0
            if pp > 0:
                c.paint_ellipse(
                    side * (sec.vb_rx + 12.0 * s + 20.0 * s * pp),
                    sec.vb_y - 4.0 * s - 10.0 * s * pp,
                    24.0 * s * pp,
                    20.0 * s * pp,
                    Tissue.MUSCLE,
                )

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

    def _paint_spine(self, sec: Section, c: Canvas) -> None:
        """Vertebrae (bodies, discs, canal, posterior elements) above the sacrum, or the sacrum."""
        u, s_mm, s, vb_y, vb_rx, vb_ry = sec.u, sec.s_mm, self.size, sec.vb_y, sec.vb_rx, sec.vb_ry
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

    def _paint_ribs(self, sec: Section, c: Canvas) -> None:
        """Ribs, with their costal cartilage in front."""
        u, s_mm, s, n, px, py, ia, ib = sec.u, sec.s_mm, self.size, sec.n, sec.px, sec.py, sec.ia, sec.ib
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
            c.paint(FULL, rib_mask, Tissue.BONE_CORTEX, Label.BONE)
            c.paint(FULL, rib_mask & marrow, Tissue.BONE_MARROW, Label.BONE)
            c.paint(FULL, cartilage, Tissue.CARTILAGE)

    def _paint_pelvis(self, sec: Section, c: Canvas) -> None:
        """Iliac wings with the gluteal and iliacus muscles, acetabula and femoral heads."""
        u, s, ia, ib, vb_y, vb_rx = sec.u, self.size, sec.ia, sec.ib, sec.vb_y, sec.vb_rx
        # Iliac wings: bony plates from the sacroiliac joint flaring forward and outward, gluteal
        # muscles behind them and the iliacus muscle on their inner face.
        ip = _profile(u, 0.64, 0.92)
        if ip > 0:
            wall_out = sec.wall_out
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
