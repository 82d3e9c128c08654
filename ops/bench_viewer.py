"""Benchmark: time per slice image the slice viewer serves, for a 300-slice 512×512 series.

Target (issue 16): "a 300-slice 512² series scrolls without waiting". The viewer prefetches the
next 5 slices, so scrolling keeps up when one slice is served faster than the wheel moves (a
notch every ~30–50 ms when scrolling fast).

Through the app (uvicorn in a thread, httpx on one keep-alive connection as a browser holds it,
the session cookie of POST /login, SQLite database), every slice of the series in order:
- cold: nothing decoded yet (the DICOM read is the slow part);
- cached, new window: the decoded slices are in the LRU, the PNG is drawn again (a preset change,
  or scrolling back);
- 304: the browser revalidates with the ETag (no drawing at all);
- overlays: the residual layer of the top slices and the contour layer of every slice.
Reference in the same run, on the same core: pydicom reading the same file and PNG-encoding the
windowed slice directly (what one slice costs at all, with no app around it). Ratio = app / reference.

    .venv/bin/python ops/bench_viewer.py [--phantom DIR] [--slices 300] [--matrix 512]

`--phantom DIR`: a folder made by `gatekeeper phantom --out DIR --series 1 --slices 300 --seed 3`;
without it one is generated into a temporary folder first (about a minute, not timed).
"""

from __future__ import annotations

import os

# One core, one thread: set before numpy loads its thread pools.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402

PASSWORD = "bench-password"


def find_series(phantom: Path) -> Path:
    """The folder of the (first) series in a `gatekeeper phantom` output folder."""
    folders = sorted({p.parent for p in phantom.rglob("CT*.dcm")})
    if not folders:
        raise SystemExit(f"no CT*.dcm under {phantom}; make one with gatekeeper phantom --out DIR --series 1")
    return folders[0]


def seed(
    sessions: Any,
    *,
    storage_dir: Path,
    folder: Path,
    scores: list[float] | None = None,
    residuals: dict[int, np.ndarray] | None = None,
) -> tuple[str, list[Path], int]:
    """A scored, worklisted series of the phantom's files, a liver SEG where the segment stage writes
    it (from the phantom's ground truth), and the user "bench".

    `scores`: per slice head → feet (default: a bump at 55 % of the series); the 5 highest get a
    residual map, `residuals[index]` or a blob. Returns (Series Instance UID, the files head → feet,
    the series' database id)."""
    from service.db.tables import Instance, Series, SeriesScore
    from service.web import crud

    now = dt.datetime.now(dt.UTC)
    headers = sorted(
        ((pydicom.dcmread(p, stop_before_pixels=True), p) for p in folder.glob("CT*.dcm")),
        key=lambda h: -float(h[0].ImagePositionPatient[2]),
    )
    first = headers[0][0]
    with sessions() as session:
        crud.create_user(session=session, name="bench", role="dosimetrist", password=PASSWORD)
    with sessions.begin() as session:
        series = Series(
            series_instance_uid=str(first.SeriesInstanceUID),
            version=1,
            study_instance_uid=str(first.StudyInstanceUID),
            frame_of_reference_uid=str(first.FrameOfReferenceUID),
            modality="CT",
            calling_ae_title="BENCH",
            state="worklisted",
            num_instances=len(headers),
            first_received_at=now,
            last_received_at=now,
            completed_at=now,
            geometry_findings=[],
            state_changed_at=now,
            patient_name="PHANTOM^DEMO",
            patient_id="PHANTOM-3",
            series_description=str(first.get("SeriesDescription", "")),
        )
        session.add(series)
        session.flush()
        slices = []
        for index, (ds, path) in enumerate(headers):
            session.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    relative_path=path.relative_to(storage_dir).as_posix(),
                    sha256="0" * 64,
                    size_bytes=path.stat().st_size,
                    received_at=now,
                )
            )
            score = scores[index] if scores else 0.2 + 0.6 * np.exp(-(((index - len(headers) * 0.55) / 12) ** 2))
            slices.append(
                {
                    "index": index,
                    "sop_instance_uid": str(ds.SOPInstanceUID),
                    "position": float(ds.ImagePositionPatient[2]),
                    "score": float(score),
                }
            )
        top = sorted(slices, key=lambda s: -s["score"])[:5]
        yy, xx = np.mgrid[0:64, 0:64]
        blob = np.exp(-((yy - 30) ** 2 + (xx - 38) ** 2) / 40.0).astype(np.float16)
        top_slices = []
        for entry in top:
            relative = f"results/{series.id}/bench/residual_{entry['index']:04d}.npy"
            (storage_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            np.save(storage_dir / relative, (residuals or {}).get(entry["index"], blob))
            top_slices.append({**entry, "residual_map": relative})
        session.add(
            SeriesScore(
                series_id=series.id,
                model_version="bench",
                score=0.8,
                threshold=0.5,
                flagged=True,
                slices=slices,
                top_slices=top_slices,
                provider="none",
                duration_s=0.0,
                created_at=now,
            )
        )
        series_id = series.id
    write_liver_seg(storage_dir=storage_dir, series_id=series_id, folder=folder, headers=[h for h, _ in headers])
    return str(first.SeriesInstanceUID), [p for _, p in headers], series_id


def write_liver_seg(*, storage_dir: Path, series_id: int, folder: Path, headers: list[pydicom.Dataset]) -> None:
    """The phantom's true liver as a liver DICOM-SEG where the segment stage writes it (not timed)."""
    import highdicom as hd

    from service.dicom_seg import build_liver_seg
    from service.phantom.canvas import Label
    from service.pipeline import results_dir
    from service.settings import Settings

    organs = hd.seg.segread(folder / "ground_truth" / "organs.seg.dcm")
    labels = organs.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in headers], combine_segments=True
    )
    seg = build_liver_seg(
        source_images=headers,
        mask=labels == Label.LIVER,
        algorithm_name="phantom ground truth",
        algorithm_version="truth",
        source_series_version=1,
    )
    target = results_dir(settings=Settings(storage_dir=storage_dir), series_id=series_id) / "liver-seg-truth.dcm"
    target.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(target, enforce_file_format=True)


