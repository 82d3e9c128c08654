"""No patient data leaves the database and the DICOM files: a full run with distinctive patient values, then a
search of everything else the processes wrote or serve.

Two series whose PatientName, PatientID, PatientBirthDate and AccessionNumber are unlike anything else go
through `gatekeeper listen` → Celery workers (`gatekeeper worker`, its own process) → the pipeline: the normal
one is segmented and its SEG delivered to Orthanc, the hip prosthesis lands on the worklist. `gatekeeper web`
and `gatekeeper flower` run meanwhile, on a Redis of the test's own. Then every log file, every command Redis
received (MONITOR: the Celery messages, events and results as they passed) and every key left in it, Flower's
/api/tasks and /api/workers, and the /metrics of the web app and of the listener's and worker's
--metrics-port are searched for those values — raw, and inside base64 (kombu's message bodies): 0 hits.
The segmented series' PatientName has no caret ("DOE JANE"), which highdicom warns about quoting the
name while the SEG is built: the warning must not reach a log either (`service.logs`), which the
fast tests at the end also check in a process of their own.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pydicom
import pytest
import redis
from conftest import throwaway_redis
from ingest_support import (
    Db,
    ct_files,
    free_port,
    gatekeeper_executable,
    make_settings,
    storescu,
    upgrade,
    wait_for,
)
from test_e2e_pipeline import phantom, process, segmenter_dir, series_uid  # noqa: F401  (segmenter_dir: a fixture)
from test_pacs_export import orthanc

from service.lifecycle import SeriesState

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PATIENT = {
    "PatientName": "Zzyzx^Quornby",
    "PatientID": "PHI-7731-XQ",
    "PatientBirthDate": "19160229",  # a real 29 February
    "AccessionNumber": "ACC-99X1Q",
}
#: The segmented series' PatientName: no caret, so highdicom warns, quoting it, while building the SEG.
CARETLESS_NAME = "DOE JANE"
# What a leak could look like: each value, each name component, and the birth date as written by Python.
NEEDLES = ("Zzyzx", "Quornby", "PHI-7731-XQ", "19160229", "1916-02-29", "ACC-99X1Q", CARETLESS_NAME)
METRICS_TOKEN = "phi-scan-metrics-token"
FLOWER_AUTH = ("ops", "phi-scan-flower-password")
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{16,}={0,2}")


def with_patient(folder: Path, out: Path, **overrides: str) -> list[Path]:
    """Copies of the CT files of `folder` carrying the distinctive patient values (`overrides` by keyword)."""
    out.mkdir(parents=True)
    paths = []
    for path in ct_files(folder):
        dataset = pydicom.dcmread(path)
        for keyword, value in {**PATIENT, **overrides}.items():
            setattr(dataset, keyword, value)
        dataset.save_as(out / path.name)
        paths.append(out / path.name)
    return paths


def readable(blob: bytes) -> bytes:
    """`blob` plus the decoded form of every base64 run in it (kombu sends message bodies in base64)."""
    decoded = []
    for run in _BASE64_RUN.findall(blob):
        try:
            decoded.append(base64.b64decode(run + b"=" * (-len(run) % 4)))
        except (binascii.Error, ValueError):
            continue
    return blob + b"\n" + b"\n".join(decoded)


def redis_snapshot(url: str) -> bytes:
    """Every key of the Redis database at `url`, with its whole value, whatever its type."""
    client = redis.Redis.from_url(url)
    parts = []
    for key in client.scan_iter("*", count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "list":
            values = list(client.lrange(key, 0, -1))
        elif kind == "hash":
            values = [b"%s=%s" % kv for kv in client.hgetall(key).items()]
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = list(client.zrange(key, 0, -1))
        elif kind == "stream":
            values = [json.dumps(str(entry)).encode() for entry in client.xrange(key)]
        else:
            values = [kind.encode()]
        parts.append(key + b" => " + b" | ".join(values))
    return b"\n".join(parts)


@contextmanager
def redis_monitor(url: str, out: Path) -> Iterator[None]:
    """Record every command the Redis server at `url` receives (redis-cli MONITOR, line-buffered) into `out`."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    with out.open("wb") as sink:
        monitor = subprocess.Popen(
            ["stdbuf", "-oL", "redis-cli", "-p", port, "monitor"], stdout=sink, stderr=subprocess.STDOUT
        )
        try:
            wait_for(lambda: out.stat().st_size > 0, timeout=30)  # "OK": recording
            yield
        finally:
            monitor.terminate()
            monitor.wait(timeout=10)


