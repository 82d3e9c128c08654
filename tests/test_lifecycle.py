"""The series lifecycle (`service.lifecycle`): every declared transition works, nothing else does.

Unit tests on a real (SQLite) database migrated to head; the worklist actions go through
`service.web.crud`, the only way a dosimetrist moves a series.
"""

from __future__ import annotations

import ast
import datetime as dt
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from ingest_support import Db, upgrade
from sqlalchemy import select, update

from service.db.tables import RouteReason, Series, SeriesEvent, UserRole, WorklistItem, WorklistStatus
from service.lifecycle import (
    ALLOWED_TRANSITIONS,
    FINAL_STATES,
    INITIAL_STATE,
    SeriesState,
    TransitionError,
    transition,
)
from service.web import crud

SERVICE_DIR = Path(__file__).resolve().parent.parent / "service"


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite database file migrated to head once; each test gets a copy (hundreds of tests)."""
    path = tmp_path_factory.mktemp("lifecycle") / "migrated.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture
def db(tmp_path: Path, migrated: Path) -> Iterator[Db]:
    shutil.copyfile(migrated, tmp_path / "lifecycle.db")
    url = f"sqlite:///{tmp_path / 'lifecycle.db'}"
    database = Db(url)
    yield database
    database.close()


def add_series(db: Db, state: SeriesState, *, version: int = 1, superseded: bool = False) -> int:
    now = dt.datetime.now(dt.UTC)
    with db.sessions.begin() as session:
        series = Series(
            series_instance_uid="1.2.826.0.1.3680043.10.543.1",
            version=version,
            study_instance_uid="1.2.826.0.1.3680043.10.543.2",
            modality="CT",
            calling_ae_title="CT1",
            state=state.value,
            num_instances=1,
            num_duplicates=0,
            queue_attempts=0,
            superseded=superseded,
            first_received_at=now,
            last_received_at=now,
        )
        session.add(series)
        session.flush()
        return series.id


def state_and_events(db: Db, series_id: int) -> tuple[str, list[str]]:
    with db.sessions() as session:
        state = session.scalar(select(Series.state).where(Series.id == series_id))
        kinds = session.scalars(
            select(SeriesEvent.kind).where(SeriesEvent.series_id == series_id).order_by(SeriesEvent.id)
        ).all()
    assert state is not None
    return state, list(kinds)


DECLARED = [(source, target) for source, targets in ALLOWED_TRANSITIONS.items() for target in sorted(targets)]
UNDECLARED = [
    (source, target)
    for source in SeriesState
    for target in SeriesState
    if target not in ALLOWED_TRANSITIONS.get(source, frozenset())
]


@pytest.mark.parametrize(("source", "target"), DECLARED, ids=[f"{s}->{t}" for s, t in DECLARED])
def test_every_declared_transition_moves_the_series_and_writes_its_event(
    db: Db, source: SeriesState, target: SeriesState
) -> None:
    series_id = add_series(db, source)
    with db.sessions.begin() as session:
        assert transition(session=session, series_id=series_id, source=source, target=target, detail={"by": "test"})
    state, kinds = state_and_events(db, series_id)
    assert (state, kinds) == (target.value, [target.value])


@pytest.mark.parametrize(("source", "target"), UNDECLARED, ids=[f"{s}->{t}" for s, t in UNDECLARED])
def test_an_undeclared_transition_raises_and_changes_nothing(db: Db, source: SeriesState, target: SeriesState) -> None:
    series_id = add_series(db, source)
    with db.sessions.begin() as session, pytest.raises(TransitionError, match=f"{source.value} -> {target.value}"):
        transition(session=session, series_id=series_id, source=source, target=target)
    assert state_and_events(db, series_id) == (source.value, [])


def test_a_series_not_in_the_expected_state_is_left_alone(db: Db) -> None:
    series_id = add_series(db, SeriesState.SCORING)  # another worker moved it first
    with db.sessions.begin() as session:
        assert not transition(
            session=session, series_id=series_id, source=SeriesState.QUEUED, target=SeriesState.SCORING
        )
    assert state_and_events(db, series_id) == ("scoring", [])


def test_a_superseded_version_is_never_moved(db: Db) -> None:
    series_id = add_series(db, SeriesState.QUEUED, superseded=True)
    with db.sessions.begin() as session:
        assert not transition(
            session=session, series_id=series_id, source=SeriesState.QUEUED, target=SeriesState.SCORING
        )
    assert state_and_events(db, series_id) == ("queued", [])


def test_every_state_is_reachable_from_the_initial_state() -> None:
    reached, frontier = {INITIAL_STATE}, [INITIAL_STATE]
    while frontier:
        for target in ALLOWED_TRANSITIONS.get(frontier.pop(), frozenset()):
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(SeriesState)


def add_worklist_item(db: Db, series_id: int, status: WorklistStatus, claimed_by: int | None = None) -> int:
    with db.sessions.begin() as session:
        item = WorklistItem(
            series_id=series_id,
            reason="anomaly",
            status=status.value,
            claimed_by=claimed_by,
            claimed_at=dt.datetime.now(dt.UTC) if claimed_by else None,
        )
        session.add(item)
        session.flush()
        return item.id


def test_a_superseded_series_version_cannot_be_claimed_or_finished(db: Db) -> None:
    with db.sessions() as session:
        user_id = crud.create_user(
            session=session, name="dana", role=UserRole.DOSIMETRIST.value, password="pw-123456"
        ).id
    open_item = add_worklist_item(db, add_series(db, SeriesState.WORKLISTED, superseded=True), WorklistStatus.OPEN)
    with db.sessions() as session, pytest.raises(crud.Conflict, match="superseded"):
        crud.claim_item(session=session, item_id=open_item, user_id=user_id)
    claimed_series = add_series(db, SeriesState.CLAIMED, version=2, superseded=True)
    claimed_item = add_worklist_item(db, claimed_series, WorklistStatus.CLAIMED, claimed_by=user_id)
    with db.sessions() as session, pytest.raises(crud.Conflict, match="superseded"):
        crud.finish_item(session=session, item_id=claimed_item, user_id=user_id)
    with db.sessions() as session:
        items = {i.id: i.status for i in session.scalars(select(WorklistItem))}
    assert items == {open_item: "open", claimed_item: "claimed"}  # nothing half-done
    assert state_and_events(db, claimed_series) == ("claimed", [])


def test_the_worklist_moves_a_current_series_through_the_lifecycle(db: Db) -> None:
    with db.sessions() as session:
        user_id = crud.create_user(
            session=session, name="dana", role=UserRole.DOSIMETRIST.value, password="pw-123456"
        ).id
    series_id = add_series(db, SeriesState.WORKLISTED)
    item_id = add_worklist_item(db, series_id, WorklistStatus.OPEN)
    with db.sessions() as session:
        crud.claim_item(session=session, item_id=item_id, user_id=user_id)
        crud.finish_item(session=session, item_id=item_id, user_id=user_id)
    assert state_and_events(db, series_id) == ("done", ["worklist_claimed", "worklist_done"])


def test_nothing_but_the_lifecycle_writes_the_series_state() -> None:
    """No `state=` in an UPDATE of Series, and no assignment to `.state`, outside service/lifecycle.py."""
    offenders = []
    for path in sorted(SERVICE_DIR.rglob("*.py")):
        if path.name == "lifecycle.py":
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == "state" and getattr(t.value, "id", "") == "series"
                for t in node.targets
            ):
                offenders.append(f"{path.name}:{node.lineno}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "values"
                and any(k.arg == "state" for k in node.keywords)
            ):
                source = ast.get_source_segment(path.read_text(), node) or ""
                if "update(Series)" in source:
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


# --- shadow mode (service/shadow.py) -----------------------------------------------------------------


def test_withheld_is_a_final_state_that_only_segmenting_leads_to() -> None:
    withheld = SeriesState.WITHHELD
    assert withheld in FINAL_STATES and not ALLOWED_TRANSITIONS.get(withheld)
    assert [s for s, targets in ALLOWED_TRANSITIONS.items() if withheld in targets] == [SeriesState.SEGMENTING]


def test_a_shadow_review_is_not_claimed_and_its_answer_leaves_the_series_withheld(db: Db) -> None:
    with db.sessions() as session:
        user_id = crud.create_user(
            session=session, name="dana", role=UserRole.DOSIMETRIST.value, password="pw-123456"
        ).id
    series_id = add_series(db, SeriesState.WITHHELD)
    with db.sessions.begin() as session:
        session.execute(update(Series).where(Series.id == series_id).values(route="auto"))  # not a state change
        item = WorklistItem(series_id=series_id, reason=RouteReason.SHADOW_REVIEW.value, status="open")
        session.add(item)
        session.flush()
        item_id = item.id
    with db.sessions() as session, pytest.raises(crud.Conflict, match="shadow review"):
        crud.claim_item(session=session, item_id=item_id, user_id=user_id)
    with db.sessions() as session:
        crud.answer_shadow_review(session=session, item_id=item_id, user_id=user_id, verdict="yes")
        status = session.scalar(select(WorklistItem.status).where(WorklistItem.id == item_id))
    assert status == "done"
    assert state_and_events(db, series_id) == ("withheld", [])


def test_a_returned_contour_moves_only_a_worklist_series_to_contoured() -> None:
    """`contoured` (service/contours/) follows the worklist states only, and itself (a later contour)."""
    sources = {source for source, targets in ALLOWED_TRANSITIONS.items() if SeriesState.CONTOURED in targets}
    assert sources == {SeriesState.WORKLISTED, SeriesState.CLAIMED, SeriesState.DONE, SeriesState.CONTOURED}
    assert ALLOWED_TRANSITIONS[SeriesState.CONTOURED] == frozenset({SeriesState.CONTOURED})
