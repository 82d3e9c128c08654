"""The synthetic CT scanner: choose a scan's geometry, render each slice, and image it.

Imaging a slice: tissue map → HU (per-phase lookup + tissue texture) → anomaly artifacts →
partial-volume blur and correlated noise (one FFT round trip: blur is the system's MTF, the noise
has a CT-like ramp/apodised noise power spectrum) → pixels outside the reconstruction circle set
to air → 12-bit stored values with RescaleIntercept −1024.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft

from service.phantom.anatomy import Patient
from service.phantom.anomalies import Anomaly, Truncation
from service.phantom.canvas import Canvas, hu_lookup
from service.phantom.sites import DEFAULT_SITE, SiteProfile

RESCALE_INTERCEPT = -1024.0
MAX_STORED = 4095  # 12 bits stored
SLICE_THICKNESSES_MM = (1.25, 2.0, 2.5, 3.0, 5.0)
SLICE_THICKNESS_WEIGHTS = (0.08, 0.12, 0.3, 0.25, 0.25)

#: Scan ranges of the clinic mix (`plan_clinic_geometry`). The first two cover the whole liver;
#: the others are series the liver model does not apply to.
SCAN_RANGES: tuple[str, ...] = ("abdomen", "abdomen_pelvis", "chest", "pelvis", "liver_partial")
#: Scan ranges without the whole liver in the field of view.
OFF_TARGET_RANGES: tuple[str, ...] = ("chest", "pelvis", "liver_partial")
#: Slice thicknesses of the default site's clinic mix (mm) and how often each is chosen
#: (other sites: `sites.SiteProfile.slice_thicknesses_mm`).
CLINIC_THICKNESSES_MM = DEFAULT_SITE.slice_thicknesses_mm
CLINIC_THICKNESS_WEIGHTS = DEFAULT_SITE.slice_thickness_weights


@dataclass(frozen=True)
class ScanGeometry:
    """Where the slices of one series are, in the DICOM patient coordinate system (mm)."""

    rows: int
    columns: int
    pixel_spacing: float  # mm, square pixels
    slice_thickness: float  # mm
    spacing_between_slices: float  # mm
    u_positions: tuple[float, ...]  # anatomical position of each slice, head → feet
    z_positions: tuple[float, ...]  # ImagePositionPatient z of each slice
    first_pixel_xy: tuple[float, float]  # ImagePositionPatient x, y (centre of pixel [0, 0])
    body_center_xy: tuple[float, float]  # where the patient's midline is, patient coordinates
    fov_radius: float  # radius of the reconstruction circle, mm

    def __post_init__(self) -> None:
        if self.rows < 32 or self.columns < 32:
            raise ValueError(f"rows and columns must be >= 32, got {self.rows}×{self.columns}.")
        if not self.u_positions:
            raise ValueError("a series needs at least one slice (u_positions is empty).")
        if len(self.u_positions) != len(self.z_positions):
            raise ValueError("u_positions and z_positions must have the same length.")
        if self.pixel_spacing <= 0 or self.slice_thickness <= 0 or self.spacing_between_slices <= 0:
            raise ValueError("pixel_spacing, slice_thickness and spacing_between_slices must be > 0 mm.")

    @property
    def num_slices(self) -> int:
        return len(self.u_positions)


def plan_geometry(
    patient: Patient,
    rng: np.random.Generator,
    *,
    num_slices: int | None,
    matrix: int,
    anomaly: Anomaly | None,
) -> ScanGeometry:
    """Choose slice thickness, scan range and field of view as a CT technologist would.

    Scans start either in the lower chest or at the dome of the liver and run over the abdomen,
    sometimes down to the hips; the field of view is the smallest standard one that holds the
    body (pixel spacing 0.6–0.9 mm at 512²), except for the truncation anomaly.

    Raises:
        ValueError: if `num_slices` cannot fit on the modelled body at the thinnest slices.
    """
    if num_slices is not None and num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}.")
    if matrix < 32:
        raise ValueError(f"matrix must be >= 32 pixels, got {matrix}.")
    length = patient.length_mm
    thickness = float(rng.choice(SLICE_THICKNESSES_MM, p=SLICE_THICKNESS_WEIGHTS))
    if rng.uniform() < 0.5:
        u_start = float(rng.uniform(0.0, 0.08))  # from the lung bases
    else:
        u_start = float(patient.u_dome_right - rng.uniform(0.005, 0.03))  # from the liver dome
    if num_slices is None:
        available = (1.0 - u_start) * length
        range_mm = min(float(rng.uniform(200.0, 460.0)), available - thickness)
        num_slices = max(8, int(range_mm / thickness))
    # Thinner slices if the requested count would run off the modelled body.
    while thickness > SLICE_THICKNESSES_MM[0] and u_start * length + num_slices * thickness > length:
        thickness = max(t for t in SLICE_THICKNESSES_MM if t < thickness)
    span_u = (num_slices - 1) * thickness / length
    if span_u > 1.0:
        raise ValueError(
            f"{num_slices} slices of {thickness} mm need {num_slices * thickness:.0f} mm, more than the "
            f"{length:.0f} mm modelled body; ask for fewer slices."
        )
    need = anomaly.required_range(patient) if anomaly is not None else None
    if need is not None:
        lo, hi = need
        if u_start + span_u < hi:
            u_start = hi - span_u + 0.01
        if u_start > lo:
            u_start = max(0.0, min(u_start, (lo + hi) / 2 - span_u / 2))
    u_start = float(np.clip(u_start, 0.0, max(0.0, 1.0 - span_u)))
    u = u_start + np.arange(num_slices) * thickness / length
    return _frame(patient, rng, u, thickness, matrix, anomaly)


def plan_clinic_geometry(
    patient: Patient,
    rng: np.random.Generator,
    *,
    kind: str,
    matrix: int,
    anomaly: Anomaly | None,
    site: SiteProfile = DEFAULT_SITE,
) -> ScanGeometry:
    """A clinic scan range of `kind` (one of `SCAN_RANGES`), slices and FOV as `site` chooses them.

    - abdomen: from the lung bases or the liver dome to between the lower kidney poles and the
      iliac crest (≈ 25–40 cm);
    - abdomen_pelvis: the same start, down through the femoral heads (≈ 45–55 cm);
    - chest: the lower chest, ending 1–2 cm above the liver dome (no liver in the field of view);
    - pelvis: from below the liver (the iliac crests) through the femoral heads (no liver);
    - liver_partial: the scan starts or ends through the liver (30–70 % of the way down it).

    The range is widened to cover what `anomaly` needs (`Anomaly.required_range`). The slice
    thickness is drawn from `site.slice_thicknesses_mm` (default site: 2.5–5 mm), the field of view
    with `site.fov_margin` within `site.fov_limits_mm`.

    Raises:
        ValueError: for an unknown `kind`, or a matrix under 32 pixels.
    """
    if kind not in SCAN_RANGES:
        raise ValueError(f"kind must be one of {', '.join(SCAN_RANGES)}, got {kind!r}.")
    if matrix < 32:
        raise ValueError(f"matrix must be >= 32 pixels, got {matrix}.")
    length = patient.length_mm
    thickness = float(rng.choice(site.slice_thicknesses_mm, p=site.slice_thickness_weights))
    dome, liver_end = patient.u_dome_right, patient.u_liver_end
    if rng.uniform() < 0.5:
        top = float(rng.uniform(0.0, 0.08))  # from the lung bases
    else:
        top = float(dome - rng.uniform(0.005, 0.03))  # from the liver dome
    kidney_end = (
        max(patient.u_kidney_left, patient.u_kidney_right) + 112.0 * patient.size * patient.kidney_scale / length
    )
    if kind == "abdomen":
        lo, hi = top, float(rng.uniform(max(liver_end, kidney_end) + 0.03, 0.72))
    elif kind == "abdomen_pelvis":
        lo, hi = top, max(float(rng.uniform(0.97, 1.0)), patient.u_femoral_head + 0.01)
    elif kind == "chest":
        hi = float(dome - rng.uniform(0.02, 0.04))
        lo = max(-0.2, hi - float(rng.uniform(120.0, 200.0)) / length)
    elif kind == "pelvis":
        lo, hi = max(liver_end + 0.04, float(rng.uniform(0.60, 0.70))), float(rng.uniform(0.97, 1.0))
    else:  # liver_partial
        through = float(dome + rng.uniform(0.3, 0.7) * (liver_end - dome))
        if rng.uniform() < 0.5:  # an upper-abdomen or chest scan that ends in the liver
            lo, hi = min(top, through - 0.1), through
        else:  # a lower abdomen scan that starts in the liver
            lo, hi = through, float(rng.uniform(0.65, 1.0))
    need = anomaly.required_range(patient) if anomaly is not None else None
    if need is not None:
        lo, hi = min(lo, max(0.0, need[0] - 0.01)), max(hi, min(1.0, need[1] + 0.01))
    num_slices = max(8, int((hi - lo) * length / thickness) + 1)
    u = lo + np.arange(num_slices) * thickness / length
    return _frame(patient, rng, u, thickness, matrix, anomaly, site=site)


def _frame(
    patient: Patient,
    rng: np.random.Generator,
    u: np.ndarray,
    thickness: float,
    matrix: int,
    anomaly: Anomaly | None,
    *,
    site: SiteProfile = DEFAULT_SITE,
) -> ScanGeometry:
    """Place slices at levels `u` on the table and choose the field of view that holds the body.

    The FOV is the body's extent times a margin drawn from `site.fov_margin`, within
    `site.fov_limits_mm` (the seed protocol and the default site: 307–461 mm).
    """
    length = patient.length_mm
    u_start = float(u[0])
    z_top = float(rng.uniform(-150.0, 150.0))  # where the table happened to be
    z = z_top - (u - u_start) * length

    u_lo, u_hi = float(u[0]), float(u[-1])
    half_width = patient.max_half_width(u_lo, u_hi)
    half_depth = max(patient.outer_half_axes(v)[1] for v in np.linspace(u_lo, u_hi, 9))
    reach = float(np.hypot(half_width * 0.92, half_depth * 0.75))  # superellipse's far corner
    fov_min, fov_max = site.fov_limits_mm
    fov = float(np.clip(2.0 * reach * rng.uniform(*site.fov_margin), fov_min, fov_max))
    center = (float(rng.normal(0.0, 6.0)), float(rng.normal(-5.0, 8.0)))  # patient off-centre a little
    if isinstance(anomaly, Truncation):
        fov = float(np.clip(2.0 * half_width * anomaly.fov_fraction, fov_min, fov_max))
        if fov >= 2.0 * half_width * 0.95:  # still fits: the patient lies off-centre, 25 mm past the edge
            center = (float(rng.choice([-1, 1]) * (fov / 2 + 25.0 - half_width)), center[1])
    spacing = fov / matrix
    body_center = (-center[0], -center[1])  # body centre relative to the FOV centre at (0, 0)
    first = (-(matrix - 1) / 2 * spacing, -(matrix - 1) / 2 * spacing)
    return ScanGeometry(
        rows=matrix,
        columns=matrix,
        pixel_spacing=round(spacing, 6),
        slice_thickness=thickness,
        spacing_between_slices=thickness,
        u_positions=tuple(float(v) for v in u),
        z_positions=tuple(float(v) for v in z),
        first_pixel_xy=(round(first[0], 4), round(first[1], 4)),
        body_center_xy=body_center,
        fov_radius=fov / 2.0,
    )


class Scanner:
    """Images one patient with one geometry: `acquire(i)` gives slice i's stored pixels and truth."""

    def __init__(
        self,
        patient: Patient,
        geometry: ScanGeometry,
        anomaly: Anomaly | None,
        *,
        noise_sigma: float,
        seed: int,
        site: SiteProfile = DEFAULT_SITE,
        phase: str = "portal_venous",
    ) -> None:
        """`phase`: the contrast phase of a series without an anomaly (an anomaly brings its own);
        `site`: the reconstruction kernel (in-plane blur, noise grain) and noise factor."""
        if not noise_sigma >= 0:
            raise ValueError(f"noise_sigma must be >= 0 HU, got {noise_sigma}.")
        self.patient = patient
        self.geometry = geometry
        self.anomaly = anomaly
        self.rng = np.random.default_rng([seed, 0x5CA7])
        g = geometry
        ps = g.pixel_spacing
        bx, by = g.body_center_xy
        cols = g.first_pixel_xy[0] + np.arange(g.columns) * ps - bx  # x relative to the body centre
        rows = g.first_pixel_xy[1] + np.arange(g.rows) * ps - by
        self._cols, self._rows = cols.astype(np.float32), rows.astype(np.float32)
        self._x = np.broadcast_to(self._cols[None, :], (g.rows, g.columns))
        self._y = np.broadcast_to(self._rows[:, None], (g.rows, g.columns))
        patient.bind(rows, cols)
        # Inside the reconstruction circle (FOV centre is the image centre).
        fy = (np.arange(g.rows) - (g.rows - 1) / 2) * ps
        fx = (np.arange(g.columns) - (g.columns - 1) / 2) * ps
        self.in_fov = (fx[None, :] ** 2 + fy[:, None] ** 2) <= g.fov_radius**2
        if isinstance(anomaly, Truncation):
            anomaly.fov_radius = g.fov_radius
            anomaly.center = (-bx, -by)
        self.hu_lut, self.texture_lut = hu_lookup(anomaly.phase if anomaly is not None else phase)
        for tissue, shift in patient.hu_jitter.items():
            self.hu_lut[tissue] += shift
        self.hu_lut[25] += patient.marrow_hu_shift  # Tissue.BONE_MARROW
        if anomaly is not None:
            anomaly.adjust_hu(self.hu_lut, self.texture_lut)
        # Noise: CT noise power spectrum ~ f · apodisation², normalised so the pixel std is sigma.
        size_factor = float(np.clip((2 * patient.max_half_width() / 340.0) ** 0.8, 0.7, 1.7))
        self.noise_sigma = noise_sigma * site.noise_factor * size_factor * (anomaly.noise_factor if anomaly else 1.0)
        f = np.sqrt(fft.fftfreq(g.rows)[:, None] ** 2 + fft.rfftfreq(g.columns)[None, :] ** 2)
        f_full = np.sqrt(fft.fftfreq(g.rows)[:, None] ** 2 + fft.fftfreq(g.columns)[None, :] ** 2)
        f_cut = 0.28 * min(1.0, 0.7 / ps) * site.noise_cutoff_factor  # cycles/pixel; finer for coarse pixels

        def nps_amplitude(freq: np.ndarray) -> np.ndarray:
            return np.sqrt(freq / f_cut) * np.exp(-((freq / f_cut) ** 2))

        # Pixel variance = mean of |filter|² over the full spectrum: normalise that to 1.
        self._noise_filter = (nps_amplitude(f) / np.sqrt(np.mean(nps_amplitude(f_full) ** 2))).astype(np.float32)
        blur_mm = float(np.hypot(site.in_plane_blur_mm, 0.09 * g.slice_thickness))  # in-plane MTF + partial volume
        self._blur = np.exp(-2.0 * (np.pi * blur_mm / ps * f) ** 2).astype(np.float32)

    def _render(self, u: float) -> tuple[Canvas, np.ndarray, np.ndarray, np.ndarray | None]:
        """Paint anatomy and anomaly at level u: (canvas, HU before blur and noise, body, mask)."""
        g = self.geometry
        p = self.patient
        s_mm = u * p.length_mm
        dx, dy = p.deformation(s_mm)
        canvas = Canvas(
            x=self._x + dx,
            y=self._y + dy,
            x0=float(self._cols[0]),
            y0=float(self._rows[0]),
            spacing=g.pixel_spacing,
            margin=3.0 * p.deform_mm,
        )
        texture, body = p.render(u, canvas)
        mask = None
        if self.anomaly is not None:
            mask = self.anomaly.paint(u, s_mm, canvas, body)
        hu = self.hu_lut[canvas.tissue] + self.texture_lut[canvas.tissue] * texture
        return canvas, hu, body, mask

    def acquire(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Image slice `index`: (stored uint16 pixels, organ label map, anomaly mask or None).

        Slices of 2.5 mm and thicker average the anatomy at ±thickness/3 with the centre (through-
        plane partial volume); labels and masks are those of the slice centre.
        """
        g = self.geometry
        u = g.u_positions[index]
        hu_sum = None
        if g.slice_thickness >= 2.5:
            du = g.slice_thickness / 3.0 / self.patient.length_mm
            for off in (-du, du):
                _, hu_off, _, _ = self._render(u + off)
                hu_sum = hu_off if hu_sum is None else hu_sum + hu_off
        canvas, hu, body, mask = self._render(u)  # the centre last: anomalies keep its state
        if hu_sum is not None:
            hu = (hu + hu_sum) / 3.0
        if self.anomaly is not None:
            art = self.anomaly.artifact(canvas, body & self.in_fov, mask)
            if art is not None:
                extra, art_mask = art
                hu += extra
                mask = art_mask if mask is None else (mask | art_mask)
        spectrum = fft.rfft2(hu, workers=1) * self._blur
        if self.noise_sigma > 0:
            white = self.rng.standard_normal(hu.shape, dtype=np.float32)
            spectrum += fft.rfft2(white, workers=1) * (self._noise_filter * self.noise_sigma)
        image = fft.irfft2(spectrum, s=hu.shape, workers=1)
        image[~self.in_fov] = -1024.0
        stored = np.clip(np.rint(image - RESCALE_INTERCEPT), 0, MAX_STORED).astype(np.uint16)
        label = canvas.label
        label[~self.in_fov] = 0
        if mask is not None:
            mask &= self.in_fov
            if not mask.any():
                mask = None
        return stored, label, mask