def http_get(url: str, **kwargs: object) -> str | None:
    try:
        response = httpx.get(url, timeout=10, **kwargs)  # type: ignore[arg-type]
    except httpx.TransportError:
        return None
    return response.text if response.status_code == 200 else None


def test_no_patient_data_in_logs_broker_flower_or_metrics(
    tmp_path: Path,
    postgres_db_url: str,
    segmenter_dir: Path,  # noqa: F811  (the fixture imported above)
) -> None:
    upgrade(postgres_db_url)
    normal = with_patient(
        phantom(tmp_path / "normal", anomaly="none", seed=5, slices=30),
        tmp_path / "normal-phi",
        PatientName=CARETLESS_NAME,
    )
    hip = with_patient(phantom(tmp_path / "hip", anomaly="hip_prosthesis", seed=6, slices=30), tmp_path / "hip-phi")
    uids = {"normal": series_uid(normal[0].parent), "hip": series_uid(hip[0].parent)}
    logs = tmp_path / "logs"
    logs.mkdir()
    db = Db(postgres_db_url)
    listener_metrics, worker_metrics = free_port(), free_port()
    with ExitStack() as stack:
        redis_url = stack.enter_context(throwaway_redis())  # every key in it is this test's
        pacs = stack.enter_context(orthanc(tmp_path / "orthanc"))
        pacs.start()
        settings = make_settings(
            tmp_path / "var",
            postgres_db_url,
            redis_url,
            pacs_host="127.0.0.1",
            pacs_port=pacs.dicom_port,
            pacs_ae_title="ORTHANC",
            export_timeout_s=10,
            segmenter_model_dir=segmenter_dir,
            pipeline_sweep_interval_s=1,
            web_port=free_port(),
            web_secret_key="phi-scan-" + "k" * 40,
            flower_port=free_port(),
            flower_user=FLOWER_AUTH[0],
            flower_password=FLOWER_AUTH[1],
            metrics_token=METRICS_TOKEN,
            metrics_ae_title_labels=True,  # AE titles are no patient data: search the most talkative scrape
        )
        stack.enter_context(redis_monitor(redis_url, logs / "redis-monitor.txt"))
        # Flower first: it asks the workers to send task events, which is what it shows.
        # Every process at its most talkative (--verbose: DEBUG, pynetdicom's narration included).
        gatekeeper = [gatekeeper_executable(), "--verbose"]
        start = {
            "flower": [*gatekeeper, "flower"],
            "listener": [*gatekeeper, "listen", "--metrics-port", str(listener_metrics)],
            "worker": [*gatekeeper, "worker", "--metrics-port", str(worker_metrics)],
            "web": [*gatekeeper, "web"],
        }
        for name, command in start.items():
            stack.enter_context(process(command, settings, logs / f"{name}.log"))
        flower = f"http://127.0.0.1:{settings.flower_port}"
        wait_for(lambda: http_get(f"{flower}/api/workers", auth=FLOWER_AUTH), timeout=90, interval=0.5)
        metrics_auth = {"Authorization": f"Bearer {METRICS_TOKEN}"}
        wait_for(
            lambda: http_get(f"http://127.0.0.1:{listener_metrics}/metrics", headers=metrics_auth),
            timeout=90,
            interval=0.5,
        )

        for files in (normal, hip):
            sent = storescu(settings.port, files)
            assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]

        def states() -> dict[str, str | None]:
            return {name: (rows[-1].state if (rows := db.series(uid)) else None) for name, uid in uids.items()}

        wait_for(
            lambda: states() == {"normal": SeriesState.DELIVERED, "hip": SeriesState.WORKLISTED},
            timeout=300,
            interval=0.5,
        )
        # The patient values did go through: the database keeps them (for the worklist's display).
        assert {name: {s.patient_name for s in db.series(uid)} for name, uid in uids.items()} == {
            "normal": {CARETLESS_NAME},
            "hip": {PATIENT["PatientName"]},
        }
        ids = {name: db.series(uid)[-1].id for name, uid in uids.items()}

        # Flower saw the pipeline's tasks (events on), so searching its API means something.
        flower_tasks = wait_for(
            lambda: (text := http_get(f"{flower}/api/tasks", auth=FLOWER_AUTH)) and "score_series" in text and text,
            timeout=60,
            interval=1,
        )
        served = {
            "flower /api/tasks": flower_tasks,
            "flower /api/workers": http_get(f"{flower}/api/workers?refresh=1", auth=FLOWER_AUTH) or "",
            "web /metrics": http_get(f"http://127.0.0.1:{settings.web_port}/metrics", headers=metrics_auth) or "",
            "listen --metrics-port": http_get(f"http://127.0.0.1:{listener_metrics}/metrics", headers=metrics_auth)
            or "",
            "worker --metrics-port": http_get(f"http://127.0.0.1:{worker_metrics}/metrics", headers=metrics_auth) or "",
        }
        for name in ("web /metrics", "listen --metrics-port", "worker --metrics-port"):
            assert "gatekeeper_instances_received_total" in served[name], name
        redis_keys = redis_snapshot(redis_url)
        time.sleep(0.5)  # the last commands reach the monitor's file
    monitor = (logs / "redis-monitor.txt").read_bytes()

    places: dict[str, bytes] = {name: text.encode() for name, text in served.items()}
    places["redis keys"] = readable(redis_keys)
    places["redis monitor"] = readable(monitor)
    for path in [*logs.glob("*.log"), *settings.storage_dir.rglob("*.log")]:  # not Orthanc's: the PACS may
        places[str(path.relative_to(tmp_path))] = path.read_bytes()
    # The Celery messages were in what we searched, decoded: task names in the headers, series ids in the bodies.
    assert b"gatekeeper.pipeline.process_series" in places["redis monitor"]
    assert b"[[%d]" % ids["normal"] in places["redis monitor"] and b"[[%d]" % ids["hip"] in places["redis monitor"]
    assert b"instance" in places["logs/listener.log"] and b"score_series" in places["logs/worker.log"]

    leaks = [
        f"{needle!r} in {place}" for place, blob in places.items() for needle in NEEDLES if needle.encode() in blob
    ]
    assert leaks == []
    db.close()


