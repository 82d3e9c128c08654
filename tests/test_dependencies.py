"""Every third-party module that `service/` imports — at the top of a module or inside a function — comes from a
base dependency of pyproject.toml, so `pip install .` alone (the Docker image) runs every production path.

An extra (`train`, `test`, `gpu`) is not enough: an import found only at run time would fail in production
(returned RTSTRUCTs read with rt-utils were once recorded as unreadable that way).
"""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"service", "models", "migrations"}
#: onnxruntime-gpu provides `onnxruntime` too (the `gpu` extra swaps the wheel); either satisfies it.
ALTERNATIVES = {"onnxruntime-gpu": "onnxruntime"}


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _imported_modules(root: Path) -> dict[str, str]:
    """Top-level module name → the first file importing it, for every import statement under `root`."""
    found: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def test_every_third_party_import_of_service_is_a_base_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {_normalise(Requirement(r).name) for r in project["dependencies"]}
    owners = packages_distributions()
    missing = []
    for module, where in sorted(_imported_modules(REPO / "service").items()):
        if module in FIRST_PARTY or module in sys.stdlib_module_names or module == "__future__":
            continue
        dists = {_normalise(d) for d in owners.get(module, [])}
        dists |= {_normalise(ALTERNATIVES[d]) for d in dists if d in ALTERNATIVES}
        if not dists:
            missing.append(f"{module} (imported in {where}) is installed by no distribution")
        elif not dists & base:
            missing.append(f"{module} (imported in {where}) comes from {sorted(dists)}, not a base dependency")
    assert not missing, "\n".join(missing)


def test_service_never_imports_torch_or_models() -> None:
    imported = _imported_modules(REPO / "service")
    for forbidden in ("torch", "models"):
        assert forbidden not in imported, f"service/ imports {forbidden} ({imported.get(forbidden)})"


@pytest.mark.parametrize("module", ["rt_utils", "prometheus_client", "kombu"])
def test_the_modules_once_missing_from_the_base_are_declared(module: str) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {_normalise(Requirement(r).name) for r in project["dependencies"]}
    assert {_normalise(d) for d in packages_distributions()[module]} & base


def test_tracked_files_stay_under_40_mb() -> None:
    """Shipped models and small report figures only: candidate checkpoints and big artefacts live in git history."""
    import subprocess

    names = (
        subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    )
    total = sum((REPO / n).stat().st_size for n in names if n and (REPO / n).is_file())
    assert total <= 40 * 1024 * 1024, f"tracked files hold {total / 2**20:.1f} MiB; keep them at most 40 MiB"
