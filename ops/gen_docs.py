"""Write the generated parts of the documentation from the code they describe.

Two parts of `docs/` are made from the code, so that they cannot drift from it:

- `docs/architecture.md`: the series lifecycle diagram (mermaid `stateDiagram-v2`) and its table of
  states, from `service/lifecycle.py` (`SeriesState`, `INITIAL_STATE`, `ALLOWED_TRANSITIONS`,
  `WORKING_STATES`, `FINAL_STATES`);
- `docs/settings.md`: the settings reference, from the one settings class `service.settings.Settings`:
  every field with its environment variable, type, default and the comment that documents it.

Each part sits between two marker comments in its file (`<!-- BEGIN GENERATED: NAME ... -->` and
`<!-- END GENERATED: NAME -->`); the prose around them is written by hand. Run from the repository
root after changing the lifecycle or a setting:

    .venv/bin/python ops/gen_docs.py            # rewrite the generated parts
    .venv/bin/python ops/gen_docs.py --check    # exit 1, with a diff, when a committed part is stale

`tests/test_docs.py` runs the check. Nothing here reads the process environment: defaults are the
class's own, whatever `GATEKEEPER_*` variables are set.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

from pydantic import SecretStr  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

from service import lifecycle  # noqa: E402
from service.settings import Settings  # noqa: E402

GENERATOR = "ops/gen_docs.py"


def begin_marker(name: str) -> str:
    """The comment that opens generated part `name`."""
    return f"<!-- BEGIN GENERATED: {name} — made by {GENERATOR}; edit the code, then run it -->"


def end_marker(name: str) -> str:
    """The comment that closes generated part `name`."""
    return f"<!-- END GENERATED: {name} -->"


def _one_line(text: str) -> str:
    """Markdown table cell text: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _comments_by_line(source: str) -> tuple[dict[int, str], set[int]]:
    """The comments of `source` by line number (1-based), and the lines that hold code."""
    comments: dict[int, str] = {}
    code_lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
        elif token.type not in skip:
            code_lines.update(range(token.start[0], token.end[0] + 1))
    return comments, code_lines


def _clean_comment(lines: list[str]) -> str:
    """Comment lines as one sentence, without the `---` that marks a group of settings."""
    text = " ".join(line for line in lines if line)
    return text.removeprefix("---").strip()


#: A comment line `# === Title: what the group holds.` in the settings class starts a group of settings.
GROUP_MARK = "==="


def setting_groups(cls: type) -> list[tuple[str, list[str]]]:
    """The groups of fields of `cls` in class order: (the `# ===` header's text, the field names under it).

    Fields before the first header form a group with an empty title.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    comments, _ = _comments_by_line(source)
    class_def = ast.parse(source).body[0]
    assert isinstance(class_def, ast.ClassDef)
    headers = sorted(
        (line, text.removeprefix(GROUP_MARK).strip()) for line, text in comments.items() if text.startswith(GROUP_MARK)
    )
    groups: list[tuple[str, list[str]]] = []
    for node in class_def.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        title = next((text for line, text in reversed(headers) if line < node.lineno), "")
        if not groups or groups[-1][0] != title:
            groups.append((title, []))
        groups[-1][1].append(node.target.id)
    return groups


def documented_assignments(cls: type) -> dict[str, str]:
    """For each annotated or plain assignment in `cls`'s body, the comment that documents it.

    That is the trailing comment on its line(s) or, failing that, the comment lines directly above
    it. An assignment with neither that directly follows another one (no blank line between) shares
    that one's comment, as `dimse_timeout_s` and `network_timeout_s` share `acse_timeout_s`'s: it
    then reads "See `acse_timeout_s` above (documented together)." instead of repeating the comment.
    """
    source = textwrap.dedent(inspect.getsource(cls))
    comments, code_lines = _comments_by_line(source)
    lines = source.splitlines()
    tree = ast.parse(source)
    class_def = tree.body[0]
    assert isinstance(class_def, ast.ClassDef)
    found: dict[str, str] = {}
    previous: tuple[int, str] | None = None  # (end line, name whose comment it is) of the assignment before
    for node in class_def.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            name = node.target.id
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            previous = None
            continue
        end = node.end_lineno or node.lineno
        inline = [comments[n] for n in range(node.lineno, end + 1) if n in comments]
        above: list[str] = []
        line = node.lineno - 1
        while line >= 1 and line in comments and line not in code_lines and not comments[line].startswith(GROUP_MARK):
            above.insert(0, comments[line])
            line -= 1
        owner = name
        if inline:
            found[name] = _clean_comment(inline)
        elif above:
            found[name] = _clean_comment(above)
        elif previous is not None and previous[0] == node.lineno - 1 and lines[node.lineno - 2].strip():
            owner = previous[1]
            found[name] = f"See `{owner}` above (documented together)." if found[owner] else ""
        else:
            found[name] = ""
        previous = (end, owner)
    return found


# --- the series lifecycle ---------------------------------------------------------------------------


def render_lifecycle() -> str:
    """The mermaid state diagram and the table of states of `service/lifecycle.py`."""
    states = list(lifecycle.SeriesState)
    order = {state: index for index, state in enumerate(states)}
    meaning = documented_assignments(lifecycle.SeriesState)
    out = ["```mermaid", "stateDiagram-v2", f"    [*] --> {lifecycle.INITIAL_STATE.value}"]
    for source in states:
        for target in sorted(lifecycle.ALLOWED_TRANSITIONS.get(source, frozenset()), key=order.__getitem__):
            out.append(f"    {source.value} --> {target.value}")
    for state in states:
        if not lifecycle.ALLOWED_TRANSITIONS.get(state):
            out.append(f"    {state.value} --> [*]")
    out += ["```", "", "| state | meaning | may move to | role |", "| --- | --- | --- | --- |"]
    for state in states:
        targets = sorted(lifecycle.ALLOWED_TRANSITIONS.get(state, frozenset()), key=order.__getitem__)
        role = []
        if state == lifecycle.INITIAL_STATE:
            role.append("initial")
        if state in lifecycle.WORKING_STATES:
            role.append("working (the sweeper watches it)")
        if state in lifecycle.FINAL_STATES:
            role.append("final (end of the automatic journey)")
        out.append(
            f"| `{state.value}` | {_one_line(meaning.get(state.name, ''))} | "
            f"{', '.join(f'`{t.value}`' for t in targets) or '—'} | {', '.join(role)} |"
        )
    return "\n".join(out)


# --- the settings reference -------------------------------------------------------------------------


def format_type(annotation: Any) -> str:
    """A field's type as a reader would write it: `int`, `Path | None`, `"seg" | "rtstruct"`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(f'"{arg}"' if isinstance(arg, str) else repr(arg) for arg in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(format_type(arg) for arg in args)
    if origin is typing.Annotated:
        return format_type(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(format_type(arg) for arg in args)}]"
    if annotation is type(None):
        return "None"
    if annotation is SecretStr:
        return "secret str"
    return getattr(annotation, "__name__", str(annotation))


