"""Scaling out: two workers on "two hosts" share the database, the broker and the storage folder.

Host A takes the queues default, score and segment; host B default, score and export (node names
`gatekeeper@host-a` and `gatekeeper@host-b`, given with `gatekeeper worker --hostname`). Both
read the instances the listener wrote into the one storage folder (NFS-style: the same path on
every host). Four normal series are pushed; the series events name the worker of each stage, so
the test sees the work divided — every segmentation on A, every delivery on B, the scoring wherever
a worker was free — and each series scored, segmented and delivered exactly once.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pydicom
import pytest
import redis
from ingest_support import (
    Db,
    clone_series,
    ct_files,
    free_port,
    gatekeeper_executable,
    listener_process,
    make_settings,
    storescu,
    upgrade,
    wait_for,
)
from sqlalchemy import func, select
from test_e2e_pipeline import process
from test_outage import phantom_series
from test_pacs_export import orthanc

from service.db.tables import Export, SeriesEvent, SeriesScore
from service.lifecycle import SeriesState

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOST_A, HOST_B = "gatekeeper@host-a", "gatekeeper@host-b"
SERIES, SLICES = 4, 12


def test_two_workers_with_different_queues_divide_the_work_and_finish_each_series_once(
    tmp_path: Path, postgres_db_url: str, redis_url: str
) -> None:
    upgrade(postgres_db_url)
    source = phantom_series(tmp_path / "phantom", slices=SLICES, seed=5)  # a normal series: route auto
    folders = [source]
    for n in range(1, SERIES):
        clone_series(source, tmp_path / f"clone{n}", SLICES)
        folders.append(tmp_path / f"clone{n}")
    uids = [str(pydicom.dcmread(ct_files(f)[0], stop_before_pixels=True).SeriesInstanceUID) for f in folders]
    db = Db(postgres_db_url)

    with orthanc(tmp_path / "orthanc") as pacs:
        pacs.start()
        settings = make_settings(
            tmp_path / "shared",  # the storage path every host mounts
            postgres_db_url,
            redis_url,
            pacs_host="127.0.0.1",
            pacs_port=pacs.dicom_port,
            pacs_ae_title="ORTHANC",
            export_timeout_s=10,
            export_queue=f"test.export.{tmp_path.name}.{free_port()}",
            # No sweeper rounds after the first: every stage here is settled by the worker that did it.
            pipeline_sweep_interval_s=3600,
        )
        worker = [gatekeeper_executable(), "worker"]
        with (
            listener_process(settings, tmp_path / "listener.log"),
            process([*worker, "--queues", "default,score,segment", "--hostname", HOST_A], settings, tmp_path / "a.log"),
            process([*worker, "--queues", "default,score,export", "--hostname", HOST_B], settings, tmp_path / "b.log"),
        ):
            # Both consume before anything arrives, so that either can take the first series.
            for log in ("a.log", "b.log"):
                wait_for(lambda log=log: " ready." in (tmp_path / log).read_text(), timeout=180, interval=0.5)
            for folder in folders:
                sent = storescu(settings.port, ct_files(folder))
                assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
            wait_for(
                lambda: (
                    [s.state for s in db.series() if s.series_instance_uid in uids] == [SeriesState.DELIVERED] * SERIES
                ),
                timeout=300,
                interval=0.5,
            )

        with db.sessions() as session:
            series_ids = [s.id for s in db.series() if s.series_instance_uid in uids]
            events = session.execute(
                select(SeriesEvent.series_id, SeriesEvent.kind, SeriesEvent.detail)
                .where(SeriesEvent.series_id.in_(series_ids))
                .order_by(SeriesEvent.id)
            ).all()
            scores = session.execute(select(SeriesScore.series_id, func.count()).group_by(SeriesScore.series_id)).all()
            exports = list(session.scalars(select(Export).where(Export.series_id.in_(series_ids))))
        for export in exports:
            assert len(pacs.instances_with_uid(export.sop_instance_uid)) == 1

    # Which host did each stage of each series: exactly one each, on a host that consumes its queue.
    by_stage: dict[str, list[str]] = collections.defaultdict(list)
    per_series: dict[tuple[int, str], int] = collections.Counter()
    for series_id, kind, detail in events:
        if kind in ("scoring", "scored", "exporting", "delivered"):
            by_stage[kind].append(detail["worker"])
            per_series[(series_id, kind)] += 1
    assert set(per_series.values()) == {1} and len(per_series) == 4 * SERIES, per_series
    assert set(by_stage["scoring"]) <= {HOST_A, HOST_B} and set(by_stage["scored"]) <= {HOST_A, HOST_B}
    assert by_stage["exporting"] == [HOST_A] * SERIES  # only host A segments
    assert by_stage["delivered"] == [HOST_B] * SERIES  # only host B delivers
    assert sorted(count for _, count in scores) == [1] * SERIES and len(exports) == SERIES
    print(
        "scored by",
        dict(collections.Counter(by_stage["scored"])),
        "started by",
        dict(collections.Counter(by_stage["scoring"])),
    )
    broker = redis.Redis.from_url(redis_url)
    for name in (settings.score_queue, settings.segment_queue, settings.export_queue, settings.pipeline_queue):
        broker.delete(name)
    db.close()


def test_worker_hostname_without_a_host_part_is_a_usage_error(tmp_path: Path) -> None:
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEKEEPER_")}
    env["GATEKEEPER_STORAGE_DIR"] = str(tmp_path)
    done = subprocess.run(
        [gatekeeper_executable(), "worker", "--hostname", "just-a-name"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "gatekeeper worker: error: --hostname must look like NAME@HOST, got 'just-a-name'"
    ]