def wait_until(page: Any, expression: str, *, timeout_s: float = 60.0) -> None:
    """Wait until the JavaScript `expression` is true in `page`, polling with `page.evaluate` (the
    DevTools protocol, which the app's Content-Security-Policy does not restrict, unlike the polling of
    `page.wait_for_function`, which evaluates a string in the page and is refused without 'unsafe-eval')."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise SystemExit(f"still false after {timeout_s:.0f} s: {expression}")
        page.wait_for_timeout(50)


def serve(app: Any) -> tuple[Any, str]:
    """Run `app` under uvicorn in a thread on a free port (the access log off, as in production)."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise SystemExit("uvicorn did not start")
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{port}"


def per_slice(run: Callable[[int], Any], indexes: range | list[int]) -> list[float]:
    """Seconds per call of `run(index)`, one per index, in order."""
    times = []
    for i in indexes:
        start = time.perf_counter()
        run(i)
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float]) -> str:
    ms = sorted(t * 1000 for t in times)
    p95 = ms[min(len(ms) - 1, int(0.95 * len(ms)))]
    return f"median {statistics.median(ms):6.1f} ms  p95 {p95:6.1f} ms  mean {statistics.fmean(ms):6.1f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--phantom", type=Path, help="a gatekeeper phantom output folder (default: generate one)")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    args = parser.parse_args(argv)
    os.sched_setaffinity(0, {args.core})

    import httpx
    from PIL import Image

    from service.db.session import make_engine, make_session_factory
    from service.db.tables import Base
    from service.imaging import Window, apply_window
    from service.phantom.generate import SeriesSpec, generate_series
    from service.settings import Settings
    from service.web.app import create_app
    from service.web.images import PNG_COMPRESS_LEVEL
    from service.web.routes.viewer import SLICE_CACHE

    with tempfile.TemporaryDirectory(prefix="bench_viewer_") as tmp:
        work = Path(tmp)
        if args.phantom is None:
            print(f"generating a {args.slices}-slice {args.matrix}² phantom (not timed) ...", flush=True)
            spec = SeriesSpec(folder="s", patient_seed=3, series_seed=3, num_slices=args.slices, matrix=args.matrix)
            generate_series(spec, work / "phantom")
            phantom = work / "phantom"
        else:
            phantom = args.phantom.resolve()
        folder = find_series(phantom)
        storage_dir = folder.parent
        settings = Settings(
            storage_dir=storage_dir,
            database_url=f"sqlite:///{work / 'bench.db'}",
            web_secret_key="b" * 40,
        )
        engine = make_engine(settings.database_url)
        Base.metadata.create_all(engine)
        sessions = make_session_factory(engine)
        uid, files, _ = seed(sessions, storage_dir=storage_dir, folder=folder)
        n = len(files)
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        print(f"series: {n} slices of {ds.Rows}×{ds.Columns}, {folder}")

        server, url = serve(create_app(settings, sessions))
        client = httpx.Client(base_url=url, follow_redirects=False, timeout=60, headers={"Origin": url})
        # Log in as the browser does (the form's CSRF token, Origin): the session cookie costs an HMAC
        # per request, HTTP basic auth a password hash (~100+ ms by design), which would swamp what is measured here.
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text)
        if token is None:
            raise SystemExit("no csrf_token on the login page")
        form = {"name": "bench", "password": PASSWORD, "next": "/worklist", "csrf_token": token.group(1)}
        login = client.post("/login", data=form)
        if login.status_code != 303:
            raise SystemExit(f"login failed: {login.status_code}")
        base = f"/series/{uid}/versions/1"
        info = client.get(f"{base}/viewer.json").json()
        assert info["num_slices"] == n, info

        def get(path: str, status: int = 200, **kwargs: Any) -> Any:
            response = client.get(path, **kwargs)
            if response.status_code != status:
                raise SystemExit(f"{path}: {response.status_code} {response.text[:200]}")
            return response

        sizes: list[int] = []
        etags: list[str] = []

        def cold(i: int) -> None:
            response = get(f"{base}/viewer/slices/{i}.png", params={"wl": 40, "ww": 400})
            sizes.append(len(response.content))
            etags.append(response.headers["etag"])

        abdomen = Window(center=40.0, width=400.0)

        def reference(i: int) -> None:
            dataset = pydicom.dcmread(files[i])
            hu = dataset.pixel_array.astype(np.float32) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
            picture = (apply_window(hu, abdomen) * 255.0 + 0.5).astype(np.uint8)
            Image.fromarray(picture, mode="L").save(io.BytesIO(), format="PNG", compress_level=PNG_COMPRESS_LEVEL)

        order = list(range(n))
        get(f"{base}/viewer/slices/0/contour.png")  # warm the routes and read the SEG once (timed below)
        SLICE_CACHE.clear()
        reference_times = per_slice(reference, order)
        t0 = time.perf_counter()
        cold_times = per_slice(cold, order)
        cold_total = time.perf_counter() - t0
        cached_times = per_slice(lambda i: get(f"{base}/viewer/slices/{i}.png", params={"wl": 400, "ww": 1800}), order)
        revalidate_times = per_slice(
            lambda i: get(
                f"{base}/viewer/slices/{i}.png",
                status=304,
                params={"wl": 40, "ww": 400},
                headers={"If-None-Match": etags[i]},
            ),
            order,
        )
        residual_times = per_slice(lambda i: get(f"{base}/viewer/slices/{i}/residual.png"), info["residual_slices"])
        SLICE_CACHE.clear()
        start = time.perf_counter()
        get(f"{base}/viewer.json")
        seg_read = time.perf_counter() - start
        contour_times = per_slice(lambda i: get(f"{base}/viewer/slices/{i}/contour.png"), order)
        client.close()
        server.should_exit = True
        engine.dispose()

    ref = statistics.median(reference_times)
    print(f"reference  (pydicom read + window + PNG, no app): {summary(reference_times)}")
    print(
        f"app, cold  (read + window + PNG + HTTP + DB):     {summary(cold_times)}"
        f"  ratio {statistics.median(cold_times) / ref:.2f}×  ({n / cold_total:.0f} slices/s)"
    )
    print(
        f"app, cached slice, new window:                  {summary(cached_times)}"
        f"  ratio {statistics.median(cached_times) / ref:.2f}×"
    )
    print(f"app, 304 revalidation (ETag):                   {summary(revalidate_times)}")
    print(f"residual layer ({len(residual_times)} top slices):               {summary(residual_times)}")
    print(f"viewer.json with a cold SEG read:               {seg_read * 1000:6.1f} ms")
    print(f"contour layer (every slice, slices cold):       {summary(contour_times)}")
    print(f"PNG size (abdomen window): median {statistics.median(sizes) / 1024:.0f} KiB")
    print(f"cache after the run: {len(SLICE_CACHE)} entries, {SLICE_CACHE.size_bytes / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
