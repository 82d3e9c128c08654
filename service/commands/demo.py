"""`gatekeeper demo`: the product's main job, end to end, on synthetic data (what `make demo` runs).

1. writes a small phantom study of three abdominal scans (realistic scan ranges that cover the
   liver): a normal series, a gross stent and a gross liver tumour (`DEMO_SERIES`);
2. starts Orthanc as the PACS (throwaway configuration on free ports) and `gatekeeper serve`
   (listener, worker, worklist; SQLite and the embedded broker) configured to export to it;
3. pushes the study with DCMTK `storescu`, as a PACS or scanner would;
4. waits until every series has ended its automatic journey and prints per series: the route, the
   gate's fused evidence against its cut, and either "SEG delivered to PACS" (checked through
   Orthanc's REST API: the SEG is there and references the series; its liver Dice against the
   phantom's truth) or the worklist URL with the gate's reasons in words (every series is segmented
   first; a worklisted one keeps a draft);
5. on a terminal (stdin and stdout both a TTY, `keep_running`): leaves the worklist and Orthanc
   running so the links work, prints the worklist's login and Orthanc's web page, and waits for
   Ctrl-C (or SIGTERM); without a terminal (CI, scripts) it goes straight on to
6. stop everything it started. Exit 0 when every series ended where it should (`safe_outcome`): the
   normal one delivered, and each anomaly either on the worklist or delivered with a correct contour.

Everything it writes lies under --out (default out/demo): `study/`, `var/` (the gatekeeper's
storage and database), `orthanc/`, and the logs of the processes it ran.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from service import dcmtk
from service.errors import UsageError

# (folder label, phantom anomaly or None, its severity grade, what the gatekeeper should do with it:
# "auto" — segmented and delivered; "safe" — the gate's contract: on the worklist, or delivered with a
# contour that is right, Dice >= SAFE_DICE against the phantom's truth; see `safe_outcome`)
DEMO_SERIES = (
    ("normal", None, None, "auto"),
    ("stent", "stent", "gross", "safe"),
    ("tumor", "tumor", "gross", "safe"),
)
#: The Dice below which a delivered contour counts as a failure the gate should have flagged.
SAFE_DICE = 0.95
DEMO_USER, DEMO_PASSWORD = "demo", "demo-dosimetrist-password"
CALLING_AE = "DEMO_SCANNER"
WAIT_TIMEOUT_S = 480.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("demo", help="run the demo on a synthetic study (what `make demo` runs)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="where the demo writes (default out/demo)")
    p.add_argument(
        "--slices",
        type=int,
        default=None,
        help="slices per series (default: a realistic abdominal scan range that covers the liver, as the "
        "gate expects; fewer slices cut the liver and the gate says so)",
    )
    p.add_argument("--matrix", type=int, default=256, help="rows and columns per slice (default 256)")
    p.add_argument("--seed", type=int, default=2026, help="seed of the synthetic patients (default 2026)")
    p.set_defaults(func=run)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tool(name: str, *fallbacks: str) -> str:
    found = dcmtk.tool(name) or next((f for f in fallbacks if Path(f).exists()), None)
    if not found:
        raise UsageError(f"{name} is not installed (make system-deps installs DCMTK and Orthanc)")
    return found


def _rest(port: int, path: str, body: bytes | None = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=body, method="POST" if body is not None else "GET"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _rest_bytes(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return bytes(response.read())


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise UsageError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def keep_running(stdin: TextIO, stdout: TextIO) -> bool:
    """Whether the demo should stay up after its summary: True when both streams are a terminal.

    A person at a terminal wants to click the printed links; CI and scripts (pipes, files,
    /dev/null) want the demo to end by itself. A closed stream counts as no terminal.
    """
    try:
        return stdin.isatty() and stdout.isatty()
    except (AttributeError, ValueError):  # no isatty(), or the stream is closed
        return False


class _Stopped(Exception):
    """SIGINT or SIGTERM (its number in `args`) arrived while the demo stayed up."""


def stay_up(processes: Mapping[str, subprocess.Popen[bytes]], *, poll_s: float = 0.5) -> str:
    """Block until Ctrl-C (SIGINT) or SIGTERM arrives, or one of `processes` ends; say which.

    Returns "interrupted" (SIGINT), "terminated" (SIGTERM) or "<name> ended (exit code N)". Both
    signal handlers are put back as they were before returning.
    """

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Stopped(signum)

    # Both handlers explicitly: a process started in the background by a shell inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt.
    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            for name, process in processes.items():
                code = process.poll()
                if code is not None:
                    return f"{name} ended (exit code {code})"
            time.sleep(poll_s)
    except (KeyboardInterrupt, _Stopped) as stop:
        interrupted = isinstance(stop, KeyboardInterrupt) or stop.args == (signal.SIGINT,)
        return "interrupted" if interrupted else "terminated"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(args: argparse.Namespace) -> int:
    from service.settings import settings_environment

    if args.slices is not None and args.slices < 8:
        raise UsageError(f"--slices must be >= 8 for a useful demo, got {args.slices}")
    storescu, orthanc_exe = _tool("storescu"), _tool("Orthanc", "/usr/sbin/Orthanc")
    started = time.monotonic()
    out: Path = args.out.resolve()
    study = out / "study"
    manifest = _write_study(args, study)
    series_uids = [entry["series_instance_uid"] for entry in manifest["series"]]

    orthanc_http, orthanc_dicom, dicom_port, web_port = free_port(), free_port(), free_port(), free_port()
    settings = _demo_settings(out, dicom_port=dicom_port, web_port=web_port, orthanc_dicom=orthanc_dicom)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEKEEPER_")}
    env.update(settings_environment(settings))
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    with ExitStack() as stack:
        sigint_handler = signal.getsignal(signal.SIGINT)
        if sigint_handler is not None:  # put back last, after every child is stopped (see below)
            stack.callback(signal.signal, signal.SIGINT, sigint_handler)
        orthanc = _start_orthanc(stack, orthanc_exe, out, logs, http_port=orthanc_http, dicom_port=orthanc_dicom)
        print(
            f"[demo] Orthanc (the PACS) is up: DICOM port {orthanc_dicom}, http://127.0.0.1:{orthanc_http}/", flush=True
        )
        serve = _start_gatekeeper(stack, env, logs, dicom_port=dicom_port)
        print(
            f"[demo] gatekeeper serve is up: DICOM port {dicom_port}, worklist http://127.0.0.1:{web_port}/ "
            f"(log in as {DEMO_USER} / {DEMO_PASSWORD}); log {logs / 'gatekeeper.log'}",
            flush=True,
        )
        _push(storescu, manifest, study, called_ae=settings.ae_title, dicom_port=dicom_port)
        pushed = time.monotonic()
        print(f"[demo] pushed {len(series_uids)} series with storescu; waiting for the pipeline ...", flush=True)

        rows = _wait(lambda: _final_rows(settings, series_uids), WAIT_TIMEOUT_S, "every series to be routed")
        print(
            f"[demo] all series done {time.monotonic() - pushed:.0f} s after the push "
            f"(quiet period {settings.quiet_period_s:g} s)\n",
            flush=True,
        )
        ok = _report(rows, manifest, study, orthanc_http=orthanc_http, web_port=web_port)
        if keep_running(sys.stdin, sys.stdout):
            print(
                f"\n[demo] still running, so that the links work:\n"
                f"  worklist  http://127.0.0.1:{web_port}/  log in as {DEMO_USER} / {DEMO_PASSWORD}\n"
                f"  Orthanc   http://127.0.0.1:{orthanc_http}/app/explorer.html  (the PACS and what it received)\n"
                f"[demo] press Ctrl-C to stop gatekeeper serve and Orthanc",
                flush=True,
            )
            why = stay_up({"gatekeeper serve": serve, "Orthanc": orthanc})
            # A second Ctrl-C must not cut the stop short: the children are stopped below, each in turn.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            print(f"\n[demo] {why}; stopping ...", flush=True)
    print(
        f"\n[demo] stopped gatekeeper serve and Orthanc; total {time.monotonic() - started:.0f} s. Files under {out}",
        flush=True,
    )
    return 0 if ok else 1


def _write_study(args: argparse.Namespace, study: Path) -> dict[str, Any]:
    """Write the demo's phantom study (`DEMO_SERIES`) under `study`, replacing the previous run's files,
    and return its manifest."""
    from service.commands.phantom import prepare_output
    from service.phantom.generate import SeriesSpec, generate_run

    prepare_output(study, force=True)  # the demo replaces its own previous study
    for folder in ("var", "orthanc"):
        shutil.rmtree(study.parent / folder, ignore_errors=True)
    print(
        f"[demo] writing the phantom study ({len(DEMO_SERIES)} series, {args.slices or 'abdominal scan range'} slices, "
        f"{args.matrix}x{args.matrix}) under {study}",
        flush=True,
    )
    specs = [
        SeriesSpec(
            folder=f"{i + 1:02d}_{label}",
            patient_seed=args.seed + i,
            series_seed=args.seed * 10 + i,
            anomaly=anomaly,
            grade=grade if args.slices is None else None,
            scan_range="abdomen" if args.slices is None else None,
            num_slices=args.slices,
            matrix=args.matrix,
        )
        for i, (label, anomaly, grade, _) in enumerate(DEMO_SERIES)
    ]
    return generate_run(specs, study, progress=False, meta={"protocol": "demo", "seed": args.seed})


def _demo_settings(out: Path, *, dicom_port: int, web_port: int, orthanc_dicom: int) -> Any:
    """The settings of the demo's `gatekeeper serve`: SQLite under `out/var`, exports to the demo's Orthanc."""
    from service.settings import Settings

    return Settings(
        storage_dir=out / "var",
        port=dicom_port,
        web_port=web_port,
        quiet_period_s=3.0,
        allowed_ae_titles=[CALLING_AE],
        allowed_networks=[ipaddress.ip_network("127.0.0.0/8")],
        pacs_host="127.0.0.1",
        pacs_port=orthanc_dicom,
        pacs_ae_title="ORTHANC",
        min_free_disk_bytes=200_000_000,
        export_retry_initial_s=5,
        export_retry_max_s=30,
        pipeline_sweep_interval_s=2,
    )


def _start_orthanc(
    stack: ExitStack, orthanc_exe: str, out: Path, logs: Path, *, http_port: int, dicom_port: int
) -> subprocess.Popen[bytes]:
    """Start Orthanc (the demo's PACS) with a throwaway configuration under `out/orthanc`; wait until its
    REST API answers. It is stopped when `stack` closes."""
    (out / "orthanc").mkdir(parents=True)
    config = {
        "Name": "demo-pacs",
        "StorageDirectory": str(out / "orthanc" / "db"),
        "IndexDirectory": str(out / "orthanc" / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [],
    }
    (out / "orthanc" / "orthanc.json").write_text(json.dumps(config))
    orthanc_log = stack.enter_context((logs / "orthanc.log").open("wb"))
    orthanc = subprocess.Popen(
        [orthanc_exe, str(out / "orthanc" / "orthanc.json")], stdout=orthanc_log, stderr=subprocess.STDOUT
    )
    stack.callback(_stop, orthanc)

    def orthanc_up() -> bool:
        if orthanc.poll() is not None:
            raise UsageError(f"Orthanc ended at start; see {logs / 'orthanc.log'}")
        try:
            _rest(http_port, "/system")
            return True
        except OSError:
            return False

    _wait(orthanc_up, 60, "Orthanc to start")
    return orthanc


def _start_gatekeeper(stack: ExitStack, env: dict[str, str], logs: Path, *, dicom_port: int) -> subprocess.Popen[bytes]:
    """Migrate the demo database, add the demo user and start `gatekeeper serve`; wait until the listener
    accepts connections. It is stopped when `stack` closes."""
    gatekeeper = [sys.executable, "-m", "service.commands.main"]
    serve_log = stack.enter_context((logs / "gatekeeper.log").open("wb"))
    subprocess.run([*gatekeeper, "db", "upgrade"], env=env, check=True, stdout=serve_log, stderr=subprocess.STDOUT)
    subprocess.run(
        [*gatekeeper, "users", "add", DEMO_USER, "--role", "dosimetrist", "--password-stdin"],
        env=env,
        input=(DEMO_PASSWORD + "\n").encode(),
        stdout=serve_log,
        stderr=subprocess.STDOUT,
    )
    serve = subprocess.Popen([*gatekeeper, "serve"], env=env, stdout=serve_log, stderr=subprocess.STDOUT)
    stack.callback(_stop, serve)

    def listening() -> bool:
        if serve.poll() is not None:
            raise UsageError(f"gatekeeper serve ended at start; see {logs / 'gatekeeper.log'}")
        try:
            socket.create_connection(("127.0.0.1", dicom_port), timeout=0.5).close()
            return True
        except OSError:
            return False

    _wait(listening, 90, "gatekeeper serve to listen")
    return serve


def _push(storescu: str, manifest: dict[str, Any], study: Path, *, called_ae: str, dicom_port: int) -> None:
    """Send every series of the study to the listener with DCMTK `storescu`, one association per series."""
    for entry in manifest["series"]:
        files = [str(study / entry["folder"] / name) for name in entry["files"]]
        sent = subprocess.run(
            [storescu, "-aet", CALLING_AE, "-aec", called_ae, "127.0.0.1", str(dicom_port), *files],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if sent.returncode != 0:
            raise UsageError(f"storescu failed for {entry['folder']}: {sent.stderr.strip()[-500:]}")


def _final_rows(settings: Any, series_uids: list[str]) -> dict[str, dict[str, Any]] | None:
    """Per SeriesInstanceUID: state, route, reason, GAN score, the gate's fused evidence and cut, fired findings'
    words, SEG UID; None while any is still working."""
    from sqlalchemy import select

    from service.db.session import make_engine, make_session_factory
    from service.db.tables import Export, Series, SeriesScore
    from service.lifecycle import FINAL_STATES
    from service.web.crud import gate_decision

    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            rows = {}
            for uid in series_uids:
                series = session.scalars(
                    select(Series).where(Series.series_instance_uid == uid).order_by(Series.version.desc())
                ).first()
                if series is None or series.state not in {s.value for s in FINAL_STATES}:
                    return None
                score = session.scalars(
                    select(SeriesScore).where(SeriesScore.series_id == series.id).order_by(SeriesScore.id.desc())
                ).first()
                seg_uid = session.scalars(select(Export.sop_instance_uid).where(Export.series_id == series.id)).first()
                gate = (gate_decision(session=session, series_id=series.id) or {}).get("gate") or {}
                rows[uid] = {
                    "state": series.state,
                    "route": series.route,
                    "reason": series.route_reason,
                    "score": score.score if score else None,
                    "fused": gate.get("fused"),
                    "cut": gate.get("fused_threshold"),
                    "seg_uid": seg_uid,
                    "reasons": [f["words"] for f in gate.get("findings", []) if f.get("fired")],
                }
            return rows
    except Exception:  # the database is created by serve at start; not there yet is "not done"
        return None
    finally:
        engine.dispose()


def safe_outcome(expected: str, route: str | None, dice: float | None) -> bool:
    """Whether a demo series ended as `DEMO_SERIES` expects.

    "auto": delivered. "safe": what the gate promises — a contour the segmenter got wrong (Dice <
    `SAFE_DICE` against the phantom's truth) never goes out unflagged: on the worklist, or delivered
    with a measured Dice of at least `SAFE_DICE`. An anomaly the segmenter contours correctly may go
    through; the gate flags failures, not findings.
    """
    if expected == "auto":
        return route == "auto"
    if expected == "safe":
        return route == "worklist" or (route == "auto" and dice is not None and dice >= SAFE_DICE)
    raise ValueError(f"expected must be 'auto' or 'safe', got {expected!r}")


def delivered_dice(seg_file: bytes, series_folder: Path) -> float:
    """Dice of the liver in the delivered SEG (`seg_file`) against the phantom's truth in `series_folder`."""
    from io import BytesIO

    import pydicom

    from service.contours.reading import ct_headers, read_liver_mask
    from service.settings import get_settings

    names = get_settings().liver_structure_names
    headers = ct_headers(sorted(series_folder.glob("*.dcm")))
    _, delivered = read_liver_mask(pydicom.dcmread(BytesIO(seg_file)), headers, names)
    _, truth = read_liver_mask(pydicom.dcmread(series_folder / "ground_truth" / "organs.seg.dcm"), headers, names)
    total = int(delivered.sum()) + int(truth.sum())
    return 2.0 * int((delivered & truth).sum()) / total if total else 1.0


def _report(
    rows: dict[str, dict[str, Any]], manifest: dict[str, Any], study: Path, *, orthanc_http: int, web_port: int
) -> bool:
    """Print one line per series; True when each ended as `DEMO_SERIES` expects (`safe_outcome`)."""
    ok = True
    for (label, _, _, expected), entry in zip(DEMO_SERIES, manifest["series"], strict=True):
        uid = entry["series_instance_uid"]
        row = rows[uid]
        score = (
            f"gate evidence {row['fused']:.2f} (cut {row['cut']:.2f})"
            if row["fused"] is not None and row["cut"] is not None
            else "no gate evidence"
        )
        dice = None
        if row["state"] == "delivered" and row["seg_uid"]:
            found = _rest(orthanc_http, "/tools/lookup", row["seg_uid"].encode())
            ids = [item["ID"] for item in found if item["Type"] == "Instance"]
            refs = (
                _rest(orthanc_http, f"/instances/{ids[0]}/simplified-tags").get("ReferencedSeriesSequence", [])
                if ids
                else []
            )
            if ids and refs and refs[0].get("SeriesInstanceUID") == uid:
                dice = delivered_dice(_rest_bytes(orthanc_http, f"/instances/{ids[0]}/file"), study / entry["folder"])
                outcome = f"SEG delivered to PACS (liver Dice {dice:.3f} against the phantom's truth)"
            else:
                outcome = "SEG NOT found in the PACS"
                ok = False
        elif row["route"] == "worklist":
            outcome = f"on the worklist: http://127.0.0.1:{web_port}/series/{uid}"
        else:
            outcome = f"ended {row['state']}"
        route = (row["route"] or row["state"]) + (f" ({row['reason']})" if row["reason"] else "")
        print(f"  {label:<15} route {route:<22} {score:<34} {outcome}")
        for words in row["reasons"]:
            print(f"  {'':<15} - {words}")
        if expected == "safe" and row["route"] == "auto" and dice is not None and dice >= SAFE_DICE:
            print(f"  {'':<15} - an anomaly contoured correctly: the gate flags failures, not findings")
        ok = ok and safe_outcome(expected, row["route"], dice)
    return ok
