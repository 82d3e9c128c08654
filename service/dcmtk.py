"""DCMTK's command-line tools (storescu, echoscu, storescp), found on PATH past the virtual environment's bin.

pynetdicom installs console scripts with the same names (storescu, echoscu, storescp …) but other
options into the virtual environment's bin folder, which comes first on PATH once the environment
is activated. The demo, the ops scripts and the tests mean DCMTK's; `tool` skips that folder.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def tool(name: str) -> str | None:
    """The path of DCMTK's `name` on PATH (the virtual environment's bin folder skipped), or None."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    folders = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if d and Path(d).resolve() != venv_bin]
    return shutil.which(name, path=os.pathsep.join(folders))
