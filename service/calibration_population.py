"""Which population the active gate was calibrated on, for `gatekeeper status`, `/readyz` and the worklist.

The active gate is the registry's active gate version (`model_registry.active_model`); before the
first series registers one, the settings' gate folder (`Settings.gate_model_dir`), which is what
the first series will register. Its gate.json says what it was calibrated on
(`calibration_population`): the phantom mix shipped with the code, or a site's
own series (`gatekeeper commission` writes that block).

Reads gate.json only (no reference hash check: `/readyz`'s gate check does that), so the worklist
page can show it on every request. No patient data: counts, dates, versions, a report's path.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.db.tables import ModelKind
from service.model_registry import active_model
from service.settings import Settings

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class ActiveGate:
    """The gate the pipeline decides with, and the population it was calibrated on.

    `source`: "registry" (the active registered version) or "settings" (no version registered
    yet: `Settings.gate_model_dir`, which the first series registers). `folder` is None for the
    rules-only gate (no gate.json); `problem` says why gate.json could not be read (then
    `population` is the rules-only one).
    """

    version: str
    source: str
    folder: Path | None
    population: CalibrationPopulation
    problem: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "source": self.source,
            "folder": str(self.folder) if self.folder is not None else None,
            "calibration_population": self.population.to_json(),
            "calibrated_on": self.population.words(),
            "problem": self.problem,
        }


def active_gate_folder(*, session: Session, settings: Settings) -> tuple[Path, str]:
    """The active gate's folder and where it came from ("registry" or "settings").

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database could not be read.
    """
    record = active_model(session=session, kind=ModelKind.GATE)
    if record is not None:
        return record.folder(settings), "registry"
    return Path(settings.gate_model_dir), "settings"


def read_active_gate(*, session: Session, settings: Settings) -> ActiveGate:
    """The active gate's version and calibration population, from its gate.json; never raises for a bad file.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database could not be read.
    """
    folder, source = active_gate_folder(session=session, settings=settings)
    path = folder / "gate.json"
    if not path.is_file():
        return ActiveGate("rules-only", source, None, calibration_population(None))
    try:
        config = json.loads(path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        log.warning("cannot read the active gate's %s: %s", path, exc)
        return ActiveGate("unreadable", source, folder, calibration_population(None), f"{path}: {exc}")
    return ActiveGate(str(config.get("version", "?")), source, folder, calibration_population(config))
