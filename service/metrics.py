"""Every Prometheus metric of CT Gatekeeper, defined here, and the small functions that record them.

Two kinds, so that one scrape is right whichever process did the work:

- **Event metrics** (counted where the work happens; `record_*` below): C-STORE responses by status,
  associations by calling AE title, time per pipeline stage, routes by reason, export attempts by
  outcome. `gatekeeper listen` and `gatekeeper worker` run in prometheus_client's multiprocess mode:
  each process writes its values to files in the metrics folder (`Settings.metrics_dir`, default
  `storage_dir/metrics`), and a scrape sums them, so the web app's `/metrics` shows what the listener
  and the worker did. A process not in that mode (a test, a one-off command) counts in memory.
- **Scraped facts** (computed at scrape time by `GatekeeperCollector`, from the database, the disk and
  the model folders): instances and bytes received (stored instances of the current series
  versions), series by state and the oldest per state, queue depth and oldest queued age, exports by
  state, free disk against the listener's reserve, the model versions in use. They need no shared
  memory and survive restarts.

Labels never carry patient data: states, reasons, outcomes and model versions only, and calling AE
titles only with `metrics_ae_title_labels` (a scrape otherwise shows `calling_ae="any"`). A scrape
needs the bearer token `metrics_token`, or `metrics_open` (`refusal`).
Recording never raises: a metrics failure is logged and must not break a store or a stage.

A process records events in multiprocess mode when `PROMETHEUS_MULTIPROC_DIR` is in its
environment before prometheus_client is first imported: `gatekeeper listen` and `gatekeeper worker`
export it (`service.commands.ingest.use_metrics_dir`) before they import this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import shutil
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import Export, ExportState, Instance, Route, RouteReason, Series, utc_now
from service.lifecycle import FINAL_STATES, SeriesState
from service.settings import Settings

log = logging.getLogger(__name__)

# --- event metrics ----------------------------------------------------------------------------------

# The `*_created` samples are not written in multiprocess mode; leave them out everywhere alike.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: The registry of this process's event metrics (not prometheus_client's default one, which also
#: holds process and GC collectors that a multi-process scrape cannot sum).
EVENTS = CollectorRegistry(auto_describe=True)

CSTORE_STATUS_NAMES = {
    0x0000: "success",
    0xA700: "out_of_resources",
    0xA900: "data_set_does_not_match_sop_class",
    0xC210: "cannot_understand",
    0xC000: "cannot_understand",
}
STAGES = ("score", "segment", "forward", "export")
EXPORT_OUTCOMES = ("delivered", "transient", "permanent")
ATTEMPT_LABELS = ("1", "2", "3", "4+")
#: At most this many distinct calling AE titles are counted by name; more fall into "other".
MAX_AE_LABELS = 64

CSTORE_RESPONSES = Counter(
    "gatekeeper_cstore_responses",
    "C-STORE requests answered by the listener, by response status",
    ["status"],
    registry=EVENTS,
)
ASSOCIATIONS = Counter(
    "gatekeeper_associations",
    "DICOM associations requested of the listener, by calling AE title and result (accepted/rejected)",
    ["calling_ae", "result"],
    registry=EVENTS,
)
STAGE_SECONDS = Histogram(
    "gatekeeper_stage_duration_seconds",
    "Seconds a pipeline stage worked on one series (export: one delivery attempt)",
    ["stage"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
    registry=EVENTS,
)
ROUTES = Counter(
    "gatekeeper_routes",
    "Routing decisions: auto-segmentation, or the worklist with its reason",
    ["route", "reason"],
    registry=EVENTS,
)
EXPORT_ATTEMPTS = Counter(
    "gatekeeper_export_attempts",
    "Delivery attempts to the PACS, by outcome and by attempt number within the export's round",
    ["outcome", "attempt"],
    registry=EVENTS,
)

# Known label values start at 0, so that rates and alerts see the series before the first event.
for _status in sorted(set(CSTORE_STATUS_NAMES.values())):
    CSTORE_RESPONSES.labels(status=_status)
for _stage in STAGES:
    STAGE_SECONDS.labels(stage=_stage)
ROUTES.labels(route=Route.AUTO.value, reason="none")
for _reason in RouteReason:
    if _reason != RouteReason.SHADOW_REVIEW:  # not a route: shadow mode's review of an auto-routed series
        ROUTES.labels(route=Route.WORKLIST.value, reason=_reason.value)
for _outcome in EXPORT_OUTCOMES:
    for _attempt in ATTEMPT_LABELS:
        EXPORT_ATTEMPTS.labels(outcome=_outcome, attempt=_attempt)

#: The family name of ASSOCIATIONS as collected (prometheus_client drops the `_total` suffix).
ASSOCIATIONS_NAME = "gatekeeper_associations"
#: The `calling_ae` label value when `metrics_ae_title_labels` is off.
ANY_AE = "any"

_ae_labels: set[str] = set()
_ae_lock = threading.Lock()


def _ae_label(calling_ae_title: str) -> str:
    """The calling AE title as a label value; past `MAX_AE_LABELS` distinct titles, "other"."""
    title = calling_ae_title.strip()[:16] or "(empty)"
    with _ae_lock:
        if title in _ae_labels:
            return title
        if len(_ae_labels) >= MAX_AE_LABELS:
            return "other"
        _ae_labels.add(title)
        return title


def without_ae_titles(family: Metric) -> Metric:
    """`family` (the associations counter) summed over calling AE titles: `calling_ae="any"` per result."""
    sums: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for sample in family.samples:
        labels = {**sample.labels, "calling_ae": ANY_AE} if "calling_ae" in sample.labels else dict(sample.labels)
        key = (sample.name, tuple(sorted(labels.items())))
        sums[key] = sums.get(key, 0.0) + sample.value
    merged = Metric(family.name, family.documentation, family.type, family.unit)
    for (name, label_items), value in sums.items():
        merged.add_sample(name, dict(label_items), value)
    return merged


def record_store_response(response: object) -> None:
    """Count one C-STORE answered with `response`: a status (0x0000 success ...) or a data set with Status."""
    try:
        status = int(getattr(response, "Status", response))  # type: ignore[call-overload]
        CSTORE_RESPONSES.labels(status=CSTORE_STATUS_NAMES.get(status, f"0x{status:04X}")).inc()
    except Exception:  # a metrics failure never breaks a store
        log.exception("could not count a C-STORE response")


def record_association(calling_ae_title: str, *, accepted: bool) -> None:
    """Count one association from `calling_ae_title`, accepted or rejected."""
    try:
        ASSOCIATIONS.labels(calling_ae=_ae_label(calling_ae_title), result="accepted" if accepted else "rejected").inc()
    except Exception:
        log.exception("could not count an association")


def record_stage(stage: str, seconds: float) -> None:
    """Record that pipeline stage `stage` (one of `STAGES`) worked `seconds` on one series."""
    try:
        STAGE_SECONDS.labels(stage=stage).observe(max(0.0, seconds))
    except Exception:
        log.exception("could not record the duration of stage %s", stage)


def record_route(route: str, reason: str | None) -> None:
    """Count one routing decision: `route` "auto" (reason None) or "worklist" with its reason."""
    try:
        ROUTES.labels(route=route, reason=reason or "none").inc()
    except Exception:
        log.exception("could not count a route")


def record_export_attempt(outcome: str, *, attempt: int, seconds: float) -> None:
    """Count one delivery attempt (`attempt`-th of its round) with `outcome`; its time is the export stage's."""
    try:
        EXPORT_ATTEMPTS.labels(outcome=outcome, attempt=str(attempt) if attempt < 4 else "4+").inc()
        STAGE_SECONDS.labels(stage="export").observe(max(0.0, seconds))
    except Exception:
        log.exception("could not count an export attempt")


