"""Ingest benchmark: DCMTK storescu pushes 300-slice 512×512 CT series to DCMTK storescp and to our listener.

    .venv/bin/python ops/bench_ingest.py [--database-url postgresql://postgres@127.0.0.1/postgres]
                                         [--work DIR] [--slices 300] [--processes 1 2]

For each receiver, 1 and 4 concurrent associations (4 different series), with the sender on DCMTK
defaults (Nagle on: the usual PACS) and with the sender tuned (TCP_NODELAY=1 in its environment).
storescp runs with TCP_NODELAY=1 (its receiving socket tuned) and `--fork` for concurrent senders;
it writes files without fsync and keeps no database. Our listener runs as `gatekeeper listen` with
fsync and the PostgreSQL index on, exactly as in production, in a fresh database per run.

Prints a Markdown table: instances/s, MB/s, ratio ours/storescp (same sender mode and concurrency),
and the listener's peak resident memory (all its processes together).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import psycopg
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
GATEKEEPER = str(Path(sys.executable).parent / "gatekeeper")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def make_series(work: Path, count: int, slices: int) -> list[list[Path]]:
    """`count` series of `slices` 512×512 slices: phantom slices, cloned with new UIDs and positions."""
    phantom = work / "phantom"
    if not phantom.exists():
        subprocess.run(
            [
                GATEKEEPER,
                "phantom",
                "--out",
                str(phantom),
                "--series",
                "1",
                "--slices",
                "20",
                "--seed",
                "1",
                "--matrix",
                "512",
                "--quiet",
            ],
            check=True,
        )
    templates = [dcmread(p) for p in sorted(next(p for p in phantom.iterdir() if p.is_dir()).glob("CT*.dcm"))]
    spacing = float(templates[0].SliceThickness)
    all_series = []
    for s in range(count):
        out = work / f"series{s}"
        if out.exists() and len(list(out.glob("*.dcm"))) == slices:
            all_series.append(sorted(out.glob("*.dcm")))
            continue
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        series_uid = generate_uid()
        paths = []
        for i in range(slices):
            dataset = templates[i % len(templates)]
            dataset.SeriesInstanceUID = series_uid
            dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            dataset.InstanceNumber = i + 1
            dataset.ImagePositionPatient = [0.0, 0.0, -i * spacing]
            path = out / f"CT{i + 1:06d}.dcm"
            dataset.save_as(path)
            paths.append(path)
        all_series.append(paths)
    return all_series


class PeakRss:
    """Samples the resident memory of a process and its children every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                total = self.process.memory_info().rss + sum(
                    c.memory_info().rss for c in self.process.children(recursive=True)
                )
            except psutil.Error:
                continue
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def push(port: int, series: list[list[Path]], tuned_sender: bool, aec: str) -> float:
    """Send each series over its own association, all at once; return the wall time in seconds."""
    env = dict(os.environ)
    if tuned_sender:
        env["TCP_NODELAY"] = "1"
    else:
        env.pop("TCP_NODELAY", None)
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for files in series
    ]
    for sender in senders:
        _, err = sender.communicate()
        if sender.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def run_storescp(work: Path, series: list[list[Path]], tuned_sender: bool) -> tuple[float, int]:
    out = work / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    env = dict(os.environ, TCP_NODELAY="1")
    args = ["storescp", "-od", str(out), "+xa", "-aet", "STORESCP", *(["--fork"] if len(series) > 1 else []), str(port)]
    scp = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        rss = PeakRss(scp.pid)
        seconds = push(port, series, tuned_sender, "STORESCP")
        peak = rss.stop()
    finally:
        scp.terminate()
        scp.wait()
    stored = len(list(out.iterdir()))
    assert stored == sum(len(s) for s in series), f"storescp stored {stored} files"
    return seconds, peak


def run_ours(
    work: Path, series: list[list[Path]], tuned_sender: bool, admin_url: str, processes: int
) -> tuple[float, int]:
    name = f"gatekeeper_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    storage = work / "gatekeeper-var"
    shutil.rmtree(storage, ignore_errors=True)
    port = free_port()
    env = dict(
        os.environ,
        GATEKEEPER_DATABASE_URL=database_url,
        GATEKEEPER_STORAGE_DIR=str(storage),
        GATEKEEPER_PORT=str(port),
        GATEKEEPER_ALLOWED_AE_TITLES="BENCH",
        GATEKEEPER_ALLOWED_NETWORKS="127.0.0.0/8",
        GATEKEEPER_QUIET_PERIOD_S="3600",
        GATEKEEPER_MIN_FREE_DISK_BYTES="0",
        GATEKEEPER_MAX_DISK_USED_FRACTION="1.0",
    )
    try:
        subprocess.run([GATEKEEPER, "db", "upgrade"], env=env, check=True, capture_output=True)
        listener = subprocess.Popen(
            [GATEKEEPER, "listen", "--processes", str(processes)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=(work / "listener.log").open("ab"),
        )
        try:
            wait_port(port)
            time.sleep(1.0 if processes > 1 else 0.2)  # let the extra processes bind too
            rss = PeakRss(listener.pid)
            seconds = push(port, series, tuned_sender, "GATEKEEPER")
            peak = rss.stop()
        finally:
            listener.terminate()
            listener.wait()
        with psycopg.connect(database_url) as conn:
            stored = conn.execute("SELECT count(*) FROM instance").fetchone()[0]
        assert stored == sum(len(s) for s in series), f"listener indexed {stored} instances"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return seconds, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="PostgreSQL admin URL; a fresh database is made per run",
    )
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gatekeeper-bench-ingest")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[1, 2], help="listener process counts to measure (default: 1 2)"
    )
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    all_series = make_series(args.work, 4, args.slices)
    megabytes = {n: sum(p.stat().st_size for s in all_series[:n] for p in s) / 1e6 for n in (1, 4)}

    rows = []
    for tuned_sender in (False, True):
        for n in (1, 4):
            series = all_series[:n]
            instances = sum(len(s) for s in series)
            base_s, base_rss = run_storescp(args.work, series, tuned_sender)
            rows.append(
                (
                    "storescp" + (" --fork" if n > 1 else ""),
                    tuned_sender,
                    n,
                    instances,
                    base_s,
                    megabytes[n],
                    base_s,
                    base_rss,
                )
            )
            for processes in args.processes:
                seconds, rss = run_ours(args.work, series, tuned_sender, args.database_url, processes)
                rows.append(
                    (f"gatekeeper listen ×{processes}", tuned_sender, n, instances, seconds, megabytes[n], base_s, rss)
                )
            print(f"done: sender {'tuned' if tuned_sender else 'defaults'}, {n} association(s)", file=sys.stderr)

    print("| receiver | sender | assoc. | instances | seconds | instances/s | MB/s | ours/storescp | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, tuned, n, instances, seconds, mb, base, rss in rows:
        ratio = "—" if name.startswith("storescp") else f"{base / seconds:.2f}"
        print(
            f"| {name} | {'TCP_NODELAY' if tuned else 'defaults'} | {n} | {instances} | {seconds:.2f} | "
            f"{instances / seconds:.0f} | {mb / seconds:.0f} | {ratio} | {rss / 1e6:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
