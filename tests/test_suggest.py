"""`service.suggest` and `gatekeeper pool suggest`: which series a person should contour first.

- Unit: each strategy's scores (one test each), k-center greedy, the ranking's order and missing
  evidence, and the stored gate evidence read back.
- Bad input: a budget ≤ 0 and an unknown strategy end with one line and exit code 2.
- Integration (real PostgreSQL, the shipped ONNX segmenter and detector): phantom series stored as
  the pipeline leaves them (scores, a gate decision, a worklist item), one contoured and one
  superseded series that must not be suggested; every strategy ranks, `diverse` and `entropy`
  compute what was not stored from the files.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from ingest_support import Db, ct_files, make_phantom, make_settings, upgrade

from service.commands.main import main
from service.db.tables import Instance, Series, SeriesEvent, SeriesScore, WorklistItem
from service.settings import get_settings, settings_environment
from service.suggest import (
    STRATEGIES,
    Candidate,
    diverse_scores,
    entropy_scores,
    gan_scores,
    gate_evidence,
    gate_scores,
    informativeness,
    k_center_greedy,
    random_scores,
    rank,
)


def candidates() -> list[Candidate]:
    return [
        Candidate("1.1", detector_score=2.0, detector_threshold=4.0, gate_fused=1.0, gate_fused_threshold=2.0),
        Candidate("1.2", detector_score=8.0, detector_threshold=4.0, entropy=0.2),
        Candidate("1.3", gate_fused=6.0, gate_fused_threshold=2.0, entropy=0.05),
    ]


# --- unit: one per strategy ---------------------------------------------------------------------------


def test_gan_scores_are_score_over_threshold_and_nan_when_unscored() -> None:
    scores = gan_scores(candidates())
    assert scores[:2].tolist() == [0.5, 2.0] and np.isnan(scores[2])


def test_gate_scores_are_fused_over_threshold() -> None:
    scores = gate_scores(candidates())
    assert scores[0] == 0.5 and np.isnan(scores[1]) and scores[2] == 3.0


def test_entropy_scores_are_the_stored_entropy() -> None:
    scores = entropy_scores(candidates())
    assert np.isnan(scores[0]) and scores[1:].tolist() == [0.2, 0.05]


def test_random_scores_are_seeded() -> None:
    pool = candidates() * 5
    assert random_scores(pool, seed=3).tolist() == random_scores(pool, seed=3).tolist()
    assert random_scores(pool, seed=3).tolist() != random_scores(pool, seed=4).tolist()


def test_k_center_greedy_covers_the_clusters_before_repeating_one() -> None:
    rng = np.random.default_rng(0)
    clusters = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    features = np.concatenate([c + 0.1 * rng.standard_normal((5, 2)) for c in clusters])
    picks, distances = k_center_greedy(features, 3)
    assert sorted(p // 5 for p in picks) == [0, 1, 2]  # one series of each cluster
    assert distances == sorted(distances, reverse=True)
    picks, _ = k_center_greedy(features, 2, centres=features[:5])  # cluster 0 already contoured
    assert sorted(p // 5 for p in picks) == [1, 2]


def test_diverse_scores_rank_the_picks_first_and_skip_missing_embeddings() -> None:
    embeddings = [np.array([0.0, 0.0]), np.array([0.1, 0.0]), np.array([5.0, 5.0]), None]
    pool = [Candidate(f"2.{i}", embedding=e) for i, e in enumerate(embeddings)]
    scores = diverse_scores(pool, 2)
    assert np.isnan(scores[3])
    top2 = set(np.argsort(-np.nan_to_num(scores, nan=-99))[:2])
    assert 2 in top2 and len(top2 & {0, 1}) == 1  # the outlier and one of the near-duplicates


def test_rank_puts_missing_evidence_last_and_names_the_strategy() -> None:
    rows = rank(candidates(), strategy="gan", budget=3)
    assert [r.series_instance_uid for r in rows] == ["1.2", "1.1", "1.3"]
    assert [r.rank for r in rows] == [1, 2, 3] and rows[2].score is None
    assert {r.strategy for r in rows} == {"gan"}
    assert rows[0].as_json().keys() >= {"series_instance_uid", "rank", "score", "strategy", "evidence"}
    assert len(rank(candidates(), strategy="gate", budget=1)) == 1


@pytest.mark.parametrize(("strategy", "budget"), [("gan", 0), ("best", 3)])
def test_rank_refuses_bad_requests(strategy: str, budget: int) -> None:
    with pytest.raises(ValueError, match="budget|strategy"):
        rank(candidates(), strategy=strategy, budget=budget)


def test_gate_evidence_and_informativeness_read_the_stored_decision() -> None:
    detail = {"gate": {"fused": 3.0, "fused_threshold": 1.5, "findings": [{"signal": "entropy", "value": 0.11}]}}
    assert gate_evidence(detail) == (3.0, 1.5, 0.11)
    assert gate_evidence({"problem": "x"}) == (None, None, None)
    assert informativeness(detail=detail, score=1.0, threshold=4.0) == 2.0
    assert informativeness(detail={}, score=1.0, threshold=4.0) == 0.25
    assert informativeness(detail=None, score=None, threshold=None) is None


@pytest.mark.parametrize(
    ("args", "message"), [(["--budget", "0"], "budget"), (["--budget", "3", "--strategy", "best"], "strategy")]
)
def test_pool_suggest_bad_input_is_one_line_and_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pool", "suggest", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


# --- integration: the command on the real database -----------------------------------------------------


def _store(db: Db, storage: Path, folder: Path, *, state: str, version: int = 1, superseded: bool = False) -> int:
    """A phantom series' files indexed as ingest leaves them; returns the series id."""
    now = dt.datetime.now(dt.UTC)
    files = ct_files(folder)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    with db.sessions.begin() as session:
        series = Series(
            series_instance_uid=str(first.SeriesInstanceUID),
            version=version,
            study_instance_uid=str(first.StudyInstanceUID),
            frame_of_reference_uid=str(first.FrameOfReferenceUID),
            modality="CT",
            calling_ae_title="STORESCU",
            state=state,
            num_instances=len(files),
            first_received_at=now,
            last_received_at=now,
            completed_at=now,
            superseded=superseded,
        )
        session.add(series)
        session.flush()
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            session.add(
                Instance(
                    series_id=series.id,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    relative_path=path.relative_to(storage).as_posix(),
                    sha256="0" * 64,
                    size_bytes=path.stat().st_size,
                    received_at=now,
                )
            )
        return int(series.id)