def format_constraints(metadata: Sequence[Any]) -> str:
    """The bounds of a field (`ge=1, le=65535` → `≥ 1, ≤ 65535`), empty when it has none."""
    symbols = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}
    parts = []
    for item in metadata:
        for attribute, symbol in symbols.items():
            value = getattr(item, attribute, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                parts.append(f"{symbol} {format_value(value)}")
    return ", ".join(parts)


def format_value(value: Any) -> str:
    """A default as text, repository paths relative to the repository root."""
    if isinstance(value, SecretStr):
        return "" if not value.get_secret_value() else "(set)"
    if isinstance(value, Path):
        if value.is_absolute() and value.is_relative_to(ROOT):
            return value.relative_to(ROOT).as_posix()
        return value.as_posix()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, ".15g")
    if isinstance(value, list | tuple):
        return ", ".join(format_value(item) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{key}: {format_value(item)}" for key, item in value.items())
    return str(value)


def format_default(value: Any) -> str:
    """A default as a table cell: the value in backticks, or *empty* / *unset*."""
    if value is None:
        return "*unset*"
    if value is PydanticUndefined:
        return "*required*"
    text = format_value(value)
    return f"`{_one_line(text)}`" if text else "*empty*"


def render_settings() -> str:
    """The settings reference of `service.settings.Settings`: one table per group of settings, one row per field."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    comments = documented_assignments(Settings)
    groups = setting_groups(Settings)
    out = [
        f"{len(Settings.model_fields)} settings in {len(groups)} groups, in the order of `service/settings.py`: "
        + ", ".join(title.split(":")[0] for title, _ in groups)
        + ".",
    ]
    for title, names in groups:
        name, _, meaning = title.partition(":")
        out += ["", f"### {name.strip()}", ""]
        if meaning.strip():
            out += [meaning.strip()[0].upper() + meaning.strip()[1:], ""]
        out += ["| setting | environment variable | type | default | meaning |", "| --- | --- | --- | --- | --- |"]
        for field_name in names:
            field = Settings.model_fields[field_name]
            kind = format_type(field.annotation)
            bounds = format_constraints(field.metadata)
            if bounds:
                kind = f"{kind} ({bounds})"
            description = (
                field.description or comments.get(field_name, "") or "*(no description in service/settings.py)*"
            )
            default = field.get_default(call_default_factory=True)
            out.append(
                f"| `{field_name}` | `{prefix}{field_name.upper()}` | {_one_line(kind)} | {format_default(default)} | "
                f"{_one_line(description)} |"
            )
    return "\n".join(out)


# --- the files ----------------------------------------------------------------------------------------

#: Each file of docs/ with generated parts: part name → the function that makes its text.
PARTS: dict[str, dict[str, Callable[[], str]]] = {
    "docs/architecture.md": {"lifecycle": render_lifecycle},
    "docs/settings.md": {"settings": render_settings},
}


def replace_part(text: str, name: str, body: str) -> str:
    """`text` with the part between `name`'s markers replaced by `body`.

    Raises:
        ValueError: the markers of `name` are missing, doubled or out of order.
    """
    begin, end = begin_marker(name), end_marker(name)
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"expected one {begin!r} followed by one {end!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def expected_text(relative_path: str, root: Path = ROOT) -> str:
    """What `relative_path` should hold: its current text with every generated part made anew."""
    text = (root / relative_path).read_text(encoding="utf-8")
    for name, render in PARTS[relative_path].items():
        text = replace_part(text, name, render())
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or with --check compare) the generated parts; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file is stale")
    args = parser.parse_args(argv)
    stale = 0
    for relative_path in PARTS:
        path = ROOT / relative_path
        current = path.read_text(encoding="utf-8")
        wanted = expected_text(relative_path)
        if current == wanted:
            continue
        if args.check:
            stale += 1
            sys.stdout.writelines(
                difflib.unified_diff(
                    current.splitlines(keepends=True),
                    wanted.splitlines(keepends=True),
                    f"{relative_path} (committed)",
                    f"{relative_path} (from the code now)",
                )
            )
        else:
            path.write_text(wanted, encoding="utf-8")
            sys.stdout.write(f"wrote {relative_path}\n")
    if stale:
        sys.stdout.write(f"{stale} file(s) stale: run .venv/bin/python {GENERATOR}\n")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
