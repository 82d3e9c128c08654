"""`gatekeeper contours` and `gatekeeper pool`: the returned contours and the training pool they make.

    gatekeeper contours list [--json]      every received RT Structure Set / Segmentation, its status and why
    gatekeeper pool list [--json] [--all]  the training pool (one entry per CT series; --all: superseded too)
    gatekeeper pool export DIR             the pool as CT + liver SEG folders for `gatekeeper train segmenter --data DIR`
    gatekeeper pool suggest --budget K [--strategy gan|gate|entropy|diverse|random] [--json]
                                           the uncontoured series to contour first (`service.suggest`)

`pool list --json` prints a JSON list of objects with at least `series_instance_uid` and
`contour_sop_instance_uid` (other tools rely on it). The layouts are described in `service.contours`.
The database comes from `GATEKEEPER_DATABASE_URL`; an unreachable or un-migrated database ends the
command with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from service.errors import UsageError
from service.settings import load_settings_or_exit

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `gatekeeper contours` and `gatekeeper pool` to the top-level parser."""
    contours = subparsers.add_parser(
        "contours", help="returned contours (RT Structure Sets, Segmentations): matched or why not"
    )
    contour_commands = contours.add_subparsers(dest="contours_command", metavar="CONTOURS_COMMAND", required=True)
    listing = contour_commands.add_parser("list", help="every received contour object, oldest first")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=run_contours_list)

    pool = subparsers.add_parser("pool", help="the training pool: CT series with a returned liver contour")
    pool_commands = pool.add_subparsers(dest="pool_command", metavar="POOL_COMMAND", required=True)
    pool_list = pool_commands.add_parser("list", help="the pool's entries, oldest first")
    pool_list.add_argument("--json", action="store_true", help="machine-readable output")
    pool_list.add_argument("--all", action="store_true", help="also the entries a later contour superseded")
    pool_list.set_defaults(func=run_pool_list)
    export = pool_commands.add_parser(
        "export", help="write the pool as CT + liver SEG folders that `gatekeeper train segmenter --data` reads"
    )
    export.add_argument("out", type=Path, metavar="DIR", help="a new or empty folder")
    export.set_defaults(func=run_pool_export)
    suggest = pool_commands.add_parser(
        "suggest", help="rank the uncontoured series (and the open worklist) by the value of a manual contour"
    )
    suggest.add_argument("--budget", type=int, required=True, metavar="K", help="how many series to suggest")
    suggest.add_argument(
        "--strategy", default="gate", help="gan | gate | entropy | diverse | random (default gate; service.suggest)"
    )
    suggest.add_argument("--seed", type=int, default=0, help="the random strategy's seed (default 0)")
    suggest.add_argument("--json", action="store_true", help="machine-readable output")
    suggest.set_defaults(func=run_pool_suggest)


def run_contours_list(args: argparse.Namespace) -> int:
    """Print every received contour object with its status and reason; exit 0 (also when there is none).

    Raises:
        DatabaseNotReady: the database does not answer or is not migrated.
    """
    from service.contours import contour_listing
    from service.db.schema import open_database

    settings = load_settings_or_exit()
    with open_database(settings) as sessions, sessions() as session:
        rows = contour_listing(session=session)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no contour object received yet")
        return 0
    print(f"{'id':>5} {'received (UTC)':<16} {'kind':<8} {'from':<16} {'status':<10} matched series / reason")
    for row in rows:
        if row["matched_series_instance_uid"]:
            what = f"{row['matched_series_instance_uid']} v{row['matched_series_version']} ({row['structure_name']})"
            if row["reason"]:
                what += f": {row['reason']}"
        else:
            what = row["reason"] or ""
        print(
            f"{row['id']:>5} {row['received_at'][:16].replace('T', ' '):<16} {row['modality']:<8} "
            f"{row['calling_ae_title']:<16} {row['status']:<10} {what}"
        )
    return 0


def run_pool_list(args: argparse.Namespace) -> int:
    """Print the training pool; exit 0 (also when it is empty).

    Raises:
        DatabaseNotReady: the database does not answer or is not migrated.
    """
    from service.contours import pool_listing
    from service.db.schema import open_database

    settings = load_settings_or_exit()
    with open_database(settings) as sessions, sessions() as session:
        rows = pool_listing(session=session, include_superseded=args.all)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("the training pool is empty")
        return 0
    print(
        f"{'id':>5} {'received (UTC)':<16} {'from':<16} {'by':<12} {'slices':>6} {'liver vox':>10} series_instance_uid"
    )
    for row in rows:
        mark = " (superseded)" if row["superseded"] else ""
        print(
            f"{row['id']:>5} {row['received_at'][:16].replace('T', ' '):<16} {row['calling_ae_title']:<16} "
            f"{row['contoured_by'] or '-':<12} {row['num_slices']:>6} {row['liver_voxels']:>10} "
            f"{row['series_instance_uid']}{mark}"
        )
    return 0


def run_pool_export(args: argparse.Namespace) -> int:
    """Write the pool to DIR; exit 0.

    Raises:
        UsageError: DIR exists and is not an empty folder, or a pool entry's files are gone or changed.
        DatabaseNotReady: the database does not answer or is not migrated.
    """
    from service.contours import export_pool
    from service.db.schema import open_database

    settings = load_settings_or_exit()
    out: Path = args.out
    with open_database(settings) as sessions:
        try:
            entries = export_pool(sessions=sessions, settings=settings, out=out, progress=log.info)
        except FileExistsError as exc:
            raise UsageError(f"{exc}; give a new or empty folder") from None
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    print(f"{len(entries)} pool entr{'y' if len(entries) == 1 else 'ies'} written to {out} (pool.json lists them)")
    if len(entries) < 3:
        print("note: `gatekeeper train segmenter --data` needs at least 3 contoured series (2 train, 1 validation)")
    return 0


def run_pool_suggest(args: argparse.Namespace) -> int:
    """Print the `--budget` series to contour first under `--strategy`, with their evidence; exit 0.

    Raises:
        UsageError: a budget < 1 or an unknown strategy.
        DatabaseNotReady: the database does not answer or is not migrated.
    """
    from service.db.schema import open_database
    from service.suggest import check_request, suggest

    try:
        check_request(strategy=args.strategy, budget=args.budget)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    settings = load_settings_or_exit()
    with open_database(settings) as sessions:
        rows = suggest(sessions=sessions, settings=settings, strategy=args.strategy, budget=args.budget, seed=args.seed)
    if args.json:
        print(json.dumps([row.as_json() for row in rows], indent=1))
        return 0
    if not rows:
        print("no series without a contour to suggest")
        return 0
    print(f"{'rank':>4} {'score':>9} {'detector':>9} {'gate':>9} {'entropy':>8} {'worklist':<9} series_instance_uid")
    for row in rows:
        e = row.evidence
        detector = (
            e["detector_score"] / e["detector_threshold"] if e["detector_score"] and e["detector_threshold"] else None
        )
        gate = e["gate_fused"] / e["gate_fused_threshold"] if e["gate_fused"] and e["gate_fused_threshold"] else None
        print(
            f"{row.rank:>4} {_cell(row.score, 9)} {_cell(detector, 9)} {_cell(gate, 9)} {_cell(e['entropy'], 8)} "
            f"{e['worklist_status'] or '-':<9} {row.series_instance_uid}"
        )
    return 0


def _cell(x: float | None, width: int) -> str:
    return f"{x:>{width}.3f}" if x is not None else f"{'-':>{width}}"
