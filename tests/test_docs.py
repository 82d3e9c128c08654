"""The documentation says what the code and the committed reports say.

- The generated parts of docs/ (the series lifecycle diagram in docs/architecture.md, the settings
  reference in docs/settings.md) are what `ops/gen_docs.py` makes from the code now.
- The figures the README and docs/results.md state for real CT and for the gate are those of the
  committed `report.json` files, so a re-run of an evaluation cannot leave stale numbers behind.
- The README is a front door: at most 15 KB, no issue numbers, and every command, make target,
  environment variable and link in it exists.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from service.lifecycle import ALLOWED_TRANSITIONS, INITIAL_STATE
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REAL_CT_REPORT = DOCS / "evaluation" / "real-ct" / "report.json"
GATE_CLINIC_REPORT = DOCS / "evaluation" / "gate-clinic" / "report.json"
SITE_B_REPORT = DOCS / "evaluation" / "commission-site-b" / "report.json"
ACTIVE_LEARNING_REPORT = DOCS / "evaluation" / "active-learning-curve" / "report.json"
# The pages this test keeps link-clean (the others have owners of their own).
OWN_PAGES = ["operator-guide.md", "architecture.md", "settings.md", "results.md", "results-log.md"]


def _gen_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "ops" / "gen_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _readme() -> str:
    return README.read_text(encoding="utf-8")


# --- generated parts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("relative_path", ["docs/architecture.md", "docs/settings.md"])
def test_generated_docs_match_the_code(relative_path: str) -> None:
    gen_docs = _gen_docs()
    committed = (ROOT / relative_path).read_text(encoding="utf-8")
    assert committed == gen_docs.expected_text(relative_path), (
        f"{relative_path} is stale: run `.venv/bin/python ops/gen_docs.py` and commit the result"
    )


def test_generator_check_mode_agrees() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "ops" / "gen_docs.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_lifecycle_diagram_has_exactly_the_declared_transitions() -> None:
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    diagram = text.split("```mermaid\nstateDiagram-v2\n", 1)[1].split("```", 1)[0]
    edges = set(re.findall(r"^\s+(\S+) --> (\S+)$", diagram, flags=re.M))
    declared = {(source.value, target.value) for source, targets in ALLOWED_TRANSITIONS.items() for target in targets}
    assert {e for e in edges if "[*]" not in e} == declared
    assert ("[*]", INITIAL_STATE.value) in edges


def test_settings_reference_names_every_field_and_its_environment_variable() -> None:
    text = (DOCS / "settings.md").read_text(encoding="utf-8")
    missing = [name for name in Settings.model_fields if f"| `{name}` | `GATEKEEPER_{name.upper()}` |" not in text]
    assert missing == []


# --- numbers from the committed reports ---------------------------------------------------------------


def _bold_after(name: str, value: str, text: str) -> bool:
    """Whether `text` shows case `name` followed by `value` in bold, e.g. "`siemens-j2k-20` **0.867**"."""
    return re.search(rf"`?{re.escape(name)}`?\s+\*\*{re.escape(value)}\*\*", text) is not None


def test_every_setting_is_in_a_named_group_of_its_concern() -> None:
    groups = _gen_docs().setting_groups(Settings)
    titles = [title.split(":")[0] for title, _ in groups]
    assert titles == ["Storage and services", "Listener", "PACS", "Export", "Pipeline", "Models", "Web", "Monitoring"]
    assert sorted(name for _, names in groups for name in names) == sorted(Settings.model_fields)
    by_group = {title.split(":")[0]: names for title, names in groups}
    assert all(name.startswith("pacs_") for name in by_group["PACS"])
    assert all(name.startswith(("web_", "worklist_")) for name in by_group["Web"])
    assert all(name.startswith(("metrics_", "flower_", "log_")) for name in by_group["Monitoring"])


def test_readme_real_ct_dice_is_the_committed_report() -> None:
    report = _report(REAL_CT_REPORT)
    readme = _readme()
    assert report["cases"], "the real-CT report has no cases"
    wrong = {
        name: f"{case['dice']:.3f}"
        for name, case in report["cases"].items()
        if not _bold_after(name, f"{case['dice']:.3f}", readme)
    }
    assert wrong == {}, f"README.md, section Results, should show these Dice values from {REAL_CT_REPORT}"


def test_readme_real_ct_names_the_segmenter_that_was_measured() -> None:
    report = _report(REAL_CT_REPORT)
    first_case = next(iter(report["cases"]))
    (paragraph,) = [p for p in _readme().split("\n\n") if first_case in p]
    assert f"segmenter `{report['segmenter_version']}`" in " ".join(paragraph.split())


def test_results_page_real_ct_table_is_the_committed_report() -> None:
    report = _report(REAL_CT_REPORT)
    page = (DOCS / "results.md").read_text(encoding="utf-8")
    assert f"segmenter `{report['segmenter_version']}`" in page
    for name, case in report["cases"].items():
        row = f"| `{name}` | {case['slices']} | **{case['dice']:.3f}** | {case['route']}: {case['route_reason']} |"
        assert row in page, f"docs/results.md should have the row {row}"


def test_readme_gate_figures_are_the_committed_clinic_report() -> None:
    report = _report(GATE_CLINIC_REPORT)
    fused = report["fused"]
    readme = _readme()
    expected = [
        f"all **{report['failures']}**",
        f"recall **{fused['recall_dice_lt_095']:.2f}**",
        f"(**{fused['failure_rate_auto_routed'] * 100:.1f} %**)",
        f"manual share of **{fused['manual_share'] * 100:.1f} %**",
        f"**{report['normals_sent_to_manual'] * 100:.1f} %** of normal series",
        f"{report['series']} synthetic series",
    ]
    assert [phrase for phrase in expected if phrase not in readme] == []
    (paragraph,) = [p for p in readme.split("\n\n") if f"{report['series']} synthetic series" in p]
    paragraph = " ".join(paragraph.split())
    assert f"gate `{report['gate']['version']}` on segmenter `{report['meta']['segmenter_version']}`" in paragraph


def site_b_phrases(report: dict[str, Any]) -> list[str]:
    """The README's site-B sentence: before and after commissioning, as the committed report has them."""
    phrases = [f"**{report['normals_used']}** of its normal series"]
    for side in ("before", "after"):
        o = report[side]
        phrases.append(
            f"**{o['manual_share'] * 100:.1f} %** to a person (recall of Dice < 0.95 "
            f"**{o['recall_dice_lt_095']:.2f}**, **{o['normals_to_manual'] * 100:.1f} %** of normals)"
        )
    return phrases


