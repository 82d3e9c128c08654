"""Small keyword-only data functions behind the worklist: users, worklist items, series for review.

Each function takes the ORM `session` and commits what it changes. Domain failures raise
`NotFound` (no such row: HTTP 404) or `Conflict` (the row is in a state that forbids the action:
HTTP 409); their messages are shown to the user as they are, so they never hold patient data
beyond what the user may see anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db.session import rows_changed
from service.db.tables import (
    Instance,
    Series,
    SeriesScore,
    User,
    UserRole,
    WorklistItem,
    WorklistStatus,
    utc_now,
)
from service.lifecycle import SeriesState, transition
from service.web import security

log = logging.getLogger(__name__)

MAX_USER_NAME_LENGTH = 64


class NotFound(LookupError):
    """The series, worklist item or user asked for does not exist."""


class Conflict(Exception):
    """The action is not possible in the current state (e.g. the item is claimed by someone else)."""


# --- users -----------------------------------------------------------------------------------------


def create_user(*, session: Session, name: str, role: str, password: str) -> User:
    """Add an active user with a salted scrypt hash of `password`.

    Raises:
        ValueError: the name is empty, too long or has spaces; the role is unknown; the password is too short.
        Conflict: a user with this name exists.
    """
    if not name or len(name) > MAX_USER_NAME_LENGTH or any(ch.isspace() for ch in name):
        raise ValueError(f"user name {name!r}: expected 1 to {MAX_USER_NAME_LENGTH} characters without spaces")
    if role not in {r.value for r in UserRole}:
        raise ValueError(f"role {role!r}: expected one of {', '.join(r.value for r in UserRole)}")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise Conflict(f"user {name!r} exists")
    user = User(name=name, role=role, password_hash=security.hash_password(password), active=True)
    session.add(user)
    session.commit()
    log.info("user %s added with role %s", user.id, role)
    return user


def list_users(*, session: Session) -> list[User]:
    """Every user, active or not, by name."""
    return list(session.scalars(select(User).order_by(User.name)))


def set_user_active(*, session: Session, name: str, active: bool) -> User:
    """Enable or disable the login of user `name`; a disabled user's sessions end at their next request.

    Raises:
        NotFound: no user has this name.
    """
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    user.active = active
    session.commit()
    log.info("user %s %s", user.id, "enabled" if active else "disabled")
    return user


def set_password(*, session: Session, name: str, password: str) -> User:
    """Replace the password of user `name`.

    Raises:
        NotFound: no user has this name.
        ValueError: the password is too short.
    """
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    user.password_hash = security.hash_password(password)
    session.commit()
    return user


def authenticate(*, session: Session, name: str, password: str) -> User | None:
    """The active user with this name and password, or None; takes as long for an unknown name."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        security.dummy_password_check(password)
        return None
    if not security.verify_password(password, user.password_hash) or not user.active:
        return None
    return user


def get_active_user(*, session: Session, user_id: int) -> User | None:
    """The user with this id if they exist and may log in, else None."""
    user = session.get(User, user_id)
    return user if user is not None and user.active else None


# --- the worklist ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorklistRow:
    """One worklist item with what the list shows about it.

    `score` is the latest detector result of the series version (None when the series was never
    scored, e.g. unreadable); `claimed_by` is the claimer's user name.
    """

    item: WorklistItem
    series: Series
    score: SeriesScore | None
    claimed_by: str | None


def list_worklist(*, session: Session, statuses: Collection[str]) -> list[WorklistRow]:
    """The worklist items whose status is in `statuses`, oldest first (sorting for display is the caller's)."""
    rows = session.execute(
        select(WorklistItem, Series, User.name)
        .join(Series, Series.id == WorklistItem.series_id)
        .outerjoin(User, User.id == WorklistItem.claimed_by)
        .where(WorklistItem.status.in_(list(statuses)))
        .order_by(WorklistItem.created_at, WorklistItem.id)
    ).all()
    scores = latest_scores(session=session, series_ids=[series.id for _, series, _ in rows])
    return [
        WorklistRow(item=item, series=series, score=scores.get(series.id), claimed_by=name)
        for item, series, name in rows
    ]


def latest_scores(*, session: Session, series_ids: Collection[int]) -> dict[int, SeriesScore]:
    """Per series id, its most recent detector result (the newest model version that scored it)."""
    if not series_ids:
        return {}
    latest: dict[int, SeriesScore] = {}
    for score in session.scalars(
        select(SeriesScore)
        .where(SeriesScore.series_id.in_(list(series_ids)))
        .order_by(SeriesScore.created_at, SeriesScore.id)
    ):
        latest[score.series_id] = score
    return latest


