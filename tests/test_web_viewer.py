"""The slice viewer over real HTTP (uvicorn, PostgreSQL): its JSON, the slice and overlay layers, and one
real-browser journey (headless Chromium via Playwright) through scrolling, presets, overlays and the plot.

The flagged series of `web_support.seed_database` is scored (12 slices, residual maps on the three
top slices) and gets a liver DICOM-SEG here (from the phantom's ground truth, where the segment
stage would write it); the geometry series is unscored and has no contour.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select
from test_web import Env, make_settings
from web_support import ANOMALY, NUM_SLICES, PASSWORDS, THRESHOLD, seed_database, serve, wait_until, write_phantom

from service.db.session import make_engine, make_session_factory
from service.db.tables import Base, Series
from service.dicom_seg import build_liver_seg
from service.phantom.canvas import Label
from service.pipeline import results_dir
from service.settings import Settings
from service.web.app import create_app
from service.web.images import slice_score_svg
from service.web.routes.viewer import NO_CONTOUR, SLICE_CACHE

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
TOP_SLICES = [5, 6, 7]
LIVER_FROM = 3  # the written liver SEG has no liver on slices 0–2  # the seeded flagged series' three highest scores (slices 5–8 are above the threshold)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("phantoms")
    return {
        "anomaly": write_phantom(out, anomaly=ANOMALY, seed=31),
        "geometry": write_phantom(out, anomaly=None, seed=32),
        "normal": write_phantom(out, anomaly=None, seed=33),
    }


def write_liver_seg(*, settings: Settings, series_id: int, phantom: Path) -> Path:
    """The phantom's true liver as the segment stage stores it: `results/<series id>/liver-seg-<version>.dcm`.

    The liver is cut off the three slices nearest the head (LIVER_FROM), so that some slices have none.
    """
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(phantom.glob("CT*.dcm"))]
    headers.sort(key=lambda ds: -float(ds.ImagePositionPatient[2]))  # head → feet, as the viewer's indexes
    organs = hd.seg.segread(phantom / "ground_truth" / "organs.seg.dcm")
    labels = organs.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in headers], combine_segments=True
    )
    mask = labels == Label.LIVER
    mask[:LIVER_FROM] = False
    assert mask[LIVER_FROM:].any(axis=(1, 2)).sum() >= 3, "the phantom needs liver on several slices"
    seg = build_liver_seg(
        source_images=headers,
        mask=mask,
        algorithm_name="test liver",
        algorithm_version="test-1",
        source_series_version=1,
    )
    path = results_dir(settings=settings, series_id=series_id) / "liver-seg-test-1.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
    return path


def start(tmp_path: Path, postgres_db_url: str, redis_url: str, phantoms: dict[str, Path]) -> Iterator[Env]:
    settings = make_settings(tmp_path, postgres_db_url, redis_url)
    engine = make_engine(settings.database_url)
    Base.metadata.create_all(engine)
    sessions = make_session_factory(engine)
    seeded = seed_database(sessions, storage_dir=settings.storage_dir, phantoms=phantoms)
    with sessions() as session:
        flagged_id = session.scalar(select(Series.id).where(Series.series_instance_uid == seeded.flagged_uid))
    assert flagged_id is not None
    write_liver_seg(settings=settings, series_id=flagged_id, phantom=phantoms["anomaly"])
    SLICE_CACHE.clear()
    app = create_app(settings, sessions)
    with serve(app) as url:
        yield Env(url, app, seeded, sessions)
    engine.dispose()


@pytest.fixture
def env(tmp_path: Path, postgres_db_url: str, redis_url: str, phantoms: dict[str, Path]) -> Iterator[Env]:
    yield from start(tmp_path, postgres_db_url, redis_url, phantoms)


def base(uid: str, version: int = 1) -> str:
    return f"/series/{uid}/versions/{version}"


def png(response: object) -> Image.Image:
    image = Image.open(io.BytesIO(response.content))  # type: ignore[attr-defined]
    image.load()
    return image


# --- viewer.json ------------------------------------------------------------------------------------


def test_viewer_json_lists_every_slice_with_scores_residuals_and_contour(env: Env) -> None:
    with env.browser("alice") as client:
        response = client.get(f"{base(env.seeded.flagged_uid)}/viewer.json")
    assert response.status_code == 200
    info = response.json()
    assert info["num_slices"] == NUM_SLICES == len(info["slices"])
    assert [s["index"] for s in info["slices"]] == list(range(NUM_SLICES))
    assert info["threshold"] == THRESHOLD
    assert all(s["score"] is not None for s in info["slices"])
    positions = [s["position"] for s in info["slices"]]
    assert positions == sorted(positions, reverse=True)  # head → feet
    assert info["residual_slices"] == TOP_SLICES
    assert [s["index"] for s in info["slices"] if s["residual"]] == TOP_SLICES
    assert info["contour"]["available"] is True and info["contour"]["reason"] is None
    liver = info["contour"]["slices"]
    assert liver and min(liver) >= LIVER_FROM  # the SEG's frames land on their slices
    assert [s["index"] for s in info["slices"] if s["contour"]] == liver
    assert info["presets"]["bone"] == {"level": 400.0, "width": 1800.0}
    assert set(info["presets"]) == {"abdomen", "liver", "bone", "lung"}
    assert info["window"] == {"level": 40.0, "width": 400.0}
    assert info["urls"]["slice"] == f"{base(env.seeded.flagged_uid)}/viewer/slices/{{index}}.png"


def test_viewer_json_of_an_unscored_series_orders_slices_by_position_and_has_no_contour(env: Env) -> None:
    with env.browser("alice") as client:
        info = client.get(f"{base(env.seeded.geometry_uid)}/viewer.json").json()
    assert info["num_slices"] == NUM_SLICES and info["threshold"] is None
    positions = [s["position"] for s in info["slices"]]
    assert None not in positions and positions == sorted(positions, reverse=True)
    assert info["residual_slices"] == []
    assert info["contour"] == {"available": False, "slices": [], "reason": NO_CONTOUR}


# --- slice and overlay layers -----------------------------------------------------------------------


def test_slice_png_is_the_windowed_slice_and_the_window_changes_the_pixels(env: Env) -> None:
    url = f"{base(env.seeded.flagged_uid)}/viewer/slices/6.png"
    with env.browser("alice") as client:
        abdomen = client.get(url)
        bone = client.get(url, params={"wl": 400, "ww": 1800})
        lung = client.get(url, params={"wl": -600, "ww": 1500})
    for response in (abdomen, bone, lung):
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert response.headers["cache-control"].startswith("private, max-age=")
        assert response.headers["etag"]
    images = [np.asarray(png(r)) for r in (abdomen, bone, lung)]
    assert all(png(r).mode == "L" and png(r).size == (64, 64) for r in (abdomen, bone, lung))
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[1], images[2])
    assert len({abdomen.headers["etag"], bone.headers["etag"], lung.headers["etag"]}) == 3
    # The soft-tissue window saturates bone and air; the bone window keeps bone below white.
    assert (images[0] == 255).sum() > (images[1] == 255).sum()


def test_the_browser_revalidates_a_slice_with_its_etag_and_gets_304(env: Env) -> None:
    url = f"{base(env.seeded.flagged_uid)}/viewer/slices/3.png"
    with env.browser("alice") as client:
        first = client.get(url, params={"wl": 70, "ww": 150})
        again = client.get(url, params={"wl": 70, "ww": 150}, headers={"If-None-Match": first.headers["etag"]})
        other_window = client.get(url, params={"wl": 40, "ww": 400}, headers={"If-None-Match": first.headers["etag"]})
    assert first.status_code == 200
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == first.headers["etag"]
    assert other_window.status_code == 200


def test_decoded_slices_are_cached_so_a_new_window_does_not_read_the_file_again(env: Env) -> None:
    url = f"{base(env.seeded.flagged_uid)}/viewer/slices/2.png"
    with env.browser("alice") as client:
        client.get(url)
        hits, misses = SLICE_CACHE.hits, SLICE_CACHE.misses
        assert client.get(url, params={"wl": -600, "ww": 1500}).status_code == 200
    assert (SLICE_CACHE.hits, SLICE_CACHE.misses) == (hits + 1, misses)


def test_residual_layer_is_a_transparent_heat_map_on_top_slices_only(env: Env) -> None:
    root = f"{base(env.seeded.flagged_uid)}/viewer/slices"
    with env.browser("alice") as client:
        top = client.get(f"{root}/6/residual.png")
        other = client.get(f"{root}/0/residual.png")
    assert top.status_code == 200 and top.headers["content-type"] == "image/png" and top.headers["etag"]
    layer = png(top)
    assert layer.mode == "RGBA" and layer.size == (64, 64)
    alpha = np.asarray(layer)[..., 3]
    assert alpha.max() > 100 and (alpha == 0).mean() > 0.3  # opaque where the residual is high, clear elsewhere
    assert other.status_code == 404 and "no residual map" in other.text


def test_contour_layer_outlines_the_stored_liver_segmentation(env: Env) -> None:
    with env.browser("alice") as client:
        info = client.get(f"{base(env.seeded.flagged_uid)}/viewer.json").json()
        liver = info["contour"]["slices"]
        without = sorted(set(range(NUM_SLICES)) - set(liver))
        root = f"{base(env.seeded.flagged_uid)}/viewer/slices"
        on_liver = client.get(f"{root}/{liver[len(liver) // 2]}/contour.png")
        off_liver = client.get(f"{root}/{without[0]}/contour.png")
        none = client.get(f"{base(env.seeded.geometry_uid)}/viewer/slices/3/contour.png")
    assert on_liver.status_code == 200 and on_liver.headers["content-type"] == "image/png"
    layer = np.asarray(png(on_liver))
    assert layer.shape == (64, 64, 4)
    drawn = layer[..., 3] > 0
    assert 0 < drawn.sum() < 0.5 * drawn.size  # an outline, not a filled mask
    assert off_liver.status_code == 200 and not np.asarray(png(off_liver))[..., 3].any()
    assert none.status_code == 404 and NO_CONTOUR in none.text


# --- errors and login -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/series/1.2.3.4/versions/1/viewer.json", "no version 1 of series 1.2.3.4"),
        ("{flagged}/versions/9/viewer.json", "no version 9"),
        ("{flagged}/versions/1/viewer/slices/99.png", "has no slice 99"),
        ("{flagged}/versions/1/viewer/slices/-1/residual.png", "has no slice -1"),
        ("/series/1.2.3.4/versions/1/viewer/slices/0/contour.png", "no version 1 of series 1.2.3.4"),
    ],
)
def test_unknown_series_version_or_slice_is_404_with_a_reason(env: Env, path: str, reason: str) -> None:
    with env.browser("alice") as client:
        response = client.get(path.replace("{flagged}", f"/series/{env.seeded.flagged_uid}"))
    assert response.status_code == 404
    assert reason in response.text


@pytest.mark.parametrize("params", [{"ww": 0}, {"ww": -5}, {"ww": 99999}, {"wl": "abc"}, {"wl": 1e9}])
def test_bad_window_values_are_refused(env: Env, params: dict[str, object]) -> None:
    with env.browser("alice") as client:
        response = client.get(f"{base(env.seeded.flagged_uid)}/viewer/slices/0.png", params=params)
    assert response.status_code == 422


def test_the_viewer_needs_a_login(env: Env) -> None:
    paths = [
        f"{base(env.seeded.flagged_uid)}/viewer.json",
        f"{base(env.seeded.flagged_uid)}/viewer/slices/6.png",
        f"{base(env.seeded.flagged_uid)}/viewer/slices/6/residual.png",
        f"{base(env.seeded.flagged_uid)}/viewer/slices/6/contour.png",
    ]
    with env.client() as anonymous, env.browser("bob") as bob:
        for path in paths:
            response = anonymous.get(path)
            assert response.status_code == 303, path
            assert response.headers["location"].startswith("/login?next=")
            assert bob.get(path).status_code == 200, path  # the session cookie


def test_score_plot_points_carry_their_slice_index() -> None:
    svg = slice_score_svg(
        [{"index": i, "score": 0.1 * i} for i in range(5)], threshold=0.25, top_indexes=[4], width=400
    )
    for i in range(5):
        assert f'data-index="{i}"' in svg
    assert 'data-first="0"' in svg and 'data-last="4"' in svg and "data-x0=" in svg and "data-x1=" in svg


# --- one real-browser journey -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_dosimetrist_scrolls_windows_and_toggles_overlays_in_the_slice_viewer(env: Env) -> None:
    from playwright.sync_api import expect, sync_playwright

    assert CHROMIUM.exists(), "Debian's chromium is missing: apt-get install chromium (make system-deps)"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(f"{env.url}/login?next=/series/{env.seeded.flagged_uid}")
            page.fill("input[name=name]", "alice")
            page.fill("input[name=password]", PASSWORDS["alice"])
            page.click("button[type=submit]")
            viewer = page.locator("#viewer")
            expect(viewer).to_have_attribute("data-ready", "true")
            index = page.locator("#viewer-index")
            slice_img = page.locator("#viewer img.viewer-slice")
            expect(index).to_have_text("6")  # opens on the highest-scoring slice
            wait_for_slice(page, 6)

            # Scroll: the wheel and the arrow keys move one slice; the slider jumps.
            page.locator("#viewer .viewer-stage").hover()
            page.mouse.wheel(0, 120)
            expect(index).to_have_text("7")
            wait_for_slice(page, 7)
            page.mouse.wheel(0, -120)
            page.mouse.wheel(0, -120)
            expect(index).to_have_text("5")
            page.locator("#viewer .viewer-stage").focus()
            page.keyboard.press("ArrowDown")
            expect(index).to_have_text("6")
            page.keyboard.press("ArrowUp")
            page.keyboard.press("ArrowUp")
            expect(index).to_have_text("4")
            page.locator("#viewer-slider").fill("9")
            expect(index).to_have_text("9")
            wait_for_slice(page, 9)

            # Presets change the window of the image (and the free W/L fields).
            for name, level, width in (("bone", 400, 1800), ("lung", -600, 1500), ("liver", 70, 150)):
                page.locator(f"#viewer button[data-preset={name}]").click()
                expect(slice_img).to_have_attribute("src", f"{url_of(env, 9)}?wl={level}&ww={width}")
                expect(page.locator("#viewer-ww")).to_have_value(str(width))
                wait_for_slice(page, 9)
            page.locator("#viewer-wl").fill("100")
            page.locator("#viewer-ww").fill("700")
            page.locator("#viewer-ww").press("Enter")
            expect(slice_img).to_have_attribute("src", f"{url_of(env, 9)}?wl=100&ww=700")
            page.locator("#viewer button[data-preset=abdomen]").click()

            # The score plot: a click on a point jumps to that slice.
            page.locator("svg.score-plot circle.point[data-index='6']").click(force=True)
            expect(index).to_have_text("6")
            wait_for_slice(page, 6)

            # Overlays: each toggles its own layer on and off.
            residual = page.locator("#viewer img.viewer-residual")
            contour = page.locator("#viewer img.viewer-contour")
            expect(residual).to_be_hidden()
            page.locator("#viewer-overlay-residual").check()
            expect(residual).to_be_visible()
            expect(residual).to_have_attribute("src", f"{url_of(env, 6)}".replace(".png", "/residual.png"))
            page.locator("#viewer-overlay-contour").check()
            expect(contour).to_be_visible()
            expect(residual).to_be_visible()
            wait_until(
                page,
                "[...document.querySelectorAll('#viewer .viewer-stage img')]"
                ".every(img => img.hidden || (img.complete && img.naturalWidth === 64))",
            )
            page.screenshot(path=str(ARTIFACTS / "viewer-overlays.png"), full_page=True)
            page.locator("#viewer-overlay-residual").uncheck()
            expect(residual).to_be_hidden()
            expect(contour).to_be_visible()
            page.locator("#viewer-overlay-contour").uncheck()
            expect(contour).to_be_hidden()
            # Residual maps exist on the top slices only: elsewhere the layer stays hidden.
            page.locator("#viewer-overlay-residual").check()
            page.keyboard.press("Home")
            expect(index).to_have_text("0")
            expect(residual).to_be_hidden()
        finally:
            browser.close()


@pytest.mark.slow
def test_without_a_contour_the_overlay_toggle_is_disabled_with_a_reason(env: Env) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{env.url}/login?next=/series/{env.seeded.geometry_uid}")
            page.fill("input[name=name]", "alice")
            page.fill("input[name=password]", PASSWORDS["alice"])
            page.click("button[type=submit]")
            expect(page.locator("#viewer")).to_have_attribute("data-ready", "true")
            toggle = page.locator("#viewer-overlay-contour")
            expect(toggle).to_be_disabled()
            expect(page.locator("label[for=viewer-overlay-contour]")).to_have_attribute("title", NO_CONTOUR)
            expect(page.locator("#viewer-overlay-residual")).to_be_disabled()
            expect(page.locator("#viewer-index")).to_have_text("0")  # unscored: opens on the first slice
        finally:
            browser.close()


def url_of(env: Env, index: int) -> str:
    return f"{base(env.seeded.flagged_uid)}/viewer/slices/{index}.png"


def wait_for_slice(page: object, index: int) -> None:
    """Wait until the slice layer shows slice `index`, loaded (the viewer sets data-loaded on load)."""
    wait_until(page, f"document.querySelector('#viewer').dataset.loaded === '{index}'")
