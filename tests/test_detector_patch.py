"""The v2 (patch, multi-window) detector recipe: numpy preprocessing, a tiny training run with resume,
ONNX export parity, and the patch → slice → series scoring rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service import imaging
from service.commands.main import main as gatekeeper

torch = pytest.importorskip("torch")

torch.set_num_threads(1)  # a shared 2-core machine


def _phantom_slice(shape: tuple[int, int] = (512, 512), centre: tuple[int, int] = (300, 230)) -> np.ndarray:
    """Air with an elliptic 40-HU body (semi-axes 120 × 180 px) off the image centre."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    hu = np.full(shape, -1000.0, np.float32)
    hu[((yy - centre[0]) / 120.0) ** 2 + ((xx - centre[1]) / 180.0) ** 2 < 1] = 40.0
    return hu


# --- (1) numpy preprocessing ----------------------------------------------------------------------------


def test_field_has_the_fixed_spacing_and_is_centred_on_the_body() -> None:
    geometry = imaging.PatchGeometry()
    assert geometry.field_px == 320
    field, mask, (r0, r1, c0, c1) = imaging.resample_to_field(_phantom_slice(), (0.75, 0.75), geometry)
    assert field.shape == mask.shape == (320, 320)
    # Body: 240 × 360 px at 0.75 mm = 180 × 270 mm = 120 × 180 px at 1.5 mm, centred in the field.
    assert abs((r1 - r0 + 1) - 120) <= 2 and abs((c1 - c0 + 1) - 180) <= 2
    assert abs((r0 + r1) / 2 - 159.5) <= 1 and abs((c0 + c1) / 2 - 159.5) <= 1
    assert field[128, 128] == pytest.approx(40.0, abs=1.0)
    assert field[0, 0] <= -1000.0  # air (inside or outside the scanned image)
    # Coarser native pixels: the same body in mm gives the same field.
    coarse = _phantom_slice((256, 256), (150, 115))
    coarse[:] = -1000.0
    yy, xx = np.mgrid[:256, :256]
    coarse[((yy - 150) / 60.0) ** 2 + ((xx - 115) / 90.0) ** 2 < 1] = 40.0
    _, mask2, box2 = imaging.resample_to_field(coarse, (1.5, 1.5), geometry)
    assert abs(int(mask2.sum()) - int(mask.sum())) < 0.02 * mask.sum()
    assert np.abs(np.subtract(box2, (r0, r1, c0, c1))).max() <= 2


def test_outside_the_scanned_image_is_air() -> None:
    geometry = imaging.PatchGeometry(spacing_mm=1.5, field_mm=480.0)
    small = _phantom_slice((200, 200), (100, 100))  # 100 mm wide at 0.5 mm: most of the field is outside it
    field, _, _ = imaging.resample_to_field(small, (0.5, 0.5), geometry)
    assert field[0, 0] == imaging.AIR_HU


def test_metal_channel_separates_a_stent_from_bone() -> None:
    hu = np.array([[3000.0, 1300.0, 70.0, 40.0]], np.float32)
    abdomen, liver, metal = imaging.window_channels(hu)
    assert abdomen[0, 0] == abdomen[0, 1] == 1.0  # both clipped white in the abdomen window
    assert metal[0, 0] == pytest.approx(1.0)
    assert metal[0, 1] == pytest.approx((1300 - 200) / 2800 * 2 - 1)
    assert metal[0, 0] - metal[0, 1] > 1.0
    # The liver window gives a 30-HU difference 400/150 times the abdomen window's contrast.
    assert (liver[0, 2] - liver[0, 3]) == pytest.approx((abdomen[0, 2] - abdomen[0, 3]) * 400 / 150, rel=1e-5)
    assert [name for name, _ in imaging.PATCH_WINDOWS] == ["abdomen", "liver", "metal"]


