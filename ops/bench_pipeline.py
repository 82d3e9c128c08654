"""Pipeline benchmark: latency to a delivered SEG, and the score worker's peak memory.

    .venv/bin/python ops/bench_pipeline.py [--work DIR] [--latency-slices 200] [--rss-slices 300]
                                           [--segmenter MODEL_DIR]

1. **Latency.** `gatekeeper serve --no-web` (SQLite, embedded broker, one worker on every queue:
   the single-machine setup) exports to a throwaway Orthanc. DCMTK storescu pushes one 512×512 CT
   series of `--latency-slices` slices. Measured from the last instance received
   (`Series.last_received_at`) to the PACS's acceptance of the SEG (`Export.delivered_at`), and
   the same minus the quiet period (the time the pipeline itself takes).
2. **Peak RSS.** Fresh processes run each worker stage's work on the stored 512×512 series of
   `--rss-slices` slices and report their peak resident memory (`ru_maxrss`) and the part before the
   series was read: the score stage (read, score every slice in batches of `score_batch`, keep the
   top residual maps) and the segment stage as the gate runs it (read, segment, the test-time views
   and every signal of `service.gate`, the decision). The segment stage is also timed against a
   reference measured in the same run: the segmenter alone on the same series (one view, no gate),
   so the ratio says what the gate's extra segmentations and signals cost.

The latency series is a normal phantom, scored by a copy of the detector whose threshold cannot be
reached; it is timed to its outcome (SEG delivered, or worklisted with the gate's draft kept — always
segmented first). The RSS series is a normal phantom whose range covers the whole liver.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from service import dcmtk  # noqa: E402

# DCMTK's tools, not the pynetdicom console scripts of the same names (service/dcmtk.py).
STORESCU = dcmtk.tool("storescu") or "storescu"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def make_series(work: Path, slices: int) -> list[Path]:
    """A normal 512² phantom of `slices` slices whose range covers the liver (the gate runs every view on it)."""
    from ingest_support import ct_files, make_phantom

    shutil.rmtree(work / "series", ignore_errors=True)
    [folder] = make_phantom(work / "series", slices=slices, seed=11, matrix=512)
    manifest = json.loads((work / "series" / "manifest.json").read_text())
    assert manifest["series"][0]["scan_range"]["liver"] == "complete", manifest["series"][0]["scan_range"]
    return ct_files(folder)


def latency(work: Path, slices: int, segmenter: str | None) -> dict:
    from ingest_support import ct_files, make_phantom
    from sqlalchemy import select

    from service.db.session import make_engine, make_session_factory
    from service.db.tables import Export, Series
    from service.settings import Settings, settings_environment

    # A real normal phantom (clones repeat anatomy and are flagged by the detector, which is right).
    [folder] = make_phantom(work / "normal", slices=slices, seed=11, matrix=512)
    files = ct_files(folder)
    orthanc_http, orthanc_dicom, port = free_port(), free_port(), free_port()
    config = {
        "Name": "bench-pacs",
        "StorageDirectory": str(work / "orthanc"),
        "IndexDirectory": str(work / "orthanc"),
        "HttpPort": orthanc_http,
        "DicomPort": orthanc_dicom,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    orthanc = subprocess.Popen(
        [shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(work / "orthanc.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    values = dict(
        storage_dir=work / "var",
        port=port,
        quiet_period_s=2.0,
        allowed_ae_titles=["BENCH"],
        allowed_networks=["127.0.0.0/8"],
        pacs_host="127.0.0.1",
        pacs_port=orthanc_dicom,
        pacs_ae_title="ORTHANC",
        min_free_disk_bytes=0,
        max_disk_used_fraction=1.0,
    )
    if segmenter:
        values["segmenter_model_dir"] = Path(segmenter)
    # The shipped (undertrained) detector flags long normal phantoms (its training series had 48
    # slices); the timing of the SEG path does not depend on the threshold, so a copy with an
    # unreachable threshold routes the series to auto-segmentation. Scoring runs in full.
    from service.settings import Settings as _S

    detector = work / "detector"
    shutil.copytree(_S().detector_model_dir, detector, dirs_exist_ok=True)
    meta = json.loads((detector / "model.json").read_text())
    meta["threshold"] = 1e9
    (detector / "model.json").write_text(json.dumps(meta))
    values["detector_model_dir"] = detector
    settings = Settings(**values)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEKEEPER_")} | settings_environment(settings)
    log = (work / "serve.log").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "service.commands.main", "serve", "--no-web"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait(up, 90, "the listener")
        subprocess.run(
            [
                dcmtk.tool("storescu") or "storescu",
                "-aet",
                "BENCH",
                "-aec",
                "GATEKEEPER",
                "127.0.0.1",
                str(port),
                *map(str, files),
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        engine = make_engine(settings.database_url)
        sessions = make_session_factory(engine)

        def outcome():  # type: ignore[no-untyped-def]
            with sessions() as session:
                series = session.scalars(select(Series)).first()
                if series is None:
                    return None
                if series.state == "worklisted":  # the gate's decision; its draft SEG was written first
                    return series.last_received_at, series.state_changed_at, f"worklisted ({series.route_reason})"
                row = session.execute(
                    select(Export.delivered_at).where(Export.series_id == series.id, Export.delivered_at.is_not(None))
                ).first()
                return (series.last_received_at, row[0], "SEG delivered") if row else None

        last_received, settled_at, what = wait(outcome, 300, "the series' outcome")
        engine.dispose()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
        orthanc.terminate()
        orthanc.wait(timeout=30)
        log.close()
    total = (settled_at - last_received).total_seconds()
    return {
        "slices": slices,
        "outcome": what,
        "latency_s": total,
        "pipeline_s": total - settings.quiet_period_s,
        "quiet_period_s": settings.quiet_period_s,
    }


SCORE_CHILD = r"""
import json, resource, sys
from pathlib import Path
from service.inference import load_detector
from service.pipeline import load_stored_series, save_top_residual_maps
from service.settings import Settings
settings = Settings(storage_dir=Path(sys.argv[2]))
detector = load_detector(settings.detector_model_dir, batch=settings.score_batch)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
series = load_stored_series(sorted(Path(sys.argv[1]).glob("*.dcm")))
result = detector.score_series(series, keep_maps=True)
del series
slices = [{"index": i, "sop_instance_uid": s.sop_instance_uid, "score": s.score} for i, s in enumerate(result.slices)]
save_top_residual_maps(settings=settings, series_id=1, model_version=detector.version, slices=slices,
                       residual_maps=result.residual_maps)
