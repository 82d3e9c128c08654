"""The demo's ending: on a terminal it stays up until Ctrl-C; without one it ends by itself.

The whole demo takes minutes; these tests check the decision (`keep_running`) on real pseudo-
terminals and pipes, the wait (`stay_up`) with real signals in a child process, and the verdict per
series (`safe_outcome`, `delivered_dice` on a real phantom series).
"""

from __future__ import annotations

import io
import os
import pty
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service.commands.demo import SAFE_DICE, delivered_dice, keep_running, safe_outcome, stay_up

REPO = Path(__file__).resolve().parent.parent


def test_demo_stays_up_when_stdin_and_stdout_are_a_terminal() -> None:
    leader, follower = pty.openpty()
    try:
        with open(follower, closefd=False) as stdin, open(follower, "w", closefd=False) as stdout:
            assert keep_running(stdin, stdout)
    finally:
        os.close(leader)
        os.close(follower)


@pytest.mark.parametrize("which", ["stdin", "stdout", "both"])
def test_demo_ends_by_itself_when_a_stream_is_not_a_terminal(which: str) -> None:
    leader, follower = pty.openpty()
    read_end, write_end = os.pipe()
    try:
        with (
            open(follower, closefd=False) as tty_in,
            open(follower, "w", closefd=False) as tty_out,
            open(read_end, closefd=False) as pipe_in,
            open(write_end, "w", closefd=False) as pipe_out,
        ):
            stdin = pipe_in if which in ("stdin", "both") else tty_in
            stdout = pipe_out if which in ("stdout", "both") else tty_out
            assert not keep_running(stdin, stdout)
    finally:
        for fd in (leader, follower, read_end, write_end):
            os.close(fd)


def test_closed_or_in_memory_streams_are_no_terminal() -> None:
    closed = io.StringIO()
    closed.close()
    assert not keep_running(io.StringIO(), io.StringIO())
    assert not keep_running(closed, closed)


def test_stay_up_returns_when_a_process_ends() -> None:
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    child.wait(timeout=60)
    assert stay_up({"Orthanc": child}, poll_s=0.05) == "Orthanc ended (exit code 3)"


# A child that waits in stay_up on a long `sleep`, and says "ready" once it polls inside the wait
# (so the signal cannot arrive before the wait catches it); it prints what stay_up returned.
# It starts with SIGINT ignored, as a background job does: stay_up must catch SIGINT itself.
_WAITER = textwrap.dedent(
    """
    import signal, subprocess, sys
    from service.commands.demo import stay_up

    # As a job started in the background by a shell (CI): SIGINT ignored, so no KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    class Ready:
        said = False
        def poll(self):
            if not self.said:
                print("ready", flush=True)
                self.said = True
            return None

    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        print(stay_up({"announcer": Ready(), "sleeper": sleeper}, poll_s=0.05), flush=True)
    finally:
        sleeper.kill()
    """
)


@pytest.mark.parametrize(("signum", "expected"), [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_stay_up_ends_cleanly_on_ctrl_c_or_sigterm(signum: int, expected: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _WAITER], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        child.send_signal(signum)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert out.strip() == expected and "Traceback" not in err


@pytest.mark.parametrize(
    ("expected", "route", "dice", "ok"),
    [
        ("auto", "auto", 0.97, True),
        ("auto", "worklist", None, False),
        ("safe", "worklist", None, True),
        ("safe", "auto", SAFE_DICE, True),
        ("safe", "auto", 0.90, False),  # a failure delivered unflagged
        ("safe", "auto", None, False),  # delivered, Dice unknown: not shown to be safe
        ("safe", "failed", None, False),
    ],
)
def test_an_anomaly_may_go_through_only_with_a_correct_contour(expected, route, dice, ok) -> None:
    assert safe_outcome(expected, route, dice) is ok


def test_safe_outcome_refuses_an_unknown_expectation() -> None:
    with pytest.raises(ValueError, match="expected"):
        safe_outcome("maybe", "auto", 1.0)


def test_delivered_dice_compares_the_seg_with_the_phantom_truth(tmp_path: Path) -> None:
    import numpy as np
    import pydicom

    from service.phantom.generate import SeriesSpec, generate_run

    spec = SeriesSpec(folder="s", patient_seed=3, series_seed=4, anomaly=None, num_slices=12, matrix=64)
    generate_run([spec], tmp_path, progress=False)
    folder = tmp_path / "s"
    truth = (folder / "ground_truth" / "organs.seg.dcm").read_bytes()
    assert delivered_dice(truth, folder) == 1.0
    # The same SEG with the liver's frames emptied: no overlap left.
    ds = pydicom.dcmread(folder / "ground_truth" / "organs.seg.dcm")
    liver = next(s.SegmentNumber for s in ds.SegmentSequence if s.SegmentLabel.lower() == "liver")
    frames = ds.pixel_array.copy()
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == liver:
            frames[i] = 0
    packed = np.packbits(frames.reshape(-1), bitorder="little")
    ds.PixelData = packed.tobytes() + (b"\0" if packed.size % 2 else b"")
    out = tmp_path / "empty.seg.dcm"
    ds.save_as(out)
    assert delivered_dice(out.read_bytes(), folder) == 0.0