def _score(db: Db, series_id: int, score: float) -> None:
    with db.sessions.begin() as session:
        session.add(
            SeriesScore(
                series_id=series_id,
                model_version="test",
                score=score,
                threshold=4.0,
                flagged=score > 4.0,
                slices=[],
                top_slices=[],
                provider="CPUExecutionProvider",
                duration_s=0.1,
            )
        )


def _gate(fused: float, entropy: float) -> dict[str, object]:
    finding = {"signal": "entropy", "value": entropy, "threshold": 0.2, "fired": False, "slices": None, "words": ""}
    return {"gate": {"manual": fused > 2.0, "fused": fused, "fused_threshold": 2.0, "findings": [finding]}}


@pytest.mark.integration
def test_pool_suggest_ranks_the_uncontoured_series_on_postgres(
    tmp_path: Path,
    postgres_db_url: str,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    storage = tmp_path / "storage"
    folders = make_phantom(storage / "incoming", slices=10, seed=5, series=5, matrix=128)
    capsys.readouterr()  # the phantom command's own lines
    upgrade(postgres_db_url)
    settings = make_settings(storage, postgres_db_url, redis_url)
    for name, value in settings_environment(settings).items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    db = Db(postgres_db_url)
    try:
        delivered = _store(db, storage, folders[0], state="delivered")
        worklisted = _store(db, storage, folders[1], state="worklisted")
        unscored = _store(db, storage, folders[2], state="withheld")
        _store(db, storage, folders[3], state="contoured")  # its contour came back: not suggested
        _store(db, storage, folders[4], state="delivered", superseded=True)  # an older version: not suggested
        _score(db, delivered, 2.0)
        _score(db, worklisted, 9.0)
        with db.sessions.begin() as session:
            session.add(SeriesEvent(series_id=delivered, kind="exporting", detail=_gate(1.0, 0.05)))
            session.add(WorklistItem(series_id=worklisted, reason="gate_evidence", detail=_gate(6.0, 0.3)))

        def suggested(strategy: str, budget: int = 5) -> list[dict[str, object]]:
            assert main(["pool", "suggest", "--budget", str(budget), "--strategy", strategy, "--json"]) == 0
            rows: list[dict[str, object]] = json.loads(capsys.readouterr().out)
            assert all(r["strategy"] == strategy for r in rows)
            assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
            return rows

        ids = {r["series_id"]: r for r in suggested("gan")}
        assert set(ids) == {delivered, worklisted, unscored}
        assert [r["series_id"] for r in suggested("gan")] == [worklisted, delivered, unscored]
        gate = suggested("gate")
        assert [r["series_id"] for r in gate] == [worklisted, delivered, unscored] and gate[2]["score"] is None
        assert gate[0]["evidence"]["worklist_status"] == "open"  # type: ignore[index]
        entropy = suggested("entropy")
        assert all(r["score"] is not None for r in entropy)  # the withheld one's computed by the ONNX segmenter
        assert entropy[0]["series_id"] == worklisted
        diverse = suggested("diverse", budget=2)
        assert len(diverse) == 2 and all(isinstance(r["score"], float) for r in diverse)
        assert len(suggested("random", budget=2)) == 2
        assert main(["pool", "suggest", "--budget", "2"]) == 0  # the table: a header and two lines
        assert len(capsys.readouterr().out.strip().splitlines()) == 3
        assert set(STRATEGIES) == {"gan", "gate", "entropy", "diverse", "random"}
    finally:
        get_settings.cache_clear()
        db.close()
