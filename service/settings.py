"""Every tunable of CT Gatekeeper, in one typed class.

Values come from, highest priority first:

1. environment variables `GATEKEEPER_<FIELD>` (e.g. `GATEKEEPER_PORT=11113`);
2. the TOML file named by `GATEKEEPER_CONFIG`, with the field names as top-level keys
   (e.g. `port = 11113`); an unknown key is an error, so a typo cannot pass silently;
3. the defaults below, which are enough for a single-machine development setup: SQLite and
   an SQLite-backed Celery broker under `storage_dir`, the listener on the loopback address.

List fields take a TOML array in the file, and a comma-separated string in the environment
(`GATEKEEPER_ALLOWED_AE_TITLES=CT1,CT2`).

This is the only module that reads the process environment. The fields are grouped by concern
(storage, listener, PACS, export, pipeline, models, web, monitoring), each group under a `# ===`
comment line that `docs/settings.md` takes its sections from. To add a setting, add a typed field
with a default and a comment that states its meaning and unit to its group; validators below show
how to check a value and say what was expected.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "GATEKEEPER_"
CONFIG_ENV_VAR = "GATEKEEPER_CONFIG"
EXIT_BAD_SETTINGS = 2
# The repository (or installed source) root: the shipped models lie under `models/` there.
_REPO_DIR = Path(__file__).resolve().parent.parent

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ConfigFileError(Exception):
    """The file named by GATEKEEPER_CONFIG is missing or is not valid TOML."""


def check_ae_title(value: str) -> str:
    """Return `value` without trailing spaces if it is a valid DICOM Application Entity title.

    A valid AE title (PS3.5, VR "AE") has 1 to 16 characters from the default character
    repertoire (printable ASCII), no backslash, and is not made of spaces only.

    Raises:
        ValueError: the title breaks one of those rules; the message says which.
    """
    if not 1 <= len(value) <= 16:
        raise ValueError(f"AE title {value!r} has {len(value)} characters; expected 1 to 16")
    if "\\" in value:
        raise ValueError(f"AE title {value!r} contains a backslash")
    if any(not " " <= ch <= "~" for ch in value):
        raise ValueError(f"AE title {value!r} has characters outside printable ASCII")
    if not value.strip():
        raise ValueError("AE title is all spaces")
    return value.rstrip()


def _is_ipv6(value: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(value), ipaddress.IPv6Address)
    except ValueError:
        return False


def split_list(value: Any) -> Any:
    """Turn a comma-separated environment string into a list; leave other values to pydantic."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """The configuration of one gatekeeper process; invalid values refuse to load."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    # === Storage and services: where files, the database and the broker live.
    # Folder for received DICOM files, the default SQLite database and the default broker.
    storage_dir: Path = Path("./var")
    # SQLAlchemy URL; `postgresql://` URLs use psycopg 3. Empty: SQLite file `storage_dir/gatekeeper.db`.
    database_url: str = ""
    # Celery broker URL, e.g. `redis://127.0.0.1:6379/0`. Empty: the embedded SQLAlchemy transport
    # on `storage_dir/broker.db`, which needs no server but suits one machine only.
    broker_url: str = ""

    # === Listener: the DICOM listener (`gatekeeper listen`), its access control and limits.
    # Our own DICOM Application Entity title, as the senders address us.
    ae_title: str = "GATEKEEPER"
    # TCP port of the DICOM listener.
    port: int = Field(default=11112, ge=1, le=65535)
    # IP address the DICOM listener binds to; `0.0.0.0` listens on every interface.
    bind_address: str = "127.0.0.1"
    # Calling AE titles accepted by the listener. Access control fails closed: with an empty list
    # `gatekeeper listen` refuses to start; `*` alone accepts any calling AE title.
    allowed_ae_titles: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Networks (CIDR, e.g. `10.1.0.0/16`) the listener accepts associations from. Empty: the
    # listener refuses to start; `0.0.0.0/0` and `::/0` accept every address.
    allowed_networks: Annotated[list[IPNetwork], NoDecode] = Field(default_factory=list)
    # Seconds without a new instance after which a series counts as completely received.
    quiet_period_s: float = Field(default=20.0, gt=0)
    # Quiet period per calling AE title, overriding `quiet_period_s` for that sender (seconds);
    # TOML table `[quiet_period_s_by_ae]`, or JSON in the environment: `{"SLOW_PACS": 60}`.
    quiet_period_s_by_ae: dict[str, float] = Field(default_factory=dict)
    # Most associations the listener serves at once; more are rejected (transient, local limit).
    max_associations: int = Field(default=16, ge=1, le=1000)
    # Largest P-DATA PDU we accept, in bytes; 0: no limit. Larger PDUs cost less Python per byte.
    max_pdu_bytes: int = Field(default=1_048_576, ge=0)
    # Seconds to wait for an A-ASSOCIATE / A-RELEASE answer (ACSE), a DIMSE message, and for any
    # network traffic on an idle association before it is aborted.
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)
    # Stores are refused with 0xA700 (Out of Resources) while the disk holding `storage_dir` has
    # less than this many bytes free, or more than this fraction of it is used.
    min_free_disk_bytes: int = Field(default=5_000_000_000, ge=0)
    max_disk_used_fraction: float = Field(default=0.90, gt=0, le=1)
    # DICOM TLS: PEM certificate and private key of the listener. When both are set the listener
    # also serves TLS on `tls_port`. With `tls_ca_path` set, clients must present a certificate
    # signed by one of those CAs (mutual TLS).
    tls_cert_path: Path | None = None
    tls_key_path: Path | None = None
    tls_ca_path: Path | None = None
    # TCP port of the TLS listener (2762 is the port IANA assigns to DICOM over TLS).
    tls_port: int = Field(default=2762, ge=1, le=65535)
    # Largest data set one C-STORE may carry, in bytes as sent (before any inflation). A larger one is
    # not kept in memory past this size and is answered 0xA700 (Refused: Out of Resources). A listener
    # may hold about three copies of an instance per association at once: size memory accordingly.
    max_instance_bytes: int = Field(default=1_073_741_824, ge=1024)
    # Largest size a Deflated Explicit VR Little Endian data set may inflate to, in bytes; inflation
    # stops there and the instance is answered 0xA700 (a decompression bomb never reaches memory).
    max_inflated_bytes: int = Field(default=1_073_741_824, ge=1024)
    # Seconds a file in `storage_dir/tmp` must be untouched before the listener deletes it as the
    # leftover of a failed store (never acknowledged); a live one is seconds old. Checked at start-up
    # and every `orphan_tmp_age_s` after.
    orphan_tmp_age_s: float = Field(default=60.0, gt=0)
    # Seconds between two rounds of the listener's assembler (series completion, queueing, resends).
    sweeper_interval_s: float = Field(default=1.0, gt=0)

    # === PACS: where results go (C-STORE), and DICOM TLS to it.
    # The PACS that receives our DICOM-SEGs by C-STORE: its AE title, host name or IP address, and
    # TCP port. Export refuses to run while pacs_host or pacs_ae_title is empty (no destination).
    pacs_ae_title: str = ""
    pacs_host: str = ""
    pacs_port: int = Field(default=104, ge=1, le=65535)
    # DICOM TLS to the PACS. With pacs_tls on, the PACS's certificate must be signed by a CA in
    # pacs_tls_ca_path (unset: the system's CAs) and name pacs_host; with pacs_tls_cert_path and
    # pacs_tls_key_path (PEM) we present our own certificate too (mutual TLS).
    pacs_tls: bool = False
    pacs_tls_ca_path: Path | None = None
    pacs_tls_cert_path: Path | None = None
    pacs_tls_key_path: Path | None = None

    # === Export: what is sent to the PACS and how it is retried; the contours that come back.
    # Our calling AE title when we send to the PACS; empty: ae_title.
    export_ae_title: str = ""
    # Seconds to wait for the PACS in one export: to connect and associate, for the C-STORE
    # response, and for any traffic on the open association.
    export_timeout_s: float = Field(default=60.0, gt=0)
    # Transient failures are retried after export_retry_initial_s, then after twice as long each
    # time up to export_retry_max_s; export_retry_deadline_s after the export was queued (or last
    # retried by an operator) it is given up and listed as failed. Seconds.
    export_retry_initial_s: float = Field(default=30.0, gt=0)
    export_retry_max_s: float = Field(default=3600.0, gt=0)
    export_retry_deadline_s: float = Field(default=48 * 3600.0, gt=0)
    # Celery queue of SEG deliveries to the PACS.
    export_queue: str = Field(default="gatekeeper.export", min_length=1)
    # What the auto route delivers to the PACS for each segmented series: "seg" the DICOM-SEG,
    # "rtstruct" an RT Structure Set (the liver as closed planar contours, for treatment planning
    # systems), "both" the two objects, each an export of its own.
    export_format: Literal["seg", "rtstruct", "both"] = "seg"
    # ROIName of the liver in that RT Structure Set: 1 to 64 characters (DICOM LO), no backslash.
    rtstruct_roi_name: str = "Liver"
    # Returned contours (service/contours/). Names of the liver structure in RT Structure Sets
    # (ROIName) and Segmentations (SegmentLabel) sent back by the TPS or PACS, compared without letter
    # case or surrounding blanks; the first name of this list found in an object wins. Comma-separated
    # in the environment (GATEKEEPER_LIVER_STRUCTURE_NAMES). Never empty.
    liver_structure_names: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["liver", "Liver", "LIVER", "Liver_manual", "Liver manual", "Liver-manual", "Leber"],
        min_length=1,
    )

    # === Pipeline: score -> route -> segment -> SEG -> export, or worklist (service/pipeline/).
    # Celery queue that completed series versions are sent to.
    pipeline_queue: str = Field(default="gatekeeper.series", min_length=1)
    # Seconds a series may stay `queued` without a worker confirming it before it is sent again.
    queue_resend_after_s: float = Field(default=300.0, gt=0)
    # Celery queues of the detector (GPU workers) and of the segmenter; `pipeline_queue` is the light
    # default queue (start of the pipeline), `export_queue` the deliveries.
    score_queue: str = Field(default="gatekeeper.score", min_length=1)
    segment_queue: str = Field(default="gatekeeper.segment", min_length=1)
    # How the auto route segments. "internal": the worker runs the segmenter of
    # segmenter_model_dir and sends the DICOM-SEG to the PACS. "forward": the worker sends every
    # stored instance of the series by C-STORE (one association) to an external auto-segmentation
    # node instead, which delivers its own results; our segmenter is not loaded.
    segmentation_mode: Literal["internal", "forward"] = "internal"
    # That external node (forward mode only, where forward_ae_title and forward_host are required):
    # its AE title, host name or IP address, and TCP port. Our calling AE title, the timeouts and
    # the absence of TLS are those of the PACS export (export_ae_title, export_timeout_s).
    forward_ae_title: str = ""
    forward_host: str = ""
    forward_port: int = Field(default=104, ge=1, le=65535)
    # A segmentation with less liver than this (millilitres) counts as "no liver" (worklist).
    min_liver_ml: float = Field(default=1.0, ge=0)
    # Where a series the liver model does not apply to goes (the gate's reasons no liver in the field
    # of view, liver only partly covered, not an abdominal CT): "worklist" — on the worklist with its
    # reason; "withhold" — kept with its reason (state withheld), nothing sent, not on the worklist.
    # Either way no SEG is sent for it.
    off_target_routing: Literal["worklist", "withhold"] = "worklist"
    # "live": the auto route delivers to the PACS (or forwards). "shadow": before go-live, every
    # series is scored, segmented and routed as in live mode, but nothing is sent to the PACS or the
    # forward node (auto-routed series end `withheld`); series the gate stops go to the worklist as
    # usual with their draft contour (service/shadow.py).
    mode: Literal["live", "shadow"] = "live"
    # Shadow mode: the share (0 to 1) of auto-routed series also put on the worklist for a shadow
    # review ("is the auto contour acceptable? yes / no"), chosen by a hash of the Series Instance
    # UID, so the same series is always chosen or not.
    shadow_review_share: float = Field(default=0.2, ge=0, le=1)
    # Seconds a series may stay in scoring, scored or segmenting before the sweeper queues its
    # stage again (worker died, message lost); after `pipeline_max_requeues` such re-queues of one
    # stage the series goes to the worklist as unreadable instead of looping.
    pipeline_stuck_after_s: float = Field(default=900.0, gt=0)
    pipeline_max_requeues: int = Field(default=3, ge=1)
    # Seconds between two rounds of the pipeline sweeper (in the listener's assembler thread).
    pipeline_sweep_interval_s: float = Field(default=10.0, gt=0)

    # === Models: the detector, segmenter and gate folders the workers run, and how they run them.
    # Model folders (model.json + ONNX files) of the detector and of the liver segmenter. The pipeline's
    # workers run the model registry's active versions (service/model_registry.py); these folders are
    # registered as the active ones on first use when the registry has none of a kind.
    detector_model_dir: Path = _REPO_DIR / "models" / "detector" / "default"
    segmenter_model_dir: Path = _REPO_DIR / "models" / "segmenter" / "default"
    # The gate's folder (gate.json: its calibrated thresholds and fusion rule, service/gate/), used
    # like the model folders above. Without a gate.json there, and none registered, the workers use
    # the rules-only gate (the detector's flag, the geometry, no liver).
    gate_model_dir: Path = _REPO_DIR / "models" / "gate" / "default"
    # Slices per ONNX Runtime call when scoring; bounds the memory of one call.
    score_batch: int = Field(default=16, ge=1, le=1024)
    # Highest-scoring slices whose residual map is kept for the reviewer, and the side (pixels) of
    # the stored, downsampled map.
    top_slices: int = Field(default=5, ge=0, le=100)
    residual_map_size: int = Field(default=64, ge=8, le=512)

    # === Web: the worklist web app (`gatekeeper web`), its sessions and login throttling.
    # TCP port of the worklist web app that `gatekeeper serve` starts.
    web_port: int = Field(default=8000, ge=1, le=65535)
    # IP address the worklist web app (`gatekeeper web`) binds to (its port is `web_port`).
    web_bind_address: str = "127.0.0.1"
    # Key that signs the worklist's session cookies, at least 32 characters (`openssl rand -hex 32`).
    # Empty: only with the embedded SQLite database (development), where each process makes a random
    # key; with any other database the web app refuses to start.
    web_secret_key: SecretStr = SecretStr("")
    # Hours a worklist login lasts; whether the session cookie is sent over HTTPS only (set it
    # whenever the worklist is served through TLS).
    web_session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    web_cookie_secure: bool = False
    # Minutes without a request after which a worklist login ends (besides `web_session_hours`).
    web_session_idle_minutes: float = Field(default=30.0, gt=0)
    # Host names (and IP addresses) the worklist answers to, as in the Host header without the port;
    # any other Host gets 400 (DNS rebinding). Empty: `web_bind_address`, localhost, 127.0.0.1 and ::1.
    # Behind a reverse proxy, the name users type (e.g. `gatekeeper.hospital.example`).
    web_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # IP addresses of the reverse proxy in front of the worklist (TLS), whose X-Forwarded-For and
    # X-Forwarded-Proto are believed, so that login throttling and the log see the user's address.
    # Empty: the headers are ignored (the peer address is the client's).
    web_proxy_addresses: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Login throttling, per user name and per client address alike: after this many failed logins
    # in a row, the next is refused (429) for `web_login_lockout_s` seconds, doubling with every
    # further failure up to `web_login_lockout_max_s`; a successful login resets both counts.
    web_login_free_failures: int = Field(default=5, ge=1)
    web_login_lockout_s: float = Field(default=30.0, gt=0)
    web_login_lockout_max_s: float = Field(default=900.0, gt=0)
    # Hours on the worklist after which an open or claimed item is shown in the warning colour.
    worklist_age_warning_h: float = Field(default=24.0, gt=0)

    # === Monitoring: Flower, logs and metrics.
    # Flower, the Celery monitor (`gatekeeper flower`): IP address, TCP port and its HTTP basic-auth
    # account. `gatekeeper flower` refuses to start while the user or the password is empty.
    flower_bind_address: str = "127.0.0.1"
    flower_port: int = Field(default=5555, ge=1, le=65535)
    flower_user: str = ""
    flower_password: SecretStr = SecretStr("")
    # Level of the root logger.
    log_level: LogLevel = "INFO"
    # Metrics (Prometheus; service/metrics.py). Folder where the listener and worker processes
    # keep their event counters (prometheus_client's multiprocess files) so that one scrape sums them.
    # Empty: `storage_dir/metrics`.
    metrics_dir: Path | None = None
    # Bearer token that `/metrics` (web app and `--metrics-port`) requires. Empty: `/metrics` answers
    # 401 to everyone, unless `metrics_open` is true (then it needs no token: a trusted network only).
    metrics_token: SecretStr = SecretStr("")
    metrics_open: bool = False
    # Whether `gatekeeper_associations_total` names the calling AE title; false: one `calling_ae="any"`
    # series per result, so a scrape does not list which AE titles the listener accepts.
    metrics_ae_title_labels: bool = False
    # IP address the `--metrics-port` endpoint of `gatekeeper listen` and `gatekeeper worker` binds to.
    metrics_bind_address: str = "127.0.0.1"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Read keyword arguments, then the environment, then the GATEKEEPER_CONFIG file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_path = os.environ.get(CONFIG_ENV_VAR, "")
        if config_path:
            if not Path(config_path).is_file():
                raise ConfigFileError(f"{CONFIG_ENV_VAR}: no such file {config_path}")
            try:
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(config_path)))
            except tomllib.TOMLDecodeError as exc:
                raise ConfigFileError(f"{CONFIG_ENV_VAR}: {config_path} is not valid TOML: {exc}") from exc
        return tuple(sources)

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("allowed_ae_titles", mode="before")
    @classmethod
    def _split_ae_titles(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("allowed_ae_titles")
    @classmethod
    def _check_ae_titles(cls, value: list[str]) -> list[str]:
        return [check_ae_title(title) for title in value]

    @field_validator("allowed_networks", mode="before")
    @classmethod
    def _parse_networks(cls, value: Any) -> Any:
        value = split_list(value)
        if not isinstance(value, list):
            return value
        networks = []
        for item in value:
            try:
                networks.append(ipaddress.ip_network(item))
            except ValueError as exc:
                raise ValueError(f"{item!r} is not a network in CIDR notation ({exc})") from None
        return networks

    @field_validator("quiet_period_s_by_ae")
    @classmethod
    def _check_quiet_periods(cls, value: dict[str, float]) -> dict[str, float]:
        checked = {}
        for title, seconds in value.items():
            if not seconds > 0:
                raise ValueError(f"quiet period for AE title {title!r} is {seconds}; expected > 0 seconds")
            checked[check_ae_title(title)] = seconds
        return checked

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        """TLS needs both a certificate and its key; a CA alone means nothing."""
        if (self.tls_cert_path is None) != (self.tls_key_path is None):
            raise ValueError("tls_cert_path and tls_key_path must be set together")
        if self.tls_ca_path is not None and self.tls_cert_path is None:
            raise ValueError("tls_ca_path is set but TLS is not (set tls_cert_path and tls_key_path)")
        if self.tls_cert_path is not None and self.tls_port == self.port:
            raise ValueError(f"tls_port {self.tls_port} is the same as port; expected two different ports")
        return self

    @field_validator("pacs_ae_title", "export_ae_title", "forward_ae_title")
    @classmethod
    def _check_optional_ae_title(cls, value: str) -> str:
        return check_ae_title(value) if value else value

    @field_validator("pacs_host", "forward_host")
    @classmethod
    def _strip_pacs_host(cls, value: str) -> str:
        return value.strip()

    @model_validator(mode="after")
    def _check_forward(self) -> Settings:
        """Forward mode needs the external node's host and AE title."""
        if self.segmentation_mode == "forward":
            for name in ("forward_host", "forward_ae_title"):
                if not getattr(self, name):
                    raise ValueError(
                        f"segmentation_mode is 'forward' but {name} is empty; set "
                        f"{ENV_PREFIX}{name.upper()} to the external segmentation node's "
                        f"{'host' if name == 'forward_host' else 'AE title'}"
                    )
        return self

    @model_validator(mode="after")
    def _check_export(self) -> Settings:
        """PACS TLS files need pacs_tls on, a certificate needs its key; backoff limits must be ordered."""
        if (self.pacs_tls_cert_path is None) != (self.pacs_tls_key_path is None):
            raise ValueError("pacs_tls_cert_path and pacs_tls_key_path must be set together")
        if not self.pacs_tls and (self.pacs_tls_ca_path or self.pacs_tls_cert_path):
            raise ValueError("pacs_tls_ca_path or pacs_tls_cert_path is set but pacs_tls is off")
        if self.export_retry_max_s < self.export_retry_initial_s:
            raise ValueError(
                f"export_retry_max_s {self.export_retry_max_s} is less than export_retry_initial_s "
                f"{self.export_retry_initial_s}"
            )
        return self

    @field_validator("export_format", mode="before")
    @classmethod
    def _lower_export_format(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("mode", "off_target_routing", mode="before")
    @classmethod
    def _lower_mode(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("rtstruct_roi_name")
    @classmethod
    def _check_roi_name(cls, value: str) -> str:
        """An ROIName is a DICOM LO value: 1 to 64 characters, not blank, no backslash or control character."""
        value = value.strip()
        if not 1 <= len(value) <= 64:
            raise ValueError(f"ROI name {value!r} has {len(value)} characters; expected 1 to 64")
        if "\\" in value or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ValueError(f"ROI name {value!r} contains a backslash or a control character")
        return value

    @field_validator("liver_structure_names", mode="before")
    @classmethod
    def _split_liver_structure_names(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("liver_structure_names")
    @classmethod
    def _check_liver_structure_names(cls, value: list[str]) -> list[str]:
        names = [name.strip() for name in value]
        if not names or not all(names):
            raise ValueError("liver_structure_names needs at least one name and no blank name")
        return names

    def export_calling_ae_title(self) -> str:
        """Our calling AE title towards the PACS: `export_ae_title`, or `ae_title` when that is empty."""
        return self.export_ae_title or self.ae_title

    def quiet_period_for(self, calling_ae_title: str) -> float:
        """Seconds without a new instance after which a series from `calling_ae_title` is complete."""
        return self.quiet_period_s_by_ae.get(calling_ae_title.strip(), self.quiet_period_s)

    @field_validator("bind_address", "web_bind_address", "flower_bind_address")
    @classmethod
    def _check_bind_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None
        return value

    @field_validator("web_allowed_hosts", "web_proxy_addresses", mode="before")
    @classmethod
    def _split_web_allowed_hosts(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("web_proxy_addresses")
    @classmethod
    def _check_web_proxy_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ValueError(f"{address!r} is not an IPv4 or IPv6 address (the reverse proxy's)") from None
        return value

    @field_validator("web_allowed_hosts")
    @classmethod
    def _check_web_allowed_hosts(cls, value: list[str]) -> list[str]:
        hosts = [host.strip().lower() for host in value]
        for host in hosts:
            if not host or any(ch in host for ch in "/:@ ") and not _is_ipv6(host):
                raise ValueError(f"{host!r} is not a host name or IP address (no scheme, port or path)")
        return hosts

    @model_validator(mode="after")
    def _check_web_session_times(self) -> Settings:
        if self.web_session_idle_minutes > self.web_session_hours * 60:
            raise ValueError(
                f"web_session_idle_minutes {self.web_session_idle_minutes:g} is longer than the whole login "
                f"(web_session_hours {self.web_session_hours:g} h); expected at most {self.web_session_hours * 60:g}"
            )
        if self.web_login_lockout_max_s < self.web_login_lockout_s:
            raise ValueError(
                f"web_login_lockout_max_s {self.web_login_lockout_max_s:g} is below web_login_lockout_s "
                f"{self.web_login_lockout_s:g}; expected at least that"
            )
        return self

    @property
    def web_trusted_hosts(self) -> list[str]:
        """The Host names the worklist answers to: `web_allowed_hosts`, or the bind address and localhost."""
        if self.web_allowed_hosts:
            return list(self.web_allowed_hosts)
        return list(dict.fromkeys([self.web_bind_address.lower(), "localhost", "127.0.0.1", "::1"]))

    @model_validator(mode="after")
    def _fill_metrics_dir(self) -> Settings:
        """Put the metrics folder under `storage_dir` when none is given."""
        if self.metrics_dir is None:
            self.metrics_dir = self.storage_dir.resolve() / "metrics"
        return self

    @field_validator("metrics_bind_address")
    @classmethod
    def _check_metrics_bind_address(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 or IPv6 address") from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_log_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _fill_default_urls(self) -> Settings:
        """Put the default database and broker under `storage_dir` when none is given."""
        storage = self.storage_dir.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{storage / 'gatekeeper.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{storage / 'broker.db'}"
        return self


def settings_environment(settings: Settings) -> dict[str, str]:
    """`settings` as `GATEKEEPER_*` variables, for a child process that must run with exactly them.

    Lists become comma-separated strings and tables JSON, as `Settings` reads them back.
    """
    import json

    env: dict[str, str] = {}
    for name, value in settings.model_dump(mode="json").items():
        raw = getattr(settings, name)
        if isinstance(raw, SecretStr):  # dumped as "**********"; the child needs the value itself
            value = raw.get_secret_value()
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(map(str, value))
        elif isinstance(value, dict):
            value = json.dumps(value)
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    return env


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return this process's settings, read once and then cached.

    Raises:
        pydantic.ValidationError: a value is invalid (see `load_settings_or_exit`).
        ConfigFileError: GATEKEEPER_CONFIG names a missing or malformed file.
    """
    return Settings()


def load_settings_or_exit() -> Settings:
    """Return the settings, or end the process with exit code 2 when they are invalid.

    For each bad field, one line naming its environment variable goes to stderr, e.g.
    `gatekeeper: invalid setting GATEKEEPER_PORT: Input should be less than or equal to 65535`;
    a check across fields gives one line with its own message (`gatekeeper: invalid settings: ...`).
    """
    try:
        return get_settings()
    except ConfigFileError as exc:
        _exit_with([f"gatekeeper: invalid setting {exc}"])
    except ValidationError as exc:
        lines: dict[str, str] = {}
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            if field in lines:
                continue  # one line per field; the first reason is enough to fix it
            if error["type"] == "extra_forbidden":
                lines[field] = f"gatekeeper: unknown setting {field!r} in the {CONFIG_ENV_VAR} file"
            elif not error["loc"]:  # a check across fields (model validator); its message names them
                lines[field] = f"gatekeeper: invalid settings: {error['msg'].removeprefix('Value error, ')}"
            else:
                lines[field] = f"gatekeeper: invalid setting {ENV_PREFIX}{field.upper()}: {error['msg']}"
        _exit_with(list(lines.values()))


def _exit_with(lines: list[str]) -> NoReturn:
    sys.stderr.write("".join(line + "\n" for line in lines))
    sys.exit(EXIT_BAD_SETTINGS)
