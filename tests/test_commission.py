"""`gatekeeper commission` end to end on a tiny phantom site (24 normal series of 64², 12 slices; liver contours
for 10): the patient-wise split, the models and their series lists, candidates in the real PostgreSQL registry,
report.json and a self-contained report.html, resume from the cache, the minimum, and the leakage refusal.

The detector and the segmenter fine-tune run a couple of steps only (`--detector-steps`, `--fine-tune-steps`):
this tests the wiring, not the models.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("torch")

import psycopg  # noqa: E402
from ingest_support import upgrade  # noqa: E402

from models.commission.leakage import leaked_series, seen_series  # noqa: E402
from models.commission.split import MINIMUM_NORMALS, role_sizes  # noqa: E402
from service.commands.main import main  # noqa: E402
from service.phantom.generate import SeriesSpec, generate_run  # noqa: E402
from service.settings import get_settings  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERIES = MINIMUM_NORMALS  # 24: the protocol's minimum
CONTOURED = 10
QUICK = ["--minutes", "0.2", "--detector-family", "dcgan", "--detector-size", "64", "--detector-steps", "2",
         "--detector-batch", "4", "--fine-tune-steps", "2", "--fine-tune-minutes", "1", "--jobs", "1",
         "--no-progress"]  # fmt: skip


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


@dataclass
class Site:
    normals: Path
    contours: Path
    out: Path
    first_stdout: str
    database_url: str


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, postgres_url: str) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("site")
    specs = [
        SeriesSpec(folder=f"{i:04d}", patient_seed=700 + i, series_seed=1700 + i, num_slices=12, matrix=64)
        for i in range(SERIES)
    ]
    generate_run(specs, root / "normals", progress=False)
    (root / "normals" / "manifest.json").unlink()  # a PACS export has none
    contours = root / "contours"
    contours.mkdir()
    for spec in specs[:CONTOURED]:
        shutil.move(root / "normals" / spec.folder / "ground_truth" / "organs.seg.dcm", contours / f"{spec.folder}.dcm")
    name = f"commission_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    saved = {k: v for k, v in os.environ.items() if k.startswith("GATEKEEPER_")}
    os.environ.update({"GATEKEEPER_DATABASE_URL": url, "GATEKEEPER_STORAGE_DIR": str(root / "storage")})
    get_settings.cache_clear()
    try:
        out = root / "report"
        code, stdout, stderr = _run(
            ["commission", "--normals", str(root / "normals"), "--contours", str(contours), "--out", str(out), *QUICK]
        )
        assert code == 0, stderr[-3000:]
        yield Site(root / "normals", contours, out, stdout, url)
    finally:
        for k in [k for k in os.environ if k.startswith("GATEKEEPER_")]:
            del os.environ[k]
        os.environ.update(saved)
        get_settings.cache_clear()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_split_is_patient_wise_disjoint_and_stated(site: Site) -> None:
    split = json.loads((site.out / "split.json").read_text())
    roles = split["roles"]
    assert {r: len(u) for r, u in roles.items()} == role_sizes(SERIES)
    every = [u for uids in roles.values() for u in uids]
    assert len(every) == len(set(every)) == SERIES
    assert split["minimum"].startswith(f"at least {MINIMUM_NORMALS}")
    # contoured series are held out first, so Dice is measured
    assert set(split["contoured"]) & set(roles["held_out"])
    text = (site.out / "split.json").read_text() + (site.out / "report.json").read_text()
    assert "PH0007" not in text and "PatientID" not in text  # no patient IDs written (phantom IDs are PH…)


def test_every_model_lists_the_series_it_was_trained_or_calibrated_on(site: Site) -> None:
    roles = json.loads((site.out / "split.json").read_text())["roles"]
    detector = json.loads((site.out / "models" / "detector" / "model.json").read_text())["training"]
    assert detector["trained_on_series"] == roles["train"]
    assert detector["calibrated_on_series"] == roles["detector_validation"]
    gate = json.loads((site.out / "models" / "gate" / "gate.json").read_text())
    assert gate["data"]["calibrated_on_series"] == roles["gate_calibration"]
    population = gate["calibration_population"]
    assert population["kind"] == "site" and population["series"] == len(roles["gate_calibration"])
    assert population["report"] == str((site.out / "report.html").resolve())
    seg = json.loads((site.out / "models" / "segmenter" / "model.json").read_text())
    held = set(roles["held_out"])
    assert seen_series(seg) and not seen_series(seg) & held


def test_report_json_and_self_contained_html(site: Site) -> None:
    report = json.loads((site.out / "report.json").read_text())
    ev = report["evaluation"]
    assert ev["held_out_normals"] == role_sizes(SERIES)["held_out"]
    lo, hi = ev["false_flag_rate_ci95"]
    assert 0 <= lo <= ev["false_flag_rate"] <= hi <= 1
    assert ev["segmenter"]["contoured_held_out"] >= 1 and ev["segmenter"]["dice_mean"] is not None
    assert {row["signal"] for row in report["signals"]} and all(row["shipped"] for row in report["signals"])
    assert any(s == "gatekeeper report shadow" for s in report["next_steps"])
    assert any(s.startswith("gatekeeper models promote gate ") for s in report["next_steps"])
    html = (site.out / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html
    assert [line for line in site.first_stdout.splitlines() if line.startswith("commission: ")][-1].startswith(
        "commission: report:"
    )


def test_candidates_are_registered_in_postgres(site: Site) -> None:
    report = json.loads((site.out / "report.json").read_text())
    with psycopg.connect(site.database_url.replace("+psycopg", "")) as conn:
        rows = dict(conn.execute("SELECT kind || ':' || version, status FROM model_version").fetchall())
    for kind in ("detector", "gate", "segmenter"):
        version = report["candidates"][kind]
        assert version and rows[f"{kind}:{version}"] == "candidate"


def test_a_second_run_resumes_from_the_cache(site: Site) -> None:
    model = site.out / "models" / "detector" / "model.json"
    cached = sorted((site.out / "cache").glob("*/*.pkl"))
    before = model.stat().st_mtime_ns
    before_cache = [p.stat().st_mtime_ns for p in cached]
    assert cached
    code, stdout, stderr = _run(
        ["commission", "--normals", str(site.normals), "--contours", str(site.contours), "--out", str(site.out), *QUICK]
    )
    assert code == 0, stderr[-2000:]
    assert "commission: split: reused" in stdout
    assert model.stat().st_mtime_ns == before
    assert [p.stat().st_mtime_ns for p in cached] == before_cache  # no series measured again


def test_evaluate_gate_refuses_a_series_the_gate_was_calibrated_on(site: Site, tmp_path: Path) -> None:
    gate = json.loads((site.out / "models" / "gate" / "gate.json").read_text())
    uid = gate["data"]["calibrated_on_series"][0]
    code, _, stderr = _run(
        ["evaluate", "gate", "--data", str(site.normals), "--out", str(tmp_path / "eval"),
         "--gate", str(site.out / "models" / "gate"), "--detector", str(site.out / "models" / "detector")]
    )  # fmt: skip
    assert code == 2
    assert uid in stderr or "refusing" in stderr
    assert "refusing to report" in stderr.strip().splitlines()[-1]


def test_too_few_normals_exit_2_naming_the_minimum(site: Site, tmp_path: Path) -> None:
    few = tmp_path / "few"
    for folder in sorted(p for p in site.normals.iterdir() if p.is_dir())[:3]:
        shutil.copytree(folder, few / folder.name)
    code, _, stderr = _run(["commission", "--normals", str(few), "--out", str(tmp_path / "r"), *QUICK])
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and f"at least {MINIMUM_NORMALS} normal CT series" in lines[0]


def test_leaked_series_names_the_model_and_the_series(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text(json.dumps({"training": {"trained_on_series": ["1.2.3"]}}))
    assert leaked_series(["9.9"], {"--model": tmp_path}) is None
    problem = leaked_series(["9.9", "1.2.3"], {"--model": tmp_path})
    assert problem is not None and "1.2.3" in problem and "--model" in problem


def test_false_flag_reasons_read_as_words_in_the_html() -> None:
    from models.commission.report import _reasons

    assert _reasons({}) == "none"
    assert _reasons({"metal": 1, "gate_evidence": 2}) == "gate_evidence 2, metal 1"
    assert _reasons({"<b>": 1}) == "&lt;b&gt; 1"
