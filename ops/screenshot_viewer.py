"""Screenshots of the slice viewer for the README: docs/screenshots/viewer.png and viewer-overlays.png.

A 512² phantom series with a liver tumour is put behind the app (uvicorn, SQLite) with a liver SEG
from the phantom's ground truth where the segment stage writes it. The slice scores and the residual
maps are drawn from the tumour's ground truth too (area per slice; the tumour mask blurred), so that
the picture shows what the viewer draws without running the detector; the README says so.
Headless Chromium (Debian's package) through Playwright.

    .venv/bin/python ops/screenshot_viewer.py [--out docs/screenshots] [--slices 80]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_viewer import PASSWORD, find_series, seed, serve, wait_until  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")


def truth_scores(folder: Path, num_slices: int) -> tuple[list[float], dict[int, np.ndarray]]:
    """Per-slice scores (head → feet) and 64² residual maps from the phantom's anomaly ground truth."""
    headers = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in folder.glob("CT*.dcm")),
        key=lambda ds: -float(ds.ImagePositionPatient[2]),
    )
    seg = hd.seg.segread(folder / "ground_truth" / "anomaly.seg.dcm")
    masks = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in headers], combine_segments=True
    )
    area = (np.asarray(masks) > 0).sum(axis=(1, 2)).astype(np.float64)
    smooth = np.convolve(area, np.ones(5) / 5, mode="same")
    scores = list(0.18 + 0.02 * np.sin(np.arange(num_slices) / 3) + 0.7 * smooth / max(smooth.max(), 1.0))
    residuals = {}
    for index in np.argsort(scores)[::-1][:5]:  # the slices `seed` gives residual maps: the 5 highest scores
        blurred = np.asarray(masks[index] > 0, np.float32).reshape(64, 8, 64, 8).mean(axis=(1, 3))
        for axis in (0, 1, 0, 1):  # a small box blur, so the map fades out like a reconstruction error
            blurred = (np.roll(blurred, 1, axis) + blurred + np.roll(blurred, -1, axis)) / 3
        residuals[int(index)] = (blurred / max(float(blurred.max()), 1e-6)).astype(np.float16)
    return scores, residuals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--slices", type=int, default=80)
    args = parser.parse_args(argv)

    from playwright.sync_api import expect, sync_playwright

    from service.db.session import make_engine, make_session_factory
    from service.db.tables import Base
    from service.phantom.generate import SeriesSpec, generate_series
    from service.settings import Settings
    from service.web.app import create_app

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="screenshot_viewer_") as tmp:
        work = Path(tmp)
        spec = SeriesSpec(folder="s", patient_seed=7, series_seed=7, anomaly="tumor", num_slices=args.slices)
        generate_series(spec, work / "phantom")
        folder = find_series(work / "phantom")
        scores, residuals = truth_scores(folder, args.slices)
        settings = Settings(
            storage_dir=folder.parent, database_url=f"sqlite:///{work / 'viewer.db'}", web_secret_key="v" * 40
        )
        engine = make_engine(settings.database_url)
        Base.metadata.create_all(engine)
        sessions = make_session_factory(engine)
        uid, _, _ = seed(sessions, storage_dir=folder.parent, folder=folder, scores=scores, residuals=residuals)
        server, url = serve(create_app(settings, sessions))
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
                page = browser.new_page(viewport={"width": 1100, "height": 900})
                page.goto(f"{url}/login?next=/series/{uid}")
                page.fill("input[name=name]", "bench")
                page.fill("input[name=password]", PASSWORD)
                page.click("button[type=submit]")
                expect(page.locator("#viewer")).to_have_attribute("data-ready", "true", timeout=60_000)
                shown = page.locator("#viewer-index").inner_text()
                wait_until(page, f"document.querySelector('#viewer').dataset.loaded === '{shown}'")
                page.evaluate("window.scrollTo(0, 0)")  # bounding boxes in page coordinates
                plot_and_viewer = page.locator("svg.score-plot").bounding_box()
                viewer_box = page.locator("section.viewer").bounding_box()
                assert plot_and_viewer and viewer_box
                clip = {
                    "x": 0,
                    "y": plot_and_viewer["y"] - 75,
                    "width": 1100,
                    "height": viewer_box["y"] + viewer_box["height"] - plot_and_viewer["y"] + 85,
                }
                page.screenshot(path=str(args.out / "viewer.png"), full_page=True, clip=clip)
                page.locator("#viewer-overlay-residual").check()
                page.locator("#viewer-overlay-contour").check()
                page.locator("#viewer button[data-preset=liver]").click()
                wait_until(
                    page,
                    "[...document.querySelectorAll('#viewer .viewer-stage img')]"
                    ".every(img => img.hidden || (img.complete && img.naturalWidth > 0))",
                )
                wait_until(  # the layers' load handlers unhide them
                    page,
                    "!document.querySelector('img.viewer-residual').hidden"
                    " && !document.querySelector('img.viewer-contour').hidden",
                )
                page.locator("section.viewer").screenshot(path=str(args.out / "viewer-overlays.png"))
                browser.close()
        finally:
            server.should_exit = True
            engine.dispose()
    print(f"wrote {args.out / 'viewer.png'} and {args.out / 'viewer-overlays.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
