"""Which way the imports of `service/` and `models/` flow: import cycles, and service → models.

The house rule (STYLE.md, habit 14): `models/` may import `service/`; `service/` never imports
`models/`, not even inside a function; and no module of either package is part of an import cycle
(a cycle is what makes people hide imports inside functions). This script reads every module with `ast`,
without importing anything, and counts every import statement: at module level, inside functions,
under `if TYPE_CHECKING:` and under `if __name__ == "__main__":` alike.

    .venv/bin/python ops/import_graph.py [--root DIR]

Prints each cycle that contains a service module, each cycle among `models/` modules alone (for
both: its modules, and one closed path with the line of each import) and each import of `models`
from `service`. Exit 1 when there is any of them, else 0.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("service", "models")


@dataclass(frozen=True)
class Edge:
    """`source` imports `target` (both dotted module names) at `line` of the source file."""

    source: str
    target: str
    line: int


@dataclass
class ImportGraph:
    """Modules of the scanned packages and the imports between them (imports of anything else are dropped)."""

    modules: dict[str, Path] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)

    def targets(self, source: str) -> list[str]:
        """Modules that `source` imports, each once, in first-seen order."""
        return list(dict.fromkeys(e.target for e in self.edges if e.source == source))

    def edge(self, source: str, target: str) -> Edge:
        """The first import of `target` by `source`."""
        return next(e for e in self.edges if e.source == source and e.target == target)


@dataclass
class Report:
    """What breaks the rule: cycles with a service module, service → models imports, cycles among models."""

    service_cycles: list[list[str]]
    service_to_models: list[Edge]
    models_cycles: list[list[str]]

    @property
    def ok(self) -> bool:
        return not self.service_cycles and not self.service_to_models and not self.models_cycles


def module_name(root: Path, path: Path) -> str:
    """`service/db/session.py` → `service.db.session`; a package's `__init__.py` → the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_modules(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]
) -> list[str]:
    """The scanned modules one import statement loads, each once.

    `import a.b` → a.b; `from a import b` → a.b when that is a module, else a (b is a name in a);
    a name that is no scanned module but one inside it (`a.b.c` with only `a.b` scanned) → a.b.
    """
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: resolve against the importing module's package
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    resolved = (_resolve(name, modules) for name in names)
    return list(dict.fromkeys(target for target in resolved if target is not None))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The scanned module that `name` means: itself, or its longest prefix that is a module."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def build_graph(root: Path, packages: Sequence[str] = PACKAGES) -> ImportGraph:
    """Parse every `.py` file under `root/<package>` and collect the imports between those modules.

    `from a import b` counts as an import of the module `a.b` when that module exists, else of `a`.

    Raises:
        SyntaxError: a file does not parse.
    """
    graph = ImportGraph()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            graph.modules[module_name(root, path)] = path
    for module, path in graph.modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _imported_modules(node, module, is_package, graph.modules):
                    graph.edges.append(Edge(module, target, node.lineno))
    graph.edges.sort(key=lambda e: (e.source, e.line, e.target))
    return graph


def strongly_connected(graph: ImportGraph) -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan), each sorted.

    A module that imports itself is a group of one; other single modules are left out.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    successors = {m: graph.targets(m) for m in graph.modules}

    def visit(start: str) -> None:
        # Iterative Tarjan: (node, iterator over its successors) frames instead of recursion.
        frames = [(start, iter(successors[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while frames:
            node, children = frames[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    frames.append((child, iter(successors[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            frames.pop()
            if frames:
                low[frames[-1][0]] = min(low[frames[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in successors[node]:
                    groups.append(sorted(group))

    for module in graph.modules:
        if module not in index:
            visit(module)
    return sorted(groups)


def cycle_path(graph: ImportGraph, group: Sequence[str]) -> list[Edge]:
    """One closed path of imports through `group`, starting at its first module (breadth-first, shortest)."""
    members = set(group)
    start = group[0]
    previous: dict[str, Edge] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in graph.targets(node):
            if target not in members:
                continue
            if target == start:
                path = [graph.edge(node, target)]
                while path[0].source != start:
                    path.insert(0, previous[path[0].source])
                return path
            if target not in previous:
                previous[target] = graph.edge(node, target)
                queue.append(target)
    raise ValueError(f"{list(group)} is not a cycle")


def check(root: Path) -> tuple[ImportGraph, Report]:
    """Build the graph under `root` and say what breaks the rule."""
    graph = build_graph(root)
    cycles = strongly_connected(graph)
    in_service = [g for g in cycles if any(m.split(".")[0] == "service" for m in g)]
    report = Report(
        service_cycles=in_service,
        service_to_models=[
            e for e in graph.edges if e.source.split(".")[0] == "service" and e.target.split(".")[0] == "models"
        ],
        models_cycles=[g for g in cycles if g not in in_service],
    )
    return graph, report


def format_report(graph: ImportGraph, report: Report) -> str:
    """The report as text, one finding per paragraph, each import with its file line."""

    def path_lines(group: list[str]) -> list[str]:
        return [f"    {e.source} -> {e.target}  ({graph.modules[e.source]}:{e.line})" for e in cycle_path(graph, group)]

    lines = [f"{len(graph.modules)} modules, {len(graph.edges)} imports between them"]
    for group in report.service_cycles:
        lines += [f"service cycle: {', '.join(group)}", *path_lines(group)]
    for e in report.service_to_models:
        lines.append(f"service imports models: {e.source} -> {e.target}  ({graph.modules[e.source]}:{e.line})")
    for group in report.models_cycles:
        lines += [f"models cycle: {', '.join(group)}", *path_lines(group)]
    lines.append("ok: imports flow one way" if report.ok else "FAILED: see above")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--root", type=Path, default=Path(__file__).resolve().parent.parent, help="repository root (default: this one)"
    )
    args = parser.parse_args(argv)
    graph, report = check(args.root)
    print(format_report(graph, report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
