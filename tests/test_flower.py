"""`gatekeeper flower`: Flower on the pipeline's Redis broker, refusing anonymous requests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import free_port

pytestmark = pytest.mark.integration

GATEKEEPER = str(Path(sys.executable).parent / "gatekeeper")


def flower_env(tmp_path: Path, redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEKEEPER_", "FLOWER_"))}
    env.update({"GATEKEEPER_STORAGE_DIR": str(tmp_path), "GATEKEEPER_BROKER_URL": redis_url}, **extra)
    return env


def test_flower_refuses_to_start_without_credentials(tmp_path: Path, redis_url: str) -> None:
    result = subprocess.run(
        [GATEKEEPER, "flower", "--port", str(free_port())],
        env=flower_env(tmp_path, redis_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "GATEKEEPER_FLOWER_PASSWORD" in result.stderr


def test_flower_starts_and_refuses_anonymous_requests(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    env = flower_env(tmp_path, redis_url, GATEKEEPER_FLOWER_USER="ops", GATEKEEPER_FLOWER_PASSWORD="flower-secret-1")
    process = subprocess.Popen(
        [GATEKEEPER, "flower", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                anonymous = httpx.get(f"{url}/", timeout=2)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"flower did not start: {process.stdout.read() if process.stdout else ''}"
                    ) from None
                time.sleep(0.2)
        assert anonymous.status_code == 401
        assert httpx.get(f"{url}/api/workers", timeout=5).status_code == 401
        assert httpx.get(f"{url}/", auth=("ops", "wrong"), timeout=5).status_code == 401
        page = httpx.get(f"{url}/", auth=("ops", "flower-secret-1"), timeout=10)
        assert page.status_code == 200 and "Flower" in page.text
        assert "flower-secret-1" not in " ".join(Path(f"/proc/{process.pid}/cmdline").read_text().split("\0"))
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
