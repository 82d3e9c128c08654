"""Every `gatekeeper` command's --help renders (a stray '%' in a help text crashes argparse)."""

from __future__ import annotations

import argparse

from service.commands.main import build_parser


def _parsers(parser: argparse.ArgumentParser, prog: str) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.extend(_parsers(child, f"{prog} {name}"))
    return found


def test_every_command_help_renders() -> None:
    parsers = _parsers(build_parser(), "gatekeeper")
    names = [name for name, _ in parsers]
    assert "gatekeeper phantom" in names and "gatekeeper train segmenter" in names
    for name, parser in parsers:
        text = parser.format_help()
        assert text.startswith("usage:"), name
