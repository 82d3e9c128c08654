"""gate.json: its fields and checks, reading it with the reference it names, writing both, its version.

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
    folder: Path, config: dict[str, Any], reference: Reference, *, command: str, data: Mapping[str, Any]
) -> Path:
    """Write gate.json and its reference .npz to `folder`; returns gate.json's path."""
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
    full["version"] = content_version(full)
    path = folder / "gate.json"
    path.write_text(json.dumps(full, indent=1, default=float) + "\n")
    return path


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
