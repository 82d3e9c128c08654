"""Anomalies injected into a synthetic series, each with an exact per-slice ground-truth mask.

An anomaly is chosen once per series (`make_anomaly`) and then asked, slice by slice, to change
the anatomy (`paint`: a tumour replaces liver tissue, fluid replaces fat) and to add the image
artifacts it causes (`artifact`: metal streaks, truncation glare). The mask it returns says where
the slice is abnormal; the manifest lists exactly the slices whose mask is non-empty.

The liver ground truth follows clinical practice: a tumour inside the liver is still liver (also
the part of a lesion at the liver's edge that bulges beyond its outline); ascites around it and a
stent in the bile duct are not.

Severity. Every anomaly records `severity`: a grade ("subtle", "moderate", "gross") and the
parameters drawn. With `grade=None` (the seed protocol: `gatekeeper phantom dataset`, `--large`,
`--anomaly`) the parameters are drawn exactly as they always were, so those series keep their
images, and the grade is read off the main parameter with the cut-offs in `GRADE_CUTOFFS`. With a
grade (the clinic mix, `gatekeeper phantom dataset --clinic`) every parameter is drawn within that
grade's range in `SEVERITY_RANGES`:

================  ===========================  ===========================  ===========================
type              subtle                       moderate                     gross
================  ===========================  ===========================  ===========================
tumor             1–3 cm, 1–2 lesions,         3–6 cm, 1–3 lesions,         6–12 cm, 1–6 lesions,
                  15–35 HU from liver          30–60 HU                     40–80 HU
fluid             3–8 mm perihepatic rim       8–25 mm perihepatic          25–60 mm, generalised
stent             80–200 HU streaks, 3–6 cm    200–450 HU, 4.5–9 cm         450–900 HU, 7–12 cm
hip_prosthesis    150–300 HU streaks           300–550 HU                   550–900 HU (half bilateral)
low_dose          noise × 1.5–2.2              noise × 2.2–3.2              noise × 3.2–5
contrast_phase    45–70 % of the enhancement   15–45 %                      0–15 % (unenhanced)
truncation        FOV 92–97 % of body width    82–92 %                      70–82 %
================  ===========================  ===========================  ===========================

Tumours are hypodense, hyperdense or heterogeneous (necrotic core, enhancing rim); ~40 % sit at
the liver's edge. Fluid is simple or complex (0–55 HU); ~40 % of clinic fluid series are
unenhanced, where the fluid can sit within a few HU of the liver (≈ 60 HU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.phantom.anatomy import Patient
from service.phantom.canvas import TISSUE_HU, Canvas, Label, Tissue

#: Every anomaly the phantom can inject; the first three are the ones the product card names.
ANOMALY_TYPES: tuple[str, ...] = (
    "stent",
    "tumor",
    "fluid",
    "hip_prosthesis",
    "low_dose",
    "contrast_phase",
    "truncation",
)

#: Severity grades, mildest first.
SEVERITY_GRADES: tuple[str, ...] = ("subtle", "moderate", "gross")

#: Per type and grade, the range each graded parameter is drawn from (inclusive; counts are integers).
SEVERITY_RANGES: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "tumor": {
        "subtle": {"diameter_cm": (1.0, 3.0), "count": (1, 2), "contrast_hu": (15.0, 35.0)},
        "moderate": {"diameter_cm": (3.0, 6.0), "count": (1, 3), "contrast_hu": (30.0, 60.0)},
        "gross": {"diameter_cm": (6.0, 12.0), "count": (1, 6), "contrast_hu": (40.0, 80.0)},
    },
    "fluid": {
        "subtle": {"thickness_mm": (3.0, 8.0), "fluid_hu": (0.0, 55.0)},
        "moderate": {"thickness_mm": (8.0, 25.0), "fluid_hu": (0.0, 55.0)},
        "gross": {"thickness_mm": (25.0, 60.0), "fluid_hu": (0.0, 55.0)},
    },
    "stent": {
        "subtle": {"streak_hu": (80.0, 200.0), "length_mm": (30.0, 60.0)},
        "moderate": {"streak_hu": (200.0, 450.0), "length_mm": (45.0, 90.0)},
        "gross": {"streak_hu": (450.0, 900.0), "length_mm": (70.0, 120.0)},
    },
    "hip_prosthesis": {
        "subtle": {"streak_hu": (150.0, 300.0)},
        "moderate": {"streak_hu": (300.0, 550.0)},
        "gross": {"streak_hu": (550.0, 900.0)},
    },
    "low_dose": {
        "subtle": {"noise_factor": (1.5, 2.2)},
        "moderate": {"noise_factor": (2.2, 3.2)},
        "gross": {"noise_factor": (3.2, 5.0)},
    },
    "contrast_phase": {
        "subtle": {"enhancement": (0.45, 0.70)},
        "moderate": {"enhancement": (0.15, 0.45)},
        "gross": {"enhancement": (0.0, 0.15)},
    },
    "truncation": {
        "subtle": {"fov_fraction": (0.92, 0.97), "glare_hu": (50.0, 120.0)},
        "moderate": {"fov_fraction": (0.82, 0.92), "glare_hu": (90.0, 220.0)},
        "gross": {"fov_fraction": (0.70, 0.82), "glare_hu": (180.0, 320.0)},
    },
}

#: The parameter that grades a series drawn without a grade (the seed protocol), and its two
#: cut-offs (subtle | moderate | gross); for `fov_fraction` smaller is worse.
GRADE_CUTOFFS: dict[str, tuple[str, float, float]] = {
    "tumor": ("diameter_cm", 3.0, 6.0),
    "fluid": ("thickness_mm", 8.0, 25.0),
    "stent": ("streak_hu", 200.0, 450.0),
    "hip_prosthesis": ("streak_hu", 300.0, 550.0),
    "low_dose": ("noise_factor", 2.2, 3.2),
    "contrast_phase": ("enhancement", 0.45, 0.15),
    "truncation": ("fov_fraction", 0.92, 0.82),
}


def grade_of(name: str, severity: dict[str, Any]) -> str:
    """The grade the seed protocol's parameters fall in (see `GRADE_CUTOFFS`)."""
    key, first, second = GRADE_CUTOFFS[name]
    value = float(severity[key])
    if first > second:  # a parameter where smaller is worse
        value, first, second = -value, -first, -second
    return SEVERITY_GRADES[0] if value < first else (SEVERITY_GRADES[1] if value < second else SEVERITY_GRADES[2])


