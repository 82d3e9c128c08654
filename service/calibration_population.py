"""Which population the active gate was calibrated on, for `gatekeeper status`, `/readyz` and the worklist.

The active gate is the registry's active gate version (`model_registry.active_model`); before the
first series registers one, the settings' gate folder (`Settings.gate_model_dir`), which is what
the first series will register. Its gate.json says what it was calibrated on
(`service.gate.config.calibration_population`): the phantom mix shipped with the code, or a site's
own series (`gatekeeper commission` writes that block).

Reads gate.json only (no reference hash check: `/readyz`'s gate check does that), so the worklist
page can show it on every request. No patient data: counts, dates, versions, a report's path.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.db.tables import ModelKind
from service.gate.config import CalibrationPopulation, calibration_population
from service.model_registry import active_model
from service.settings import Settings

log = logging.getLogger(__name__)


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
