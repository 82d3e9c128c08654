"""Where the models shipped with the code lie, for the commands' defaults (a leaf: imports nothing of ours)."""

from __future__ import annotations

from pathlib import Path

#: The detector shipped with the code (trained on `gatekeeper phantom dataset`; see its model.json).
DEFAULT_DETECTOR_DIR = Path(__file__).resolve().parent.parent / "models" / "detector" / "default"
#: The gate shipped with the code (calibrated on the clinic mix's validation normals; see its gate.json).
DEFAULT_GATE_DIR = Path(__file__).resolve().parent.parent / "models" / "gate" / "default"
