"""The `gatekeeper` command: one entry point, one subcommand per job.

Each subcommand lives in the module that does the work and is registered here with a
`register(subparsers)` function, so `gatekeeper --help` lists everything in one place.
Bad input ends with a one-line message on stderr and exit code 2, never a traceback.

The training, evaluation and benchmark commands of the networks live under `models/`, which
`service/` never imports. They come in as plugins: each entry point of the group
`gatekeeper.commands` (pyproject.toml) names a function that takes the command groups
`train`, `evaluate` and `bench` made here and adds its subcommands to them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import NoReturn, cast

from service.errors import DatabaseNotReady, UsageError

__all__ = ["EXIT_USAGE", "PLUGIN_GROUP", "UsageError", "build_parser", "main"]

log = logging.getLogger(__name__)

EXIT_USAGE = 2
#: Entry-point group of the functions that add commands from outside `service/` (see the module docstring).
PLUGIN_GROUP = "gatekeeper.commands"

# Command groups that plugins add their subcommands to: name → (help, description).
COMMAND_GROUPS = {
    "train": ("train a model (needs the 'train' extra: torch)", "Train, calibrate and export a model."),
    "evaluate": (
        "evaluate a model on a labelled phantom split",
        "Evaluate an exported model (ONNX Runtime) on a phantom test split.",
    ),
    "bench": ("benchmarks (needs the 'train' extra: torch)", "Measure speed on this machine."),
}
# The placeholder each group shows for its subcommand in usage lines and errors.
_GROUP_METAVARS = {"train": "MODEL", "evaluate": "MODEL", "bench": "WHAT"}


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (the usage is in --help) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _add_group(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], name: str
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    help_text, description = COMMAND_GROUPS[name]
    parser = subparsers.add_parser(name, help=help_text, description=description)
    return parser.add_subparsers(dest="what", metavar=_GROUP_METAVARS[name], required=True)


def register_plugins(groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]]) -> None:
    """Call every `gatekeeper.commands` entry point, in name order, with the command groups.

    `groups` maps `train`, `evaluate` and `bench` to their sub-commands and `top` to the top-level
    commands (a plugin's own command, e.g. `gatekeeper commission`).

    A plugin that cannot be loaded (a broken install) is logged and skipped, so that the
    production commands still run; its commands are then missing from `gatekeeper --help`.
    """
    for entry_point in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            register = entry_point.load()
        except ImportError as exc:
            log.warning("commands of plugin %r (%s) not available: %s", entry_point.name, entry_point.value, exc)
            continue
        register(groups)


def build_parser() -> argparse.ArgumentParser:
    # Imported here so that `gatekeeper --help` stays fast and one broken module names itself.
    from service.commands import (
        contours,
        db,
        demo,
        exports,
        feedback,
        gate,
        ingest,
        models,
        phantom,
        score,
        segment,
        serve,
        shadow,
        status,
        web,
    )

    parser = _ArgumentParser(
        prog="gatekeeper",
        description="CT Gatekeeper: anomaly gate in front of CT auto-segmentation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    # The subcommands' parsers are _ArgumentParser too (argparse uses the parent's class); typed as
    # plain ArgumentParser, which is all the register functions rely on.
    subparsers = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", metavar="COMMAND", required=True),
    )
    demo.register(subparsers)
    phantom.register(subparsers)
    db.register(subparsers)
    ingest.register(subparsers)
    serve.register(subparsers)
    exports.register(subparsers)
    score.register(subparsers)
    groups = {"train": _add_group(subparsers, "train"), "evaluate": _add_group(subparsers, "evaluate")}
    segment.register(subparsers)
    groups["bench"] = _add_group(subparsers, "bench")
    web.register(subparsers)
    feedback.register(subparsers)
    contours.register(subparsers)
    status.register(subparsers)
    shadow.register(subparsers)
    models.register(subparsers)
    gate.register(subparsers)
    groups["top"] = subparsers
    register_plugins(groups)
    return parser


def _settings_log_level() -> int:
    """`GATEKEEPER_LOG_LEVEL` (Settings.log_level); INFO when the settings do not load — the command that
    needs them then names the bad field itself."""
    from pydantic import ValidationError

    from service.settings import ConfigFileError, Settings

    try:  # not get_settings(): its cache belongs to the command
        return int(logging.getLevelName(Settings().log_level))
    except (ValidationError, ConfigFileError):
        return logging.INFO


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `gatekeeper` subcommand and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from service.logs import configure_logging

    configure_logging(logging.DEBUG if args.verbose else _settings_log_level())
    try:
        return int(args.func(args) or 0)
    except DatabaseNotReady as exc:
        print(f"gatekeeper: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"gatekeeper {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"gatekeeper {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # `python -m service.commands.main` (how `gatekeeper serve` starts its children): UsageError comes from
    # service.errors, so this module run as __main__ catches the very class the commands raise.
    sys.exit(main())
