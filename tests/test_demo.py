"""The demo's ending: on a terminal it stays up until Ctrl-C; without one it ends by itself.

The whole demo takes minutes; these tests check the decision (`keep_running`) on real pseudo-
terminals and pipes, and the wait (`stay_up`) with real signals in a child process.
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

from service.commands.demo import keep_running, stay_up

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
