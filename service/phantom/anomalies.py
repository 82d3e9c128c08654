"""Anomalies injected into a synthetic series, each with an exact per-slice ground-truth mask.

An anomaly is chosen once per series (`make_anomaly`) and then asked, slice by slice, to change
the anatomy (`paint`: a tumour replaces liver tissue, fluid replaces fat) and to add the image
artifacts it causes (`artifact`: metal streaks, truncation glare). The mask it returns says where
the slice is abnormal; the manifest lists exactly the slices whose mask is non-empty.

The liver ground truth follows clinical practice: a tumour inside the liver is still liver;
ascites around it and a stent in the bile duct are not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.phantom.anatomy import TISSUE_HU, Canvas, Label, Patient, Tissue

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


@dataclass
class Anomaly:
    """Base: a series-level anomaly. Subclasses override what they change."""

    name: str
    #: Multiplies the series' noise sigma (low-dose scans are noisier).
    noise_factor: float = 1.0
    #: Contrast phase the series is rendered in.
    phase: str = "portal_venous"
    #: Parameters recorded in the manifest.
    params: dict[str, Any] = field(default_factory=dict)

    def required_range(self, patient: Patient) -> tuple[float, float] | None:
        """Anatomical levels (u0, u1) the scan must cover for this anomaly to be visible."""
        return None

    def paint(self, u: float, s_mm: float, canvas: Canvas, body: np.ndarray) -> np.ndarray | None:
        """Change the anatomy of one slice; return this slice's anomaly mask, or None if untouched."""
        return None

    def artifact(
        self, canvas: Canvas, body: np.ndarray, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """An additive HU field for the slice and the pixels it makes abnormal, or None."""
        return None


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

    def __init__(self, patient: Patient, rng: np.random.Generator) -> None:
        super().__init__("stent")
        s = patient.size
        self.site = str(rng.choice(["biliary", "aortic"], p=[0.6, 0.4]))
        self.length_mm = float(rng.uniform(45, 110)) * s
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
        self.strength = float(rng.uniform(250, 500))
        self.params = {"site": self.site, "length_mm": round(self.length_mm, 1), "radius_mm": round(self.radius, 1)}

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
    """One to three liver lesions, 1–8 cm, hypo- or hyper-dense relative to the liver."""

    def __init__(self, patient: Patient, rng: np.random.Generator) -> None:
        super().__init__("tumor")
        self.patient = patient
        #: (level u of the centre, in-plane centre in mm, radii in mm) of each lesion.
        self.lesions: list[tuple[float, tuple[float, float], np.ndarray]] = []
        liver_hu = TISSUE_HU[Tissue.LIVER][0]
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
            self.lesions.append((uc, center, radii))
        self.params = {
            "kind": self.kind,
            "lesion_hu": round(self.lesion_hu, 1),
            "diameters_mm": [round(float(2 * r[2].mean()), 1) for r in self.lesions],
        }

    def required_range(self, patient: Patient) -> tuple[float, float]:
        us = [uc for uc, _, _ in self.lesions]
        return min(us), max(us)

    def paint(self, u: float, s_mm: float, canvas: Canvas, body: np.ndarray) -> np.ndarray | None:
        mask: np.ndarray | None = None
        for uc, (cx, cy), (rx, ry, rz) in self.lesions:
            dz = (u - uc) * self.patient.length_mm
            if abs(dz) >= rz:
                continue
            k = np.sqrt(1.0 - (dz / rz) ** 2)
            shape = canvas.ellipse(cx, cy, rx * k, ry * k)
            if shape is None:
                continue
            box, r2 = shape
            inside = (r2 < 1.0) & (canvas.label[box] == Label.LIVER)  # only liver tissue turns lesion
            if not inside.any():
                continue
            canvas.paint(box, inside, Tissue.LESION, Label.LIVER)
            mask = np.zeros(canvas.x.shape, bool) if mask is None else mask
            mask[box] |= inside
        return mask


class Fluid(Anomaly):
    """Ascites: free fluid (≈ 8 HU) around the liver, thickest lateral and in front of it."""

    def __init__(self, patient: Patient, rng: np.random.Generator) -> None:
        super().__init__("fluid")
        self.patient = patient
        self.thickness_mm = float(rng.uniform(8, 30))
        self.params = {"thickness_mm": round(self.thickness_mm, 1)}

    def required_range(self, patient: Patient) -> tuple[float, float]:
        return patient.u_dome_right + 0.02, patient.u_liver_end - 0.02

    def paint(self, u: float, s_mm: float, canvas: Canvas, body: np.ndarray) -> np.ndarray | None:
        lobe = self.patient.liver_right_lobe(u)
        if lobe is None:
            return None
        cx, cy, rx, ry, angle = lobe
        t = self.thickness_mm
        shape = canvas.ellipse(cx - 0.2 * t, cy - 0.2 * t, rx + t, ry + t, angle)
        if shape is None:
            return None
        box, r2 = shape
        displaceable = np.isin(canvas.tissue[box], (Tissue.FAT, Tissue.BOWEL_WALL, Tissue.BOWEL_CONTENT, Tissue.GAS))
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


class HipProsthesis(Anomaly):
    """A metal total hip replacement (head, acetabular cup, stem) with severe streaks."""

    def __init__(self, patient: Patient, rng: np.random.Generator) -> None:
        super().__init__("hip_prosthesis")
        self.patient = patient
        self.sides = [-1, 1] if rng.uniform() < 0.25 else [int(rng.choice([-1, 1]))]
        self.seed = int(rng.integers(1 << 31))
        self.strength = float(rng.uniform(350, 700))
        self.params = {"sides": ["right" if s < 0 else "left" for s in self.sides]}

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
    """A low-dose acquisition: the whole series 2.5–4× noisier. Every body pixel is abnormal."""

    def __init__(self, patient: Patient, rng: np.random.Generator) -> None:
        super().__init__("low_dose", noise_factor=float(rng.uniform(2.5, 4.0)))
        self.params = {"noise_factor": round(self.noise_factor, 2)}

    def paint(self, u: float, s_mm: float, canvas: Canvas, body: np.ndarray) -> np.ndarray | None:
        return body.copy()


class ContrastPhase(Anomaly):
    """A non-contrast scan where the model expects portal-venous: enhancing organs are darker."""

    def __init__(self, patient: Patient, rng: np.random.Generator) -> None:
        super().__init__("contrast_phase", phase="non_contrast")
        self.params = {"phase": "non_contrast"}
        enhancing = [t for t, (pv, nc, _) in TISSUE_HU.items() if abs(pv - nc) > 20]
        self.enhancing = np.array(sorted(enhancing), dtype=np.uint8)

    def paint(self, u: float, s_mm: float, canvas: Canvas, body: np.ndarray) -> np.ndarray | None:
        mask = np.isin(canvas.tissue, self.enhancing)
        return mask if mask.any() else None


class Truncation(Anomaly):
    """Field-of-view truncation: a large patient wider than the reconstruction circle, with the
    bright rim that missing projection data causes at the edge of the field of view."""

    def __init__(self, patient: Patient, rng: np.random.Generator) -> None:
        super().__init__("truncation")
        #: The reconstruction circle's diameter as a fraction of the body's widest extent.
        self.fov_fraction = float(rng.uniform(0.80, 0.92))
        self.glare_hu = float(rng.uniform(90, 220))
        self.params = {"fov_fraction": round(self.fov_fraction, 3), "glare_hu": round(self.glare_hu, 1)}
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


def make_anomaly(name: str | None, patient: Patient, rng: np.random.Generator) -> Anomaly | None:
    """The anomaly called `name` for this patient (None for a normal series).

    Raises:
        ValueError: for an unknown anomaly name (the message lists the known ones).
    """
    if name is None or name == "none":
        return None
    cls = _CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown anomaly type {name!r}; expected one of: none, {', '.join(ANOMALY_TYPES)}.")
    return cls(patient, rng)
