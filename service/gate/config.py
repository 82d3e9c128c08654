"""gate.json: its fields and checks, reading it with the reference it names, writing both, its version,
and the population it was calibrated on (`calibration_population`: the shipped phantom mix, or a site's series).

A calibrated gate.json holds the signals' calibrations (`signals`), the fusion rule and its cut
(`fusion`), the bands, the plain rules, the test-time views and the reference .npz's name and SHA-256;
`version` is the hash of the content, so an edited file is refused (recalibrate instead:
`gatekeeper calibrate gate`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.gate.reference import Reference
from service.gate.rules import DEFAULT_RULES
from service.gate.signals import SIGNALS
from service.gate.statistics import SignalSpec
from service.gate.views import DEFAULT_VIEWS, VIEWS

GATE_FORMAT = 1
KIND = "ct-gatekeeper-gate"
REFERENCE_FILE = "reference.npz"


def read_config(folder: Path) -> tuple[dict[str, Any], Reference | None]:
    """gate.json in `folder` and, for a calibrated gate, the reference it names (None for a rules-only one).

    Raises:
        FileNotFoundError: no gate.json in `folder`, or the reference file it names is missing.
        ValueError: a field is missing or wrong, the reference file's SHA-256 differs from gate.json's,
            or `version` is not the hash of the content (the message names the field).
    """
    path = folder / "gate.json"
    config: dict[str, Any] = json.loads(path.read_text())
    for key in ("format", "kind", "version"):
        if key not in config:
            raise ValueError(f"{path}: field {key!r} missing")
    if config["format"] != GATE_FORMAT:
        raise ValueError(f"{path}: format {config['format']!r}; this gatekeeper reads format {GATE_FORMAT}")
    if config["kind"] != KIND:
        raise ValueError(f"{path}: kind {config['kind']!r}; expected {KIND!r}")
    reference = None
    if config.get("signals"):
        validate_config(config, str(path))
        if config["version"] != content_version(config):
            raise ValueError(
                f"{path}: field 'version' {config['version']!r} is not the hash of the content "
                f"({content_version(config)!r}); recalibrate with `gatekeeper calibrate gate` instead of editing"
            )
        reference = read_reference(folder, config)
    return config, reference


def content_version(config: Mapping[str, Any]) -> str:
    """The gate's version: the first 16 hex digits of the SHA-256 of gate.json's content without `version`."""
    body = {k: v for k, v in config.items() if k != "version"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=float).encode()).hexdigest()[:16]


def write_gate(
    folder: Path,
    config: dict[str, Any],
    reference: Reference,
    *,
    command: str,
    data: Mapping[str, Any],
    population: Mapping[str, Any] | None = None,
) -> Path:
    """Write gate.json and its reference .npz to `folder`; returns gate.json's path.

    `population` (or `config["calibration_population"]`): what the gate was calibrated on, written as
    gate.json's `calibration_population` block (`population_block`); without either, none is written and
    readers take the gate for one calibrated on the shipped phantom mix.

    Raises:
        ValueError: the population block is wrong (the message names the field), before anything is written.
    """
    block = population if population is not None else config.get("calibration_population")
    checked = population_block(block) if block is not None else None
    folder.mkdir(parents=True, exist_ok=True)
    ref_path = folder / REFERENCE_FILE
    with open(ref_path, "wb") as f:
        np.savez_compressed(
            f,
            mahalanobis_mean=reference.mahalanobis_mean.astype(np.float64),
            mahalanobis_precision=reference.mahalanobis_precision.astype(np.float32),
        )
    full = {
        "format": GATE_FORMAT,
        "kind": KIND,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "data": dict(data),
        "views": list(DEFAULT_VIEWS),
        "rules": json.loads(json.dumps(DEFAULT_RULES)),
        **config,
    }
    full["reference"] = {**config.get("reference", {}), "file": REFERENCE_FILE, "sha256": _sha256(ref_path)}
    if checked is not None:
        full["calibration_population"] = checked
    full["version"] = content_version(full)
    path = folder / "gate.json"
    path.write_text(json.dumps(full, indent=1, default=float) + "\n")
    return path


#: What `calibration_population.kind` may say: the gatekeeper's phantom, or the site's own series.
POPULATION_KINDS = ("phantom", "site")


@dataclass(frozen=True)
class CalibrationPopulation:
    """The normal series a gate's cut was calibrated on, as gate.json's `calibration_population` says.

    `kind`: "phantom" or "site"; "none" for the rules-only gate (nothing calibrated); "unknown" when
    the block is there but says something else. `shipped`: gate.json has no block (the gate shipped
    with the code, calibrated on the phantom's clinic mix): the numbers then come from its `data`
    (series, split, data hash) and `created`. `series`: how many normal series; `date`: when
    (ISO date); `report`: path or URL of the commissioning report; `site`: the site's (or phantom
    site profile's) name.
    """

    kind: str
    shipped: bool = False
    series: int | None = None
    date: str | None = None
    report: str | None = None
    site: str | None = None
    split: str | None = None
    data_hash: str | None = None

    def words(self) -> str:
        """One line for people: "the shipped phantom mix: 60 normal series …" or "site data: 120 series, …"."""
        if self.kind == "none":
            return "not calibrated (rules-only gate)"
        count = f"{self.series} normal series" if self.series is not None else "series count not recorded"
        if self.shipped:
            where = ", ".join(
                part
                for part in (
                    f"{self.split} split" if self.split else "",
                    f"data {self.data_hash}" if self.data_hash else "",
                )
                if part
            )
            when = f", calibrated {self.date}" if self.date else ""
            return f"the shipped phantom mix: {count}" + (f" ({where})" if where else "") + when
        label = {"site": "site data", "phantom": "phantom data"}.get(self.kind, f"{self.kind} data")
        parts = [count, self.date or "date not recorded"]
        if self.site:
            parts.insert(0, self.site)
        if self.report:
            parts.append(f"report {self.report}")
        return f"{label}: " + ", ".join(parts)

    @property
    def report_url(self) -> str | None:
        """`report` when it is an http(s) URL (a page may link it), else None."""
        if self.report and self.report.lower().startswith(("http://", "https://")):
            return self.report
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "shipped": self.shipped,
            "series": self.series,
            "date": self.date,
            "report": self.report,
            "site": self.site,
            "split": self.split,
            "data_hash": self.data_hash,
        }


def calibration_population(config: Mapping[str, Any] | None) -> CalibrationPopulation:
    """What a gate.json says about its calibration population; tolerant: never raises.

    `config` None: the rules-only gate. No `calibration_population` block: the shipped phantom mix,
    with `data.series`, `data.split`, `data.hash` and the date of `created`. A block
    ``{"kind": "phantom" | "site", "series": N, "date": "...", "report": "path or URL", "site": "..."}``:
    those fields, each optional; a kind outside `POPULATION_KINDS` reads as "unknown".
    """
    if config is None:
        return CalibrationPopulation(kind="none")
    block = config.get("calibration_population")
    if not isinstance(block, Mapping):
        raw = config.get("data")
        data: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        return CalibrationPopulation(
            kind="phantom",
            shipped=True,
            series=_count(data.get("series")),
            date=_text(config.get("created"), 10),
            split=_text(data.get("split")),
            data_hash=_text(data.get("hash"), 16),
        )
    kind = block.get("kind")
    return CalibrationPopulation(
        kind=kind if kind in POPULATION_KINDS else "unknown",
        series=_count(block.get("series")),
        date=_text(block.get("date"), 32),
        report=_text(block.get("report"), 1000),
        site=_text(block.get("site"), 200),
    )


def _count(value: Any) -> int | None:
    """A non-negative whole count, from an int or its decimal string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _text(value: Any, limit: int = 200) -> str | None:
    """A non-empty string cut to `limit` characters; None for anything else."""
    if isinstance(value, str) and value.strip():
        return value.strip()[:limit]
    return None


def population_block(block: Mapping[str, Any]) -> dict[str, Any]:
    """A `calibration_population` block checked for writing: `kind` (one of `POPULATION_KINDS`), `series`
    (a whole number >= 1), `date` (ISO date, or date and time), optional `report` (path or URL) and `site`.

    Raises:
        ValueError: an unknown field, or a field missing or wrong (the message names it).
    """
    unknown = sorted(set(block) - {"kind", "series", "date", "report", "site"})
    if unknown:
        raise ValueError(
            f"calibration_population: unknown field {unknown[0]!r}; expected kind, series, date, report, site"
        )
    if block.get("kind") not in POPULATION_KINDS:
        raise ValueError(
            f"calibration_population.kind must be one of {', '.join(POPULATION_KINDS)}, got {block.get('kind')!r}"
        )
    series = block.get("series")
    if isinstance(series, bool) or not isinstance(series, int) or series < 1:
        raise ValueError(f"calibration_population.series must be a whole number >= 1, got {series!r}")
    date = block.get("date")
    try:
        dt.date.fromisoformat(str(date)[:10])
    except ValueError:
        raise ValueError(f"calibration_population.date must be an ISO date (YYYY-MM-DD), got {date!r}") from None
    out: dict[str, Any] = {"kind": block["kind"], "series": series, "date": str(date)}
    for key in ("report", "site"):
        value = block.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"calibration_population.{key} must be a non-empty string, got {value!r}")
        out[key] = value.strip()
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def validate_config(config: Mapping[str, Any], where: str) -> dict[str, SignalSpec]:
    """Check a calibrated gate.json; return its signal specs.

    Raises:
        ValueError: a field is missing or wrong (the message names it).
    """
    for key in ("signals", "fusion", "false_flag_rate", "bands", "rules", "views", "reference"):
        if key not in config:
            raise ValueError(f"{where}: field {key!r} missing")
    if not isinstance(config["signals"], dict):
        raise ValueError(f"{where}: field 'signals' must be an object of signal name → calibration")
    specs = {}
    for name, d in config["signals"].items():
        if name not in SIGNALS:
            raise ValueError(f"{where}: signals.{name}: unknown signal; expected some of {list(SIGNALS)}")
        specs[name] = SignalSpec.from_json(name, d, where)
    fusion = config["fusion"]
    if fusion.get("rule") != "min_tail_probability":
        raise ValueError(f"{where}: fusion.rule {fusion.get('rule')!r}; expected 'min_tail_probability'")
    if not isinstance(fusion.get("threshold"), int | float) or not fusion["threshold"] > 0:
        raise ValueError(f"{where}: fusion.threshold must be a number > 0, got {fusion.get('threshold')!r}")
    if not isinstance(config["false_flag_rate"], int | float) or not 0 < config["false_flag_rate"] < 0.5:
        raise ValueError(f"{where}: false_flag_rate must be in (0, 0.5), got {config['false_flag_rate']!r}")
    for view in config["views"]:
        if view not in VIEWS:
            raise ValueError(f"{where}: views: unknown view {view!r}; expected some of {list(VIEWS)}")
    bands = config["bands"]
    for key in ("liver_hu", "fluid_hu"):
        b = bands.get(key)
        if not (isinstance(b, list) and len(b) == 2 and b[0] < b[1]):
            raise ValueError(f"{where}: bands.{key} must be [low, high] HU with low < high, got {b!r}")
    if not isinstance(bands.get("metal_hu"), int | float):
        raise ValueError(f"{where}: field 'bands.metal_hu' missing")
    ref = config["reference"]
    for key in ("file", "sha256"):
        if key not in ref:
            raise ValueError(f"{where}: field 'reference.{key}' missing")
    rules = config["rules"]
    for rule, keys in (
        ("not_abdomen", ("min_body_area_cm2", "max_bone_fraction")),
        ("liver_partial", ("max_end_ratio",)),
    ):
        for key in keys:
            if not isinstance(rules.get(rule, {}).get(key), int | float):
                raise ValueError(f"{where}: field 'rules.{rule}.{key}' missing or not a number")
    return specs


def read_reference(folder: Path, config: Mapping[str, Any]) -> Reference:
    """The reference .npz gate.json names, checked against its SHA-256.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: its SHA-256 differs from `reference.sha256`, or an array is missing or misshapen.
    """
    ref = config["reference"]
    path = folder / str(ref["file"])
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference file named in gate.json (reference.file) not found")
    if _sha256(path) != ref["sha256"]:
        raise ValueError(f"{path}: SHA-256 differs from gate.json's reference.sha256 (file changed after calibration)")
    with np.load(path) as z:
        for key in ("mahalanobis_mean", "mahalanobis_precision"):
            if key not in z:
                raise ValueError(f"{path}: array {key!r} missing")
        mean = z["mahalanobis_mean"].astype(np.float64)
        precision = z["mahalanobis_precision"].astype(np.float64)
    if precision.shape != (mean.size, mean.size):
        raise ValueError(
            f"{path}: mahalanobis_precision has shape {precision.shape}; expected {(mean.size, mean.size)}"
        )
    band = config["bands"]["liver_hu"]
    return Reference(mean, precision, (float(band[0]), float(band[1])))


def file_version(path: Path) -> str:
    """The first 16 hex digits of the SHA-256 of gate.json: its version."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