# --- where the event files live ------------------------------------------------------------------------


def metrics_directory(settings: Settings) -> Path:
    """The folder of the multiprocess event files: `metrics_dir` (the settings default it under `storage_dir`)."""
    return Path(settings.metrics_dir) if settings.metrics_dir is not None else Path(settings.storage_dir) / "metrics"


# --- scraped facts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelVersion:
    """Which model a configured folder holds: `version` is what results are keyed by; None when unreadable."""

    model: str  # "detector" or "segmenter"
    model_dir: Path
    name: str
    version: str | None
    problem: str | None = None


@lru_cache(maxsize=16)
def _file_version(path: Path, mtime_ns: int, size: int) -> str:
    """The first 16 hex digits of the SHA-256 of a model file (as `service.inference` keys results)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def model_version(model: str, model_dir: Path) -> ModelVersion:
    """The version of the model in `model_dir`, read from its model.json (no ONNX Runtime needed).

    The detector's is model.json's `version`, else the hash of its scorer file (as the worker keys
    scores); the segmenter's is model.json's `version`. Never raises: `problem` says what is wrong.
    """
    path = Path(model_dir) / "model.json"
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
        name = str(meta.get("name") or meta.get("kind") or model)
        version = meta.get("version")
        if not version and isinstance(meta.get("files"), dict) and "scorer" in meta["files"]:
            scorer = Path(model_dir) / str(meta["files"]["scorer"])
            stat = scorer.stat()
            version = _file_version(scorer, stat.st_mtime_ns, stat.st_size)
        if not version:
            return ModelVersion(model, Path(model_dir), name, None, f"{path} has no version")
        return ModelVersion(model, Path(model_dir), name, str(version))
    except (OSError, ValueError, TypeError) as exc:
        return ModelVersion(model, Path(model_dir), model, None, f"{path}: {exc}")


def model_versions(settings: Settings) -> list[ModelVersion]:
    """The detector's and the segmenter's versions, from the configured model folders."""
    return [
        model_version("detector", settings.detector_model_dir),
        model_version("segmenter", settings.segmenter_model_dir),
    ]


@dataclass(frozen=True)
class DiskSpace:
    """Free space of the disk holding `storage_dir` and the reserve under which stores are refused."""

    path: Path
    free_bytes: int
    total_bytes: int
    reserve_bytes: int


def disk_space(settings: Settings) -> DiskSpace:
    """The storage disk's free space and the listener's reserve (`min_free_disk_bytes`, `max_disk_used_fraction`).

    Raises:
        OSError: `storage_dir` (or the nearest existing folder above it) cannot be read.
    """
    path = Path(settings.storage_dir).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    usage = shutil.disk_usage(path)
    reserve = max(settings.min_free_disk_bytes, int(usage.total * (1.0 - settings.max_disk_used_fraction)))
    return DiskSpace(Path(settings.storage_dir), usage.free, usage.total, reserve)


#: States in which a series is waiting for a worker to take it from the queue.
WAITING_STATES = (SeriesState.COMPLETE, SeriesState.QUEUED)


def state_since() -> Any:
    """When a series version entered its state, as a column (older rows may lack `state_changed_at`)."""
    return func.coalesce(Series.state_changed_at, Series.completed_at, Series.last_received_at)


def waiting_since() -> Any:
    """When a series version started waiting for a worker, as a column."""
    return func.coalesce(Series.queued_at, Series.completed_at, Series.last_received_at)


class GatekeeperCollector(Collector):
    """Everything `/metrics` shows: the event metrics of every process, and the facts read at scrape time."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions

    def collect(self) -> Iterable[Metric]:
        yield from self._events()
        yield from self._database()
        yield from self._host()

    def _events(self) -> Iterator[Metric]:
        """The listener's and workers' files (summed), then this process's own for anything not there."""
        families: dict[str, Metric] = {}
        directory = metrics_directory(self.settings)
        try:
            if directory.is_dir() and any(directory.glob("*.db")):
                files = MultiProcessCollector(None, path=str(directory))  # type: ignore[no-untyped-call]
                for family in files.collect():  # type: ignore[no-untyped-call]
                    families[family.name] = family
        except Exception:  # a half-written file from a crashed process must not take /metrics down
            log.exception("could not read the metrics files in %s", directory)
        for family in EVENTS.collect():
            families.setdefault(family.name, family)
        if not self.settings.metrics_ae_title_labels and ASSOCIATIONS_NAME in families:
            families[ASSOCIATIONS_NAME] = without_ae_titles(families[ASSOCIATIONS_NAME])
        yield from families.values()

    def _database(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("gatekeeper_database_up", "1 when the database answered this scrape")
        try:
            facts = self._read_database()
        except SQLAlchemyError as exc:
            log.warning("metrics: database not readable: %s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from facts

    def _read_database(self) -> list[Metric]:
        now = utc_now()
        current = Series.superseded.is_(False)
        with self.sessions() as session:
            instances, size = session.execute(
                select(func.count(Instance.id), func.coalesce(func.sum(Instance.size_bytes), 0))
                .join(Series, Instance.series_id == Series.id)
                .where(current)
            ).one()
            by_state = session.execute(
                select(Series.state, func.count(), func.min(state_since())).where(current).group_by(Series.state)
            ).all()
            waiting, oldest_waiting = session.execute(
                select(func.count(), func.min(waiting_since())).where(
                    current, Series.state.in_([s.value for s in WAITING_STATES])
                )
            ).one()
            exports = dict(session.execute(select(Export.state, func.count()).group_by(Export.state)).all())
        received = CounterMetricFamily(
            "gatekeeper_instances_received",
            "Instances received and stored (current series versions; duplicates and refusals not counted)",
        )
        received.add_metric([], float(instances))
        received_bytes = CounterMetricFamily(
            "gatekeeper_received_bytes", "Bytes of the instances counted by gatekeeper_instances_received"
        )
        received_bytes.add_metric([], float(size))
        series = GaugeMetricFamily("gatekeeper_series", "Series versions (not superseded) by state", labels=["state"])
        oldest = GaugeMetricFamily(
            "gatekeeper_series_oldest_age_seconds",
            "Seconds the oldest series version has been in each unfinished state",
            labels=["state"],
        )
        counts = {state.value: 0 for state in SeriesState}
        for state, count, since in by_state:
            counts[state] = count
            if since is not None and state not in {s.value for s in FINAL_STATES}:
                oldest.add_metric([state], max(0.0, (now - since).total_seconds()))
        for state, count in counts.items():
            series.add_metric([state], count)
        depth = GaugeMetricFamily("gatekeeper_queue_depth", "Series versions waiting for a worker (complete, queued)")
        depth.add_metric([], waiting)
        oldest_queued = GaugeMetricFamily(
            "gatekeeper_queue_oldest_age_seconds", "Seconds the oldest series waiting for a worker has waited; 0: none"
        )
        oldest_queued.add_metric([], max(0.0, (now - oldest_waiting).total_seconds()) if oldest_waiting else 0.0)
        by_export_state = GaugeMetricFamily("gatekeeper_exports", "Exports to the PACS by state", labels=["state"])
        for export_state in ExportState:
            by_export_state.add_metric([export_state.value], exports.get(export_state.value, 0))
        return [received, received_bytes, series, oldest, depth, oldest_queued, by_export_state]

    def _host(self) -> Iterator[Metric]:
        free = GaugeMetricFamily("gatekeeper_storage_free_bytes", "Free bytes on the disk holding storage_dir")
        reserve = GaugeMetricFamily(
            "gatekeeper_storage_reserve_bytes", "Free bytes under which the listener refuses stores (0xA700)"
        )
        try:
            space = disk_space(self.settings)
            free.add_metric([], space.free_bytes)
            reserve.add_metric([], space.reserve_bytes)
        except OSError as exc:
            log.warning("metrics: cannot read the storage disk: %s", exc)
        yield free
        yield reserve
        info = InfoMetricFamily("gatekeeper_model", "Model versions in use (from the configured model folders)")
        for version in model_versions(self.settings):
            info.add_metric(
                [], {"model": version.model, "name": version.name, "version": version.version or "unreadable"}
            )
        yield info


def scrape_registry(settings: Settings, sessions: sessionmaker[Session]) -> CollectorRegistry:
    """A registry holding `GatekeeperCollector`: what `/metrics` and `--metrics-port` expose."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatekeeperCollector(settings, sessions))
    return registry


def token_matches(authorization: str | None, token: str) -> bool:
    """Whether an Authorization header is `Bearer <token>` (compared in constant time)."""
    return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())


def refusal(settings: Settings, authorization: str | None) -> str | None:
    """Why a scrape with this Authorization header is refused (401), or None when it may read the metrics.

    With `metrics_token` set, the header must be `Bearer <token>`; without one, only `metrics_open`
    lets anyone read them (fails closed).
    """
    token = settings.metrics_token.get_secret_value()
    if token:
        return (
            None if token_matches(authorization, token) else "metrics need the bearer token (GATEKEEPER_METRICS_TOKEN)"
        )
    if settings.metrics_open:
        return None
    return "metrics are closed: set GATEKEEPER_METRICS_TOKEN (or GATEKEEPER_METRICS_OPEN=true on a trusted network)"


def serve_metrics(settings: Settings, sessions: sessionmaker[Session], *, port: int) -> WSGIServer:
    """Serve `scrape_registry` at http://`metrics_bind_address`:`port`/metrics in a daemon thread.

    A request that `refusal` refuses gets 401 (without a token set: every request, unless
    `metrics_open`). Call `shutdown()` on the returned server to stop it.

    Raises:
        OSError: the port cannot be bound.
    """
    app = make_wsgi_app(scrape_registry(settings, sessions))

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        reason = refusal(settings, environ.get("HTTP_AUTHORIZATION"))
        if reason is not None:
            start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
            return [reason.encode() + b"\n"]
        return app(environ, start_response)  # type: ignore[no-any-return]

    address = settings.metrics_bind_address

    class Server(ThreadingWSGIServer):
        address_family = socket_family(address)

    httpd = make_server(address, port, guarded, Server, handler_class=_SilentHandler)
    threading.Thread(target=httpd.serve_forever, name=f"metrics-{port}", daemon=True).start()
    log.info("metrics on http://%s:%s/metrics", address, httpd.server_port)
    return httpd


def socket_family(address: str) -> int:
    """AF_INET6 for an IPv6 address, else AF_INET."""
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def age_seconds(since: dt.datetime | None, now: dt.datetime) -> float | None:
    """Seconds from `since` to `now`, or None."""
    return None if since is None else max(0.0, (now - since).total_seconds())
