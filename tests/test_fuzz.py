"""The fuzz harness (ops/fuzz.py), 1 000 seeded cases against `gatekeeper listen` in its own process: malformed
data sets over real associations and malformed PDUs over raw sockets. The listener never dies, answers every
case with a DICOM status, a reject, an abort or a close, acknowledges nothing broken, and still stores a clean
series afterwards. The 10 000-case run by hand is in docs/reliability.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ingest_support import make_phantom

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CASES = 1000


def test_a_thousand_fuzzed_cases_leave_the_listener_serving(tmp_path: Path, postgres_url: str) -> None:
    phantom = make_phantom(tmp_path / "phantom", slices=10, seed=14, series=2, matrix=64)[0].parent
    results = tmp_path / "fuzz.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "fuzz.py"), "--cases", str(CASES), "--seed", "14"]
        + ["--phantom", str(phantom), "--database-url", postgres_url, "--work", str(tmp_path / "work")]
        + ["--json", str(results)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert results.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    summary = json.loads(results.read_text())
    assert summary["crashes"] == 0
    assert summary["failures"] == [], summary["failures"][:10]
    assert summary["cases_run"] == CASES
    assert summary["clean_series_stored"], summary["clean_series_detail"]
    assert summary["listener_exit_code_after_sigterm"] == 0
    assert run.returncode == 0, run.stderr[-3000:]

    by_kind = summary["by_kind"]
    # Every kind of mutation ran, and reached the check that should refuse it.
    assert set(by_kind) == set(summary["kinds"])
    assert by_kind["valid"] == {"0x0000": sum(by_kind["valid"].values())}
    assert set(by_kind["oversized"]) == {"0xA700"}
    assert {"0x0000", "0xA700", "0xA900", "0xC210"} <= set(summary["statuses"])
    # Each malformed data set was refused by a check that names it, never by the catch-all (0xC000 + traceback).
    assert summary["listener_log"]["unforeseen_check_errors"] == 0
    assert "0xC000" not in summary["statuses"]
