"""Tables for DICOM ingest and for export to the PACS, as SQLAlchemy 2 declarative classes.

A *series version* is one reception of a series: when instances of an already completed series
arrive again, a new `Series` row with the next `version` is made and the older one is marked
`superseded`. Display fields (patient name and id, study date, series description) are stored
here for the worklist only; they must never appear in logs.

Every datetime is timezone-aware UTC, also on SQLite, which stores none (see `UTCDateTime`).
Changes to these classes need a hand-reviewed Alembic revision under `migrations/versions/`.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Constraint names that are the same on every database, so that migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)  # DICOM UI: at most 64 characters
AE_TITLE = String(16)  # DICOM AE: at most 16 characters


def utc_now() -> dt.datetime:
    """The current time as a timezone-aware UTC datetime."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A `TIMESTAMP WITH TIME ZONE` that takes and gives timezone-aware UTC datetimes only.

    Raises:
        ValueError: on binding a naive datetime, whose meaning would be a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"datetime {value.isoformat()} has no time zone; expected an aware UTC datetime")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # SQLite gives back what was stored, which is UTC
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Route(StrEnum):
    """Where the pipeline sent a series version."""

    AUTO = "auto"  # auto-segmentation, SEG to the PACS
    WORKLIST = "worklist"  # manual contouring


class RouteReason(StrEnum):
    """Why a series went to the worklist (`Series.route_reason`, `WorklistItem.reason`)."""

    ANOMALY = "anomaly"  # series score above the detector's threshold
    GEOMETRY = "geometry"  # ingest geometry findings (gaps, mixed orientation, localizer …)
    UNREADABLE = "unreadable"  # the series could not be read or scored (one slice, bad pixels …)
    NO_LIVER = "no_liver"  # auto-segmentation found no liver
    # Issue 15 (`service.gate`): the fused, calibrated evidence says the segmenter may fail on this series.
    GATE = "gate_evidence"
    LIVER_PARTIAL = "liver_partial"  # the liver is cut by the first or the last slice
    NOT_ABDOMEN = "not_abdomen"  # not an abdominal CT (head, limb …): the liver model does not apply
    # A readable series that the segmenter could not process, or whose SEG / RT Structure Set could not
    # be built from its headers: the worklist item's detail "problem" says what, in words.
    CANNOT_SEGMENT = "cannot_segment"
    # Not a route: shadow mode (service/shadow.py) put an auto-routed, `withheld` series on the
    # worklist for a yes/no review of its auto contour. `WorklistItem.reason` only; the series' route stays auto.
    SHADOW_REVIEW = "shadow_review"


class WorklistStatus(StrEnum):
    OPEN = "open"
    CLAIMED = "claimed"
    DONE = "done"
    CONTOURED = "contoured"  # a returned liver contour was matched to the series (`service.contours`)


class UserRole(StrEnum):
    DOSIMETRIST = "dosimetrist"
    ADMIN = "admin"


class FeedbackVerdict(StrEnum):
    """A dosimetrist's answer to "is the auto contour of this series acceptable?" (`ContourFeedback.verdict`)."""

    YES = "yes"  # the auto contour would have been acceptable: the gate need not have stopped it
    NO = "no"  # it would have failed: the series had to be contoured by hand
    NOT_APPLICABLE = "not_applicable"  # no judgement possible (no liver in view, wrong series …)


class AuditAction(StrEnum):
    """What a person did in the worklist app (`AuditEvent.action`)."""

    CLAIM = "claim"
    RELEASE = "release"
    DONE = "done"
    ASSIGN = "assign"
    UNASSIGN = "unassign"
    FEEDBACK = "feedback"


