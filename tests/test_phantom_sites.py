"""Site profiles of the phantom's clinic mix (`gatekeeper phantom dataset --clinic --site NAME`).

Every site must measurably differ from the default as docs/phantom-sites.md says (slice
thickness, noise, field of view, contrast phase mix, other patients), and the default site must
render exactly the clinic mix it rendered before sites existed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pydicom
import pytest

from service.commands.main import main
from service.phantom.canvas import Label
from service.phantom.generate import clinic_specs, dataset_specs, generate_run, plan_series
from service.phantom.scanner import Scanner
from service.phantom.sites import DEFAULT_SITE, SITES, site_profile
from service.phantom.truth import load_manifest, load_series

SITE_B, SITE_C = SITES["site-b"], SITES["site-c"]

#: Default-site clinic series (seed 0, 20 test series) as the generator made them before site profiles
#: were added: a hash of the geometry (slice levels, pixel spacing, thickness, FOV) and the anomaly's
#: drawn parameters (exact), and for four slices at 64² the mean stored value, mean label code and
#: anomaly-mask pixel count. Pixels within a tolerance, as in test_phantom's seed-protocol reference
#: (an ulp of numpy's vectorised functions differs between CPUs and flips a few roundings); a profile
#: leaking into the default site moves these by far more.
DEFAULT_SITE_REFERENCE = {
    "validation/0001_normal": (
        "a2c6f562fcf964ba",
        [(328.977, 2.8735, 0), (453.401, 0.7239, 0), (411.54, 0.7727, 0), (424.758, 0.7942, 0)],
    ),
    "test/0001_fluid": (
        "d5ca4f249cf2c069",
        [(258.324, 2.5637, 0), (374.635, 0.7749, 26), (379.576, 0.8008, 0), (418.51, 0.5615, 0)],
    ),
    "test/0003_chest": (
        "a844199a10c5770a",
        [(238.527, 3.1628, 0), (296.104, 3.4875, 0), (315.163, 3.6602, 0), (286.829, 3.5969, 0)],
    ),
    "test/0004_contrast_phase": (
        "7e2f9b7200fc371e",
        [(289.218, 3.0525, 191), (374.323, 0.6199, 230), (401.542, 0.8013, 56), (457.843, 0.6724, 0)],
    ),
}


def test_default_site_series_are_unchanged():
    specs = {s.folder: s for s in clinic_specs(seed=0, test_series=20, matrix=64, noise_sigma=12)}
    assert clinic_specs(seed=0, test_series=20, matrix=64, noise_sigma=12, site=DEFAULT_SITE) == list(specs.values())
    for folder, (expected_hash, expected_slices) in DEFAULT_SITE_REFERENCE.items():
        spec = specs[folder]
        assert spec.site == "default" and spec.phase == "portal_venous"
        patient, anomaly, geometry = plan_series(spec)
        scanner = Scanner(patient, geometry, anomaly, noise_sigma=spec.noise_sigma, seed=spec.series_seed)
        described = [geometry.u_positions, geometry.pixel_spacing, geometry.slice_thickness, geometry.fov_radius]
        digest = hashlib.sha256(json.dumps([*described, anomaly.params if anomaly else None]).encode())
        assert digest.hexdigest()[:16] == expected_hash, folder
        for i, (e_mean, e_label_mean, e_mask) in zip(
            np.linspace(0, geometry.num_slices - 1, 4).astype(int), expected_slices
        ):
            stored, label, mask = scanner.acquire(int(i))
            assert float(stored.astype(np.float64).mean()) == pytest.approx(e_mean, abs=0.05), folder
            assert float(label.astype(np.float64).mean()) == pytest.approx(e_label_mean, abs=0.002), folder
            assert abs((int(mask.sum()) if mask is not None else 0) - e_mask) <= 2, folder


def _planned(site_name: str) -> list:
    specs = clinic_specs(seed=0, test_series=40, matrix=64, noise_sigma=12, site=SITES[site_name])
    return [(spec, plan_series(spec)[2]) for spec in specs]


def test_sites_differ_in_slice_thickness_fov_and_contrast_phase_as_documented():
    planned = {name: _planned(name) for name in SITES}
    thickness = {name: {g.slice_thickness for _, g in rows} for name, rows in planned.items()}
    assert thickness["default"] <= {2.5, 3.0, 5.0} and len(thickness["default"]) > 1
    assert thickness["site-b"] == {3.0}
    assert thickness["site-c"] <= {2.5, 5.0} and 5.0 in thickness["site-c"]
    fov = {name: np.array([2 * g.fov_radius for _, g in rows]) for name, rows in planned.items()}
    spacing = {name: np.array([g.pixel_spacing for _, g in rows]) for name, rows in planned.items()}
    assert fov["default"].min() >= 307.1 and fov["default"].max() <= 460.9
    assert fov["site-c"].min() >= 359.9 and fov["site-c"].max() <= 500.1
    # Larger FOV at the same matrix: coarser pixels (median 500 vs 435 mm: most site-c FOVs reach the 500-mm cap).
    assert np.median(fov["site-c"]) > 1.1 * np.median(fov["default"])
    assert np.median(spacing["site-c"]) > 1.1 * np.median(spacing["default"])
    for name, rows in planned.items():
        plain = [spec.phase for spec, _ in rows if spec.anomaly is None]
        share = plain.count("non_contrast") / len(plain)
        if name == "site-c":
            assert 0.4 <= share <= 0.8, share  # documented 60 %
        else:
            assert share == 0.0, name
        assert all(spec.phase == "portal_venous" for spec, _ in rows if spec.anomaly is not None)


def test_every_site_scans_its_own_patients():
    seeds = {name: {spec.patient_seed for spec, _ in _planned(name)} for name in SITES}
    protocol = {s.patient_seed for s in dataset_specs(seed=0, large=False, num_slices=None, matrix=64, noise_sigma=12)}
    names = list(seeds)
    for i, a in enumerate(names):
        assert not seeds[a] & protocol
        assert SITES[a].seed_offset <= min(seeds[a]) and max(seeds[a]) < SITES[a].seed_offset + 1_000_000
        for b in names[i + 1 :]:
            assert not seeds[a] & seeds[b], (a, b)


def _noise(scanner: Scanner, index: int) -> tuple[float, float]:
    """Noise SD (HU) and neighbour correlation, from two acquisitions of one slice in a uniform region.

    The difference of two acquisitions holds the noise only (anatomy and blur cancel), so a
    32×32 patch in the body's middle is a uniform region; divided by √2 for one image's noise.
    """
    first = scanner.acquire(index)[0].astype(np.float64)
    second = scanner.acquire(index)[0].astype(np.float64)
    diff = (first - second) / np.sqrt(2.0)
    c = diff.shape[0] // 2
    patch = diff[c - 16 : c + 16, c - 16 : c + 16]
    correlation = float(np.corrcoef(patch[:, :-1].ravel(), patch[:, 1:].ravel())[0, 1])
    return float(patch.std()), correlation


def test_sharp_kernel_site_has_the_documented_noise_and_finer_grain():
    spec = clinic_specs(seed=0, test_series=20, matrix=128, noise_sigma=12)[0]
    patient, _, geometry = plan_series(spec)
    middle = geometry.num_slices // 2
    default = Scanner(patient, geometry, None, noise_sigma=12.0, seed=5)
    sharp = Scanner(patient, geometry, None, noise_sigma=12.0, seed=5, site=SITE_B)
    sd_default, corr_default = _noise(default, middle)
    sd_sharp, corr_sharp = _noise(sharp, middle)
    assert sd_default == pytest.approx(default.noise_sigma, rel=0.15)
    assert sd_sharp / sd_default == pytest.approx(SITE_B.noise_factor, rel=0.12)
    # Finer grain: 1 − (neighbour correlation) grows with the square of the noise's cutoff frequency
    # (1.6² = 2.6 for site-b; at 64–128² the spectrum is coarse, so the ratio is measured above 1.8).
    assert 1 - corr_sharp > 1.8 * (1 - corr_default), (corr_sharp, corr_default)


@pytest.fixture(scope="module")
def site_runs(tmp_path_factory):
    """One normal abdomen series per site at 64² (site-c: a non-contrast one), written by the run generator."""
    runs = {}
    for name in SITES:
        specs = clinic_specs(seed=1, test_series=20, matrix=64, noise_sigma=12, site=SITES[name])
        normal = [s for s in specs if s.anomaly is None and s.scan_range == "abdomen"]
        picked = next((s for s in normal if s.phase == "non_contrast"), normal[0])
        assert (picked.phase == "non_contrast") == (name == "site-c")
        out = tmp_path_factory.mktemp(name)
        generate_run([picked], out, progress=False)
        runs[name] = out
    return runs


def test_rendered_site_series_carry_their_protocol(site_runs):
    for name, out in site_runs.items():
        entry = load_manifest(out)["series"][0]
        ct = pydicom.dcmread(out / entry["folder"] / entry["files"][0])
        site = site_profile(name)
        assert float(ct.SliceThickness) in site.slice_thicknesses_mm, name
        assert ct.ConvolutionKernel == site.convolution_kernel, name
        assert site.fov_limits_mm[0] - 0.1 <= float(ct.ReconstructionDiameter) <= site.fov_limits_mm[1] + 0.1
        assert float(ct.PixelSpacing[0]) == pytest.approx(float(ct.ReconstructionDiameter) / 64, rel=1e-3)
        if name == "default":
            assert "site" not in entry  # the default site's manifest entry is as before
        else:
            assert entry["site"]["name"] == name
        truth = load_series(out, entry)
        liver = truth.labels == Label.LIVER
        liver_hu = float(np.median(truth.hu[liver]))
        phase = entry["contrast_phase"]
        assert phase == ("non_contrast" if name == "site-c" else "portal_venous")
        assert str(ct.SeriesDescription).endswith("NC 3D" if phase == "non_contrast" else "PV 3D")
        assert (liver_hu < 85) == (phase == "non_contrast"), (name, liver_hu)  # 60 HU unenhanced, 110 PV


def test_cli_site_needs_the_clinic_mix_and_a_known_name(tmp_path, capsys):
    assert main(["phantom", "--out", str(tmp_path / "a"), "--site", "site-b"]) == 2
    assert main(["phantom", "dataset", "--clinic", "--out", str(tmp_path / "b"), "--site", "site-z"]) == 2
    err = capsys.readouterr().err
    assert "--site applies to 'gatekeeper phantom dataset --clinic' only" in err
    assert "unknown --site 'site-z'" in err and "site-b" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_site_specs_reject_a_site_outside_the_clinic_mix():
    spec = clinic_specs(seed=0, test_series=20, matrix=64, noise_sigma=12)[0]
    with pytest.raises(ValueError, match="site must be one of"):
        replace(spec, site="nowhere")
    with pytest.raises(ValueError, match="clinic scan range only"):
        replace(spec, site="site-b", scan_range=None)
    with pytest.raises(ValueError, match="brings its own"):
        replace(spec, anomaly="tumor", phase="non_contrast")


def test_validation_series_sets_the_validation_split_and_keeps_the_default_mix() -> None:
    default = clinic_specs(seed=0, test_series=20, matrix=64, noise_sigma=12, site=SITES["site-b"])
    larger = clinic_specs(seed=0, test_series=20, validation_series=9, matrix=64, noise_sigma=12, site=SITES["site-b"])
    assert sum(s.split == "validation" for s in default) == 2  # 12 % of 20, at least 2
    assert sum(s.split == "validation" for s in larger) == 9
    assert sum(s.split == "test" for s in larger) == 20
    assert len({s.patient_seed for s in larger}) == len(larger)  # every series its own patient
    # Left out, the mix is the one made before the option existed.
    assert clinic_specs(seed=0, test_series=20, validation_series=None, matrix=64, noise_sigma=12) == clinic_specs(
        seed=0, test_series=20, matrix=64, noise_sigma=12
    )
    with pytest.raises(ValueError, match="at least 2"):
        clinic_specs(seed=0, test_series=20, validation_series=1, matrix=64, noise_sigma=12)
