"""No leakage: the series a model was trained or calibrated on, and the refusal to report on them.

Every model.json written by a trainer lists the Series Instance UIDs it was trained on
(`training.trained_on_series`) and, where it set thresholds or normalisation, those it was
calibrated on (`training.calibrated_on_series`); every gate.json written by a calibration lists
`data.calibrated_on_series`. Shipped models written before these fields simply have none.
`evaluate gate`, `evaluate segmenter` and `commission` refuse to report on a listed series.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: The fields (dotted paths in model.json / gate.json) that list the series a model has seen.
SEEN_FIELDS = (
    "training.trained_on_series",
    "training.calibrated_on_series",
    "data.calibrated_on_series",
)


def _lookup(doc: Mapping[str, Any], dotted: str) -> Any:
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def seen_series(doc: Mapping[str, Any]) -> set[str]:
    """Every Series Instance UID that a model.json or gate.json says its model was trained or calibrated on."""
    out: set[str] = set()
    for name in SEEN_FIELDS:
        value = _lookup(doc, name)
        if isinstance(value, list):
            out.update(str(v) for v in value)
    return out


def seen_by_folder(folder: Path | str) -> set[str]:
    """`seen_series` of the model.json or gate.json in `folder` (empty when it has neither or lists none)."""
    folder = Path(folder)
    out: set[str] = set()
    for name in ("model.json", "gate.json"):
        path = folder / name
        if path.is_file():
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # the command that loads the model names what is wrong with it
            if isinstance(doc, dict):
                out |= seen_series(doc)
    return out


def leaked_series(series_instance_uids: Iterable[str], models: Mapping[str, Path | str | None]) -> str | None:
    """One line naming the first series that a model in `models` (label → folder) has seen, or None.

    `models` maps what the user named (e.g. "--gate") to the model folder.
    """
    wanted = sorted(set(series_instance_uids))
    for label, folder in models.items():
        if folder is None:
            continue
        seen = seen_by_folder(folder)
        hits = [uid for uid in wanted if uid in seen]
        if hits:
            more = f" and {len(hits) - 1} more" if len(hits) > 1 else ""
            return (
                f"series {hits[0]}{more} were used to train or calibrate the model of {label} ({folder}); "
                "refusing to report on them (leave them out, or evaluate another model)"
            )
    return None