def get_worklist_row(*, session: Session, item_id: int) -> WorklistRow:
    """One worklist item with its series, latest score and claimer.

    Raises:
        NotFound: no worklist item has this id.
    """
    row = session.execute(
        select(WorklistItem, Series, User.name)
        .join(Series, Series.id == WorklistItem.series_id)
        .outerjoin(User, User.id == WorklistItem.claimed_by)
        .where(WorklistItem.id == item_id)
        .execution_options(populate_existing=True)  # fresh after an UPDATE statement
    ).first()
    if row is None:
        raise NotFound(f"no worklist item {item_id}")
    item, series, name = row
    return WorklistRow(
        item=item,
        series=series,
        score=latest_scores(session=session, series_ids=[series.id]).get(series.id),
        claimed_by=name,
    )


def claim_item(*, session: Session, item_id: int, user_id: int) -> WorklistRow:
    """Lock an open worklist item for user `user_id`; claiming one's own claimed item again is a no-op.

    Raises:
        NotFound: no such item.
        Conflict: the item is claimed by another user, or done.
    """
    now = utc_now()
    claimed = rows_changed(
        session.execute(
            update(WorklistItem)
            .where(WorklistItem.id == item_id, WorklistItem.status == WorklistStatus.OPEN.value)
            .values(status=WorklistStatus.CLAIMED.value, claimed_by=user_id, claimed_at=now)
        )
    )
    if claimed:
        if not _series_moves(
            session=session,
            item_id=item_id,
            source=SeriesState.WORKLISTED,
            target=SeriesState.CLAIMED,
            kind="worklist_claimed",
            user_id=user_id,
        ):
            session.rollback()
            raise Conflict(f"cannot claim worklist item {item_id}: its series version was superseded or moved on")
        session.commit()
        log.info("worklist item %s claimed by user %s", item_id, user_id)
        return get_worklist_row(session=session, item_id=item_id)
    session.rollback()
    row = get_worklist_row(session=session, item_id=item_id)
    if row.item.status == WorklistStatus.CLAIMED and row.item.claimed_by == user_id:
        return row
    raise Conflict(_why_not(row, "claim"))


def release_item(*, session: Session, item_id: int, user_id: int) -> WorklistRow:
    """Unlock a claimed item so anyone may claim it; only its claimer or an admin may.

    Raises:
        NotFound: no such item, or no such user.
        Conflict: the item is not claimed, or claimed by another user and `user_id` is no admin.
    """
    return _finish_claim(
        session=session,
        item_id=item_id,
        user_id=user_id,
        action="release",
        values={"status": WorklistStatus.OPEN.value, "claimed_by": None, "claimed_at": None},
        target=SeriesState.WORKLISTED,
        kind="worklist_released",
    )


def finish_item(*, session: Session, item_id: int, user_id: int) -> WorklistRow:
    """Mark a claimed item done (contoured by hand); only its claimer or an admin may.

    Raises:
        NotFound: no such item, or no such user.
        Conflict: the item is not claimed (claim it first), or claimed by another user and `user_id` is no admin.
    """
    return _finish_claim(
        session=session,
        item_id=item_id,
        user_id=user_id,
        action="mark done",
        values={"status": WorklistStatus.DONE.value, "done_at": utc_now()},
        target=SeriesState.DONE,
        kind="worklist_done",
    )


def _finish_claim(
    *,
    session: Session,
    item_id: int,
    user_id: int,
    action: str,
    values: dict[str, Any],
    target: SeriesState,
    kind: str,
) -> WorklistRow:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user {user_id}")
    row = get_worklist_row(session=session, item_id=item_id)
    allowed = row.item.claimed_by == user_id or user.role == UserRole.ADMIN
    if row.item.status != WorklistStatus.CLAIMED or not allowed:
        raise Conflict(_why_not(row, action))
    # The claimer in the WHERE clause makes this safe against a release/claim racing it.
    changed = rows_changed(
        session.execute(
            update(WorklistItem)
            .where(
                WorklistItem.id == item_id,
                WorklistItem.status == WorklistStatus.CLAIMED.value,
                WorklistItem.claimed_by == row.item.claimed_by,
            )
            .values(**values)
        )
    )
    if not changed:
        session.rollback()
        raise Conflict(_why_not(get_worklist_row(session=session, item_id=item_id), action))
    if not _series_moves(
        session=session, item_id=item_id, source=SeriesState.CLAIMED, target=target, kind=kind, user_id=user_id
    ):
        session.rollback()
        raise Conflict(f"cannot {action} worklist item {item_id}: its series version was superseded or moved on")
    session.commit()
    log.info("worklist item %s: %s by user %s", item_id, kind, user_id)
    return get_worklist_row(session=session, item_id=item_id)


