"""Prometheus metrics: the names the alert rules and the dashboard use exist, the web app counts what
the listener stored, the bearer token, and `gatekeeper listen --metrics-port` in its own process."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ingest_support import (
    ct_files,
    free_port,
    gatekeeper_executable,
    make_phantom,
    make_settings,
    running_listener,
    settings_env,
    storescu,
    upgrade,
    wait_for,
)
from prometheus_client.parser import text_string_to_metric_families
from web_support import serve

from service.db.session import make_engine, make_session_factory
from service.settings import Settings
from service.web.app import create_app

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "ops" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "ops" / "grafana" / "gatekeeper.json"
SECRET = "metrics-test-secret-key-0123456789abcdef"
METRIC_NAME = re.compile(r"\bgatekeeper_[a-z0-9_]+\b")
#: The bearer token of `web_settings`: /metrics is closed without one.
TOKEN = "metrics-test-scrape-token"


def fetch(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(url: str, token: str | None = TOKEN) -> dict[str, float]:
    """Every sample of a /metrics answer, by `name{label="value",...}` (labels sorted); also each family's name."""
    status, text = fetch(url, token)
    assert status == 200, text
    return scrape_text(text)


def scrape_text(text: str) -> dict[str, float]:
    """`scrape` of an answer already fetched."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        samples.setdefault(family.name, 0.0)
        if family.type == "counter":
            samples.setdefault(family.name + "_total", 0.0)
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
            samples.setdefault(sample.name, sample.value)
    return samples


def web_settings(tmp_path: Path, database_url: str, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"web_secret_key": SECRET, "metrics_token": TOKEN, **overrides}
    return make_settings(tmp_path / "var", database_url, redis_url, **values)


@pytest.fixture
def database(postgres_db_url: str) -> Iterator[str]:
    upgrade(postgres_db_url)
    yield postgres_db_url


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"], "the dashboard has no panels"
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def alert_rules() -> list[str]:
    """The alert names in the rules file (a light reading of its YAML: `- alert: Name` lines)."""
    return re.findall(r"^\s*- alert: (\w+)\s*$", ALERTS.read_text(), flags=re.MULTILINE)


def test_every_metric_in_the_alert_rules_and_dashboard_exists(tmp_path: Path, database: str, redis_url: str) -> None:
    settings = web_settings(tmp_path, database, redis_url)
    assert {
        "GatekeeperNothingReceived",
        "GatekeeperQueueStuck",
        "GatekeeperExportFailures",
        "GatekeeperDiskReserveNear",
    } <= set(alert_rules())
    expressions = dashboard_expressions()
    named = set(METRIC_NAME.findall(ALERTS.read_text())) | {n for e in expressions for n in METRIC_NAME.findall(e)}
    assert len(named) >= 10, named
    with serve(create_app(settings)) as url:
        samples = scrape(f"{url}/metrics")
    missing = sorted(name for name in named if name not in samples)
    assert not missing, f"named in ops/ but not exported: {missing}"


def test_web_metrics_count_the_instances_the_listener_stored(tmp_path: Path, database: str, redis_url: str) -> None:
    [folder] = make_phantom(tmp_path / "phantom", slices=3, seed=41, matrix=64)
    files = ct_files(folder)
    settings = web_settings(tmp_path, database, redis_url)
    engine = make_engine(database)
    try:
        with serve(create_app(settings, make_session_factory(engine))) as url:
            before = scrape(f"{url}/metrics")
            with running_listener(settings) as listener:
                result = storescu(listener.port, files)
                assert result.returncode == 0, result.stderr
            after = scrape(f"{url}/metrics")
    finally:
        engine.dispose()
    key = "gatekeeper_instances_received_total"
    assert after[key] - before[key] == len(files) == 3
    assert (
        after["gatekeeper_received_bytes_total"] - before["gatekeeper_received_bytes_total"]
        >= sum(f.stat().st_size for f in files) * 0.9
    )
    # In this process (no metrics folder written) the listener's event counters are this process's own.
    success = 'gatekeeper_cstore_responses_total{status="success"}'
    assert after[success] - before[success] == 3
    assert (
        after['gatekeeper_series{state="receiving"}']
        + after['gatekeeper_series{state="complete"}']
        + after['gatekeeper_series{state="queued"}']
        >= 1
    )


def test_metrics_need_the_bearer_token_when_one_is_set(tmp_path: Path, database: str, redis_url: str) -> None:
    settings = web_settings(tmp_path, database, redis_url, metrics_token="s3cret-token")
    with serve(create_app(settings)) as url:
        assert fetch(f"{url}/metrics")[0] == 401
        assert fetch(f"{url}/metrics", token="wrong")[0] == 401
        status, text = fetch(f"{url}/metrics", token="s3cret-token")
        assert status == 200 and "gatekeeper_instances_received_total" in text
        assert fetch(f"{url}/healthz")[0] == 200  # nothing else changes


def test_metrics_are_closed_without_a_token_unless_opened_explicitly(
    tmp_path: Path, database: str, redis_url: str
) -> None:
    closed = web_settings(tmp_path / "closed", database, redis_url, metrics_token="")
    with serve(create_app(closed)) as url:
        status, text = fetch(f"{url}/metrics")
        assert status == 401 and "GATEKEEPER_METRICS_TOKEN" in text
    opened = web_settings(tmp_path / "open", database, redis_url, metrics_token="", metrics_open=True)
    with serve(create_app(opened)) as url:
        assert "gatekeeper_instances_received_total" in scrape(f"{url}/metrics", token=None)


def test_calling_ae_titles_are_not_labels_unless_enabled(tmp_path: Path, database: str, redis_url: str) -> None:
    from service import metrics

    metrics.record_association("HIDDEN_AE_1", accepted=True)
    metrics.record_association("HIDDEN_AE_2", accepted=False)
    with serve(create_app(web_settings(tmp_path / "hidden", database, redis_url))) as url:
        status, text = fetch(f"{url}/metrics", TOKEN)
    assert status == 200 and "HIDDEN_AE" not in text
    samples = scrape_text(text)
    assert samples['gatekeeper_associations_total{calling_ae="any",result="accepted"}'] >= 1
    assert samples['gatekeeper_associations_total{calling_ae="any",result="rejected"}'] >= 1
    named = web_settings(tmp_path / "named", database, redis_url, metrics_ae_title_labels=True)
    with serve(create_app(named)) as url:
        assert (
            scrape(f"{url}/metrics")['gatekeeper_associations_total{calling_ae="HIDDEN_AE_1",result="accepted"}'] >= 1
        )


def test_listen_metrics_port_serves_the_counters_of_the_listener_process(
    tmp_path: Path, database: str, redis_url: str
) -> None:
    [folder] = make_phantom(tmp_path / "phantom", slices=2, seed=42, matrix=64)
    files = ct_files(folder)
    settings = web_settings(tmp_path, database, redis_url, metrics_ae_title_labels=True)
    metrics_port = free_port()
    log_path = tmp_path / "listen.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [gatekeeper_executable(), "listen", "--metrics-port", str(metrics_port)],
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                socket.create_connection(("127.0.0.1", metrics_port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait_for(ready, timeout=60)
        result = storescu(settings.port, files)
        assert result.returncode == 0, result.stderr
        listener_samples = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert listener_samples['gatekeeper_cstore_responses_total{status="success"}'] == 2
        assert listener_samples["gatekeeper_instances_received_total"] == 2
        assert listener_samples['gatekeeper_associations_total{calling_ae="STORESCU",result="accepted"}'] >= 1
        # The web app (another process) reads the listener's counters from the metrics folder.
        assert settings.metrics_dir is not None and any(settings.metrics_dir.glob("*.db"))
        with serve(create_app(settings)) as url:
            web_samples = scrape(f"{url}/metrics")
        assert web_samples['gatekeeper_cstore_responses_total{status="success"}'] == 2
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_building_the_command_line_does_not_load_prometheus_client() -> None:
    """`gatekeeper listen` and `worker` export their metrics folder before prometheus_client loads."""
    import sys

    code = "import sys; from service.commands.main import build_parser; build_parser(); print('prometheus_client' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.stdout.strip() == "False", result.stderr
