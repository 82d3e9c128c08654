"""Chaos matrix: series stream in while every process of the product is killed or restarted, seeded.

    .venv/bin/python ops/chaos.py [--runs 1] [--seed 0] [--series 4] [--rounds 1] [--slices 12] [--interval-s 3]
                                  [--settle-s 240] [--out DIR] [--json FILE] [--keep]

Everything runs here, in throwaway instances the harness starts and owns: a PostgreSQL server
(its own cluster on a free port), a Redis server (no persistence: a restart loses every queued
message), Orthanc as the PACS, `gatekeeper listen`, and one `gatekeeper worker` per pipeline stage
(`default,score`, `segment`, `export`) — supervised like systemd's Restart=always, so a killed
process comes back after a second. A sender thread plays the hospital's PACS: it pushes small
phantom series with DCMTK `storescu` at a steady pace and re-sends whatever was not acknowledged
(refused while the database was away, or cut off by a killed listener), as a PACS does.

Per run, each disruption below happens once (`--rounds` times) at a seeded random moment of the
streaming window (a kill waits, briefly, for its target to have work — a stage with a series in
it, an export pending, the listener in the middle of an association — so that most land mid-task):

    kill_listener        kill -9 `gatekeeper listen` (restarted by the supervisor)
    kill_score_worker    kill -9 the worker of the default + score queues
    kill_segment_worker  kill -9 the worker of the segment queue
    kill_export_worker   kill -9 the worker of the export queue
    restart_redis        kill -9 Redis, start it again empty
    restart_postgres     `pg_ctl stop -m immediate` (a crash), start again (crash recovery)
    stop_orthanc         stop the PACS for a few seconds, start it again

Then the run settles (at most `--settle-s`) and is checked:

1. every instance `storescu` saw acknowledged is indexed (`Instance`) and on disk with its sha256;
2. every current (not superseded) series version is in one of `service.lifecycle.FINAL_STATES`,
   having entered it exactly once (its events);
3. no duplicate SEG/RTSTRUCT in Orthanc: each object there is one of our exports, at most one per
   series version, each delivered export present once;
4. nothing on the worklist twice (per series version, and per series among current versions).

Prints one line per run and a summary; `--json` writes every event and check. Exit code 0 when
every check of every run passed, 1 otherwise. The harness never touches the machine's own
PostgreSQL, Redis or Orthanc.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import ipaddress
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from sqlalchemy import select  # noqa: E402

from service import dcmtk  # noqa: E402
from service.db.session import make_engine, make_session_factory  # noqa: E402
from service.db.tables import Export, ExportState, Instance, Series, SeriesEvent, WorklistItem  # noqa: E402
from service.lifecycle import FINAL_STATES  # noqa: E402
from service.settings import Settings, settings_environment  # noqa: E402

GATEKEEPER = str(Path(sys.executable).parent / "gatekeeper")
SENDER_AE = "CHAOSPACS"
STORESCU = dcmtk.tool("storescu")  # DCMTK's, not the pynetdicom script of that name
EVENT_KINDS = (
    "kill_listener",
    "kill_score_worker",
    "kill_segment_worker",
    "kill_export_worker",
    "restart_redis",
    "restart_postgres",
    "stop_orthanc",
)
#: The worker processes: name → the queues it takes (`gatekeeper worker --queues`).
WORKERS = {"score": "default,score", "segment": "segment", "export": "export"}
#: The series state that means "this stage has work", for aiming a worker kill (export: a pending export).
BUSY_STATE = {"score": "scoring", "segment": "segmenting"}
#: Series events that move a series version into a final state (the worklist's carry route "worklist").
FINAL_EVENT_KINDS = {state.value for state in FINAL_STATES}
WORKLIST_EVENT_KINDS = {"routed", "rerouted", "gave_up"}


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def log_says(path: Path, text: str) -> bool:
    return text in path.read_text(errors="replace")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


# --- the servers the harness owns ------------------------------------------------------------------


class Postgres:
    """A PostgreSQL cluster of our own on a free port; `crash` stops it like a power cut."""

    def __init__(self, workdir: Path) -> None:
        candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[4]))
        initdb = candidates[-1] if candidates else Path(shutil.which("initdb") or "initdb")
        self.bindir = initdb.parent
        self.workdir = workdir
        self.workdir.mkdir(parents=True)
        self.as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            account = pwd.getpwnam("postgres")
            os.chown(self.workdir, account.pw_uid, account.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.data = self.workdir / "data"
        subprocess.run(
            [*self.as_user, str(initdb), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync"],
            check=True,
            capture_output=True,
        )
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off"
        subprocess.run(
            [*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options]
            + ["-l", str(self.workdir / "log"), "-w", "-t", "120", "start"],
            check=True,
            capture_output=True,
        )

    def crash(self) -> None:
        subprocess.run(
            [*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
            check=False,
            capture_output=True,
        )

    def answers(self) -> bool:
        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


class Redis:
    """A Redis server of our own that keeps nothing on disk: a restart loses every message."""

    def __init__(self, workdir: Path) -> None:
        self.exe = shutil.which("redis-server") or "redis-server"
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, cwd=self.workdir)
        wait_until(lambda: port_open(self.port), 30, "redis-server")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Orthanc:
    """Orthanc as the PACS, on fixed free ports; its stored objects survive a stop."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "chaos-pacs",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [],
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        with (self.folder / "orthanc.log").open("ab") as out:
            self.process = subprocess.Popen([exe, str(self.folder / "orthanc.json")], stdout=out, stderr=out)
        wait_until(self._up, 60, "Orthanc")

    def _up(self) -> bool:
        try:
            self.rest("/system")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)

    def rest(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as response:
            return json.loads(response.read())


class Supervised:
    """A `gatekeeper` process that comes back after a second whenever it dies (systemd's Restart=always)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.command, self.env, self.log_path = name, command, env, log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.lock = threading.Lock()
        self.starts = 0

    def start(self) -> None:
        with self.lock:
            with self.log_path.open("ab") as out:
                self.process = subprocess.Popen(self.command, env=self.env, stdout=out, stderr=subprocess.STDOUT)
            self.starts += 1

    def kill9(self) -> bool:
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                return False
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
            return True

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        with self.lock:
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()


# --- series and the sender ---------------------------------------------------------------------------


def make_templates(folder: Path, slices: int) -> dict[str, list[Path]]:
    """A normal series (the rules-only gate auto-segments it) and a hip prosthesis (the detector flags it)."""
    from service.phantom.generate import DEFAULT_NOISE_SIGMA, generate_series, series_specs

    templates = {}
    for kind, seed, anomaly in (("normal", 5, None), ("hip", 6, "hip_prosthesis")):
        [spec] = series_specs(
            count=1, seed=seed, num_slices=slices, anomaly=anomaly, matrix=128, noise_sigma=DEFAULT_NOISE_SIGMA
        )
        generate_series(spec, folder / kind)
        templates[kind] = sorted((folder / kind / spec.folder).glob("CT*.dcm"))
    return templates


def clone(template: list[Path], out: Path) -> list[Path]:
    """The template's slices as a new series (new study, series and SOP Instance UIDs)."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i, source in enumerate(template):
        dataset = pydicom.dcmread(source)
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID = study, series
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = out / f"CT{i + 1:04d}.dcm"
        dataset.save_as(path)
        paths.append(path)
    return paths


@dataclass
class SentSeries:
    series_instance_uid: str
    kind: str
    files: list[Path]
    acknowledged: dict[str, Path] = field(default_factory=dict)  # SOP Instance UID → file
    associations: int = 0


def acknowledged_files(output: str) -> list[Path]:
    """Files for which storescu (-v) printed a success response."""
    acknowledged, current = [], None
    for line in output.splitlines():
        if match := re.search(r"Sending file: (.+)$", line):
            current = Path(match.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            current = None
    return acknowledged


def push_until_acknowledged(series: SentSeries, port: int, deadline: float, sending: threading.Event) -> None:
    """Send the series' files; re-send those not acknowledged (refused, cut off) until all are, as a PACS does.

    `sending` is set while an association is open (so that a listener kill can aim at it).
    """
    uid_of = {path: str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in series.files}
    while True:
        missing = [path for path in series.files if uid_of[path] not in series.acknowledged]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"series {series.series_instance_uid}: {len(missing)} instances never acknowledged")
        series.associations += 1
        sending.set()
        try:
            done = subprocess.run(
                [STORESCU, "-v", "-aet", SENDER_AE, "-aec", "GATEKEEPER", "-to", "10", "-ta", "10", "-td", "20"]
                + ["127.0.0.1", str(port), *map(str, missing)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            output = done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        finally:
            sending.clear()
        for path in acknowledged_files(output):
            series.acknowledged[uid_of[path]] = path
        if len(series.acknowledged) < len(series.files):
            time.sleep(1.0)  # the PACS's retry delay


# --- one run -------------------------------------------------------------------------------------------


@dataclass
class Event:
    kind: str
    at_s: float  # scheduled, seconds after streaming began
    started_s: float = 0.0
    down_s: float = 0.0
    busy: bool | None = None  # for kills: whether its target had work when it was killed
    hit: bool = True  # False: a kill found its process not running (it never came back in time)
    done: bool = False


@dataclass
class RunResult:
    run: int
    seed: int
    series: int
    instances_acknowledged: int
    associations: int
    events: list[Event]
    settled_s: float | None
    wall_s: float
    checks: dict[str, list[str]]  # check → problems (empty: passed)
    summary: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.settled_s is not None and not any(self.checks.values())


class Run:
    """One run: fresh database, storage, broker contents and PACS; the processes; the sender; the events."""

    def __init__(self, *, index: int, seed: int, args: argparse.Namespace, postgres: Postgres, redis: Redis) -> None:
        self.index, self.seed, self.args = index, seed, args
        self.rng = random.Random(seed)
        self.postgres, self.redis = postgres, redis
        self.folder = Path(args.out) / f"run-{index:02d}-seed-{seed}"
        self.folder.mkdir(parents=True)
        self.orthanc = Orthanc(self.folder / "orthanc")
        self.processes: dict[str, Supervised] = {}
        self.stop_supervising = threading.Event()
        self.hold: set[str] = set()  # processes the supervisor must not restart right now
        self.sending = threading.Event()  # the sender has an association open
        self.t0 = 0.0

    def settings(self, database_url: str) -> Settings:
        return Settings(
            storage_dir=self.folder / "storage",
            database_url=database_url,
            broker_url=self.redis.url,
            port=free_port(),
            allowed_ae_titles=[SENDER_AE],
            allowed_networks=[ipaddress.ip_network("127.0.0.0/8")],
            quiet_period_s=5.0,
            sweeper_interval_s=0.5,
            queue_resend_after_s=15.0,
            pipeline_stuck_after_s=self.args.stuck_after_s,
            pipeline_sweep_interval_s=2.0,
            min_free_disk_bytes=0,
            max_disk_used_fraction=1.0,
            pacs_host="127.0.0.1",
            pacs_port=self.orthanc.dicom_port,
            pacs_ae_title="ORTHANC",
            export_timeout_s=10.0,
            export_retry_initial_s=1.0,
            export_retry_max_s=4.0,
            export_retry_deadline_s=3600.0,
            log_level="INFO",
            # The rules-only gate (a folder without gate.json): the matrix checks that nothing is lost
            # or sent twice, not the decision; its short series cover only part of the liver, which
            # the shipped gate rightly sends to the worklist as "liver_partial".
            gate_model_dir=self.folder / "rules-only-gate",
        )

    def supervise(self) -> None:
        while not self.stop_supervising.wait(0.5):
            for name, process in self.processes.items():
                if name not in self.hold and not process.alive():
                    time.sleep(1.0)  # RestartSec=1
                    if not self.stop_supervising.is_set() and name not in self.hold and not process.alive():
                        process.start()

    def now_s(self) -> float:
        return time.monotonic() - self.t0

    def execute(self) -> RunResult:
        started = time.monotonic()
        templates = self.args.templates
        database_url = self.postgres.create_database(f"chaos_run_{self.index}")
        self.redis_client().flushall()
        settings = self.settings(database_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEKEEPER_")}
        env.update(settings_environment(settings))
        upgrade = subprocess.run([GATEKEEPER, "db", "upgrade"], env=env, capture_output=True, text=True, timeout=300)
        if upgrade.returncode != 0:
            raise RuntimeError(f"gatekeeper db upgrade failed: {upgrade.stderr[-2000:]}")
        self.orthanc.start()
        logs = self.folder / "logs"
        logs.mkdir()
        self.processes["listener"] = Supervised("listener", [GATEKEEPER, "listen"], env, logs / "listener.log")
        for name, queues in WORKERS.items():
            command = [GATEKEEPER, "worker", "--queues", queues, "--hostname", f"chaos-{name}@%h"]
            self.processes[name] = Supervised(name, command, env, logs / f"worker-{name}.log")
        for process in self.processes.values():
            process.start()
        supervisor = threading.Thread(target=self.supervise, name="supervisor", daemon=True)
        supervisor.start()
        engine = make_engine(database_url, pool_size=2)
        sessions = make_session_factory(engine)
        try:
            wait_until(lambda: port_open(settings.port), 180, "the listener")
            for name in WORKERS:
                wait_until(partial(log_says, logs / f"worker-{name}.log", " ready."), 300, f"worker {name}")

            # The series of this run: every third one a hip prosthesis (worklist), the rest normal (auto).
            sent = []
            for i in range(self.args.series):
                kind = "hip" if i % 3 == 2 else "normal"
                files = clone(templates[kind], self.folder / "series" / f"{i:02d}-{kind}")
                uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
                sent.append(SentSeries(uid, kind, files))
            window = self.args.series * self.args.interval_s + self.args.tail_s
            events = [
                Event(kind, round(self.rng.uniform(1.0, window), 2))
                for _ in range(self.args.rounds)
                for kind in EVENT_KINDS
            ]
            events.sort(key=lambda e: e.at_s)
            log(f"run {self.index} (seed {self.seed}): " + ", ".join(f"{e.kind}@{e.at_s:.0f}s" for e in events))

            self.t0 = time.monotonic()
            sender_error: list[BaseException] = []
            sender = threading.Thread(
                target=self.send_all, args=(sent, settings.port, sender_error), name="sender", daemon=True
            )
            sender.start()
            for event in events:
                while self.now_s() < event.at_s:
                    time.sleep(0.05)
                self.disrupt(event, sessions)
            sender.join(timeout=600)
            if sender.is_alive() or sender_error:
                raise RuntimeError(f"the sender did not finish: {sender_error}")

            # Settle: everything up again; every current series version final and no export pending.
            settle_began = time.monotonic()
            settled_s: float | None = None
            uids = {s.series_instance_uid for s in sent}
            try:
                wait_until(lambda: self.settled(sessions, uids), self.args.settle_s, "settling", interval=1.0)
                settled_s = time.monotonic() - settle_began
            except TimeoutError:
                pass
            checks, summary = self.check(sessions, settings, sent)
        finally:
            self.stop_supervising.set()
            supervisor.join(timeout=10)
            for process in self.processes.values():
                process.stop()
            self.orthanc.stop()
            engine.dispose()
        return RunResult(
            run=self.index,
            seed=self.seed,
            series=len(sent),
            instances_acknowledged=sum(len(s.acknowledged) for s in sent),
            associations=sum(s.associations for s in sent),
            events=events,
            settled_s=None if settled_s is None else round(settled_s, 1),
            wall_s=round(time.monotonic() - started, 1),
            checks=checks,
            summary=summary,
        )

    def redis_client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis.url, socket_timeout=5)

    def send_all(self, sent: list[SentSeries], port: int, errors: list[BaseException]) -> None:
        try:
            for i, series in enumerate(sent):
                while self.now_s() < i * self.args.interval_s:
                    time.sleep(0.05)
                push_until_acknowledged(series, port, deadline=time.monotonic() + 300, sending=self.sending)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    def disrupt(self, event: Event, sessions: Any) -> None:
        rng = self.rng
        if event.kind.startswith("kill_") and event.kind.endswith("_worker"):
            name = event.kind.removeprefix("kill_").removesuffix("_worker")
            # Aim at a moment its stage has work, for a while; then kill whatever it is doing.
            self.wait_running(name)
            with suppress(Exception):  # not busy in time, or the database restarting right now
                wait_until(lambda: self.stage_busy(sessions, name), self.args.busy_wait_s, "busy", interval=0.1)
            time.sleep(rng.uniform(0.0, 0.5))
            event.started_s = round(self.now_s(), 2)
            event.busy = self.stage_busy_safe(sessions, name)
            event.hit = self.processes[name].kill9()
        elif event.kind == "kill_listener":
            # Aim at an open association (mid-push), for a while; then kill it whatever it does.
            self.wait_running("listener")
            self.sending.wait(self.args.busy_wait_s)
            time.sleep(rng.uniform(0.0, 0.1))
            event.started_s = round(self.now_s(), 2)
            event.busy = self.sending.is_set()
            event.hit = self.processes["listener"].kill9()
        elif event.kind == "restart_redis":
            event.started_s = round(self.now_s(), 2)
            self.redis.kill()
            down = rng.uniform(0.5, 3.0)
            time.sleep(down)
            self.redis.start()
        elif event.kind == "restart_postgres":
            event.started_s = round(self.now_s(), 2)
            self.postgres.crash()
            time.sleep(rng.uniform(0.5, 3.0))
            self.postgres.start()
        elif event.kind == "stop_orthanc":
            event.started_s = round(self.now_s(), 2)
            self.orthanc.stop()
            time.sleep(rng.uniform(2.0, 8.0))
            self.orthanc.start()
        event.down_s = round(self.now_s() - event.started_s, 2)
        event.done = True
        log(f"  {event.kind} at {event.started_s:.1f} s (busy: {event.busy}, down {event.down_s:.1f} s)")

    def wait_running(self, name: str) -> None:
        """Wait (a while) until the supervisor has `name` running again after an earlier kill."""
        with suppress(TimeoutError):
            wait_until(self.processes[name].alive, 120, name)

    def stage_busy(self, sessions: Any, name: str) -> bool:
        with sessions() as session:
            if name == "export":  # an export pending: being sent, or held by the worker for its retry
                return (
                    session.scalar(select(Export.id).where(Export.state == ExportState.PENDING.value).limit(1))
                    is not None
                )
            return (
                session.scalar(
                    select(Series.id).where(Series.state == BUSY_STATE[name], Series.superseded.is_(False)).limit(1)
                )
                is not None
            )

    def stage_busy_safe(self, sessions: Any, name: str) -> bool | None:
        try:
            return self.stage_busy(sessions, name)
        except Exception:
            return None

    def settled(self, sessions: Any, uids: set[str]) -> bool:
        try:
            with sessions() as session:
                rows = session.execute(
                    select(Series.series_instance_uid, Series.state).where(Series.superseded.is_(False))
                ).all()
                pending = session.scalar(select(Export.id).where(Export.state == ExportState.PENDING.value).limit(1))
        except Exception:
            return False
        final = {s.value for s in FINAL_STATES}
        return {uid for uid, _ in rows} >= uids and all(state in final for _, state in rows) and pending is None

    def check(
        self, sessions: Any, settings: Settings, sent: list[SentSeries]
    ) -> tuple[dict[str, list[str]], dict[str, Any]]:
        problems: dict[str, list[str]] = {"acknowledged": [], "final_state": [], "duplicate_seg": [], "worklist": []}
        with sessions() as session:
            series_rows = list(session.scalars(select(Series)))
            instances = session.execute(
                select(Instance.sop_instance_uid, Instance.series_id, Instance.relative_path, Instance.sha256)
            ).all()
            events = session.execute(select(SeriesEvent.series_id, SeriesEvent.kind, SeriesEvent.detail)).all()
            exports = list(session.scalars(select(Export)))
            worklist = session.execute(select(WorklistItem.id, WorklistItem.series_id)).all()
        by_id = {s.id: s for s in series_rows}

        # 1. Every acknowledged instance indexed, in its series' current version, and on disk.
        indexed = collections.defaultdict(list)
        for uid, series_id, relative_path, sha256 in instances:
            indexed[uid].append((series_id, relative_path, sha256))
        for series in sent:
            for uid, path in series.acknowledged.items():
                rows = indexed.get(uid)
                if not rows:
                    problems["acknowledged"].append(f"{path.name} of {series.kind} series: not indexed")
                    continue
                if all(by_id[series_id].superseded for series_id, _, _ in rows):
                    problems["acknowledged"].append(f"{uid}: only in superseded versions")
                for _, relative_path, sha256 in rows:
                    stored = settings.storage_dir / relative_path
                    if not stored.is_file() or hashlib.sha256(stored.read_bytes()).hexdigest() != sha256:
                        problems["acknowledged"].append(f"{uid}: file {relative_path} missing or changed")

        # 2. Every current version final, entered once.
        entries: collections.Counter[int] = collections.Counter()
        for series_id, kind, detail in events:
            if kind in FINAL_EVENT_KINDS or (
                kind in WORKLIST_EVENT_KINDS and (detail or {}).get("route") == "worklist"
            ):
                entries[series_id] += 1
        sent_uids = {s.series_instance_uid for s in sent}
        current = [s for s in series_rows if not s.superseded]
        for uid in sent_uids - {s.series_instance_uid for s in current}:
            problems["final_state"].append(f"series {uid}: never arrived")
        for version in current:
            if version.state not in FINAL_EVENT_KINDS:
                problems["final_state"].append(f"series id {version.id}: {version.state}, not final")
            elif entries[version.id] != 1:
                problems["final_state"].append(
                    f"series id {version.id}: entered a final state {entries[version.id]} times"
                )

        # 3. No duplicate SEG/RTSTRUCT in the PACS.
        exported = {e.sop_instance_uid: e for e in exports}
        per_version = collections.Counter((e.series_id, e.sop_class_uid) for e in exports)
        for (series_id, sop_class_uid), count in per_version.items():
            if count > 1:
                problems["duplicate_seg"].append(f"series id {series_id}: {count} exports of class {sop_class_uid}")
        in_pacs: collections.Counter[str] = collections.Counter()
        for orthanc_id in self.orthanc_instances():
            tags = self.orthanc.rest(f"/instances/{orthanc_id}/simplified-tags")
            in_pacs[tags["SOPInstanceUID"]] += 1
            if tags["SOPInstanceUID"] not in exported:
                problems["duplicate_seg"].append(f"{tags.get('Modality')} {tags['SOPInstanceUID']} is not one of ours")
        for uid, export in exported.items():
            if export.state == ExportState.DELIVERED.value and in_pacs[uid] != 1:
                problems["duplicate_seg"].append(f"export {export.id}: {in_pacs[uid]} copies in the PACS")
        # 4. Nothing on the worklist twice.
        items = collections.Counter(series_id for _, series_id in worklist)
        for series_id, count in items.items():
            if count > 1:
                problems["worklist"].append(f"series id {series_id}: {count} worklist items")
        per_series_uid = collections.Counter(
            by_id[series_id].series_instance_uid for _, series_id in worklist if not by_id[series_id].superseded
        )
        for uid, count in per_series_uid.items():
            if count > 1:
                problems["worklist"].append(f"series {uid}: on the worklist {count} times")

        states = collections.Counter(s.state for s in current)
        summary = {
            "states": dict(states),
            "superseded_versions": sum(1 for s in series_rows if s.superseded),
            "gave_up": sum(1 for _, kind, _ in events if kind == "gave_up"),
            "requeued": sum(1 for _, kind, _ in events if kind.startswith("requeued")),
            "exports": len(exports),
            "objects_in_pacs": sum(in_pacs.values()),
            "restarts": {name: p.starts - 1 for name, p in self.processes.items()},
        }
        return problems, summary

    def orthanc_instances(self) -> list[str]:
        return list(self.orthanc.rest("/instances"))


# --- the command ---------------------------------------------------------------------------------------


@contextmanager
def servers(workdir: Path) -> Iterator[tuple[Postgres, Redis]]:
    with ExitStack() as stack:
        postgres = Postgres(workdir / "postgres")
        postgres.start()
        stack.callback(postgres.crash)
        redis = Redis(workdir)
        redis.start()
        stack.callback(redis.kill)
        yield postgres, redis


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="runs, each with its own seed (seed, seed+1, ...)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first run (default 0)")
    parser.add_argument("--series", type=int, default=4, help="series pushed per run (default 4)")
    parser.add_argument("--rounds", type=int, default=1, help="times each disruption happens per run (default 1)")
    parser.add_argument("--slices", type=int, default=12, help="slices per series (128², default 12)")
    parser.add_argument("--interval-s", type=float, default=3.0, help="seconds between two series (default 3)")
    parser.add_argument("--tail-s", type=float, default=12.0, help="seconds after the last series still in the window")
    parser.add_argument("--busy-wait-s", type=float, default=10.0, help="how long a worker kill waits for work")
    parser.add_argument("--stuck-after-s", type=float, default=30.0, help="pipeline_stuck_after_s of the run")
    parser.add_argument("--settle-s", type=float, default=240.0, help="most seconds to settle after the chaos")
    parser.add_argument("--out", type=Path, help="folder for logs and data (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="write every run's events and checks here")
    parser.add_argument("--keep", action="store_true", help="keep the folder (logs, databases' files) afterwards")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.series < 1 or args.rounds < 1 or args.slices < 4:
        parser.error("--runs, --series and --rounds must be >= 1, --slices >= 4")
    if STORESCU is None:
        parser.error("storescu is not installed (apt-get install dcmtk)")

    work = Path(tempfile.mkdtemp(prefix="gatekeeper-chaos-"))
    if args.out is None:
        args.out = work / "runs"
    args.out.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        shutil.chown(work, user="postgres")
    began = time.monotonic()
    results: list[RunResult] = []
    try:
        args.templates = make_templates(work / "templates", args.slices)
        with servers(work) as (postgres, redis):
            for index in range(args.runs):
                run = Run(index=index, seed=args.seed + index, args=args, postgres=postgres, redis=redis)
                result = run.execute()
                results.append(result)
                failed = {name: found for name, found in result.checks.items() if found}
                log(
                    f"run {index} seed {result.seed}: {'PASSED' if result.passed else 'FAILED'}; "
                    f"{sum(e.hit for e in result.events)} disruptions, {result.instances_acknowledged} instances acknowledged "
                    f"over {result.associations} associations, settled in {result.settled_s} s, "
                    f"wall {result.wall_s} s; {json.dumps(result.summary)}"
                    + (f"; problems: {json.dumps(failed)}" if failed else "")
                )
    finally:
        if args.json:
            args.json.write_text(
                json.dumps([{**asdict(r), "passed": r.passed} for r in results], indent=2, default=str)
            )
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    survived = sum(sum(e.hit for e in r.events) for r in results if r.passed)
    total = sum(sum(e.hit for e in r.events) for r in results)
    log(
        f"chaos matrix: {sum(r.passed for r in results)}/{len(results)} runs passed; "
        f"{survived}/{total} disruptions survived; {time.monotonic() - began:.0f} s"
    )
    return 0 if results and all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