def _why_not(row: WorklistRow, action: str) -> str:
    """The reason, for the user, why `action` cannot be done on this item now."""
    item = row.item
    if item.status == WorklistStatus.DONE:
        return f"cannot {action} worklist item {item.id}: it is done"
    if item.status == WorklistStatus.OPEN:
        return f"cannot {action} worklist item {item.id}: it is not claimed (claim it first)"
    since = item.claimed_at.isoformat(timespec="minutes") if item.claimed_at else "?"
    return (
        f"cannot {action} worklist item {item.id}: it is claimed by {row.claimed_by or 'another user'} "
        f"since {since}; only they or an admin may"
    )


def _series_moves(
    *, session: Session, item_id: int, source: SeriesState, target: SeriesState, kind: str, user_id: int
) -> bool:
    """Move the item's series version `source` → `target` through the lifecycle, with event `kind`.

    False, changing nothing, when the series version is not in `source` or was superseded by a
    later version (a dosimetrist must not contour an outdated version).
    """
    series_id = session.scalar(select(WorklistItem.series_id).where(WorklistItem.id == item_id))
    if series_id is None:
        return False
    return transition(
        session=session,
        series_id=series_id,
        source=source,
        target=target,
        event=kind,
        detail={"worklist_item_id": item_id, "user_id": user_id},
    )


# --- a series for review ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesReview:
    """A series version with what a reviewer needs: its latest score, worklist row and newest version number."""

    series: Series
    score: SeriesScore | None
    worklist: WorklistRow | None
    latest_version: int


def get_series_review(*, session: Session, series_instance_uid: str, version: int | None = None) -> SeriesReview:
    """The series version `version` of `series_instance_uid` (default: the newest) for review.

    Raises:
        NotFound: no such series, or no such version of it.
    """
    versions = session.scalars(
        select(Series).where(Series.series_instance_uid == series_instance_uid).order_by(Series.version)
    ).all()
    if not versions:
        raise NotFound(f"no series with Series Instance UID {series_instance_uid}")
    if version is None:
        series = versions[-1]
    else:
        matching = [s for s in versions if s.version == version]
        if not matching:
            raise NotFound(
                f"series {series_instance_uid} has no version {version} "
                f"(versions: {', '.join(str(s.version) for s in versions)})"
            )
        series = matching[0]
    score = latest_scores(session=session, series_ids=[series.id]).get(series.id)
    item_id = session.scalar(select(WorklistItem.id).where(WorklistItem.series_id == series.id))
    worklist = get_worklist_row(session=session, item_id=item_id) if item_id is not None else None
    return SeriesReview(series=series, score=score, worklist=worklist, latest_version=versions[-1].version)


@dataclass(frozen=True)
class SliceSource:
    """Where to read one scored slice: its DICOM file and, for a top slice, its residual map.

    Both paths are as stored, relative to `Settings.storage_dir`.
    """

    instance_path: str
    residual_map_path: str | None


def get_slice_source(*, session: Session, series_id: int, index: int) -> SliceSource:
    """The files of slice `index` (volume order, head → feet) of a scored series version.

    Raises:
        NotFound: the series version was never scored, has no slice `index`, or its instance is not stored.
    """
    score = latest_scores(session=session, series_ids=[series_id]).get(series_id)
    if score is None:
        raise NotFound(f"series version {series_id} has no scores")
    entry = next((s for s in score.slices if s.get("index") == index), None)
    if entry is None:
        raise NotFound(f"series version {series_id} has no scored slice {index} ({len(score.slices)} slices)")
    path = session.scalar(
        select(Instance.relative_path).where(
            Instance.series_id == series_id, Instance.sop_instance_uid == entry.get("sop_instance_uid")
        )
    )
    if path is None:
        raise NotFound(f"slice {index} of series version {series_id}: its instance is not stored")
    top = next((t for t in score.top_slices if t.get("index") == index), None)
    return SliceSource(instance_path=path, residual_map_path=(top or {}).get("residual_map"))