def _check_grade(grade: str | None) -> None:
    if grade is not None and grade not in SEVERITY_GRADES:
        raise ValueError(f"grade must be one of {', '.join(SEVERITY_GRADES)} or None, got {grade!r}.")


def _draw(rng: np.random.Generator, name: str, grade: str, key: str) -> float:
    lo, hi = SEVERITY_RANGES[name][grade][key]
    return float(rng.uniform(lo, hi))


@dataclass
class Anomaly:
    """Base: a series-level anomaly. Subclasses override what they change."""

    name: str
    #: Multiplies the series' noise sigma (low-dose scans are noisier).
    noise_factor: float = 1.0
    #: Contrast phase whose HU table the series is rendered with.
    phase: str = "portal_venous"
    #: Parameters recorded in the manifest.
    params: dict[str, Any] = field(default_factory=dict)
    #: Grade ("subtle", "moderate", "gross") and the drawn parameters, recorded in the manifest.
    severity: dict[str, Any] = field(default_factory=dict)

    @property
    def phase_label(self) -> str:
        """The contrast phase the series shows, as recorded in the manifest."""
        return self.phase

    def required_range(self, patient: Patient) -> tuple[float, float] | None:
        """Anatomical levels (u0, u1) the scan must cover for this anomaly to be visible."""
        return None

    def adjust_hu(self, hu: np.ndarray, texture: np.ndarray) -> None:
        """Change the scanner's per-tissue HU and texture tables in place (default: no change)."""

    def paint(self, u: float, s_mm: float, canvas: Canvas, body: np.ndarray) -> np.ndarray | None:
        """Change the anatomy of one slice; return this slice's anomaly mask, or None if untouched."""
        return None

    def artifact(
        self, canvas: Canvas, body: np.ndarray, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """An additive HU field for the slice and the pixels it makes abnormal, or None."""
        return None

    def _record(self, grade: str | None, severity: dict[str, Any]) -> None:
        """Store `severity` with its grade: the drawn one, or the one its parameters fall in."""
        self.severity = {"grade": grade or grade_of(self.name, severity), **severity}


def _streaks(
    canvas: Canvas, centers: list[tuple[float, float]], rng_seed: int, strength: float, radius: float
) -> np.ndarray:
    """Metal streak artifact: bright and dark rays through each metal centre, plus a dark band
    between two metal objects (photon starvation along the line joining them)."""
    rng = np.random.default_rng(rng_seed)
    out = np.zeros(canvas.x.shape, np.float32)
    x, y = canvas.x, canvas.y
    for cx, cy in centers:
        dx, dy = x - cx, y - cy
        r = np.sqrt(dx * dx + dy * dy) + 1e-3
        for k in range(int(rng.integers(6, 11))):
            angle = rng.uniform(0, np.pi)
            dist = np.abs(dx * np.sin(angle) - dy * np.cos(angle))  # distance to the ray's line
            width = rng.uniform(0.8, 2.2)
            sign = 1.0 if k % 2 == 0 else -1.2
            amp = strength * rng.uniform(0.5, 1.0) * sign
            out += amp * np.exp(-0.5 * (dist / width) ** 2) * (radius / (radius + r))
        out -= 0.25 * strength * np.exp(-r / (radius * 0.8))  # beam hardening around the metal
    if len(centers) == 2:
        (x1, y1), (x2, y2) = centers
        length = np.hypot(x2 - x1, y2 - y1)
        ux, uy = (x2 - x1) / length, (y2 - y1) / length
        along = (x - x1) * ux + (y - y1) * uy
        across = np.abs((x - x1) * uy - (y - y1) * ux)
        between = (along > 0) & (along < length)
        out -= np.where(between, 0.9 * strength * np.exp(-0.5 * (across / (radius * 0.6)) ** 2), 0.0)
    return out


#: |artifact| above this (HU) counts as abnormal in the ground truth.
ARTIFACT_MASK_HU = 60.0


class Stent(Anomaly):
    """A metal stent (≈ 3000 HU mesh tube): in the common bile duct inside the liver, or in the aorta."""

    def __init__(self, patient: Patient, rng: np.random.Generator, grade: str | None = None) -> None:
        super().__init__("stent")
        _check_grade(grade)
        s = patient.size
        self.site = str(rng.choice(["biliary", "aortic"], p=[0.6, 0.4]))
        if grade is None:  # the seed protocol's draw
            self.length_mm = float(rng.uniform(45, 110)) * s
        else:
            self.length_mm = _draw(rng, "stent", grade, "length_mm") * s
        if self.site == "biliary":
            u_mid = patient.u_dome_right + 0.45 * (patient.u_liver_end - patient.u_dome_right)
            ia, ib = patient.cavity_half_axes(u_mid)
            self.start = np.array([-0.30 * ia, 0.02 * ib])
            self.radius = float(rng.uniform(4.0, 5.5))
            self.u0 = u_mid - 0.5 * self.length_mm / patient.length_mm
            self.slope = rng.normal(0.0, 0.25, 2)  # mm in-plane per mm along z: an oblique duct
        else:
            self.u0 = float(rng.uniform(0.30, patient.u_bifurcation - 0.03 - self.length_mm / patient.length_mm))
            self.start = np.array(patient.aorta_center(self.u0))
            self.radius = patient.aorta_radius - 1.0
            self.slope = np.zeros(2)
        self.u1 = self.u0 + self.length_mm / patient.length_mm
        self.patient = patient
        self.seed = int(rng.integers(1 << 31))
        self.strength = float(rng.uniform(250, 500)) if grade is None else _draw(rng, "stent", grade, "streak_hu")
        self.params = {"site": self.site, "length_mm": round(self.length_mm, 1), "radius_mm": round(self.radius, 1)}
        self._record(grade, {"streak_hu": round(self.strength, 1), **self.params})

    def required_range(self, patient: Patient) -> tuple[float, float]:
        return self.u0, self.u1

    def _center(self, u: float) -> tuple[float, float]:
        if self.site == "aortic":
            return self.patient.aorta_center(u)
        ds = (u - self.u0) * self.patient.length_mm
        return float(self.start[0] + self.slope[0] * ds), float(self.start[1] + self.slope[1] * ds)

    def paint(self, u: float, s_mm: float, canvas: Canvas, body: np.ndarray) -> np.ndarray | None:
        if not self.u0 <= u <= self.u1:
            return None
        cx, cy = self._center(u)
        tilt = 1.0 / np.sqrt(1.0 + float(self.slope @ self.slope))
        shape = canvas.ellipse(cx, cy, self.radius / tilt, self.radius)
        if shape is None:
            return None
        box, r2 = shape
        wire = 1.1 / self.radius
        ring = (r2 < 1.0) & (r2 > (1.0 - wire) ** 2)
        canvas.paint(box, ring, Tissue.METAL)  # a stent is not an organ: no label
        self._last_center = (cx, cy)
        mask = np.zeros(canvas.x.shape, bool)
        mask[box] = r2 < 1.0
        return mask

    def artifact(
        self, canvas: Canvas, body: np.ndarray, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        if mask is None:
            return None
        field_ = _streaks(canvas, [self._last_center], self.seed, self.strength, 25.0)
        return field_, (np.abs(field_) > ARTIFACT_MASK_HU) & body


class Tumor(Anomaly):
    """Liver lesions, hypo- or hyperdense relative to the liver, or heterogeneous.

    Seed protocol: one to three lesions, the index lesion 2–8 cm, hypo- or hyperdense, inside the
    liver. Graded (clinic): 1–12 cm, up to six lesions (multifocal), hypodense, hyperdense or
    heterogeneous (a necrotic core in an enhancing rim); 40 % of series have their index lesion at
    the liver's edge, where it may bulge beyond the liver's outline (still liver in the truth).
    """

    #: Tissues an exophytic lesion at the liver's edge may push aside (never another organ).
    DISPLACEABLE = (Tissue.FAT, Tissue.BOWEL_WALL, Tissue.BOWEL_CONTENT, Tissue.GAS)

    def __init__(self, patient: Patient, rng: np.random.Generator, grade: str | None = None) -> None:
        super().__init__("tumor")
        _check_grade(grade)
        self.patient = patient
        #: (level u of the centre, in-plane centre in mm, radii in mm, at the edge) of each lesion.
        self.lesions: list[tuple[float, tuple[float, float], np.ndarray, bool]] = []
        liver_hu = TISSUE_HU[Tissue.LIVER][0]
        self.core_hu: float | None = None
        self.core_fraction = 0.0
        if grade is None:
            self._draw_seed_protocol(patient, rng, liver_hu)
            contrast = abs(self.lesion_hu - liver_hu)
        else:
            contrast = self._draw_graded(patient, rng, grade, liver_hu)
        self.params = {
            "kind": self.kind,
            "lesion_hu": round(self.lesion_hu, 1),
            "diameters_mm": [round(float(2 * r.mean()), 1) for _, _, r, _ in self.lesions],
        }
        diameters_cm = [round(float(2 * r.mean()) / 10.0, 2) for _, _, r, _ in self.lesions]
        severity: dict[str, Any] = {
            "diameter_cm": diameters_cm[0],
            "diameters_cm": diameters_cm,
            "count": len(self.lesions),
            "appearance": self.kind,
            "contrast_hu": round(float(contrast), 1),
            "lesion_hu": round(self.lesion_hu, 1),
            "at_edge": bool(self.lesions[0][3]),
        }
        if self.core_hu is not None:
            severity["core_hu"] = round(self.core_hu, 1)
        self._record(grade, severity)

    def _draw_seed_protocol(self, patient: Patient, rng: np.random.Generator, liver_hu: float) -> None:
        self.kind = str(rng.choice(["hypodense", "hyperdense"], p=[0.7, 0.3]))
        delta = rng.uniform(-70, -35) if self.kind == "hypodense" else rng.uniform(35, 60)
        self.lesion_hu = float(liver_hu + delta)
        for k in range(int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))):
            # The index lesion is 2–8 cm; satellites 1–4 cm.
            low, high = (20.0, 80.0) if k == 0 else (10.0, 40.0)
            diameter = float(np.exp(rng.uniform(np.log(low), np.log(high))))
            span = patient.u_liver_end - patient.u_dome_right
            uc = float(patient.u_dome_right + rng.uniform(0.2, 0.6) * span)
            lobe = patient.liver_right_lobe(uc)
            assert lobe is not None  # uc lies between the dome and the end of the liver
            cx, cy, rx, ry, _ = lobe
            rho, phi = np.sqrt(rng.uniform(0.0, 0.3)), rng.uniform(0, 2 * np.pi)
            center = (cx + rho * rx * np.cos(phi), cy + rho * ry * np.sin(phi))
            radii = diameter / 2 * rng.uniform(0.85, 1.15, 3)
            self.lesions.append((uc, center, radii, False))

    def _draw_graded(self, patient: Patient, rng: np.random.Generator, grade: str, liver_hu: float) -> float:
        """Draw lesions within `grade`'s ranges; return the lesion's contrast to the liver (HU)."""
        ranges = SEVERITY_RANGES["tumor"][grade]
        self.kind = str(rng.choice(["hypodense", "hyperdense", "heterogeneous"], p=[0.5, 0.2, 0.3]))
        contrast = _draw(rng, "tumor", grade, "contrast_hu")
        if self.kind == "hypodense":
            self.lesion_hu = liver_hu - contrast
        elif self.kind == "hyperdense":
            self.lesion_hu = liver_hu + contrast
        else:  # an enhancing rim around a necrotic core
            self.lesion_hu = liver_hu + 0.35 * contrast
            self.core_hu = liver_hu - contrast
            self.core_fraction = float(rng.uniform(0.5, 0.75))
        lo, hi = ranges["count"]
        count = int(rng.integers(int(lo), int(hi) + 1))
        d_lo, d_hi = ranges["diameter_cm"]
        index_at_edge = bool(rng.uniform() < 0.4)
        span = patient.u_liver_end - patient.u_dome_right
        for k in range(count):
            if k == 0:
                diameter = 10.0 * float(np.exp(rng.uniform(np.log(d_lo), np.log(d_hi))))
            else:  # satellites: 1 cm up to 60 % of the index lesion
                top = max(1.0, 0.6 * d_hi)
                diameter = 10.0 * float(np.exp(rng.uniform(np.log(1.0), np.log(top))))
            at_edge = index_at_edge if k == 0 else bool(rng.uniform() < 0.3)
            uc = float(patient.u_dome_right + rng.uniform(0.25, 0.6) * span)
            lobe = patient.liver_right_lobe(uc)
            assert lobe is not None  # uc lies between the dome and the end of the liver
            cx, cy, rx, ry, angle = lobe
            phi = float(rng.uniform(0, 2 * np.pi))
            shape = rng.uniform(0.85, 1.15, 3)
            radii = diameter / 2 * shape / shape.mean()  # the mean diameter is the one drawn
            if at_edge:
                ex, ey = _liver_edge(patient, uc, lobe, phi)
                # The centre lies within a radius of the outline: the lesion touches the capsule
                # from inside or bulges across it.
                inward = float(radii[:2].mean()) * float(rng.uniform(-0.3, 0.6))
                norm = float(np.hypot(ex - cx, ey - cy)) or 1.0
                center = (ex - inward * (ex - cx) / norm, ey - inward * (ey - cy) / norm)
            else:
                rho = float(np.sqrt(rng.uniform(0.0, 0.3)))
                center = (cx + rho * rx * np.cos(phi), cy + rho * ry * np.sin(phi))
            self.lesions.append((uc, center, radii, at_edge))
        return contrast

    def required_range(self, patient: Patient) -> tuple[float, float]:
        us = [uc for uc, _, _, _ in self.lesions]
        return min(us), max(us)

    def adjust_hu(self, hu: np.ndarray, texture: np.ndarray) -> None:
        hu[Tissue.LESION] = self.lesion_hu
        if self.core_hu is not None:
            hu[Tissue.LESION_CORE] = self.core_hu
            texture[Tissue.LESION] = 14.0  # a mottled, enhancing rim

    def paint(self, u: float, s_mm: float, canvas: Canvas, body: np.ndarray) -> np.ndarray | None:
        mask: np.ndarray | None = None
        for uc, (cx, cy), (rx, ry, rz), at_edge in self.lesions:
            dz = (u - uc) * self.patient.length_mm
            if abs(dz) >= rz:
                continue
            k = np.sqrt(1.0 - (dz / rz) ** 2)
            shape = canvas.ellipse(cx, cy, rx * k, ry * k)
            if shape is None:
                continue
            box, r2 = shape
            liver = canvas.label[box] == Label.LIVER
            inside = (r2 < 1.0) & liver  # only liver tissue turns lesion
            if at_edge and inside.any():
                # Exophytic part: fat or bowel within the peritoneal cavity, below the diaphragm.
                ia, ib = self.patient.cavity_half_axes(u)
                n = 2.4
                cavity = np.abs(canvas.x[box]) ** n / ia**n + np.abs(canvas.y[box]) ** n / ib**n < 1.0
                free = np.isin(canvas.tissue[box], self.DISPLACEABLE) & (canvas.label[box] != Label.STOMACH)
                inside |= (r2 < 1.0) & free & cavity
            if not inside.any():
                continue
            canvas.paint(box, inside, Tissue.LESION, Label.LIVER)
            if self.core_hu is not None:
                canvas.paint(box, inside & (r2 < self.core_fraction**2), Tissue.LESION_CORE, Label.LIVER)
            mask = np.zeros(canvas.x.shape, bool) if mask is None else mask
            mask[box] |= inside
        return mask


