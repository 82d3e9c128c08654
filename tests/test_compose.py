"""docker-compose.yml is valid and has the services operations rely on (Debian's docker-compose; no engine needed)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

COMPOSE_FILE = Path(__file__).resolve().parent.parent / "docker-compose.yml"
SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret",
    "GATEKEEPER_WEB_SECRET_KEY": "k" * 64,
    "GATEKEEPER_FLOWER_PASSWORD": "flower-secret",
}


def compose(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    assert exe, "docker-compose is missing: apt-get install docker-compose (make system-deps)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GATEKEEPER_", "POSTGRES_", "COMPOSE_"))}
    return subprocess.run(
        [exe, "-f", str(COMPOSE_FILE), *args], env={**clean, **env}, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def service_block(config: str, name: str) -> str:
    """The text of one service in `docker-compose config` output (two-space indented YAML)."""
    match = re.search(rf"^  {re.escape(name)}:\n((?:    .*\n|\n)*)", config, re.MULTILINE)
    assert match, f"service {name} not in the config"
    return match.group(1)


def test_compose_file_is_valid_with_every_service(tmp_path: Path) -> None:
    result = compose("--profile", "trial", "config", env=SECRETS, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    services = compose("--profile", "trial", "config", "--services", env=SECRETS, cwd=tmp_path).stdout.split()
    assert set(services) == {
        "postgres",
        "redis",
        "migrate",
        "listener",
        "worker-gpu",
        "worker-cpu",
        "web",
        "flower",
        "orthanc",
    }
    config = result.stdout
    gpu = service_block(config, "worker-gpu")
    assert "driver: nvidia" in gpu and "- gpu" in gpu and "ops/Dockerfile.gpu" in gpu
    assert re.search(r"- --queues\n\s+- score\n", gpu)
    assert re.search(r"- --queues\n\s+- segment,export,default\n", service_block(config, "worker-cpu"))
    migrate = service_block(config, "migrate")
    assert re.search(r"- db\n\s+- upgrade\n", migrate)
    for name in ("listener", "worker-cpu", "web", "flower"):
        assert "condition: service_completed_successfully" in service_block(config, name), name
    assert "GATEKEEPER_WEB_SECRET_KEY: " + "k" * 64 in service_block(config, "web")
    assert "127.0.0.1:5555" in service_block(config, "flower") or "host_ip: 127.0.0.1" in service_block(
        config, "flower"
    )


def test_orthanc_is_only_in_the_trial_profile(tmp_path: Path) -> None:
    config = compose("config", env=SECRETS, cwd=tmp_path).stdout
    assert re.search(r"profiles:\n\s+- trial\n", service_block(config, "orthanc"))
    assert "profiles:" not in service_block(config, "web")


def test_compose_refuses_to_run_without_the_secrets(tmp_path: Path) -> None:
    for missing in SECRETS:
        env = {k: v for k, v in SECRETS.items() if k != missing}
        result = compose("config", "-q", env=env, cwd=tmp_path)
        assert result.returncode != 0, missing
        assert missing in result.stderr
