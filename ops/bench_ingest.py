"""Ingest benchmark: DCMTK storescu pushes 300-slice 512×512 CT series to DCMTK storescp and to our listener.

    .venv/bin/python ops/bench_ingest.py [--database-url postgresql://postgres@127.0.0.1/postgres]
                                         [--work DIR] [--slices 300] [--processes 1 2]
                                         [--senders defaults tuned] [--repeat 3]

For each receiver, 1 and 4 concurrent associations (4 different series), with the sender on DCMTK
defaults (Nagle on: the usual PACS) and with the sender tuned (TCP_NODELAY=1 in its environment).
storescp runs with TCP_NODELAY=1 (its receiving socket tuned) and `--fork` for concurrent senders;
it writes files without fsync and keeps no database. Our listener runs as `gatekeeper listen` with
fsync and the PostgreSQL index on, exactly as in production, in a fresh database per run. A third
receiver, "pynetdicom SCP, no storage", is pynetdicom set up as our listener (same contexts, PDU
size and socket options) answering Success to every C-STORE without touching the data: the most a
listener built on pynetdicom can reach (`--no-floor` skips it).

Each configuration is pushed `--repeat` times, the receivers taking turns, and the median time is
reported. Prints a Markdown table: instances/s, MB/s, ratio ours/storescp (same sender mode and
concurrency), the listener's peak resident memory (all its processes together), then the targets of
issue 14 as ratios from the same run (one association ≥ 0.9× storescp with the sender on defaults;
4 associations ≥ 2× one), and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
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

from service import dcmtk

ROOT = Path(__file__).resolve().parent.parent
FLOOR = "pynetdicom SCP, no storage"
GATEKEEPER = str(Path(sys.executable).parent / "gatekeeper")
# DCMTK's tools, not the pynetdicom console scripts of the same names (service/dcmtk.py).
STORESCU = dcmtk.tool("storescu") or "storescu"
STORESCP = dcmtk.tool("storescp") or "storescp"


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
            [STORESCU, "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
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
    args = [STORESCP, "-od", str(out), "+xa", "-aet", "STORESCP", *(["--fork"] if len(series) > 1 else []), str(port)]
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


def serve_floor(port: int) -> int:
    """Serve a pynetdicom Storage SCP set up as `gatekeeper listen` sets up its own (presentation
    contexts, PDU size, TCP_NODELAY and quick ACKs) that answers Success without decoding, checking,
    writing or indexing anything: the most any listener built on pynetdicom can do. Runs until killed."""
    from pynetdicom import evt

    from service.ingest.listener import _Server, make_ae
    from service.settings import Settings

    ae = make_ae(Settings(ae_title="FLOOR"))
    server = ae.make_server(
        ("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, lambda _event: 0x0000)], server_class=_Server
    )
    server.serve_forever()
    return 0


def run_floor(series: list[list[Path]], tuned_sender: bool) -> tuple[float, int]:
    port = free_port()
    scp = subprocess.Popen([sys.executable, __file__, "--serve-floor", str(port)], stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        rss = PeakRss(scp.pid)
        seconds = push(port, series, tuned_sender, "FLOOR")
        peak = rss.stop()
    finally:
        scp.terminate()
        scp.wait()
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
            row = conn.execute("SELECT count(*) FROM instance").fetchone()
        stored = row[0] if row is not None else 0
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
    parser.add_argument(
        "--senders",
        nargs="+",
        choices=["defaults", "tuned"],
        default=["defaults", "tuned"],
        help="sender modes: DCMTK defaults, and/or TCP_NODELAY=1 (default: both)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="pushes per configuration; the median is reported")
    parser.add_argument(
        "--no-floor",
        dest="floor",
        action="store_false",
        help="skip the reference pynetdicom SCP that answers without storing (the floor of any pynetdicom listener)",
    )
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)  # run_floor's child
    args = parser.parse_args(argv)
    if args.serve_floor is not None:
        return serve_floor(args.serve_floor)
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    args.work.mkdir(parents=True, exist_ok=True)
    all_series = make_series(args.work, 4, args.slices)
    megabytes = {n: sum(p.stat().st_size for s in all_series[:n] for p in s) / 1e6 for n in (1, 4)}
    load_before = os.getloadavg()

    rows = []
    seconds: dict[tuple[str, bool, int], float] = {}
    for tuned_sender in [mode == "tuned" for mode in args.senders]:
        for n in (1, 4):
            series = all_series[:n]
            instances = sum(len(s) for s in series)
            times: dict[str, list[float]] = {}
            rss: dict[str, int] = {}
            for _ in range(args.repeat):  # receivers take turns, so that a change of load hits all alike
                took, peak = run_storescp(args.work, series, tuned_sender)
                times.setdefault("storescp", []).append(took)
                rss["storescp"] = max(rss.get("storescp", 0), peak)
                if args.floor:
                    took, peak = run_floor(series, tuned_sender)
                    times.setdefault(FLOOR, []).append(took)
                    rss[FLOOR] = max(rss.get(FLOOR, 0), peak)
                for processes in args.processes:
                    name = f"gatekeeper listen ×{processes}"
                    took, peak = run_ours(args.work, series, tuned_sender, args.database_url, processes)
                    times.setdefault(name, []).append(took)
                    rss[name] = max(rss.get(name, 0), peak)
            base_s = statistics.median(times["storescp"])
            for name, took_all in times.items():
                took = statistics.median(took_all)
                seconds[(name, tuned_sender, n)] = took
                label = name if name != "storescp" else "storescp" + (" --fork" if n > 1 else "")
                rows.append((label, tuned_sender, n, instances, took, megabytes[n], base_s, rss[name]))
            print(f"done: sender {'tuned' if tuned_sender else 'defaults'}, {n} association(s)", file=sys.stderr)

    print(f"Median of {args.repeat} push(es) per row.")
    print()
    print("| receiver | sender | assoc. | instances | seconds | instances/s | MB/s | ours/storescp | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, tuned, n, instances, took, mb, base, peak in rows:
        ratio = "—" if name.startswith("storescp") else f"{base / took:.2f}"
        print(
            f"| {name} | {'TCP_NODELAY' if tuned else 'defaults'} | {n} | {instances} | {took:.2f} | "
            f"{instances / took:.0f} | {mb / took:.0f} | {ratio} | {peak / 1e6:.0f} |"
        )
    print()
    for line in target_lines(seconds, args.processes, args.senders):
        print(line)
    load_after = os.getloadavg()
    print()
    print(f"Load average (1, 5, 15 min): before {_load(load_before)}, after {_load(load_after)}.")
    return 0


def target_lines(seconds: dict[tuple[str, bool, int], float], processes: list[int], senders: list[str]) -> list[str]:
    """Issue 14's targets, as ratios of this run's times: ≥ 0.9× storescp on one association with
    the sender on defaults; 4 associations ≥ 2× the instance rate of one (same sender mode)."""
    lines = []
    if (FLOOR, False, 1) in seconds:
        floor = {n: seconds[("storescp", False, n)] / seconds[(FLOOR, False, n)] for n in (1, 4)}
        lines.append(
            f"- {FLOOR}, sender defaults: 1 association {floor[1]:.2f}× storescp, 4 associations "
            f"{floor[4]:.2f}× storescp --fork (the ceiling for a pynetdicom listener)"
        )
    for processes_n in processes:
        name = f"gatekeeper listen ×{processes_n}"
        for mode in senders:
            tuned = mode == "tuned"
            one = seconds[(name, tuned, 1)]
            if not tuned:
                ratio = seconds[("storescp", tuned, 1)] / one
                verdict = "met" if ratio >= 0.9 else "missed"
                lines.append(f"- {name}, sender {mode}: 1 association {ratio:.2f}× storescp (target ≥ 0.9×: {verdict})")
            scaling = 4 * one / seconds[(name, tuned, 4)]  # (4 × instances / t4) / (instances / t1)
            verdict = "met" if scaling >= 2.0 else "missed"
            lines.append(f"- {name}, sender {mode}: 4 associations {scaling:.2f}× one (target ≥ 2×: {verdict})")
    return lines


def _load(load: tuple[float, float, float]) -> str:
    return ", ".join(f"{value:.2f}" for value in load)


if __name__ == "__main__":
    sys.exit(main())
