"""The `gatekeeper` command: one entry point, one subcommand per job.

Each subcommand lives in the module that does the work and is registered here with a
`register(subparsers)` function, so `gatekeeper --help` lists everything in one place.
Bad input ends with a one-line message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

log = logging.getLogger(__name__)

EXIT_USAGE = 2


class UsageError(Exception):
    """The user asked for something impossible; the message is shown as is and the exit code is 2."""


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (the usage is in --help) and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    # Imported here so that `gatekeeper --help` stays fast and one broken module names itself.
    from models.detector import cli as detector_cli  # torch is imported only when `train` runs
    from models.segmenter import cli as segmenter_cli
    from service import db_cli, demo, exports_cli, ingest_cli, score_cli, segment_cli, serve
    from service.phantom import cli as phantom_cli
    from service.web import cli as web_cli

    parser = _ArgumentParser(
        prog="gatekeeper",
        description="CT Gatekeeper: anomaly gate in front of CT auto-segmentation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo.register(subparsers)
    phantom_cli.register(subparsers)
    db_cli.register(subparsers)
    ingest_cli.register(subparsers)
    serve.register(subparsers)
    exports_cli.register(subparsers)
    score_cli.register(subparsers)
    train = detector_cli.register(subparsers)
    evaluate = detector_cli.register_evaluate(subparsers)
    segmenter_cli.register_train(train)
    segmenter_cli.register_evaluate(evaluate)
    segment_cli.register(subparsers)
    detector_cli.register_bench(subparsers)
    web_cli.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `gatekeeper` subcommand and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from service.logs import configure_logging

    configure_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"gatekeeper {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"gatekeeper {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # Run through the imported module so `python -m service.cli` shares one UsageError class.
    from service.cli import main as _main

    sys.exit(_main())