def test_patches_lie_in_the_body_and_their_conditions_in_the_unit_range() -> None:
    geometry = imaging.PatchGeometry()
    field, mask, box = imaging.resample_to_field(_phantom_slice(), (0.75, 0.75), geometry)
    centres = imaging.patch_centres(mask, geometry)
    assert len(centres) > 20
    assert mask[centres[:, 0], centres[:, 1]].all()
    assert set(np.unique((centres - 16) % 16)) == {0}
    channels = imaging.window_channels(field)
    patches = imaging.extract_patches(channels, centres, geometry.patch)
    assert patches.shape == (len(centres), 3, 32, 32)
    r, c = centres[5]
    np.testing.assert_array_equal(patches[5], channels[:, r - 16 : r + 16, c - 16 : c + 16])
    cond = imaging.patch_conditions(1.3, centres, box)  # a position beyond the training range is clipped
    assert cond.shape == (len(centres), 3) and cond.dtype == np.float32
    assert cond.min() >= 0.0 and cond.max() <= 1.0
    assert (cond[:, 0] == 1.0).all()
    assert cond[:, 1].min() < 0.15 and cond[:, 1].max() > 0.85  # x spans the body's box


@pytest.mark.parametrize(
    ("kwargs", "field_name"),
    [({"spacing_mm": 0.0}, "spacing_mm"), ({"patch": 31}, "patch"), ({"stride": 0}, "stride")],
)
def test_impossible_patch_geometry_is_refused(kwargs: dict[str, float], field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        imaging.PatchGeometry(**kwargs)  # type: ignore[arg-type]


# --- (3) scores: patch z → slice (max) → series (top-3 within the training range) --------------------


def test_slice_score_is_the_largest_patch_z() -> None:
    z = np.array([0.1, 2.5, -1.0, 0.7, 4.0, 0.2])
    slice_index = np.array([0, 0, 0, 2, 2, 2])
    scores = imaging.slice_scores_from_patches(z, slice_index, 3)
    assert scores[0] == 2.5 and scores[2] == 4.0
    assert np.isnan(scores[1])  # no body patch on slice 1


def test_series_score_counts_only_slices_within_the_training_range() -> None:
    slice_scores = np.array([9.0, 1.0, 2.0, 3.0, np.nan, 4.0])
    positions = np.array([-0.5, 0.1, 0.2, 0.3, 0.4, 0.5])
    score, inside = imaging.series_score_in_range(slice_scores, positions, 0.0, 1.0)
    assert score == pytest.approx((4.0 + 3.0 + 2.0) / 3) and inside == 4
    score_all, inside_none = imaging.series_score_in_range(slice_scores, positions, 2.0, 3.0)
    assert inside_none == 0 and score_all == pytest.approx((9.0 + 4.0 + 3.0) / 3)


def test_normalisation_uses_the_cell_then_the_position_bin_then_the_global_statistics() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    cond = np.stack([rng.uniform(0, 0.5, n), rng.uniform(0, 1, n), rng.uniform(0, 1, n)], axis=1)
    scores = rng.normal(1.0, 1.0, n) + 5.0 * (cond[:, 1] > 0.5)  # the right half of the body differs
    table = imaging.fit_patch_normalisation(scores, cond, position_bins=2, location_bins=2, min_count=30)
    source = np.asarray(table["source"])
    assert (source[0] == 2).all() and (source[1] == 0).all()  # no normals beyond position 0.5
    z = imaging.patch_z_scores(scores, cond, table)
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.05  # location-normalised
    # An unseen position falls back to the global statistics.
    z_far = imaging.patch_z_scores(np.array([1.0]), np.array([[0.9, 0.2, 0.2]]), table)
    assert z_far[0] == pytest.approx((1.0 - table["global_mu"]) / table["global_sigma"])


def test_evidence_map_is_the_largest_z_of_the_covering_patches() -> None:
    centres = np.array([[16, 16], [16, 32]])
    zmap = imaging.patch_z_map(np.array([1.0, 3.0]), centres, 64, 32)
    assert zmap[5, 5] == 1.0 and zmap[5, 20] == 3.0 and zmap[5, 40] == 3.0
    assert np.isnan(zmap[40, 40])


# --- (2) a tiny training run, resume, export, parity ------------------------------------------------


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four normal 8-slice 128² series, no manifest (the trainer holds out 2 for validation)."""
    out = tmp_path_factory.mktemp("patch_phantom")
    args = ["phantom", "--out", str(out), "--series", "4", "--slices", "8", "--matrix", "128", "--seed", "21"]
    assert gatekeeper([*args, "--quiet"]) == 0
    (out / "manifest.json").unlink()
    return out


def _train(data: Path, out: Path, *extra: str) -> int:
    return gatekeeper(
        [
            "train",
            "detector",
            "--recipe",
            "patch",
            "--data",
            str(data),
            "--out",
            str(out),
            "--stride",
            "32",
            "--batch",
            "8",
            "--position-steps",
            "2",
            "--seed",
            "3",
            "--jobs",
            "1",
            "--threads",
            "1",
            "--no-progress",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def trained(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("patch_model")
    assert _train(phantom, out, "--gan-steps", "3", "--encoder-steps", "2") == 0
    return out


def test_training_writes_the_checkpoint_onnx_files_and_model_json(trained: Path) -> None:
    meta = json.loads((trained / "model.json").read_text())
    assert meta["recipe"] == "patch" and meta["format"] == 2
    pre = meta["preprocessing"]
    assert (pre["spacing_mm"], pre["field_mm"], pre["field_px"], pre["patch"], pre["stride"]) == (
        1.5,
        480.0,
        320,
        32,
        32,
    )
    assert [w["name"] for w in pre["windows"]] == ["abdomen", "liver", "metal"]
    assert set(meta["files"]) == {"patch_scorer", "encoder", "generator", "discriminator", "position"}
    assert all((trained / name).is_file() for name in meta["files"].values())
    assert meta["aggregation"] == "top3_mean" and np.isfinite(meta["threshold"])
    rng = meta["position_range"]
    assert rng["low"] == pytest.approx(rng["training_min"] - 0.05) and "note" in rng
    assert len(meta["validation_series_scores"]) == 2
    # The threshold comes from held-out scores (each series against the other's table), not in-sample ones.
    from models.detector.metrics import threshold_at_false_flag_rate

    held_out = meta["validation_series_scores_held_out"]
    assert len(held_out) == 2 and held_out != meta["validation_series_scores"]
    assert meta["threshold"] == pytest.approx(threshold_at_false_flag_rate(np.array(held_out), 0.05))
    assert meta["threshold_from"].startswith("leave-one-series-out")
    assert np.asarray(meta["normalisation"]["mu"]).shape == (8, 16)
    assert meta["training"]["steps"] == {"position": 2, "gan": 3, "encoder": 2}
    assert meta["training"]["data_hash_sha256"] and "--recipe patch" in meta["training"]["command"]
    ckpt = torch.load(trained / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["recipe"] == "patch" and {"G", "D", "G_ema", "E", "P", "optimizers"} <= set(ckpt)


@pytest.mark.parametrize("noise_hu", [0.0, 40.0])
def test_adversarial_autoencoder_family_trains_and_records_its_recipe(
    phantom: Path, tmp_path: Path, noise_hu: float
) -> None:
    out = tmp_path / "aae"
    noise = ["--aae-noise-hu", str(noise_hu), "--aae-noise-grid", "3"]
    assert _train(phantom, out, "--family", "aae", "--gan-steps", "3", "--encoder-steps", "2", *noise) == 0
    meta = json.loads((out / "model.json").read_text())
    assert (meta["family"], meta["patch_score"]) == ("aae", "local")
    assert meta["aae_noise"] == {"hu_std": noise_hu, "grid": 3, "window_std": None if noise_hu else 0.2}
    assert meta["training"]["steps"] == {"position": 2, "gan": 3, "encoder": 2}
    assert "--family aae" in meta["training"]["command"]
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert len(ckpt["history"]["gan"][0]) == 5  # step, d, adversarial, r1, L1 reconstruction


def test_aae_is_a_patch_recipe_family(phantom: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "detector", "--data", str(phantom), "--out", str(tmp_path / "m"), "--family", "aae"]
    assert gatekeeper(args) == 2
    assert "--recipe patch" in capsys.readouterr().err


class _Constant(torch.nn.Module):
    """A stand-in encoder (→ zeros) or generator (→ a flat patch at -1)."""

    def __init__(self, shape: tuple[int, ...], value: float) -> None:
        super().__init__()
        self.shape, self.value = shape, value

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], *self.shape), self.value)


def test_local_score_sees_a_small_finding_the_mean_averages_away() -> None:
    from models.detector.patch.networks import PatchScorer, build_patch_networks

    nets = build_patch_networks(3)
    E, G = _Constant((64,), 0.0), _Constant((3, 32, 32), -1.0)
    local = PatchScorer(G, E, nets.D, kappa=0.0, score="local").eval()  # type: ignore[arg-type]
    mean = PatchScorer(G, E, nets.D, kappa=0.0, score="mean").eval()  # type: ignore[arg-type]
    spot = torch.full((1, 3, 32, 32), -1.0)
    spot[:, 2, 14:18, 14:18] = 1.0  # 16 metal pixels of 1024
    spread = torch.full((1, 3, 32, 32), -1.0)
    spread[:, 2] += 2.0 * (16 / 1024) ** 0.5  # the same squared residual, spread over the whole patch
    cond = torch.zeros(1, 3)
    with torch.no_grad():
        assert mean(spot, cond)[1].item() == pytest.approx(mean(spread, cond)[1].item(), rel=1e-4)
        assert local(spot, cond)[1].item() > 2.5 * local(spread, cond)[1].item()
        edge = torch.full((1, 3, 32, 32), -1.0)
        edge[:, 2, 0:2, 14:18] = 1.0  # the same finding in the border the local score leaves out
        assert local(edge, cond)[1].item() < 0.5 * local(spot, cond)[1].item()
        assert local(spot, cond)[3].shape == (1, 1, 32, 32)


def test_wider_local_sigma_keeps_a_lesion_and_averages_texture_away() -> None:
    """`--local-sigma`: a 14-px disc 0.5 darker (a 3-cm lesion in the liver window) against pixel-scale
    texture of std 0.5 (what a reconstruction cannot predict): σ 4 px separates them, σ 1.5 px less so."""
    from models.detector.patch.networks import PatchScorer, build_patch_networks

    nets = build_patch_networks(3)
    E, G = _Constant((64,), 0.0), _Constant((3, 32, 32), 0.0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = torch.zeros(1, 3, 32, 32)
    disc[:, :, ((yy - 16) ** 2 + (xx - 16) ** 2) < 49] = -0.5
    texture = 0.5 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(1, 3)
    ratios = {}
    with torch.no_grad():
        for sigma in (1.5, 4.0):
            scorer = PatchScorer(G, E, nets.D, kappa=0.0, score="local", sigma=sigma).eval()  # type: ignore[arg-type]
            ratios[sigma] = scorer(disc, cond)[1].item() / scorer(texture, cond)[1].item()
    assert ratios[4.0] > 1.5 and ratios[4.0] > 1.5 * ratios[1.5]
    with pytest.raises(ValueError, match="sigma"):
        PatchScorer(G, E, nets.D, score="local", sigma=0.0)  # type: ignore[arg-type]


def test_resume_continues_the_checkpoint(phantom: Path, trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(phantom, trained, "--gan-steps", "5", "--encoder-steps", "4") == 2  # a checkpoint is there
    assert "--resume" in capsys.readouterr().err
    assert _train(phantom, trained, "--gan-steps", "5", "--encoder-steps", "4", "--resume") == 0
    meta = json.loads((trained / "model.json").read_text())
    assert meta["training"]["steps"] == {"position": 2, "gan": 5, "encoder": 4}
    ckpt = torch.load(trained / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"]["gan"] == 5 and len(ckpt["history"]["gan"]) >= 1


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def test_onnx_graphs_match_torch(trained: Path) -> None:
    from models.detector.onnx_graph import DiscriminatorWithFeatures
    from models.detector.patch.networks import PatchScorer, build_patch_networks

    weights = torch.load(trained / "weights.pt", map_location="cpu", weights_only=False)
    assert weights["recipe"] == "patch"
    nets = build_patch_networks(3)
    nets.G.load_state_dict(weights["G_ema"])
    nets.E.load_state_dict(weights["E"])
    nets.D.load_state_dict(weights["D"])
    score = json.loads((trained / "model.json").read_text())["patch_score"]
    scorer = PatchScorer(nets.G, nets.E, nets.D, kappa=1.0, score=score).eval()
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(5, 3, 32, 32, generator=gen) * 2 - 1
    cond = torch.rand(5, 3, generator=gen)
    z = torch.randn(5, nets.G.z_dim, generator=gen)
    cases = {
        "patch_scorer.onnx": (scorer, {"patches": x, "cond": cond}),
        "encoder.onnx": (nets.E.eval(), {"patches": x, "cond": cond}),
        "generator.onnx": (nets.G.eval(), {"z": z, "cond": cond}),
        "discriminator.onnx": (DiscriminatorWithFeatures(nets.D).eval(), {"patches": x, "cond": cond}),
    }
    for name, (module, feeds) in cases.items():
        with torch.no_grad():
            ref = module(*feeds.values())
        refs = ref if isinstance(ref, tuple) else (ref,)
        session = ort.InferenceSession(str(trained / name), providers=["CPUExecutionProvider"])
        got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        assert len(got) == len(refs), name
        for g, r in zip(got, refs):
            assert g.shape == tuple(r.shape), name
            assert _rel_err(g, r.numpy()) < 1e-4, f"{name}: relative error {_rel_err(g, r.numpy()):.2e}"


def test_model_json_and_onnx_files_reproduce_the_validation_scores(phantom: Path, trained: Path) -> None:
    """What serving will do, from model.json and the ONNX files only: positions, patches, z-scores,
    slice max, in-range top-3 — the validation series' scores come out as calibration wrote them."""
    from models.detector.data import PatchSeriesData, load_dataset

    meta = json.loads((trained / "model.json").read_text())
    pre, pos_meta, rng = meta["preprocessing"], meta["position"], meta["position_range"]
    geometry = imaging.PatchGeometry(pre["spacing_mm"], pre["field_mm"], pre["patch"], pre["stride"])
    data = load_dataset(phantom, pre["position_input"]["size"], seed=3, patch=geometry)
    position = ort.InferenceSession(str(trained / meta["files"]["position"]), providers=["CPUExecutionProvider"])
    scorer = ort.InferenceSession(str(trained / meta["files"]["patch_scorer"]), providers=["CPUExecutionProvider"])
    scores = []
    for s in data.validation:
        assert isinstance(s, PatchSeriesData)
        (raw,) = position.run(None, {"image": s.images[:, None].astype(np.float32)})
        fitted = imaging.fit_series_positions(raw, s.locations_mm, pos_meta["mm_per_unit"])
        positions = (fitted - pos_meta["lo"]) / (pos_meta["hi"] - pos_meta["lo"])
        z, slice_index = [], []
        for k in range(s.num_slices):
            centres = s.centres[s.centres[:, 0] == k, 1:]
            channels = imaging.window_channels(s.hu_field[k].astype(np.float32))
            patches = imaging.extract_patches(channels, centres, geometry.patch)
            cond = imaging.patch_conditions(float(positions[k]), centres, s.boxes[k])
            raw_scores = scorer.run(["score"], {"patches": patches, "cond": cond})[0]
            z.append(imaging.patch_z_scores(raw_scores, cond, meta["normalisation"]))
            slice_index.append(np.full(len(centres), k))
        slices = imaging.slice_scores_from_patches(np.concatenate(z), np.concatenate(slice_index), s.num_slices)
        scores.append(imaging.series_score_in_range(slices, positions, rng["low"], rng["high"])[0])
    np.testing.assert_allclose(scores, meta["validation_series_scores"], rtol=1e-3, atol=1e-3)


def test_serving_scores_dicom_series_as_calibration_did(phantom: Path, trained: Path) -> None:
    """`service.inference.load_detector` on a format-2 model reads the DICOM files itself and gives each
    validation series the score calibration recorded; the evidence maps lie in the slices' geometry."""
    from models.detector.data import load_dataset
    from service import dicom_series
    from service.inference import PATCH_MAP_SIZE, PatchDetector, load_detector

    meta = json.loads((trained / "model.json").read_text())
    pre = meta["preprocessing"]
    geometry = imaging.PatchGeometry(pre["spacing_mm"], pre["field_mm"], pre["patch"], pre["stride"])
    validation = [s.series_instance_uid for s in load_dataset(phantom, 64, seed=3, patch=geometry).validation]
    groups = {g.series_instance_uid: g for g in dicom_series.scan_tree(phantom)}
    detector = load_detector(trained)
    assert isinstance(detector, PatchDetector) and detector.threshold == meta["threshold"]
    verdicts = [detector.score_series(dicom_series.load_series(groups[uid]), keep_maps=True) for uid in validation]
    np.testing.assert_allclose([v.score for v in verdicts], meta["validation_series_scores"], rtol=1e-3, atol=1e-3)
    v = verdicts[0]
    assert len(v.slices) == 8 and all(np.isfinite(s.score) for s in v.slices)
    assert v.residual_maps is not None and v.residual_maps.shape == (8, PATCH_MAP_SIZE, PATCH_MAP_SIZE)
    assert np.abs(v.residual_maps).sum() > 0


def test_score_command_reads_a_patch_model(phantom: Path, trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert gatekeeper(["score", str(phantom), "--model", str(trained), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["series"]) == 4
    assert all(s["error"] is None and len(s["slices"]) == 8 and "flagged" in s for s in out["series"])


def test_field_map_lands_on_the_body_in_the_image() -> None:
    """A map that is 1 in the whole field's centre pixel block lands where the body's centre is."""
    geometry = imaging.PatchGeometry()
    hu = _phantom_slice()
    field_map = np.full((320, 320), np.nan, np.float32)
    field_map[150:170, 150:170] = 1.0
    small = imaging.field_map_to_image(field_map, hu, (0.75, 0.75), geometry, 128)
    r, c = np.argwhere(small == 1.0).mean(axis=0)
    # body centre (300, 230) of 512 → (75, 57.5) of 128
    assert abs(r - 75) <= 2 and abs(c - 57.5) <= 2
    assert (small[np.isnan(small)]).size == 0


def test_hu_noise_darkens_or_brightens_every_window_together() -> None:
    """`--aae-noise-hu`: one smooth HU field under all windows (a lesion-like blob), unlike v3's per-channel noise."""
    import argparse

    from models.detector.patch.train import PatchTrainer

    field = np.full((1, 64, 64), 60.0, np.float32)  # liver-like tissue
    trainer = PatchTrainer.__new__(PatchTrainer)
    trainer.args = argparse.Namespace(batch=8, aae_noise_hu=20.0, aae_noise_grid=3)  # stays inside both windows
    trainer.geometry = imaging.PatchGeometry(stride=24)
    trainer.device = torch.device("cpu")
    trainer.rng = torch.Generator().manual_seed(0)
    trainer.train_series = [type("S", (), {"hu_field": field})()]
    real, noisy, _ = trainer._sample_noised(np.array([[0, 0, 32, 32]] * 4), np.zeros((4, 3), np.float32))
    delta = (noisy - real).numpy()
    abdomen, liver = delta[:, 0], delta[:, 1]
    assert np.abs(liver).max() > 0.1  # tens of HU
    np.testing.assert_allclose(liver, abdomen * 400 / 150, rtol=1e-3, atol=1e-4)  # same HU change in both windows


def test_recalibrate_sets_the_threshold_from_held_out_onnx_scores(phantom: Path, trained: Path, tmp_path: Path) -> None:
    """`python -m models.detector recalibrate` scores the training data's validation split with the
    ONNX files and writes a table, in-sample scores that serving reproduces, and a threshold from the
    held-out scores. (Training's own numbers are not compared: training scores int16-stored HU fields
    with torch, and a 3-step model's patch scores are nearly constant, so the refitted σ sits at its
    floor and float-level differences move the z-scores.)"""
    import shutil

    from models.detector.__main__ import main as detector_main
    from models.detector.data import normal_splits
    from models.detector.metrics import threshold_at_false_flag_rate
    from service import dicom_series
    from service.inference import load_detector

    model = tmp_path / "model"
    shutil.copytree(trained, model)
    before = json.loads((model / "model.json").read_text())
    meta = before | {"threshold": 0.0, "validation_series_scores_held_out": [], "validation_series_scores": []}
    (model / "model.json").write_text(json.dumps(meta))
    assert detector_main(["recalibrate", "--model", str(model), "--data", str(phantom)]) == 0
    after = json.loads((model / "model.json").read_text())
    held_out = after["validation_series_scores_held_out"]
    assert len(held_out) == 2 and after["threshold_from"].startswith("leave-one-series-out")
    assert after["threshold"] == pytest.approx(threshold_at_false_flag_rate(np.array(held_out), 0.05))
    assert np.asarray(after["normalisation"]["mu"]).shape == (8, 16)
    groups = dicom_series.scan_tree(phantom)
    splits, _ = normal_splits(phantom, groups, int(before["training"]["seed"]))
    detector = load_detector(model)
    served = [
        detector.score_series(dicom_series.load_series(g)).score
        for g in groups
        if splits.get(g.series_instance_uid) == "validation"
    ]
    np.testing.assert_allclose(served, after["validation_series_scores"], rtol=1e-4, atol=1e-4)


def test_recalibrate_refuses_a_slice_recipe_model(phantom: Path) -> None:
    from models.detector.patch.calibrate import recalibrate

    with pytest.raises(ValueError, match="patch-recipe"):
        recalibrate(Path("models/detector/default"), phantom)