def _liver_edge(
    patient: Patient, u: float, lobe: tuple[float, float, float, float, float], phi: float
) -> tuple[float, float]:
    """Where a ray from the right lobe's centre at angle `phi` leaves the liver at level u (mm).

    The liver is the lobe's ellipse clipped by the abdominal wall (the cavity's superellipse).
    """
    cx, cy, rx, ry, angle = lobe
    ia, ib = patient.cavity_half_axes(u)
    t = np.linspace(0.0, 1.0, 201)
    # A point on the ellipse's own axes, rotated back into patient coordinates (see Canvas.ellipse).
    lx, ly = t * rx * np.cos(phi), t * ry * np.sin(phi)
    c, s = np.cos(angle), np.sin(angle)
    x, y = cx + c * lx - s * ly, cy + s * lx + c * ly
    inside = np.abs(x) ** 2.4 / ia**2.4 + np.abs(y) ** 2.4 / ib**2.4 < 0.97
    last = int(np.argmin(inside)) - 1 if not inside.all() else len(t) - 1
    last = max(last, 1)
    return float(x[last]), float(y[last])


class Fluid(Anomaly):
    """Ascites: free fluid around the liver, thickest lateral and in front of it.

    Seed protocol: 8–30 mm of simple fluid (≈ 8 HU) in the portal-venous phase. Graded (clinic):
    a 3 mm rim to 60 mm, simple or complex fluid (0–55 HU), 40 % of series unenhanced (liver
    ≈ 60 HU, so complex fluid sits near the liver's HU); gross ascites is generalised — a band
    along the whole peritoneal cavity, dome to pelvis, pushing the bowel to the middle.
    """

    #: Tissues that free fluid displaces (never an organ's parenchyma, bone or muscle).
    DISPLACEABLE = (Tissue.FAT, Tissue.BOWEL_WALL, Tissue.BOWEL_CONTENT, Tissue.GAS)

    def __init__(self, patient: Patient, rng: np.random.Generator, grade: str | None = None) -> None:
        super().__init__("fluid")
        _check_grade(grade)
        self.patient = patient
        self.generalised = False
        self.fluid_hu: float | None = None  # None: the ASCITES tissue's own HU (8)
        if grade is None:  # the seed protocol's draw
            self.thickness_mm = float(rng.uniform(8, 30))
            self.params = {"thickness_mm": round(self.thickness_mm, 1)}
            fluid_hu = TISSUE_HU[Tissue.ASCITES][0]
        else:
            self.thickness_mm = _draw(rng, "fluid", grade, "thickness_mm")
            self.generalised = grade == "gross"
            if rng.uniform() < 0.4:
                self.phase = "non_contrast"
                self.fluid_hu = float(rng.uniform(5.0, 55.0))
            else:
                self.fluid_hu = float(rng.uniform(0.0, 30.0))
            fluid_hu = self.fluid_hu
            self.params = {"thickness_mm": round(self.thickness_mm, 1), "fluid_hu": round(fluid_hu, 1)}
        liver_hu = TISSUE_HU[Tissue.LIVER][0 if self.phase == "portal_venous" else 1]
        self._record(
            grade,
            {
                "thickness_mm": round(self.thickness_mm, 1),
                "extent": "generalised" if self.generalised else "perihepatic",
                "fluid_hu": round(float(fluid_hu), 1),
                "phase": self.phase,
                "liver_minus_fluid_hu": round(float(liver_hu - fluid_hu), 1),
            },
        )

    def required_range(self, patient: Patient) -> tuple[float, float]:
        return patient.u_dome_right + 0.02, patient.u_liver_end - 0.02

    def adjust_hu(self, hu: np.ndarray, texture: np.ndarray) -> None:
        if self.fluid_hu is not None:
            hu[Tissue.ASCITES] = self.fluid_hu

    def paint(self, u: float, s_mm: float, canvas: Canvas, body: np.ndarray) -> np.ndarray | None:
        mask = self._perihepatic(u, canvas)
        if self.generalised:
            band = self._generalised(u, canvas)
            if band is not None:
                mask = band if mask is None else (mask | band)
        return mask

    def _perihepatic(self, u: float, canvas: Canvas) -> np.ndarray | None:
        lobe = self.patient.liver_right_lobe(u)
        if lobe is None:
            return None
        cx, cy, rx, ry, angle = lobe
        t = self.thickness_mm
        shape = canvas.ellipse(cx - 0.2 * t, cy - 0.2 * t, rx + t, ry + t, angle)
        if shape is None:
            return None
        box, r2 = shape
        displaceable = np.isin(canvas.tissue[box], self.DISPLACEABLE)
        displaceable &= canvas.label[box] != Label.STOMACH
        # Only inside the peritoneal cavity: not in the muscle wall or subcutaneous fat.
        ia, ib = self.patient.cavity_half_axes(u)
        inside_wall = (canvas.x[box] / ia) ** 2 + (canvas.y[box] / ib) ** 2 < 1.0
        in_front = canvas.y[box] < cy + 0.55 * ry
        fluid = (r2 < 1.0) & displaceable & inside_wall & in_front
        if not fluid.any():
            return None
        canvas.paint(box, fluid, Tissue.ASCITES, 0)
        mask = np.zeros(canvas.x.shape, bool)
        mask[box] = fluid
        return mask

    def _generalised(self, u: float, canvas: Canvas) -> np.ndarray | None:
        """Massive ascites: a band of fluid along the inside of the cavity, in front of the spine."""
        p = self.patient
        if not p.u_dome_right + 0.02 < u < 0.97:
            return None
        ia, ib = p.cavity_half_axes(u)
        t = min(self.thickness_mm, 0.45 * ia, 0.45 * ib)
        n = 2.4  # the cavity's superellipse exponent (see Patient.render)
        ax, ay = np.abs(canvas.x), np.abs(canvas.y)
        cavity = ax**n / ia**n + ay**n / ib**n < 1.0
        core = ax**n / (ia - t) ** n + ay**n / (ib - t) ** n < 1.0
        vb_y, _, vb_ry = p.vertebral_body(u)
        fluid: np.ndarray = cavity & ~core & (canvas.y < vb_y - vb_ry) & np.isin(canvas.tissue, self.DISPLACEABLE)
        fluid &= canvas.label != Label.STOMACH
        if not fluid.any():
            return None
        canvas.paint((slice(None), slice(None)), fluid, Tissue.ASCITES, 0)
        return fluid


