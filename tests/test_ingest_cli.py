"""`gatekeeper listen` fails closed, ingest settings are validated, `gatekeeper series` lists, SQLite works."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest
from ingest_support import (
    STORESCU,
    Db,
    ct_files,
    free_port,
    gatekeeper_executable,
    make_phantom,
    make_settings,
    running_listener,
    settings_env,
    upgrade,
    wait_for,
)
from pydantic import ValidationError

from service.errors import UsageError
from service.ingest.listener import AccessPolicy
from service.lifecycle import SeriesState
from service.settings import Settings


def run_gatekeeper(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([gatekeeper_executable(), *args], env=env, capture_output=True, text=True, timeout=60)


def test_listen_refuses_to_start_without_allow_lists(tmp_path: Path) -> None:
    env = settings_env(Settings(storage_dir=tmp_path))
    result = run_gatekeeper("listen", "--port", str(free_port()), env=env)
    assert result.returncode == 2 and "no calling AE title is allowed" in result.stderr
    result = run_gatekeeper("listen", "--port", str(free_port()), "--allow-ae", "CT1", env=env)
    assert result.returncode == 2 and "no network is allowed" in result.stderr
    result = run_gatekeeper("listen", "--allow-ae", "CT1", "--allow-ip", "10.0.0.300/8", env=env)
    assert result.returncode == 2 and "not a network in CIDR notation" in result.stderr
    assert "Traceback" not in result.stderr


def test_access_policy_fails_closed_and_matches_networks() -> None:
    with pytest.raises(ValueError, match="allowed AE titles are empty"):
        AccessPolicy(frozenset(), ())
    import ipaddress

    policy = AccessPolicy(frozenset({"CT1"}), (ipaddress.ip_network("10.1.0.0/16"),))
    assert policy.refusal("CT1", "10.1.2.3") is None
    assert policy.refusal("CT1", "::ffff:10.1.2.3") is None  # IPv4 client on a dual-stack socket
    assert "not in the allowed networks" in str(policy.refusal("CT1", "10.2.0.1"))
    assert "not allowed" in str(policy.refusal("CT2", "10.1.2.3"))
    assert AccessPolicy(frozenset({"*"}), (ipaddress.ip_network("0.0.0.0/0"),)).refusal("ANY", "192.0.2.1") is None


def test_quiet_period_per_ae_and_tls_settings_are_validated(tmp_path: Path) -> None:
    settings = Settings(quiet_period_s=20, quiet_period_s_by_ae={"SLOW_PACS": 60})
    assert settings.quiet_period_for("SLOW_PACS ") == 60 and settings.quiet_period_for("CT1") == 20
    with pytest.raises(ValidationError, match="expected > 0 seconds"):
        Settings(quiet_period_s_by_ae={"CT1": 0})
    with pytest.raises(ValidationError, match="must be set together"):
        Settings(tls_cert_path=tmp_path / "cert.pem")
    with pytest.raises(ValidationError, match="tls_ca_path is set but TLS is not"):
        Settings(tls_ca_path=tmp_path / "ca.pem")
    with pytest.raises(ValidationError, match="max_disk_used_fraction"):
        Settings(max_disk_used_fraction=1.5)


def test_quiet_period_per_ae_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEKEEPER_QUIET_PERIOD_S_BY_AE", '{"CT1": 45}')
    assert Settings().quiet_period_for("CT1") == 45


@pytest.mark.integration
def test_listener_on_default_sqlite_serves_concurrent_senders_and_series_lists_them(
    tmp_path: Path, redis_url: str
) -> None:
    database_url = f"sqlite:///{tmp_path / 'var' / 'gatekeeper.db'}"
    upgrade(database_url)
    folders = make_phantom(tmp_path / "phantom", slices=4, seed=17, series=2)
    settings = make_settings(tmp_path / "var", database_url, redis_url)
    db = Db(database_url)
    with running_listener(settings) as listener:
        senders = [
            subprocess.Popen(
                [STORESCU, "-aec", "GATEKEEPER", "127.0.0.1", str(listener.port), *map(str, ct_files(folder))]
            )
            for folder in folders
        ]
        assert [sender.wait(timeout=120) for sender in senders] == [0, 0]
        wait_for(lambda: [s.state for s in db.series()] == [SeriesState.QUEUED] * 2)
    env = settings_env(settings)
    listing = run_gatekeeper("series", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert [(r["state"], r["num_instances"], r["version"]) for r in rows] == [("queued", 4, 1)] * 2
    table = run_gatekeeper("series", env=env)
    assert table.returncode == 0 and table.stdout.count("queued") == 2
    missing = run_gatekeeper("series", "complete", "1.2.3.4", env=env)
    assert missing.returncode == 1 and "no receiving version" in missing.stdout
    db.close()


def _flags(**values: object) -> argparse.Namespace:
    names = ("ae_title", "bind", "port", "allow_ae", "allow_ip", "web_port")
    return argparse.Namespace(**{name: values.get(name) for name in names})


def test_listen_and_serve_apply_their_flags_over_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from service.commands.ingest import listen_settings
    from service.commands.serve import serve_settings
    from service.settings import get_settings

    monkeypatch.setenv("GATEKEEPER_STORAGE_DIR", str(tmp_path))
    monkeypatch.setenv("GATEKEEPER_PORT", "11112")
    get_settings.cache_clear()
    try:
        _check_flags(listen_settings, serve_settings)
    finally:
        get_settings.cache_clear()


def _check_flags(listen_settings, serve_settings) -> None:  # type: ignore[no-untyped-def]
    listen = listen_settings(_flags(port=4242, allow_ae=["PACS1"], allow_ip=["10.0.0.0/8"]))
    assert (listen.port, listen.allowed_ae_titles) == (4242, ["PACS1"])
    serve = serve_settings(_flags(bind="127.0.0.1", web_port=8123))
    assert serve.web_port == 8123 and serve.port == 11112 and serve.allowed_ae_titles == ["*"]  # loopback default
    with pytest.raises(UsageError, match="invalid port"):
        listen_settings(_flags(port=70000, allow_ae=["PACS1"], allow_ip=["10.0.0.0/8"]))
    with pytest.raises(UsageError, match="invalid web_port"):
        serve_settings(_flags(bind="127.0.0.1", web_port=0))
