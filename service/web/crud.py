"""Small keyword-only data functions behind the worklist: users, worklist items, series for review,
contour feedback and the audit trail.

Each function takes the ORM `session` and commits what it changes; every action of a person
(claim, release, done, assign, feedback) writes an `AuditEvent` in the same transaction. Domain
failures raise `NotFound` (no such row: HTTP 404), `Forbidden` (the user's role does not allow the
action: HTTP 403) or `Conflict` (the row is in a state that forbids the action: HTTP 409); their messages are shown to the user as they are, so they never hold patient data
beyond what the user may see anyway.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, or_, select, update
from sqlalchemy.orm import Session, aliased

from service.db.session import rows_changed
from service.db.tables import (
    MAX_FEEDBACK_NOTE_LENGTH,
    AuditAction,
    AuditEvent,
    ContourFeedback,
    FeedbackVerdict,
    Instance,
    RouteReason,
    Series,
    SeriesEvent,
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


class Forbidden(PermissionError):
    """The user's role does not allow the action (e.g. a dosimetrist assigning an item, reading the audit)."""


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
    if not active:
        user.session_generation += 1  # every session of theirs ends, and stays ended after `enable`
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
    user.session_generation += 1  # sessions opened with the old password end
    session.commit()
    log.info("user %s: password changed, sessions ended", user.id)
    return user


def end_sessions(*, session: Session, user_id: int) -> None:
    """End every session of user `user_id` (logout: the cookie, and any copy of it, stops working)."""
    session.execute(update(User).where(User.id == user_id).values(session_generation=User.session_generation + 1))
    session.commit()


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


def get_session_user(*, session: Session, user_id: int, generation: int) -> User | None:
    """The active user of a session cookie, or None when the user is gone or disabled, or the
    cookie's session `generation` was ended (logout, password change, disable)."""
    user = get_active_user(session=session, user_id=user_id)
    return user if user is not None and user.session_generation == generation else None


# --- the worklist ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorklistRow:
    """One worklist item with what the list shows about it.

    `score` is the latest detector result of the series version (None when the series was never
    scored, e.g. unreadable); `claimed_by` and `assigned_to` are user names.
    """

    item: WorklistItem
    series: Series
    score: SeriesScore | None
    claimed_by: str | None
    assigned_to: str | None = None


def _worklist_query() -> Select[WorklistItem, Series, str, str]:
    """SELECT worklist item, series, claimer's name, assignee's name."""
    claimer, assignee = aliased(User), aliased(User)
    return (
        select(WorklistItem, Series, claimer.name, assignee.name)
        .join(Series, Series.id == WorklistItem.series_id)
        .outerjoin(claimer, claimer.id == WorklistItem.claimed_by)
        .outerjoin(assignee, assignee.id == WorklistItem.assigned_to)
    )


def list_worklist(
    *,
    session: Session,
    statuses: Collection[str],
    reasons: Collection[str] | None = None,
    created_before: dt.datetime | None = None,
) -> list[WorklistRow]:
    """The worklist items whose status is in `statuses`, oldest first (sorting for display is the caller's).

    `reasons`: only items with one of these `RouteReason` values (None: any); `created_before`: only
    items that came onto the worklist before this time (the age filter).
    """
    query = _worklist_query().where(WorklistItem.status.in_(list(statuses)))
    if reasons is not None:
        query = query.where(WorklistItem.reason.in_(list(reasons)))
    if created_before is not None:
        query = query.where(WorklistItem.created_at < created_before)
    rows = session.execute(query.order_by(WorklistItem.created_at, WorklistItem.id)).all()
    scores = latest_scores(session=session, series_ids=[row[1].id for row in rows])
    return [
        WorklistRow(item=item, series=series, score=scores.get(series.id), claimed_by=claimer, assigned_to=assignee)
        for item, series, claimer, assignee in rows
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
        _worklist_query()
        .where(WorklistItem.id == item_id)
        .execution_options(populate_existing=True)  # fresh after an UPDATE statement
    ).first()
    if row is None:
        raise NotFound(f"no worklist item {item_id}")
    item, series, claimer, assignee = row
    return WorklistRow(
        item=item,
        series=series,
        score=latest_scores(session=session, series_ids=[series.id]).get(series.id),
        claimed_by=claimer,
        assigned_to=assignee,
    )


