"""The house rules that keep the code findable (STYLE.md, habit 16): a concept that grew past ~800 lines
is a package, and a function that needs a scroll bar is two functions.

Read with `ast`, nothing imported. Applies to `service/` (the product) and `models/` (training and
evaluation) alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 120


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _long_functions(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


@pytest.mark.parametrize("package", ["service", "models"])
def test_no_module_is_over_800_lines(package: str) -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in _modules(package)
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines (make them a package): {long}"


@pytest.mark.parametrize("package", ["service", "models"])
def test_no_function_is_over_120_lines(package: str) -> None:
    long = [finding for path in _modules(package) for finding in _long_functions(path)]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split into named steps): {long}"


def test_commands_live_in_one_package() -> None:
    stray = [path.name for path in (ROOT / "service").glob("*_cli.py")] + [
        str(path.relative_to(ROOT)) for path in (ROOT / "service").rglob("cli.py")
    ]
    assert not stray, f"command modules outside service/commands/: {stray}"
    assert (ROOT / "service" / "commands" / "main.py").is_file()


def test_the_measured_rule_finds_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    module = tmp_path / "long.py"
    module.write_text(f"def too_long() -> None:\n{body}\n", encoding="utf-8")
    assert _long_functions(module, root=tmp_path) == [f"long.py:1 too_long ({MAX_FUNCTION_LINES + 1} lines)"]
