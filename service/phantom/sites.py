"""Site profiles of the phantom's clinic mix: how one hospital's CT protocol differs from another's.

`gatekeeper phantom dataset --clinic --site NAME` renders the clinic mix as a given site would
acquire it. A profile changes only the acquisition and the patients, never the anatomy model or
the anomaly types:

- slice thicknesses and how often each is chosen;
- the reconstruction kernel: the in-plane blur (the system's MTF) and where the noise power
  peaks (a sharp kernel resolves more and moves the noise to finer grain);
- the noise level, as a factor on `--noise-sigma`;
- the field of view: the margin around the body and the smallest and largest FOV the
  technologists choose (larger FOV: coarser pixels at the same matrix);
- the share of series without an anomaly that are acquired without contrast (non-contrast phase);
- the range patient and series seeds are drawn from, so every site scans other patients.

"default" is the clinic mix as it always was: its values reproduce it bit for bit. The numbers
of every profile are in docs/phantom-sites.md.

This module imports nothing from the project (scanner and generate import it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SiteProfile:
    """One site's CT protocol and patient population for the clinic mix."""

    name: str
    summary: str  # one line for the command's help
    slice_thicknesses_mm: tuple[float, ...]
    slice_thickness_weights: tuple[float, ...]
    convolution_kernel: str  # DICOM ConvolutionKernel written in every CT file
    in_plane_blur_mm: float  # Gaussian sigma of the in-plane MTF, mm
    noise_cutoff_factor: float  # scales the noise power spectrum's cutoff frequency (>1: finer grain)
    noise_factor: float  # multiplies the series' noise sigma
    fov_margin: tuple[float, float]  # FOV / body extent, drawn uniformly in this range
    fov_limits_mm: tuple[float, float]  # smallest and largest reconstruction diameter, mm
    non_contrast_share: float  # share of series without an anomaly acquired without contrast
    seed_offset: int  # patient and series seeds come from [seed_offset, seed_offset + 1e6)
    code: int  # distinguishes the sites' random streams

    def __post_init__(self) -> None:
        if not self.slice_thicknesses_mm or len(self.slice_thicknesses_mm) != len(self.slice_thickness_weights):
            raise ValueError(
                f"site {self.name}: slice_thicknesses_mm and slice_thickness_weights must be non-empty and "
                "of the same length."
            )
        if abs(sum(self.slice_thickness_weights) - 1.0) > 1e-9:
            raise ValueError(f"site {self.name}: slice_thickness_weights must sum to 1.")
        if min(self.slice_thicknesses_mm) < 2.5:
            raise ValueError(f"site {self.name}: clinic slice_thicknesses_mm must be >= 2.5 mm.")
        if not 0.0 <= self.non_contrast_share <= 1.0:
            raise ValueError(f"site {self.name}: non_contrast_share must be within 0..1.")
        if not (0 < self.fov_limits_mm[0] < self.fov_limits_mm[1] and 0 < self.fov_margin[0] <= self.fov_margin[1]):
            raise ValueError(f"site {self.name}: fov_limits_mm and fov_margin must be increasing and > 0.")
        if self.in_plane_blur_mm <= 0 or self.noise_cutoff_factor <= 0 or self.noise_factor <= 0:
            raise ValueError(f"site {self.name}: in_plane_blur_mm, noise_cutoff_factor and noise_factor must be > 0.")


#: The clinic mix as it was before sites existed (its patients: seeds from [1e6, 2e6)).
DEFAULT_SITE = SiteProfile(
    name="default",
    summary="2.5/3/5-mm slices, standard kernel, all portal-venous, FOV 307-461 mm",
    slice_thicknesses_mm=(2.5, 3.0, 5.0),
    slice_thickness_weights=(0.3, 0.3, 0.4),
    convolution_kernel="STANDARD",
    in_plane_blur_mm=0.45,
    noise_cutoff_factor=1.0,
    noise_factor=1.0,
    fov_margin=(1.04, 1.15),
    fov_limits_mm=(0.6 * 512, 0.9 * 512),
    non_contrast_share=0.0,
    seed_offset=1_000_000,
    code=0,
)

SITES: dict[str, SiteProfile] = {
    site.name: site
    for site in (
        DEFAULT_SITE,
        SiteProfile(
            name="site-b",
            summary="3-mm slices only, sharp kernel, 1.4x noise",
            slice_thicknesses_mm=(3.0,),
            slice_thickness_weights=(1.0,),
            convolution_kernel="SHARP",
            in_plane_blur_mm=0.25,
            noise_cutoff_factor=1.6,
            noise_factor=1.4,
            fov_margin=(1.04, 1.15),
            fov_limits_mm=(0.6 * 512, 0.9 * 512),
            non_contrast_share=0.0,
            seed_offset=2_000_000,
            code=1,
        ),
        SiteProfile(
            name="site-c",
            summary="60 % of series without an anomaly non-contrast, larger FOV (360-500 mm), 5-mm-heavy slices",
            slice_thicknesses_mm=(2.5, 5.0),
            slice_thickness_weights=(0.25, 0.75),
            convolution_kernel="STANDARD",
            in_plane_blur_mm=0.45,
            noise_cutoff_factor=1.0,
            noise_factor=1.0,
            fov_margin=(1.30, 1.45),
            fov_limits_mm=(360.0, 500.0),
            non_contrast_share=0.6,
            seed_offset=3_000_000,
            code=2,
        ),
    )
}


def site_profile(name: str) -> SiteProfile:
    """The profile called `name`.

    Raises:
        ValueError: for an unknown site (the message lists the known ones).
    """
    profile = SITES.get(name)
    if profile is None:
        raise ValueError(f"site must be one of {', '.join(SITES)}, got {name!r}.")
    return profile
