"""Where the real DICOM files of the tests are, and small helpers to make defective copies of them.

Real CT cases live beside the repository, in `<repo>/../shared/realct/` (CI clones the repository and
places `shared/` beside it); they are evaluation data: tests read them, nothing trains or tunes a
threshold on them. The third-party files of the `pydicom-data` package (the test extra) are real
scanner output in many encodings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
#: GATEKEEPER_REALCT_DIR overrides it, for a clone made elsewhere (`../shared/tools/clean-clone-test` clones into /tmp).
REALCT_DIR = Path(os.environ.get("GATEKEEPER_REALCT_DIR") or REPO_DIR.parent / "shared" / "realct")
#: The real CT cases (folder names under REALCT_DIR): each has ct/*.dcm and liver.seg.dcm.
REALCT_CASES = ("siemens-j2k-20", "slab-3mm-30")


def realct_case(name: str) -> Path:
    """The folder of one real CT case; fails the test (never skips) when the cases are not there."""
    folder = REALCT_DIR / name
    if not (folder / "ct").is_dir():
        pytest.fail(
            f"real CT case {name!r} not found at {folder}: the real-CT tier needs ../shared/realct beside the "
            "repository (see its README); tests do not skip without it"
        )
    return folder


def pydicom_data_dir() -> Path:
    """The folder of pydicom-data's real files (the package is in the test extra)."""
    import data_store

    return Path(data_store.__file__).parent / "data"


def copy_series(source: Path, out: Path, change: Callable[[pydicom.Dataset], None] | None = None) -> Path:
    """A writable copy of the DICOM files in `source` in `out`, each changed by `change` (if given)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.dcm")):
        target = out / path.name
        if change is None:
            shutil.copyfile(path, target)
            continue
        dataset = pydicom.dcmread(path)
        change(dataset)
        dataset.save_as(target)
    return out


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's "Error" lines for one file (dicom3tools); fails the test when dciodvfy is missing."""
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy (Debian package dicom3tools) is not installed; run `make system-deps`")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