class Base(DeclarativeBase):
    """Declarative base of every gatekeeper table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Series(Base):
    """One received version of a DICOM series."""

    __tablename__ = "series"
    __table_args__ = (UniqueConstraint("series_instance_uid", "version"), Index("ix_series_state", "state"))

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    # 1 for the first reception of this SeriesInstanceUID, then 2, 3, ...
    version: Mapped[int]
    study_instance_uid: Mapped[str] = mapped_column(UID)
    frame_of_reference_uid: Mapped[str | None] = mapped_column(UID)
    modality: Mapped[str] = mapped_column(String(16))
    # AE title of the sender of the first instance of this version.
    calling_ae_title: Mapped[str] = mapped_column(AE_TITLE)
    # `service.lifecycle.SeriesState`; changed only by `service.lifecycle.transition`.
    state: Mapped[str] = mapped_column(String(32))
    num_instances: Mapped[int] = mapped_column(default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # True once a later version of the same series exists; superseded versions are not processed.
    superseded: Mapped[bool] = mapped_column(default=False)
    # Instances received again with identical bytes (acknowledged, not stored twice).
    num_duplicates: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    # When the series was last sent to the pipeline queue, and how many times it was sent.
    queued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    queue_attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    # Geometry findings at completion, `[{"code": ..., "message": ...}]`; empty: none; NULL: not checked.
    geometry_findings: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)

    # When `state` last changed; the pipeline's sweeper re-queues work stuck in a state too long.
    state_changed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # A `Route` value once decided, and a `RouteReason` value for the worklist route.
    route: Mapped[str | None] = mapped_column(String(16))
    route_reason: Mapped[str | None] = mapped_column(String(32))

    # Display only, never logged. Text: real-world values may exceed the DICOM lengths.
    patient_name: Mapped[str | None] = mapped_column(Text)
    patient_id: Mapped[str | None] = mapped_column(Text)
    study_date: Mapped[dt.date | None] = mapped_column(Date)
    series_description: Mapped[str | None] = mapped_column(Text)

    instances: Mapped[list[Instance]] = relationship(back_populates="series", passive_deletes=True)
    events: Mapped[list[SeriesEvent]] = relationship(back_populates="series", passive_deletes=True)


class Instance(Base):
    """One stored DICOM instance (file) of a series version."""

    __tablename__ = "instance"
    __table_args__ = (UniqueConstraint("series_id", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    # Path of the file relative to `Settings.storage_dir`, with forward slashes.
    relative_path: Mapped[str] = mapped_column(Text)
    # Hex SHA-256 of the file as written.
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())

    series: Mapped[Series] = relationship(back_populates="instances")


class SeriesEvent(Base):
    """Something that happened to a series version, for its audit trail (no patient data in `detail`)."""

    __tablename__ = "series_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)

    series: Mapped[Series] = relationship(back_populates="events")


class QuarantinedInstance(Base):
    """An instance received again with the same SOP Instance UID but different bytes.

    The first stored version stays the one in the series; this copy is kept aside under
    `quarantine/` for a person to decide, never silently overwriting the first.
    """

    __tablename__ = "quarantined_instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    # Path of the file relative to `Settings.storage_dir`, with forward slashes.
    relative_path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    calling_ae_title: Mapped[str] = mapped_column(AE_TITLE)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class ExportState(StrEnum):
    """Where the delivery of one object to the PACS stands; stored as a string."""

    PENDING = "pending"  # to be sent, or to be sent again after a transient failure
    DELIVERED = "delivered"  # the PACS answered the C-STORE with Success or a Warning
    FAILED = "failed"  # a permanent failure, or transient ones until the deadline: needs a person


class Export(Base):
    """One DICOM object (our SEG) to deliver to the PACS; one row per SOP Instance UID.

    The SEG's UIDs are deterministic, so making the same SEG again finds this row instead of
    sending a second object. `ExportAttempt` rows are its delivery receipt.
    """

    __tablename__ = "export"
    __table_args__ = (UniqueConstraint("sop_instance_uid"), Index("ix_export_state", "state"))

    id: Mapped[int] = mapped_column(primary_key=True)
    # The series version the object was made from; NULL for an object sent by hand (`exports send`).
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id", ondelete="SET NULL"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    # Path of the DICOM file; relative paths are relative to `Settings.storage_dir`.
    path: Mapped[str] = mapped_column(Text)
    # Where it was last sent, "AE_TITLE@host:port" (the destination in the settings when created).
    destination: Mapped[str] = mapped_column(Text)
    # An `ExportState` value.
    state: Mapped[str] = mapped_column(String(16), default=ExportState.PENDING.value)
    # C-STORE attempts so far, over every round (an operator's retry starts a new round).
    attempts: Mapped[int] = mapped_column(default=0)
    # DICOM Status (0000,0900) of the last C-STORE response; NULL when none came back.
    last_status: Mapped[int | None]
    # Why the last attempt failed, or the warning it was delivered with; no patient data.
    last_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    # When the current round began (creation, or an operator's retry); the retry deadline counts from here.
    pending_since: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    # When a pending export is next due; while an attempt runs, when that attempt's claim expires.
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class ExportAttempt(Base):
    """One association + C-STORE to the PACS for an `Export`: the line of a delivery receipt."""

    __tablename__ = "export_attempt"

    id: Mapped[int] = mapped_column(primary_key=True)
    export_id: Mapped[int] = mapped_column(ForeignKey("export.id", ondelete="CASCADE"), index=True)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    duration_s: Mapped[float] = mapped_column(Float())
    destination: Mapped[str] = mapped_column(Text)
    # "delivered", "transient" or "permanent" (see `service.dicom_send.Outcome`).
    outcome: Mapped[str] = mapped_column(String(16))
    # DICOM Status of the C-STORE response; NULL when none came back (no association, abort, timeout).
    status: Mapped[int | None]
    reason: Mapped[str | None] = mapped_column(Text)


class SeriesScore(Base):
    """The detector's result for one series version and one model version (the idempotency key).

    `slices` holds per slice, in volume order (head → feet): `{"index", "sop_instance_uid",
    "position", "score"}`. `top_slices` holds the highest-scoring slices with the path (relative
    to `Settings.storage_dir`) of their downsampled residual map: `{"index", "score",
    "residual_map"}`. No patient data.
    """

    __tablename__ = "series_score"
    __table_args__ = (UniqueConstraint("series_id", "model_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    # The detector's version (hash in its model.json, or of its scorer file).
    model_version: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float())
    threshold: Mapped[float] = mapped_column(Float())
    flagged: Mapped[bool]
    slices: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    top_slices: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # ONNX Runtime provider that scored it, and wall time of scoring (s).
    provider: Mapped[str] = mapped_column(String(64))
    duration_s: Mapped[float] = mapped_column(Float())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)


class User(Base):
    """A person who may use the worklist; passwords are stored only as a salted hash."""

    __tablename__ = "app_user"
    __table_args__ = (UniqueConstraint("name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    # A `UserRole` value.
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(Text)
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    # Signed into each session cookie; raised on logout, password change and disable, so every
    # cookie issued before no longer opens a session.
    session_generation: Mapped[int] = mapped_column(default=0, server_default=text("0"))


class WorklistItem(Base):
    """A series version waiting for manual contouring; one per series version."""

    __tablename__ = "worklist_item"
    __table_args__ = (UniqueConstraint("series_id"), Index("ix_worklist_item_status", "status"))

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"))
    # A `RouteReason` value, and details for the reviewer (geometry findings, error message; no patient data).
    reason: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # A `WorklistStatus` value.
    status: Mapped[str] = mapped_column(String(16), default=WorklistStatus.OPEN.value)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    claimed_by: Mapped[int | None] = mapped_column(ForeignKey("app_user.id", ondelete="SET NULL"))
    claimed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    done_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # The user an admin assigned the item to (only they or an admin may claim it), and when.
    assigned_to: Mapped[int | None] = mapped_column(ForeignKey("app_user.id", ondelete="SET NULL"))
    assigned_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


MAX_FEEDBACK_NOTE_LENGTH = 2000


class ContourFeedback(Base):
    """A dosimetrist's verdict on whether the auto contour of a series version would have been acceptable.

    A label, not a lifecycle step: recording it never changes the series' state. Every verdict is
    kept (who, when); the newest one of a series version is its label (`service.feedback`). The
    note is free text written by the dosimetrist and may hold anything they typed: never logged.
    """

    __tablename__ = "contour_feedback"
    __table_args__ = (CheckConstraint("verdict IN ('yes', 'no', 'not_applicable')", name="verdict"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    # The worklist item it was recorded on; NULL for a series that was not on the worklist.
    worklist_item_id: Mapped[int | None] = mapped_column(ForeignKey("worklist_item.id", ondelete="SET NULL"))
    # Users are disabled, never deleted, so the author stays known.
    user_id: Mapped[int] = mapped_column(ForeignKey("app_user.id"))
    # A `FeedbackVerdict` value.
    verdict: Mapped[str] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(String(MAX_FEEDBACK_NOTE_LENGTH))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)


class AuditEvent(Base):
    """One action of a person in the worklist app (who, what, when), for the admins' audit page.

    `detail` holds ids, states and verdicts only: no patient data and no feedback note.
    """

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_event_created_at", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("app_user.id", ondelete="SET NULL"))
    # An `AuditAction` value.
    action: Mapped[str] = mapped_column(String(32))
    worklist_item_id: Mapped[int | None] = mapped_column(ForeignKey("worklist_item.id", ondelete="SET NULL"))
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id", ondelete="SET NULL"))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)


# --- Returned contours and the training pool (issue 13; `service.contours`) ---------------------


class ContourStatus(StrEnum):
    """What became of a received contour object (`ContourObject.status`)."""

    PENDING = "pending"  # stored, not yet looked at by the pipeline's contour stage
    MATCHED = "matched"  # matched to a worklisted CT series, liver rasterised, in the training pool
    SUPERSEDED = "superseded"  # was matched; a later contour for the same CT series replaced it (both kept)
    UNMATCHED = "unmatched"  # references no CT series on the worklist (unknown series, not worklisted …)
    NO_LIVER = "no_liver"  # no structure/segment whose name is in `Settings.liver_structure_names`
    EMPTY = "empty"  # the liver structure rasterises to no voxel on the CT
    UNREADABLE = "unreadable"  # not a readable RT Structure Set / Segmentation, or rasterising failed


class ContourObject(Base):
    """One received RT Structure Set or Segmentation instance, and what the contour stage made of it.

    Every received contour object has a row, whatever became of it; `reason` says why it was not
    used (no patient data: UIDs, ROI names as the sender wrote them, states).
    """

    __tablename__ = "contour_object"
    __table_args__ = (UniqueConstraint("instance_id"), Index("ix_contour_object_status", "status"))

    id: Mapped[int] = mapped_column(primary_key=True)
    # The contour's own series version (an RTSTRUCT or SEG series in state `stored`) and instance.
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id", ondelete="CASCADE"))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str] = mapped_column(String(16))
    calling_ae_title: Mapped[str] = mapped_column(AE_TITLE)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    # A `ContourStatus` value, and why (for every status but pending and matched).
    status: Mapped[str] = mapped_column(String(16), default=ContourStatus.PENDING.value)
    reason: Mapped[str | None] = mapped_column(Text)
    # What the object says it contours: the referenced CT series and its frame of reference.
    referenced_series_instance_uid: Mapped[str | None] = mapped_column(UID)
    frame_of_reference_uid: Mapped[str | None] = mapped_column(UID)
    # The CT series version it was matched to (NULL: none).
    matched_series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id", ondelete="SET NULL"), index=True)
    # The structure (ROI name / segment label) taken as the liver.
    structure_name: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    # When the contour stage's message was last sent for it (a pending one is sent again later).
    queued_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    processed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


class PoolEntry(Base):
    """One training example: a CT series version and the liver mask a person contoured on it.

    The mask is a compressed NumPy file under `Settings.storage_dir` (`mask_path`, relative); see
    `service.contours` for its layout and for the export that `gatekeeper train segmenter` reads.
    A later contour for the same CT series supersedes this entry (`superseded`), which is kept.
    """

    __tablename__ = "pool_entry"
    __table_args__ = (UniqueConstraint("contour_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    contour_id: Mapped[int] = mapped_column(ForeignKey("contour_object.id", ondelete="CASCADE"))
    series_instance_uid: Mapped[str] = mapped_column(UID)
    contour_sop_instance_uid: Mapped[str] = mapped_column(UID)
    structure_name: Mapped[str] = mapped_column(Text)
    mask_path: Mapped[str] = mapped_column(Text)
    # Hex SHA-256 of the mask file as written.
    mask_sha256: Mapped[str] = mapped_column(String(64))
    num_slices: Mapped[int]
    liver_voxels: Mapped[int] = mapped_column(BigInteger)
    # Provenance: the AE that sent the contour, the dosimetrist who held the worklist item, when it came.
    calling_ae_title: Mapped[str] = mapped_column(AE_TITLE)
    contoured_by: Mapped[int | None] = mapped_column(ForeignKey("app_user.id", ondelete="SET NULL"))
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    superseded: Mapped[bool] = mapped_column(default=False, server_default=text("false"))


# --- The model registry (issue 13; `service.model_registry`) -------------------------------------


class ModelKind(StrEnum):
    """What a registered model does (`ModelVersion.kind`)."""

    SEGMENTER = "segmenter"  # the liver segmenter (segmenter.onnx + model.json)
    DETECTOR = "detector"  # the anomaly detector of the gate (ONNX files + model.json)
    GATE = "gate"  # the gate's decision settings (gate.json)


class ModelStatus(StrEnum):
    """Where a registered model version stands (`ModelVersion.status`); one `active` per kind at most."""

    CANDIDATE = "candidate"  # registered (e.g. by a retrain), not used by the pipeline
    ACTIVE = "active"  # the version every worker loads for its next task
    RETIRED = "retired"  # was active; a promotion or a rollback replaced it


class ModelVersion(Base):
    """One registered version of a model: its files, provenance and place in the promote/rollback history.

    `version` is the model's own version, the one results are recorded with
    (`SeriesScore.model_version`, the SEG's algorithm version, the events' `segmenter_version`).
    `sha256` covers model.json / gate.json and every ONNX file (`service.model_registry.model_hash`);
    the files lie, immutable, in the folder `path`.
    """

    __tablename__ = "model_version"
    __table_args__ = (
        UniqueConstraint("kind", "version"),
        CheckConstraint("kind IN ('segmenter', 'detector', 'gate')", name="kind"),
        CheckConstraint("status IN ('candidate', 'active', 'retired')", name="status"),
        # At most one active version per kind, kept by the database itself.
        Index(
            "uq_model_version_active_kind",
            "kind",
            unique=True,
            postgresql_where=text("status = 'active'"),
            sqlite_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    # A `ModelKind` value.
    kind: Mapped[str] = mapped_column(String(16))
    version: Mapped[str] = mapped_column(String(64))
    # Hex SHA-256 over model.json (gate.json) and the ONNX files, names included.
    sha256: Mapped[str] = mapped_column(String(64))
    # The model's folder (absolute, or relative to `Settings.storage_dir`).
    path: Mapped[str] = mapped_column(Text)
    # What it was trained on: {"pool_entry_ids": [...], "base_data_hash": ..., "base_data": ..., "parent_version": ...}.
    training_data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Its own validation numbers, from model.json.
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # A `ModelStatus` value.
    status: Mapped[str] = mapped_column(String(16), default=ModelStatus.CANDIDATE.value)
    registered_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
    registered_by: Mapped[str] = mapped_column(String(64))
    # The last time it became active, and who made it so (a promotion or a rollback).
    promoted_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    promoted_by: Mapped[str | None] = mapped_column(String(64))
    retired_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    # The version that was active when this one was first promoted: where a rollback returns to.
    replaced_id: Mapped[int | None] = mapped_column(ForeignKey("model_version.id", ondelete="SET NULL"))


class ModelEvent(Base):
    """Something done to a registered model version (registered, promoted, retired, rolled back), by whom."""

    __tablename__ = "model_event"

    id: Mapped[int] = mapped_column(primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_version.id", ondelete="CASCADE"), index=True)
    # "registered", "promoted", "retired", "rolled_back", "restored".
    action: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utc_now)
