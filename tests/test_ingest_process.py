"""The listener and the worker as separate processes: kill -9 in the middle of a push, lost broker
messages, a real PACS (Orthanc) pushing a study."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from ingest_support import (
    STORESCU,
    Db,
    clone_series,
    ct_files,
    free_port,
    gatekeeper_executable,
    listener_process,
    make_phantom,
    make_settings,
    running_listener,
    settings_env,
    storescu,
    upgrade,
    wait_for,
)
from pydicom import dcmread

from service.celery_app import CeleryPublisher, Next, make_celery_app
from service.lifecycle import SeriesState

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def acknowledged_files(storescu_output: str) -> list[Path]:
    """Files for which storescu (-v) printed a success response, in order."""
    acknowledged, current = [], None
    for line in storescu_output.splitlines():
        if match := re.search(r"Sending file: (.+)$", line):
            current = Path(match.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            current = None
    return acknowledged


def test_kill_9_mid_push_loses_no_acknowledged_instance_and_retry_queues_once(
    tmp_path: Path, postgres_db_url: str, redis_url: str
) -> None:
    upgrade(postgres_db_url)
    [source] = make_phantom(tmp_path / "phantom", slices=10, seed=21)
    files = clone_series(source, tmp_path / "series300", 300)
    settings = make_settings(tmp_path / "var", postgres_db_url, redis_url, quiet_period_s=4.0, sweeper_interval_s=0.3)
    db = Db(postgres_db_url)

    def stored_count() -> int:
        series = db.series()
        return series[0].num_instances if series else 0

    with listener_process(settings, tmp_path / "listener1.log") as listener:
        sender = subprocess.Popen(
            [STORESCU, "-v", "-aec", "GATEKEEPER", "127.0.0.1", str(settings.port), *map(str, files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for(lambda: stored_count() >= 100, timeout=120, interval=0.02)
        os.kill(listener.pid, signal.SIGKILL)
        listener.wait()
        output, _ = sender.communicate(timeout=60)
    acknowledged = acknowledged_files(output)
    # The kill came once 100 instances were indexed. Responses for the last of them may still have been on
    # their way (one, or a group commit's worth), so the sender saw fewer than 100 acknowledgements but many,
    # and not all 300: a kill mid-push, which is what this test is about.
    assert sender.returncode != 0 and 50 <= len(acknowledged) < 300, output[-2000:]

    [series] = db.series()
    instances = {i.sop_instance_uid: i for i in db.instances(series.id)}
    for path in acknowledged:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert uid in instances, f"acknowledged {path.name} is not in the database"
        stored = settings.storage_dir / instances[uid].relative_path
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == instances[uid].sha256
        assert dcmread(stored).PixelData == dcmread(path).PixelData
    assert series.state == SeriesState.RECEIVING

    # Restart; the sender retries the whole series.
    with listener_process(settings, tmp_path / "listener2.log"):
        retry = storescu(settings.port, files, timeout=300)
        assert retry.returncode == 0, retry.stdout[-2000:] + retry.stderr[-2000:]
        [series] = wait_for(lambda: [s for s in db.series() if s.state == SeriesState.QUEUED], timeout=60)
        time.sleep(1.0)  # a second round of the assembler must not queue again
    assert len(db.series()) == 1 and series.version == 1
    assert series.num_instances == 300 and len(db.instances(series.id)) == 300
    assert db.event_kinds(series.id).count("queued") == 1
    assert redis.Redis.from_url(redis_url).llen(settings.pipeline_queue) == 1
    db.close()


def test_worker_takes_the_series_and_sweeper_resends_a_lost_message(
    tmp_path: Path, postgres_db_url: str, redis_url: str
) -> None:
    upgrade(postgres_db_url)
    [folder] = make_phantom(tmp_path / "phantom", slices=4, seed=8)
    # Resend after 6 s: with no worker the listener re-publishes a queued series every resend period, so the
    # test must see the first message (queue length 1) within one period — 1.5 s was missed on a loaded machine
    # (the queue had grown to 2, then 3, … before the test's first look).
    settings = make_settings(tmp_path / "var", postgres_db_url, redis_url, queue_resend_after_s=6.0)
    broker = redis.Redis.from_url(redis_url)
    db = Db(postgres_db_url)
    with running_listener(settings) as listener:
        assert storescu(listener.port, ct_files(folder)).returncode == 0
        [series] = wait_for(lambda: [s for s in db.series() if s.state == SeriesState.QUEUED])
        # The state is committed before the message is published: wait for it to land.
        wait_for(lambda: broker.llen(settings.pipeline_queue) == 1)
        broker.delete(settings.pipeline_queue)  # the broker restarted without persistence: message lost
        [series] = wait_for(lambda: [s for s in db.series() if s.queue_attempts == 2])
        wait_for(lambda: broker.llen(settings.pipeline_queue) == 1)
        assert series.state == SeriesState.QUEUED
        # The event is written once the broker took the message, a moment after the publish.
        wait_for(lambda: db.event_kinds(series.id)[-2:] == ["queued", "requeued"])

        # A worker on the light queue only: it takes the series (start stage) and queues its scoring.
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [gatekeeper_executable(), "worker", "--queues", "default"],
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: db.series()[0].state == SeriesState.SCORING, timeout=60)
            wait_for(lambda: broker.llen(settings.score_queue) == 1)
            # A redelivered message changes nothing (the task is idempotent).
            CeleryPublisher(make_celery_app(settings), settings).publish(Next("start", series.id), attempt=9)
            wait_for(lambda: broker.llen(settings.pipeline_queue) == 0, timeout=30)
            time.sleep(1.0)
        finally:
            worker.terminate()
            worker.wait(timeout=30)
            log.close()
    assert db.series()[0].state == SeriesState.SCORING
    assert db.event_kinds(series.id).count("scoring") == 1
    assert broker.llen(settings.score_queue) == 1  # the score stage was queued once
    assert (
        "service.pipeline.starting: series id" in (tmp_path / "worker.log").read_text()
    )  # our log lines are not swallowed
    broker.delete(settings.score_queue)
    db.close()


def orthanc_executable() -> str:
    path = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    assert Path(path).exists(), "Orthanc is not installed (make system-deps)"
    return path


def test_orthanc_pushes_a_study_through_its_rest_api(tmp_path: Path, postgres_db_url: str, redis_url: str) -> None:
    upgrade(postgres_db_url)
    [folder] = make_phantom(tmp_path / "phantom", slices=5, seed=13)
    settings = make_settings(
        tmp_path / "var", postgres_db_url, redis_url, allowed_ae_titles=["ORTHANC"], quiet_period_s=2.0
    )
    http_port = free_port()
    config = {
        "Name": "test-pacs",
        "StorageDirectory": str(tmp_path / "orthanc-db"),
        "IndexDirectory": str(tmp_path / "orthanc-db"),
        "HttpPort": http_port,
        "DicomPort": free_port(),
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
        "DicomModalities": {"gatekeeper": ["GATEKEEPER", "127.0.0.1", settings.port]},
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    log = (tmp_path / "orthanc.log").open("wb")
    orthanc = subprocess.Popen(
        [orthanc_executable(), str(tmp_path / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    db = Db(postgres_db_url)
    base = f"http://127.0.0.1:{http_port}"

    def rest(path: str, body: bytes | None = None) -> object:
        request = urllib.request.Request(base + path, data=body, method="POST" if body is not None else "GET")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def orthanc_up() -> bool:
        try:
            rest("/system")
            return True
        except OSError:
            assert orthanc.poll() is None, (tmp_path / "orthanc.log").read_text()
            return False

    try:
        wait_for(orthanc_up, timeout=60)
        for path in ct_files(folder):
            rest("/instances", path.read_bytes())
        [study] = rest("/studies")  # type: ignore[misc]
        with running_listener(settings):
            answer = rest(
                "/modalities/gatekeeper/store", json.dumps({"Resources": [study], "Synchronous": True}).encode()
            )
            assert answer["FailedInstancesCount"] == 0 and answer["InstancesCount"] == 5, answer  # type: ignore[index]
            [series] = wait_for(lambda: [s for s in db.series() if s.state == SeriesState.QUEUED])
        assert series.num_instances == 5 and series.calling_ae_title == "ORTHANC"
    finally:
        orthanc.terminate()
        orthanc.wait(timeout=30)
        log.close()
        db.close()
