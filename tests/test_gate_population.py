"""Which population the active gate was calibrated on — in `gatekeeper status`, `/readyz` and the worklist
header — and what the worklist and series page show as the reason: the gate's evidence against its cut and
the signals that fired, not the detector's own score and threshold (which the gate does not route on).

Real HTTP against the app under uvicorn with a seeded PostgreSQL database (pages: cookie login), the
shipped gate (models/gate/default, no `calibration_population` block) and a site gate registered and
promoted in the model registry.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_web import Env, make_settings
from web_support import ANOMALY, FLAGGED_GATE, seed_database, serve, write_phantom

from service.calibration_population import calibration_population, read_active_gate
from service.commands.gate import population_of
from service.commands.status import collect_status, format_report
from service.db.session import make_engine, make_session_factory
from service.db.tables import Base, ModelKind
from service.gate import Gate, content_version
from service.gate.config import population_block, read_config, write_gate
from service.model_registry import promote, register
from service.settings import Settings
from service.web.app import create_app

SHIPPED_GATE = Path(__file__).resolve().parent.parent / "models" / "gate" / "default"
SITE_REPORT = "https://reports.example/commissioning/site-a.html"


# --- the reader ------------------------------------------------------------------------------------


def test_shipped_gate_reads_as_the_phantom_mix_with_its_numbers() -> None:
    config = json.loads((SHIPPED_GATE / "gate.json").read_text())
    assert "calibration_population" not in config  # the shipped files stay as they are
    population = calibration_population(config)
    assert population.kind == "phantom" and population.shipped
    assert population.series == config["data"]["series"] and population.date == config["created"][:10]
    assert population.words().startswith(f"the shipped phantom mix: {config['data']['series']} normal series")
    assert config["data"]["hash"] in population.words()


def test_site_block_reads_its_fields_and_a_bad_block_does_not_raise() -> None:
    block = {"kind": "site", "series": 120, "date": "2026-11-30", "report": SITE_REPORT, "site": "Site A"}
    population = calibration_population({"calibration_population": block})
    assert (population.kind, population.series, population.date, population.report) == (
        "site",
        120,
        "2026-11-30",
        SITE_REPORT,
    )
    assert population.words() == f"site data: Site A, 120 normal series, 2026-11-30, report {SITE_REPORT}"
    assert population.report_url == SITE_REPORT
    local = calibration_population({"calibration_population": {"kind": "site", "report": "reports/site-a.html"}})
    assert local.report_url is None and local.series is None  # a path is shown, never linked
    odd = calibration_population({"calibration_population": {"kind": "moon", "series": "many", "date": 5}})
    assert (odd.kind, odd.series, odd.date) == ("unknown", None, None)
    assert calibration_population(None).words() == "not calibrated (rules-only gate)"
    # Not a mapping: read as absent (the shipped mix), not an error.
    assert calibration_population({"calibration_population": "site", "data": {"series": 3}}).series == 3


def test_writer_checks_and_writes_the_block_and_the_gate_loads(tmp_path: Path) -> None:
    config, reference = read_config(SHIPPED_GATE)
    assert reference is not None
    block = {"kind": "site", "series": 120, "date": "2026-11-30", "report": "reports/site-a.html"}
    path = write_gate(tmp_path / "g", config, reference, command="test", data=config["data"], population=block)
    written = json.loads(path.read_text())
    assert written["calibration_population"] == block and written["version"] == content_version(written)
    gate = Gate.load(tmp_path / "g")  # the version hash covers the block: an edited block is refused
    assert (
        calibration_population(gate.config).words()
        == "site data: 120 normal series, 2026-11-30, report reports/site-a.html"
    )
    # Strict on output: each wrong field named, nothing written.
    for bad, field in (
        ({**block, "kind": "hospital"}, "calibration_population.kind"),
        ({**block, "series": 0}, "calibration_population.series"),
        ({**block, "date": "30/11/2026"}, "calibration_population.date"),
        ({**block, "report": ""}, "calibration_population.report"),
        ({**block, "patients": 3}, "unknown field 'patients'"),
    ):
        with pytest.raises(ValueError, match=field):
            write_gate(tmp_path / "bad", config, reference, command="test", data=config["data"], population=bad)
        assert not (tmp_path / "bad").exists()
    assert population_block({"kind": "phantom", "series": 60, "date": "2026-12-07T14:47:02+00:00"})["kind"] == "phantom"
    # Without a block (the shipped gate's case) none is written.
    plain = {k: v for k, v in config.items() if k != "calibration_population"}
    unblocked = json.loads(write_gate(tmp_path / "p", plain, reference, command="t", data=config["data"]).read_text())
    assert "calibration_population" not in unblocked


def test_calibrate_gate_writes_phantom_or_site_population(tmp_path: Path) -> None:
    from types import SimpleNamespace

    run = tmp_path / "clinic"
    run.mkdir()
    manifest = {
        "series": [{"series_instance_uid": "1.2.1", "site": {"name": "site-b"}}, {"series_instance_uid": "1.2.2"}]
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    used: Any = [SimpleNamespace(series_instance_uid=uid) for uid in ("1.2.1", "1.2.2")]
    phantom = population_of(run, used, report=None, site=None)
    assert {k: phantom[k] for k in ("kind", "series", "site")} == {
        "kind": "phantom",
        "series": 2,
        "site": "default, site-b",
    }
    assert population_block(phantom) == phantom  # what write_gate accepts
    site = population_of(run, [*used, SimpleNamespace(series_instance_uid="9.9")], report=SITE_REPORT, site="Site A")
    assert {k: site[k] for k in ("kind", "series", "site", "report")} == {
        "kind": "site",
        "series": 3,
        "site": "Site A",
        "report": SITE_REPORT,
    }


# --- a running app ---------------------------------------------------------------------------------


def site_gate(folder: Path) -> Path:
    """The shipped gate with a `calibration_population` block, re-versioned as the writer would."""
    shutil.copytree(SHIPPED_GATE, folder)
    config = json.loads((folder / "gate.json").read_text())
    config["calibration_population"] = {"kind": "site", "series": 120, "date": "2026-11-30", "report": SITE_REPORT}
    config["version"] = content_version(config)
    (folder / "gate.json").write_text(json.dumps(config, indent=1))
    return folder


@pytest.fixture
def app_env(tmp_path: Path, postgres_db_url: str, redis_url: str) -> Iterator[tuple[Env, Settings]]:
    phantoms = {
        "anomaly": write_phantom(tmp_path / "phantoms", anomaly=ANOMALY, seed=11),
        "geometry": write_phantom(tmp_path / "phantoms", anomaly=None, seed=12),
        "normal": write_phantom(tmp_path / "phantoms", anomaly=None, seed=13),
    }
    settings = make_settings(tmp_path, postgres_db_url, redis_url, gate_model_dir=SHIPPED_GATE)
    engine = make_engine(settings.database_url)
    Base.metadata.create_all(engine)
    sessions = make_session_factory(engine)
    seeded = seed_database(sessions, storage_dir=settings.storage_dir, phantoms=phantoms)
    app = create_app(settings, sessions)
    with serve(app) as url:
        yield Env(url, app, seeded, sessions), settings
    engine.dispose()


def _gate_check(env: Env) -> dict[str, Any]:
    response = env.client("alice").get("/api/readyz")
    assert response.status_code == 200, response.text
    check: dict[str, Any] = next(c for c in response.json()["checks"] if c["name"] == "gate")
    assert check["status"] == "ok", check
    return check


def test_shipped_gate_population_in_readyz_worklist_header_and_status(app_env: tuple[Env, Settings]) -> None:
    env, settings = app_env
    shipped = json.loads((SHIPPED_GATE / "gate.json").read_text())
    detail = _gate_check(env)["detail"]
    assert detail["version"] == shipped["version"] and detail["source"] == "settings"
    assert detail["calibration_population"]["kind"] == "phantom" and detail["calibration_population"]["shipped"]
    assert detail["calibration_population"]["series"] == shipped["data"]["series"]
    with env.browser("alice") as client:
        page = client.get("/worklist")
    assert page.status_code == 200
    assert f"<code>{shipped['version']}</code>" in page.text
    assert f"the shipped phantom mix: {shipped['data']['series']} normal series" in page.text

    report = collect_status(settings=settings, sessions=env.sessions, broker={})
    assert report["gate"]["version"] == shipped["version"]
    assert report["gate"]["calibration_population"]["shipped"] is True
    assert "gate_unreadable" not in {f["code"] for f in report["findings"]}
    assert f"Gate: {shipped['version']} (settings); calibrated on the shipped phantom mix" in format_report(report)


def test_promoted_site_gate_population_everywhere(app_env: tuple[Env, Settings], tmp_path: Path) -> None:
    env, settings = app_env
    record, _ = register(
        sessions=env.sessions, settings=settings, kind=ModelKind.GATE, folder=site_gate(tmp_path / "site"), actor="t"
    )
    promote(sessions=env.sessions, kind=ModelKind.GATE, version=record.version, actor="t")

    detail = _gate_check(env)["detail"]  # the registered copy loads: fields, reference hash, version hash
    assert detail["version"] == record.version and detail["source"] == "registry"
    assert {"kind": "site", "series": 120, "date": "2026-11-30"}.items() <= detail["calibration_population"].items()
    assert detail["calibrated_on"] == f"site data: 120 normal series, 2026-11-30, report {SITE_REPORT}"
    with env.browser("bob") as client:
        page = client.get("/worklist")
    assert "site data: 120 normal series, 2026-11-30" in page.text
    assert f'<a href="{SITE_REPORT}" rel="noopener noreferrer">commissioning report</a>' in page.text
    assert "shipped phantom mix" not in page.text

    report = collect_status(settings=settings, sessions=env.sessions, broker={})
    assert report["gate"]["source"] == "registry" and report["gate"]["calibration_population"]["kind"] == "site"
    assert "calibrated on site data: 120 normal series, 2026-11-30" in format_report(report)
    with env.sessions() as session:
        assert read_active_gate(session=session, settings=settings).version == record.version


def test_unreadable_gate_json_is_a_status_finding_and_fails_readyz(
    app_env: tuple[Env, Settings], tmp_path: Path
) -> None:
    env, settings = app_env
    broken = tmp_path / "broken-gate"
    broken.mkdir()
    (broken / "gate.json").write_text("{ not json")
    settings_broken = settings.model_copy(update={"gate_model_dir": broken})
    report = collect_status(settings=settings_broken, sessions=env.sessions, broker={})
    assert "gate_unreadable" in {f["code"] for f in report["findings"]}
    assert report["gate"]["version"] == "unreadable" and str(broken) in report["gate"]["problem"]
    from service.web.health import check_active_gate

    result = check_active_gate(env.sessions, settings_broken)
    assert result.status == "failed" and result.detail is not None and result.detail["problem"]


def test_worklist_and_series_page_show_the_gate_evidence_not_the_detector_threshold(
    app_env: tuple[Env, Settings],
) -> None:
    env, _ = app_env
    with env.browser("alice") as client:
        worklist = client.get("/worklist")
        series = client.get(f"/series/{env.seeded.flagged_uid}")
    assert worklist.status_code == 200 and series.status_code == 200
    row = worklist.text.split(f'data-item-id="{env.seeded.flagged_item}"', 1)[1].split("</tr>", 1)[0]
    fused, cut = FLAGGED_GATE["fused"], FLAGGED_GATE["fused_threshold"]
    assert (
        f'<span class="above" title="the gate\'s fused evidence against its cut">{fused:.3g}</span> / {cut:.3g}' in row
    )
    assert "0.850" not in row and "0.500" not in row  # the detector's score and threshold: not the reason
    assert "5–8" in row and "(fired evidence)" in row  # the slices of the fired signal (tta_dice)
    assert "Evidence / cut" in worklist.text and "sort=informative" in worklist.text

    assert 'id="gate-evidence"' in series.text and "fired: tta_dice" in series.text
    assert f"vs the gate&#39;s cut {cut:.4g}" in series.text or f"vs the gate's cut {cut:.4g}" in series.text
    detector = series.text.split('id="detector-score"', 1)[1].split("</dd>", 1)[0]
    assert "0.8500" in detector and "above" not in detector and "does not route" in detector
    assert "Series score" not in series.text and 'class="above">above threshold' not in series.text
    # A series the gate did not decide (the geometry item has no gate detail) keeps the detector's column.
    geometry_row = worklist.text.split(f'data-item-id="{env.seeded.geometry_item}"', 1)[1].split("</tr>", 1)[0]
    assert "<small>gate</small>" not in geometry_row