def test_site_b_report_has_the_issue_format_and_the_readme_its_numbers() -> None:
    report = _report(SITE_B_REPORT)
    assert {"site_profile", "normals_used", "failure_prevalence", "before", "after"} <= set(report)
    assert report["normals_used"] <= 96
    for side in ("before", "after"):
        assert {"manual_share", "recall_dice_lt_095", "normals_to_manual"} <= set(report[side])
    readme = " ".join(_readme().split())
    assert [phrase for phrase in site_b_phrases(report) if phrase not in readme] == []


def active_learning_phrases(report: dict[str, Any]) -> list[str]:
    """The README's label-efficiency sentence: random's Dice at its largest budget, and per strategy the
    labels it needs to reach that Dice, as the committed report has them."""
    random = report["strategies"]["random"]
    phrases = [f"with **{report['random_max_budget']}** contours a mean Dice of **{random['dice'][-1]:.3f}**"]
    for name, budget in report["labels_to_match_random"].items():
        if name != "random":
            phrases.append(f"`{name}` **{budget}**" if budget is not None else f"`{name}` **not within 40**")
    return phrases


def test_active_learning_report_has_the_issue_format_and_the_readme_its_numbers() -> None:
    report = _report(ACTIVE_LEARNING_REPORT)
    assert report["random_max_budget"] == max(report["budgets"])
    assert {"gan", "gate", "entropy", "diverse", "random"} <= set(report["strategies"])
    for curve in report["strategies"].values():
        assert curve["budgets"] == report["budgets"] and len(curve["dice"]) == len(curve["budgets"])
    assert report["setup"]["pool_series"] >= 200 and report["setup"]["random_repeats"] >= 3
    assert (ACTIVE_LEARNING_REPORT.parent / "curve.png").is_file()
    readme = " ".join(_readme().split())
    assert [phrase for phrase in active_learning_phrases(report) if phrase not in readme] == []


