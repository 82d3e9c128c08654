"""Test helpers for the worklist: a seeded database (phantom DICOM files, scores, residual maps,
worklist items, users) and the app under a real uvicorn server on a free port."""

from __future__ import annotations

import datetime as dt
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import uvicorn
from conftest import free_port
from fastapi import FastAPI
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import (
    Instance,
    Route,
    RouteReason,
    Series,
    SeriesEvent,
    SeriesScore,
    User,
    UserRole,
    WorklistItem,
)
from service.lifecycle import SeriesState
from service.phantom.generate import SeriesSpec, generate_series
from service.web import security

_CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def csrf_token(client: httpx.Client) -> str:
    """The CSRF token of `client`'s browser cookie, read from a rendered form (the login page; its
    first GET also sets the cookie)."""
    page = client.get("/login")
    match = _CSRF_FIELD.search(page.text)
    assert match, f"no csrf_token field on the login page ({page.status_code})"
    return match.group(1)


class PageClient(httpx.Client):
    """An HTTP client that sends what the worklist's own pages send: `Origin` with every request, the
    form's `csrf_token` with every form post, and `X-CSRF-Token` with every API call (needed with the
    cookie, ignored with basic auth). Leave out `origin` to send none."""

    def __init__(self, base_url: str, *, origin: str | None = "", **kwargs: object) -> None:
        headers = {"Origin": base_url if origin == "" else origin} if origin is not None else {}
        super().__init__(base_url=base_url, headers=headers, **kwargs)  # type: ignore[arg-type]
        self._csrf: str | None = None

    def request(self, method: str, url: httpx.URL | str, **kwargs: object) -> httpx.Response:
        if method.upper() not in _SAFE_METHODS:
            if self._csrf is None:
                self._csrf = csrf_token(self)
            if str(url).startswith("/api/"):
                kwargs["headers"] = {"X-CSRF-Token": self._csrf, **dict(kwargs.get("headers") or {})}  # type: ignore[call-overload]
            elif kwargs.get("json") is None and kwargs.get("content") is None:
                kwargs["data"] = {"csrf_token": self._csrf, **dict(kwargs.get("data") or {})}  # type: ignore[call-overload]
        return super().request(method, url, **kwargs)  # type: ignore[arg-type]