def claim_item(*, session: Session, item_id: int, user_id: int) -> WorklistRow:
    """Lock an open worklist item for user `user_id`; claiming one's own claimed item again is a no-op.

    An item an admin assigned to someone may be claimed by that person or by an admin only;
    the others see whom it is assigned to.

    Raises:
        NotFound: no such item, or no such user.
        Conflict: the item is claimed by another user, assigned to another user (and `user_id` is
            no admin), or done.
    """
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user {user_id}")
    if session.scalar(select(WorklistItem.reason).where(WorklistItem.id == item_id)) == RouteReason.SHADOW_REVIEW:
        raise Conflict(_shadow_review_not_claimed(item_id))
    now = utc_now()
    conditions: list[ColumnElement[bool]] = [
        WorklistItem.id == item_id,
        WorklistItem.status == WorklistStatus.OPEN.value,
    ]
    if user.role != UserRole.ADMIN:
        conditions.append(or_(WorklistItem.assigned_to.is_(None), WorklistItem.assigned_to == user_id))
    claimed = rows_changed(
        session.execute(
            update(WorklistItem)
            .where(*conditions)
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
        _audit(session=session, user_id=user_id, action=AuditAction.CLAIM, item_id=item_id)
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
        audit_action=AuditAction.RELEASE,
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
        audit_action=AuditAction.DONE,
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
    audit_action: AuditAction,
) -> WorklistRow:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user {user_id}")
    row = get_worklist_row(session=session, item_id=item_id)
    # Read before the UPDATE below: it refreshes `row.item` in the session (claimed_by → None on release).
    claimed_by = row.item.claimed_by
    allowed = claimed_by == user_id or user.role == UserRole.ADMIN
    if row.item.status != WorklistStatus.CLAIMED or not allowed:
        raise Conflict(_why_not(row, action))
    # The claimer in the WHERE clause makes this safe against a release/claim racing it.
    changed = rows_changed(
        session.execute(
            update(WorklistItem)
            .where(
                WorklistItem.id == item_id,
                WorklistItem.status == WorklistStatus.CLAIMED.value,
                WorklistItem.claimed_by == claimed_by,
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
    detail = {"claimed_by": claimed_by} if claimed_by != user_id else {}
    _audit(session=session, user_id=user_id, action=audit_action, item_id=item_id, detail=detail)
    session.commit()
    log.info("worklist item %s: %s by user %s", item_id, kind, user_id)
    return get_worklist_row(session=session, item_id=item_id)


def _why_not(row: WorklistRow, action: str) -> str:
    """The reason, for the user, why `action` cannot be done on this item now."""
    item = row.item
    if item.reason == RouteReason.SHADOW_REVIEW:
        return _shadow_review_not_claimed(item.id)
    if item.status == WorklistStatus.DONE:
        return f"cannot {action} worklist item {item.id}: it is done"
    if item.status == WorklistStatus.CONTOURED:
        return f"cannot {action} worklist item {item.id}: its contour came back (contoured)"
    if item.status == WorklistStatus.OPEN and action == "claim" and row.assigned_to:
        return f"cannot claim worklist item {item.id}: it is assigned to {row.assigned_to}; only they or an admin may"
    if item.status == WorklistStatus.OPEN:
        return f"cannot {action} worklist item {item.id}: it is not claimed (claim it first)"
    since = item.claimed_at.isoformat(timespec="minutes") if item.claimed_at else "?"
    return (
        f"cannot {action} worklist item {item.id}: it is claimed by {row.claimed_by or 'another user'} "
        f"since {since}; only they or an admin may"
    )


def _shadow_review_not_claimed(item_id: int) -> str:
    return (
        f"worklist item {item_id} is a shadow review: answer whether the auto contour is acceptable "
        "(yes / no); it is not claimed, released or marked done"
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
    """A series version with what a reviewer needs: its latest score, worklist row, newest version number
    and the contour feedback recorded on it (newest first)."""

    series: Series
    score: SeriesScore | None
    worklist: WorklistRow | None
    latest_version: int
    feedback: list[FeedbackRow]
    gate: dict[str, Any] | None = None  # see `gate_decision`


def gate_decision(*, session: Session, series_id: int) -> dict[str, Any] | None:
    """The gate's newest decision on series version `series_id`, as the pipeline recorded it; None if none.

    The detail of the event that routed it after segmentation ("routed" to the worklist,
    "exporting", "withheld", "export_failed"; service/pipeline/segmenting.py `segment`): `gate` (the decision,
    `GateDecision.as_json`: every finding with value, threshold, slices and plain words), `draft`
    (the draft SEG, relative to `storage_dir`, or None), and `gate_version`, `segmenter_version`,
    `detector_version`. Series routed before the gate decided after segmentation have none.
    """
    details = session.scalars(
        select(SeriesEvent.detail).where(SeriesEvent.series_id == series_id).order_by(SeriesEvent.id.desc())
    )
    for detail in details:
        if isinstance(detail, dict) and isinstance(detail.get("gate"), dict):
            return detail
    return None


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
    return SeriesReview(
        series=series,
        score=score,
        worklist=worklist,
        latest_version=versions[-1].version,
        feedback=list_series_feedback(session=session, series_id=series.id),
        gate=gate_decision(session=session, series_id=series.id),
    )


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


# --- assignment ------------------------------------------------------------------------------------


def assign_item(*, session: Session, item_id: int, admin_id: int, assignee_name: str | None) -> WorklistRow:
    """Assign an open or claimed worklist item to the user `assignee_name` (None: take the assignment away).

    Assignment is an attribute of the item, not a lifecycle step: the series' state and an existing
    claim stay as they are. While an item is assigned, only the assignee or an admin may claim it.

    Raises:
        NotFound: no such item, admin or assignee.
        Forbidden: `admin_id` is not an admin.
        Conflict: the item is done, or the assignee is disabled.
    """
    admin = session.get(User, admin_id)
    if admin is None:
        raise NotFound(f"no user {admin_id}")
    if admin.role != UserRole.ADMIN:
        raise Forbidden("only an admin may assign worklist items")
    row = get_worklist_row(session=session, item_id=item_id)
    if row.item.status in (WorklistStatus.DONE, WorklistStatus.CONTOURED):
        raise Conflict(f"cannot assign worklist item {item_id}: it is {row.item.status}")
    assignee: User | None = None
    if assignee_name is not None:
        assignee = session.scalar(select(User).where(User.name == assignee_name))
        if assignee is None:
            raise NotFound(f"no user named {assignee_name!r}")
        if not assignee.active:
            raise Conflict(f"cannot assign worklist item {item_id} to {assignee_name}: the user is disabled")
    previous = row.item.assigned_to
    row.item.assigned_to = assignee.id if assignee else None
    row.item.assigned_at = utc_now() if assignee else None
    _audit(
        session=session,
        user_id=admin_id,
        action=AuditAction.ASSIGN if assignee else AuditAction.UNASSIGN,
        item_id=item_id,
        detail={"assigned_to": assignee.id if assignee else None, "previous": previous},
    )
    session.commit()
    log.info("worklist item %s assigned to user %s by user %s", item_id, row.item.assigned_to, admin_id)
    return get_worklist_row(session=session, item_id=item_id)


# --- contour feedback ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedbackRow:
    """One recorded verdict with its author's name."""

    feedback: ContourFeedback
    user_name: str


def record_feedback(
    *, session: Session, series_id: int, user_id: int, verdict: str, note: str | None = None
) -> FeedbackRow:
    """Record user `user_id`'s verdict on the auto contour of series version `series_id`, with an optional note.

    A label for the gate's evaluation, not a lifecycle step: the series' state does not change.
    Feedback is taken on a series version the pipeline routed (to the worklist, or to
    auto-segmentation for a shadow review); each call adds a row, the newest one counts. An open
    shadow-review item of the series (service/shadow.py) is answered by it: marked done, with
    `user_id` as the one who answered (`claimed_by`).

    Raises:
        NotFound: no such series version or user.
        ValueError: `verdict` is not a `FeedbackVerdict` value; the note is longer than
            `MAX_FEEDBACK_NOTE_LENGTH` characters.
        Conflict: the series version was not routed yet (nothing to judge).
    """
    if verdict not in {v.value for v in FeedbackVerdict}:
        raise ValueError(f"verdict {verdict!r}: expected one of {', '.join(v.value for v in FeedbackVerdict)}")
    note = (note or "").strip() or None
    if note is not None and len(note) > MAX_FEEDBACK_NOTE_LENGTH:
        raise ValueError(f"note: {len(note)} characters; expected at most {MAX_FEEDBACK_NOTE_LENGTH}")
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user {user_id}")
    series = session.get(Series, series_id)
    if series is None:
        raise NotFound(f"no series version {series_id}")
    item_id = session.scalar(select(WorklistItem.id).where(WorklistItem.series_id == series_id))
    if item_id is None and series.route is None:
        raise Conflict(
            f"cannot record feedback on series version {series_id}: the pipeline has not routed it yet (state {series.state})"
        )
    feedback = ContourFeedback(
        series_id=series_id, worklist_item_id=item_id, user_id=user_id, verdict=verdict, note=note
    )
    session.add(feedback)
    if item_id is not None:
        now = utc_now()
        session.execute(
            update(WorklistItem)
            .where(
                WorklistItem.id == item_id,
                WorklistItem.reason == RouteReason.SHADOW_REVIEW.value,
                WorklistItem.status == WorklistStatus.OPEN.value,
            )
            .values(status=WorklistStatus.DONE.value, claimed_by=user_id, claimed_at=now, done_at=now)
        )
    _audit(
        session=session,
        user_id=user_id,
        action=AuditAction.FEEDBACK,
        item_id=item_id,
        series_id=series_id,
        detail={"verdict": verdict, "note": note is not None},
    )
    session.commit()
    log.info("feedback %s on series version %s by user %s", verdict, series_id, user_id)
    return FeedbackRow(feedback=feedback, user_name=user.name)


def answer_shadow_review(*, session: Session, item_id: int, user_id: int, verdict: str) -> FeedbackRow:
    """Record user `user_id`'s answer to the shadow review `item_id`: is the auto contour acceptable?

    The answer is contour feedback (`record_feedback`), which marks the item done.

    Raises:
        NotFound: no such item or user.
        ValueError: `verdict` is not "yes" or "no".
        Conflict: the item is not a shadow review, or it was answered already (a correction is
            recorded on the series page).
    """
    if verdict not in (FeedbackVerdict.YES, FeedbackVerdict.NO):
        raise ValueError(f"verdict {verdict!r}: a shadow review is answered yes or no")
    item = session.get(WorklistItem, item_id)
    if item is None:
        raise NotFound(f"no worklist item {item_id}")
    if item.reason != RouteReason.SHADOW_REVIEW:
        raise Conflict(f"worklist item {item_id} is no shadow review (reason {item.reason})")
    if item.status != WorklistStatus.OPEN:
        raise Conflict(
            f"shadow review {item_id} was answered already; a correction is recorded as feedback on the series page"
        )
    return record_feedback(session=session, series_id=item.series_id, user_id=user_id, verdict=verdict)


def list_series_feedback(*, session: Session, series_id: int) -> list[FeedbackRow]:
    """Every verdict recorded on series version `series_id`, newest first."""
    rows = session.execute(
        select(ContourFeedback, User.name)
        .join(User, User.id == ContourFeedback.user_id)
        .where(ContourFeedback.series_id == series_id)
        .order_by(ContourFeedback.created_at.desc(), ContourFeedback.id.desc())
    ).all()
    return [FeedbackRow(feedback=feedback, user_name=name) for feedback, name in rows]


# --- the audit trail -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditRow:
    """One audit line: the event, the acting user's name, and the series it concerns (UID and version)."""

    event: AuditEvent
    user_name: str | None
    series_instance_uid: str | None
    series_version: int | None


def _audit(
    *,
    session: Session,
    user_id: int,
    action: AuditAction,
    item_id: int | None = None,
    series_id: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add the audit line of one action to the session (committed with the action itself)."""
    if series_id is None and item_id is not None:
        series_id = session.scalar(select(WorklistItem.series_id).where(WorklistItem.id == item_id))
    session.add(
        AuditEvent(
            user_id=user_id,
            action=action.value,
            worklist_item_id=item_id,
            series_id=series_id,
            detail=detail or {},
            created_at=utc_now(),
        )
    )


def list_audit(*, session: Session, viewer_id: int, limit: int = 500) -> list[AuditRow]:
    """The newest `limit` audit lines, newest first, for an admin.

    Raises:
        NotFound: no user `viewer_id`.
        Forbidden: the viewer is not an admin.
    """
    viewer = session.get(User, viewer_id)
    if viewer is None:
        raise NotFound(f"no user {viewer_id}")
    if viewer.role != UserRole.ADMIN:
        raise Forbidden("only an admin may read the audit trail")
    rows = session.execute(
        select(AuditEvent, User.name, Series.series_instance_uid, Series.version)
        .outerjoin(User, User.id == AuditEvent.user_id)
        .outerjoin(Series, Series.id == AuditEvent.series_id)
        .order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc())
        .limit(limit)
    ).all()
    return [
        AuditRow(event=event, user_name=name, series_instance_uid=uid, series_version=version)
        for event, name, uid, version in rows
    ]