@pytest.mark.parametrize("report_dir", ["gate-clinic", "gate-test50", "gate-large300"])
def test_results_page_gate_table_is_the_committed_report(report_dir: str) -> None:
    report = _report(DOCS / "evaluation" / report_dir / "report.json")
    fused = report["fused"]
    page = (DOCS / "results.md").read_text(encoding="utf-8")
    rows = [line for line in page.splitlines() if f"(evaluation/{report_dir}/report.md) |" in line]
    assert len(rows) == 1, f"docs/results.md should have one gate table row for {report_dir}"
    cells = [cell.strip() for cell in rows[0].strip().strip("|").split(" | ")]
    assert cells[1].startswith(f"{report['series']} series, {report['contoured']} with liver")
    assert cells[2:] == [
        f"{report['failures']} ({report['failure_prevalence'] * 100:.1f} %)",
        f"{fused['recall_dice_lt_090']:.2f} / {fused['recall_dice_lt_095']:.2f}",
        f"{fused['manual_share'] * 100:.1f} %",
        f"{fused['failure_rate_auto_routed'] * 100:.1f} %",
        f"{report['normals_sent_to_manual'] * 100:.1f} %",
        f"{fused['aurc']:.4f} ({report['signals']['tta_dice']['aurc']:.4f})",
    ]


# --- the README as a front door -----------------------------------------------------------------------


def test_readme_is_at_most_15_kb_without_issue_numbers() -> None:
    readme = _readme()
    assert len(readme.encode("utf-8")) <= 15 * 1024
    assert re.findall(r"\bissues?\s+#?\d+|(?<![\w&])#\d+\b", readme, flags=re.I) == []


def _code(text: str) -> list[str]:
    """Every code span and fenced block of `text`, whitespace collapsed, fenced blocks line by line."""
    pieces: list[str] = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        pieces += [line.split("#", 1)[0] for line in block.splitlines()]
    without_blocks = re.sub(r"```.*?```", "", text, flags=re.S)
    pieces += [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", without_blocks)]
    return pieces


def _gatekeeper_parser() -> argparse.ArgumentParser:
    """The `gatekeeper` command's parser, found through its console-script entry point."""
    (entry_point,) = importlib.metadata.entry_points(group="console_scripts", name="gatekeeper")
    module = importlib.import_module(entry_point.module)
    parser = module.build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_gatekeeper_command_in_the_readme_exists_with_its_flags() -> None:
    root = _gatekeeper_parser()
    problems = []
    commands = [m for piece in _code(_readme()) for m in re.findall(r"\bgatekeeper((?: [^\s|;&]+)+)", piece)]
    assert len(commands) > 10  # the scan found the commands
    for command in commands:
        parser, path = root, ["gatekeeper"]
        words = command.split()
        while words and words[0] in _subcommands(parser):
            path.append(words[0])
            parser = _subcommands(parser)[words.pop(0)]
        if len(path) == 1:
            problems.append(f"`gatekeeper{command}`: no such subcommand")
            continue
        if _subcommands(parser) and not words:
            continue  # a command group named as a whole, e.g. `gatekeeper models`
        options = {option for action in parser._actions for option in action.option_strings}
        flags = [word.split("=", 1)[0] for word in words if word.startswith("--")]
        problems += [f"`{' '.join(path)}` has no option {flag}" for flag in flags if flag not in options]
    assert problems == []


def test_every_make_target_and_setting_in_the_readme_exists() -> None:
    readme = _readme()
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-zA-Z][\w-]*):", makefile, flags=re.M))
    named = {m for piece in _code(readme) for m in re.findall(r"\bmake ([a-z][\w-]*)", piece)}
    assert named and named <= targets, f"make targets the README names but the Makefile lacks: {named - targets}"
    variables = set(re.findall(r"\bGATEKEEPER_[A-Z_]+[A-Z]\b", readme))
    known = {f"GATEKEEPER_{name.upper()}" for name in Settings.model_fields} | {"GATEKEEPER_CONFIG"}
    assert variables <= known, f"settings the README names that do not exist: {variables - known}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_anchor(heading) for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", ["README.md"] + [f"docs/{name}" for name in OWN_PAGES])
def test_links_point_at_files_and_headings_that_exist(page: str) -> None:
    path = ROOT / page
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        missing_heading = anchor and linked.suffix == ".md" and linked.exists() and anchor not in _anchors(linked)
        if not linked.exists() or missing_heading:
            broken.append(target)
    assert broken == []