class HipProsthesis(Anomaly):
    """A metal total hip replacement (head, acetabular cup, stem) with severe streaks."""

    def __init__(self, patient: Patient, rng: np.random.Generator, grade: str | None = None) -> None:
        super().__init__("hip_prosthesis")
        _check_grade(grade)
        self.patient = patient
        bilateral = {None: 0.25, "subtle": 0.15, "moderate": 0.25, "gross": 0.5}[grade]
        self.sides = [-1, 1] if rng.uniform() < bilateral else [int(rng.choice([-1, 1]))]
        self.seed = int(rng.integers(1 << 31))
        self.strength = (
            float(rng.uniform(350, 700)) if grade is None else _draw(rng, "hip_prosthesis", grade, "streak_hu")
        )
        self.params = {"sides": ["right" if s < 0 else "left" for s in self.sides]}
        self._record(grade, {"streak_hu": round(self.strength, 1), **self.params})

    def required_range(self, patient: Patient) -> tuple[float, float]:
        return patient.u_femoral_head - 0.03, patient.u_femoral_head + 0.03

    def paint(self, u: float, s_mm: float, canvas: Canvas, body: np.ndarray) -> np.ndarray | None:
        p = self.patient
        s = p.size
        dz = (u - p.u_femoral_head) * p.length_mm
        head_r = 22.0 * s
        self._centers: list[tuple[float, float]] = []
        mask = np.zeros(canvas.x.shape, bool)
        ia, ib = p.cavity_half_axes(u)
        for side in self.sides:
            fx, fy = side * 0.62 * ia, -0.05 * ib
            if abs(dz) < head_r + 6.0:  # head and cup
                k = np.sqrt(max(0.0, 1.0 - (dz / (head_r + 6.0)) ** 2))
                shape = canvas.ellipse(fx, fy, (head_r + 6.0) * k, (head_r + 6.0) * k)
                if shape is not None:
                    box, r2 = shape
                    head = r2 < (head_r / (head_r + 6.0)) ** 2
                    metal = head | ((r2 < 1.0) & (r2 > 0.8)) if dz < 0 else head  # cup above the head's centre
                    canvas.paint(box, metal, Tissue.METAL, 0)
                    mask[box] |= r2 < 1.0
                    self._centers.append((fx, fy))
            elif dz > 0:  # the stem goes down the femur, laterally
                sx = fx + side * min(20.0, 0.3 * dz)
                shape = canvas.ellipse(sx, fy, 7.0 * s, 10.0 * s)
                if shape is not None:
                    box, r2 = shape
                    canvas.paint(box, r2 < 1.0, Tissue.METAL, 0)
                    mask[box] |= r2 < 1.0
                    self._centers.append((sx, fy))
        return mask if mask.any() else None

    def artifact(
        self, canvas: Canvas, body: np.ndarray, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        if mask is None or not self._centers:
            return None
        field_ = _streaks(canvas, self._centers, self.seed, self.strength, 40.0)
        return field_, (np.abs(field_) > ARTIFACT_MASK_HU) & body


class LowDose(Anomaly):
    """A low-dose acquisition: the whole series 2.5–4× noisier (graded: 1.5–5×). Every body
    pixel is abnormal."""

    def __init__(self, patient: Patient, rng: np.random.Generator, grade: str | None = None) -> None:
        _check_grade(grade)
        factor = float(rng.uniform(2.5, 4.0)) if grade is None else _draw(rng, "low_dose", grade, "noise_factor")
        super().__init__("low_dose", noise_factor=factor)
        self.params = {"noise_factor": round(self.noise_factor, 2)}
        self._record(grade, dict(self.params))

    def paint(self, u: float, s_mm: float, canvas: Canvas, body: np.ndarray) -> np.ndarray | None:
        return body.copy()


class ContrastPhase(Anomaly):
    """A scan with less enhancement than the portal-venous phase the model expects: enhancing
    organs are darker. Seed protocol: unenhanced. Graded: a fraction `enhancement` (0 = unenhanced,
    1 = a normal portal-venous scan) of each tissue's enhancement — a poor bolus or mistimed scan."""

    def __init__(self, patient: Patient, rng: np.random.Generator, grade: str | None = None) -> None:
        super().__init__("contrast_phase", phase="non_contrast")
        _check_grade(grade)
        self.enhancement = 0.0 if grade is None else _draw(rng, "contrast_phase", grade, "enhancement")
        self.params = {"phase": self.phase_label}
        if grade is not None:
            self.params["enhancement"] = round(self.enhancement, 3)
        enhancing = [t for t, (pv, nc, _) in TISSUE_HU.items() if abs(pv - nc) > 20]
        self.enhancing = np.array(sorted(enhancing), dtype=np.uint8)
        self._record(grade, {"enhancement": round(self.enhancement, 3), "phase": self.phase_label})

    @property
    def phase_label(self) -> str:
        return "non_contrast" if self.enhancement < 0.15 else "poorly_enhanced"

    def adjust_hu(self, hu: np.ndarray, texture: np.ndarray) -> None:
        if self.enhancement > 0:  # the table is the unenhanced one: add back part of each enhancement
            for tissue, (pv, nc, _) in TISSUE_HU.items():
                hu[tissue] += self.enhancement * (pv - nc)

    def paint(self, u: float, s_mm: float, canvas: Canvas, body: np.ndarray) -> np.ndarray | None:
        mask = np.isin(canvas.tissue, self.enhancing)
        return mask if mask.any() else None


class Truncation(Anomaly):
    """Field-of-view truncation: a large patient wider than the reconstruction circle, with the
    bright rim that missing projection data causes at the edge of the field of view."""

    def __init__(self, patient: Patient, rng: np.random.Generator, grade: str | None = None) -> None:
        super().__init__("truncation")
        _check_grade(grade)
        #: The reconstruction circle's diameter as a fraction of the body's widest extent.
        if grade is None:  # the seed protocol's draw
            self.fov_fraction = float(rng.uniform(0.80, 0.92))
            self.glare_hu = float(rng.uniform(90, 220))
        else:
            self.fov_fraction = _draw(rng, "truncation", grade, "fov_fraction")
            self.glare_hu = _draw(rng, "truncation", grade, "glare_hu")
        self.params = {"fov_fraction": round(self.fov_fraction, 3), "glare_hu": round(self.glare_hu, 1)}
        self._record(grade, dict(self.params))
        self.fov_radius = 0.0  # set by the scanner once the geometry is known
        self.center = (0.0, 0.0)

    def artifact(
        self, canvas: Canvas, body: np.ndarray, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        x = canvas.x - self.center[0]
        y = canvas.y - self.center[1]
        r = np.sqrt(x * x + y * y)
        edge = self.fov_radius - r
        # Truncated where the body reaches the edge of the circle along the same direction.
        rim = body & (edge < 25.0) & (edge > 0)
        if not rim.any():
            return None
        angles = np.arctan2(y[rim], x[rim])
        truncated_bins = np.zeros(72, bool)
        bins = ((angles + np.pi) / (2 * np.pi) * 72).astype(int) % 72
        outer_rim = body[rim] & (edge[rim] < max(3.0, 1.5 * canvas.spacing))  # body reaches the edge
        truncated_bins[np.unique(bins[outer_rim])] = True
        if not truncated_bins.any():
            return None
        all_angles = np.arctan2(y, x)
        all_bins = ((all_angles + np.pi) / (2 * np.pi) * 72).astype(int) % 72
        affected = body & truncated_bins[all_bins] & (edge > 0) & (edge < max(20.0, 3.0 * canvas.spacing))
        field_ = np.where(affected, self.glare_hu * np.exp(-np.clip(edge, 0, None) / 9.0), 0.0).astype(np.float32)
        return field_, affected


_CLASSES = {
    "stent": Stent,
    "tumor": Tumor,
    "fluid": Fluid,
    "hip_prosthesis": HipProsthesis,
    "low_dose": LowDose,
    "contrast_phase": ContrastPhase,
    "truncation": Truncation,
}
assert tuple(_CLASSES) == ANOMALY_TYPES


def make_anomaly(
    name: str | None, patient: Patient, rng: np.random.Generator, *, grade: str | None = None
) -> Anomaly | None:
    """The anomaly called `name` for this patient (None for a normal series).

    `grade` None draws the seed protocol's parameters (unchanged since the first release, so the
    protocol's series keep their images); a grade draws every parameter within that grade's
    `SEVERITY_RANGES`.

    Raises:
        ValueError: for an unknown anomaly name (the message lists the known ones) or grade.
    """
    if name is None or name == "none":
        if grade is not None:
            raise ValueError(f"a normal series has no severity grade, got {grade!r}.")
        return None
    cls = _CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown anomaly type {name!r}; expected one of: none, {', '.join(ANOMALY_TYPES)}.")
    return cls(patient, rng, grade)