print(json.dumps({"models_mb": before / 1024, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

# The segment stage's work as the gate runs it ("gate"), or the segmenter alone ("reference").
SEGMENT_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from service.gate import Gate
from service.pipeline import load_stored_series
from service.segmentation import Segmenter
from service.settings import Settings
settings = Settings(storage_dir=Path(sys.argv[2]))
segmenter = Segmenter(settings.segmenter_model_dir)
gate_json = settings.gate_model_dir / "gate.json"
gate = Gate.load(settings.gate_model_dir) if gate_json.is_file() else Gate.rules_only()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
series = load_stored_series(sorted(Path(sys.argv[1]).glob("*.dcm")))
if sys.argv[3] == "gate":
    decision = gate.assess(series=series, segmenter=segmenter, detector=None).decision.manual
else:
    decision = segmenter.segment(series).mask.any()
seconds = time.perf_counter() - t0
print(json.dumps({"models_mb": before / 1024, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "stage_s": seconds, "gate_version": gate.version}))
"""


def run_child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, cwd=ROOT)
    result: dict = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def peak_rss(work: Path, slices: int) -> dict:
    files = make_series(work, slices)
    folder, var = str(files[0].parent), str(work / "rss-var")
    return {
        "slices": slices,
        "score": run_child(SCORE_CHILD, folder, var),
        "reference": run_child(SEGMENT_CHILD, folder, var, "reference"),
        "gate": run_child(SEGMENT_CHILD, folder, var, "gate"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--latency-slices", type=int, default=200)
    parser.add_argument("--rss-slices", type=int, default=300)
    parser.add_argument("--segmenter", default=None, help="segmenter model folder (default: the shipped one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="gatekeeper-bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    lat = latency(work / "latency", args.latency_slices, args.segmenter)
    rss = peak_rss(work / "rss", args.rss_slices)
    print("| measurement | value | target | |\n|---|---|---|---|")
    print(
        f"| last instance → outcome ({lat['outcome']}), {lat['slices']} slices 512² | {lat['latency_s']:.1f} s "
        f"(quiet period {lat['quiet_period_s']:g} s + pipeline {lat['pipeline_s']:.1f} s) | ≤ 60 s | "
        f"{'met' if lat['latency_s'] <= 60 else 'missed'} |"
    )
    for stage in ("score", "gate"):
        r = rss[stage]
        print(
            f"| {stage if stage == 'score' else 'segment + gate'} worker peak RSS, {rss['slices']} slices 512² | "
            f"{r['peak_mb']:.0f} MB (models loaded: {r['models_mb']:.0f} MB) | ≤ 2048 MB | "
            f"{'met' if r['peak_mb'] <= 2048 else 'missed'} |"
        )
    gate, ref = rss["gate"], rss["reference"]
    print(
        f"| segment stage with the gate (gate {gate['gate_version']}) vs the segmenter alone, {rss['slices']} "
        f"slices 512² | {gate['stage_s']:.1f} s vs {ref['stage_s']:.1f} s: {gate['stage_s'] / ref['stage_s']:.2f}× "
        f"| — | |"
    )
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