def wait_until(page: Any, expression: str, *, timeout_s: float = 60.0) -> None:
    """Wait until the JavaScript `expression` is true in `page`, polling with `page.evaluate` (the
    DevTools protocol, which the app's Content-Security-Policy does not restrict, unlike the polling of
    `page.wait_for_function`, which evaluates a string in the page and is refused without 'unsafe-eval')."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout_s:.0f} s: {expression}")
        page.wait_for_timeout(50)


def login(client: httpx.Client, name: str, password: str | None = None, **form: str) -> httpx.Response:
    """POST the login form as a browser would (CSRF token of the page, Origin); `password` defaults to the seeded one."""
    data = {"name": name, "password": password if password is not None else PASSWORDS[name], **form}
    return client.post("/login", data=data)


PASSWORDS = {"alice": "alice-password", "bob": "bob-password", "admin": "admin-password"}
THRESHOLD = 0.5
NUM_SLICES = 12
MATRIX = 64
ANOMALY = "tumor"  # phantom anomaly of the flagged series
FLAGGED = range(5, 9)  # slices whose score is above the threshold in the anomalous series
#: What the gate recorded on the flagged series (`GateDecision.as_json`); the words hold "<" and "&"
#: so that a page that does not escape them shows.
GATE_WORDS = "segmentations disagree on slices 5–8 (pairwise Dice 0.81 < normal ≥ 0.93 & more)"
FLAGGED_GATE = {
    "manual": True,
    "reason": "anomaly",
    "fused": 3.1,
    "fused_threshold": 2.0,
    "gate_version": "gate-test-1",
    "findings": [
        {"signal": "tta_dice", "value": 0.81, "threshold": 0.93, "fired": True, "slices": [5, 8], "words": GATE_WORDS},
        {
            "signal": "entropy",
            "value": 0.02,
            "threshold": 0.05,
            "fired": False,
            "slices": None,
            "words": "segmenter confident around the liver (entropy 0.02; normal ≤ 0.05)",
        },
    ],
}


def write_phantom(out: Path, *, anomaly: str | None, seed: int) -> Path:
    """A small phantom series (12 slices, 64×64) in `out`; returns its folder."""
    spec = SeriesSpec(
        folder=f"s{seed}", patient_seed=seed, series_seed=seed, anomaly=anomaly, num_slices=NUM_SLICES, matrix=MATRIX
    )
    generate_series(spec, out)
    return out / spec.folder


@dataclass(frozen=True)
class Seeded:
    """What `seed_database` made: Series Instance UIDs and worklist item ids by role in the tests."""

    flagged_uid: str  # anomaly, open worklist item, scored, residual maps
    flagged_item: int
    geometry_uid: str  # geometry findings, open worklist item, no score
    geometry_item: int
    delivered_uid: str  # routed to auto-segmentation, no worklist item
    user_ids: dict[str, int]


def add_series(
    session: Session,
    *,
    folder: Path,
    storage_dir: Path,
    state: SeriesState,
    route: Route | None,
    reason: RouteReason | None,
    name: str,
    version: int = 1,
) -> tuple[Series, list[dict]]:
    """Copy the folder's slices under `storage_dir` and add the Series and Instance rows.

    Returns the series and its slices head → feet as `{"index", "sop_instance_uid", "position"}`.
    """
    now = dt.datetime.now(dt.UTC)
    headers = []
    for path in sorted(folder.glob("CT*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        headers.append((float(ds.ImagePositionPatient[2]), path, ds))
    headers.sort(key=lambda h: -h[0])  # head first: descending z
    first = headers[0][2]
    series = Series(
        series_instance_uid=str(first.SeriesInstanceUID),
        version=version,
        study_instance_uid=str(first.StudyInstanceUID),
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        modality="CT",
        calling_ae_title="CT1",
        state=state.value,
        num_instances=len(headers),
        first_received_at=now - dt.timedelta(hours=3),
        last_received_at=now - dt.timedelta(hours=3),
        completed_at=now - dt.timedelta(hours=3),
        geometry_findings=[],
        route=route.value if route else None,
        route_reason=reason.value if reason else None,
        patient_name=name,
        patient_id=f"PID-{name[:3].upper()}",
        study_date=dt.date(2026, 3, 14),
        series_description=str(first.get("SeriesDescription", "")),
        state_changed_at=now,
    )
    session.add(series)
    session.flush()
    slices = []
    for index, (z, path, ds) in enumerate(headers):
        relative = f"series/{series.id}/{path.name}"
        target = storage_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        session.add(
            Instance(
                series_id=series.id,
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                relative_path=relative,
                sha256="0" * 64,
                size_bytes=target.stat().st_size,
                received_at=now,
            )
        )
        slices.append({"index": index, "sop_instance_uid": str(ds.SOPInstanceUID), "position": z})
    return series, slices


def seed_database(sessions: sessionmaker[Session], *, storage_dir: Path, phantoms: dict[str, Path]) -> Seeded:
    """Users alice and bob (dosimetrists) and admin; a flagged series on the worklist with scores and
    residual maps; a geometry series on the worklist without scores; a delivered series."""
    now = dt.datetime.now(dt.UTC)
    with sessions() as session:
        users = {
            name: User(
                name=name,
                role=(UserRole.ADMIN if name == "admin" else UserRole.DOSIMETRIST).value,
                password_hash=security.hash_password(password),
                active=True,
            )
            for name, password in PASSWORDS.items()
        }
        session.add_all(users.values())

        flagged, slices = add_series(
            session,
            folder=phantoms["anomaly"],
            storage_dir=storage_dir,
            state=SeriesState.WORKLISTED,
            route=Route.WORKLIST,
            reason=RouteReason.ANOMALY,
            name="Doe^Jane",
        )
        for entry in slices:
            entry["score"] = (
                0.9 - 0.05 * abs(entry["index"] - 6) if entry["index"] in FLAGGED else 0.2 + 0.01 * entry["index"]
            )
        top = sorted(slices, key=lambda s: -s["score"])[:3]
        top_slices = []
        for entry in top:
            relative = f"residuals/{flagged.id}/{entry['index']}.npy"
            (storage_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            yy, xx = np.mgrid[0:64, 0:64]
            blob = np.exp(-((yy - 30) ** 2 + (xx - 38) ** 2) / 40.0).astype(np.float16)
            np.save(storage_dir / relative, blob)
            top_slices.append(
                {
                    "index": entry["index"],
                    "score": entry["score"],
                    "residual_map": relative,
                    "sop_instance_uid": entry["sop_instance_uid"],
                }
            )
        session.add(
            SeriesScore(
                series_id=flagged.id,
                model_version="test-model-1",
                score=0.85,
                threshold=THRESHOLD,
                flagged=True,
                slices=slices,
                top_slices=top_slices,
                provider="CPUExecutionProvider",
                duration_s=1.0,
                created_at=now,
            )
        )
        gate_detail = {
            "gate": FLAGGED_GATE,
            "draft": None,
            "gate_version": "gate-test-1",
            "segmenter_version": "seg-test-1",
            "detector_version": "test-model-1",
        }
        flagged_item = WorklistItem(
            series_id=flagged.id,
            reason=RouteReason.ANOMALY.value,
            detail={"score": 0.85, **gate_detail},
            created_at=now - dt.timedelta(hours=2),
        )
        session.add(
            SeriesEvent(
                series_id=flagged.id,
                kind="routed",
                detail={"route": "worklist", "reason": "anomaly", **gate_detail},
                created_at=now - dt.timedelta(hours=2),
            )
        )

        geometry, _ = add_series(
            session,
            folder=phantoms["geometry"],
            storage_dir=storage_dir,
            state=SeriesState.WORKLISTED,
            route=Route.WORKLIST,
            reason=RouteReason.GEOMETRY,
            name="Roe^Richard",
        )
        geometry.geometry_findings = [{"code": "gap", "message": "slice gap of 10 mm between slices 4 and 5"}]
        geometry_item = WorklistItem(
            series_id=geometry.id,
            reason=RouteReason.GEOMETRY.value,
            detail={"findings": ["gap"]},
            created_at=now - dt.timedelta(minutes=20),
        )

        delivered, delivered_slices = add_series(
            session,
            folder=phantoms["normal"],
            storage_dir=storage_dir,
            state=SeriesState.DELIVERED,
            route=Route.AUTO,
            reason=None,
            name="Poe^Edgar",
        )
        for entry in delivered_slices:
            entry["score"] = 0.2
        session.add(
            SeriesScore(
                series_id=delivered.id,
                model_version="test-model-1",
                score=0.2,
                threshold=THRESHOLD,
                flagged=False,
                slices=delivered_slices,
                top_slices=[],
                provider="CPUExecutionProvider",
                duration_s=1.0,
                created_at=now,
            )
        )
        session.add_all([flagged_item, geometry_item])
        session.commit()
        return Seeded(
            flagged_uid=flagged.series_instance_uid,
            flagged_item=flagged_item.id,
            geometry_uid=geometry.series_instance_uid,
            geometry_item=geometry_item.id,
            delivered_uid=delivered.series_instance_uid,
            user_ids={name: user.id for name, user in users.items()},
        )


def write_model_dir(folder: Path) -> Path:
    """A model folder that passes the readiness check: model.json naming one existing file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text('{"format": 1, "files": {"net": "net.onnx"}}')
    (folder / "net.onnx").write_bytes(b"not really onnx")
    return folder


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run `app` under uvicorn in a thread on a free port; yield its base URL, stop it afterwards."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