# --- warnings (fast: a process of their own) -------------------------------------------------------

WARN = """
import warnings
{setup}
from highdicom.valuerep import check_person_name
check_person_name("DOE JANE")  # highdicom: `The string "DOE JANE" is unlikely to represent ...`
warnings.warn('attribute PatientName "DOE JANE" looks odd', UserWarning)  # any library's warning
warnings.warn("attribute PatientID 'PHI-7731-XQ' looks odd", UserWarning)
"""


def run_warnings(setup: str) -> str:
    """Everything a fresh Python process writes while two libraries warn about patient values."""
    result = subprocess.run(
        [sys.executable, "-c", WARN.format(setup=setup)], capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout + result.stderr


def test_warnings_that_quote_patient_values_never_reach_the_log() -> None:
    unprotected = run_warnings("")
    assert "DOE JANE" in unprotected and "PHI-7731-XQ" in unprotected  # what Python does by itself
    logged = run_warnings("from service.logs import configure_logging\nconfigure_logging()")
    leaks = [needle for needle in (CARETLESS_NAME, "DOE", "JANE", "PHI-7731-XQ") if needle in logged]
    assert leaks == [], logged
    assert logged.count("WARNING py.warnings") == 2 and 'attribute PatientName "…" looks odd' in logged, logged
    assert "unlikely to represent" not in logged  # highdicom's is silenced outright
