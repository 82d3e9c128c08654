"""`gatekeeper phantom`: write synthetic CT series with exact ground truth.

gatekeeper phantom --out DIR --series N --slices K --seed S [--anomaly TYPE]
gatekeeper phantom dataset --out DIR [--large] [--seed S]
gatekeeper phantom dataset --clinic --out DIR [--series N] [--matrix 256] [--jobs 2] [--site NAME]

`--clinic` writes the clinic-like mix (`generate.clinic_specs`): a `validation` split of normal
series (12 % of N; for calibrating a gate only) and a `test` split of N series (default 500) of
unseen patients — ~15 % anomalous over every type with severities subtle/moderate/gross, ~1.4 %
each of off-target scans, the rest normal. In its manifest.json each series has `category`
("normal", "anomaly", "off_target"), `anomaly.severity` (grade and drawn parameters) and
`scan_range.kind`: "abdomen", "abdomen_pelvis", or, for off-target series, "chest" (no liver in
the field of view), "pelvis" (no liver) or "liver_partial" (the scan starts or ends through the
liver). The seed protocol's series (without --clinic) are unchanged.

`--site NAME` acquires the clinic mix with another site's protocol and patients
(`service.phantom.sites`; docs/phantom-sites.md has the numbers). Without it (or with
`--site default`) the output is the same as before sites existed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from service.errors import UsageError
from service.phantom.anomalies import ANOMALY_TYPES
from service.phantom.generate import (
    CLINIC_TEST_SERIES,
    DEFAULT_NOISE_SIGMA,
    RUN_MARKER,
    clinic_specs,
    count_slices,
    dataset_specs,
    generate_run,
    series_specs,
    severity_summary,
    spec_summary,
)
from service.phantom.sites import DEFAULT_SITE, SITES


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "phantom",
        help="generate synthetic abdominal CT series with ground truth",
        description="Generate synthetic abdominal CT series (CT Image Storage files) with exact ground truth "
        "(DICOM-SEG of organs and of the injected anomaly) and a manifest.json. "
        "'gatekeeper phantom dataset' builds the seed protocol: 96 train, 10 validation, 50 test series. "
        "'gatekeeper phantom dataset --clinic' builds a clinic-like mix of unseen patients: a 'validation' split "
        "of normal series (12 % of --series; for calibration only) and a 'test' split of --series series "
        f"(default {CLINIC_TEST_SERIES}): ~15 % anomalous over all types, each with a severity grade (subtle/moderate/gross) "
        "and its drawn parameters in manifest.json (anomaly.severity); ~1.4 % each of off-target scans the "
        "liver model does not apply to, labelled category 'off_target' with scan_range.kind 'chest' or "
        "'pelvis' (no liver in the field of view) or 'liver_partial' (the scan starts or ends through the "
        "liver); the rest normal ('abdomen' or 'abdomen_pelvis' ranges, 2.5-5 mm slices).",
    )
    p.add_argument("mode", nargs="?", choices=["dataset"], help="'dataset': build the seed protocol")
    p.add_argument("--out", required=True, type=Path, help="output folder (must be empty, or use --force)")
    p.add_argument(
        "--series",
        type=int,
        default=None,
        help=f"number of series (default 1; not with 'dataset'; with --clinic: test series, default "
        f"{CLINIC_TEST_SERIES})",
    )
    p.add_argument(
        "--slices", type=int, default=None, help="slices per series (default: a realistic scan range, ~40–380 slices)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed: same seed, same output (default 0)")
    p.add_argument(
        "--anomaly",
        default="none",
        help=f"anomaly to inject in every series: none, {', '.join(ANOMALY_TYPES)} (default none)",
    )
    p.add_argument("--matrix", type=int, default=512, help="rows and columns per slice (default 512)")
    p.add_argument(
        "--noise-sigma",
        type=float,
        default=DEFAULT_NOISE_SIGMA,
        help=f"CT noise standard deviation in HU for an average adult (default {DEFAULT_NOISE_SIGMA:g})",
    )
    p.add_argument("--large", action="store_true", help="with 'dataset': the >= 300-series test set instead")
    p.add_argument(
        "--clinic",
        action="store_true",
        help="with 'dataset': the clinic-like mix (validation + test splits of unseen patients, severity-graded "
        "anomalies, off-target scan ranges) instead",
    )
    p.add_argument(
        "--site",
        default=DEFAULT_SITE.name,
        help="with 'dataset --clinic': acquire the mix as this site does, with its own patients "
        "(patient seeds disjoint from every other site's); docs/phantom-sites.md has the numbers. "
        + "; ".join(f"{site.name}: {site.summary}" for site in SITES.values()).replace("%", "%%")
        + f" (default {DEFAULT_SITE.name})",
    )
    p.add_argument(
        "--validation-series",
        type=int,
        default=None,
        help="with 'dataset --clinic': normal validation series (default 12 %% of --series), e.g. 96 to "
        "commission a gate on; another number draws other patients",
    )
    p.add_argument(
        "--split",
        choices=["train", "validation", "test"],
        default=None,
        help="with 'dataset': write only this split of the protocol (same series as in the full run)",
    )
    p.add_argument("--jobs", type=int, default=1, help="series generated in parallel (default 1)")
    p.add_argument("--force", action="store_true", help="replace an earlier phantom run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    if args.slices is not None and args.slices < 1:
        raise UsageError(f"--slices must be >= 1, got {args.slices}")
    if args.series is not None and args.series < 1:
        raise UsageError(f"--series must be >= 1, got {args.series}")
    if args.anomaly not in ("none", *ANOMALY_TYPES):
        raise UsageError(f"unknown --anomaly {args.anomaly!r}; expected one of: none, {', '.join(ANOMALY_TYPES)}")
    if not 64 <= args.matrix <= 1024:
        raise UsageError(f"--matrix must be within 64..1024 pixels, got {args.matrix}")
    if not args.noise_sigma >= 0:
        raise UsageError(f"--noise-sigma must be >= 0 HU, got {args.noise_sigma}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    if args.mode == "dataset":
        if args.anomaly != "none":
            raise UsageError("'phantom dataset' builds a fixed protocol; --anomaly does not apply")
        if args.series is not None and not args.clinic:
            raise UsageError("'phantom dataset' builds the fixed protocol; --series applies only with --clinic")
    elif args.large or args.split or args.clinic:
        raise UsageError("--large, --clinic and --split apply to 'gatekeeper phantom dataset' only")
    if args.large and args.split not in (None, "test"):
        raise UsageError("--large builds a test set only; --split must be test or absent")
    if args.site not in SITES:
        raise UsageError(f"unknown --site {args.site!r}; expected one of: {', '.join(SITES)}")
    if args.site != DEFAULT_SITE.name and not args.clinic:
        raise UsageError("--site applies to 'gatekeeper phantom dataset --clinic' only")
    if args.clinic:
        if args.large:
            raise UsageError("--clinic and --large are different sets; choose one")
        if args.split == "train":
            raise UsageError("--clinic has no train split; --split must be validation, test or absent")
        if args.slices is not None:
            raise UsageError("--clinic plans realistic scan ranges; --slices does not apply")
        if args.validation_series is not None and args.validation_series < 2:
            raise UsageError(f"--validation-series must be >= 2, got {args.validation_series}")
    elif args.validation_series is not None:
        raise UsageError("--validation-series applies to 'gatekeeper phantom dataset --clinic' only")


def prepare_output(out: Path, force: bool) -> None:
    """Make sure `out` is an empty folder; with `force`, clear an earlier phantom run there.

    Raises:
        UsageError: `out` is a file, or a non-empty folder without --force, or a non-empty folder
            that is not a phantom run (no manifest.json) — never deleted, even with --force.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(f"--out {out} is not empty; use --force to replace an earlier phantom run")
        if not ((out / "manifest.json").is_file() or (out / RUN_MARKER).is_file()):
            raise UsageError(
                f"--out {out} is not empty and is not a phantom run (no manifest.json); refusing to delete it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    anomaly = None if args.anomaly == "none" else args.anomaly
    try:
        if args.clinic:
            specs = clinic_specs(
                seed=args.seed,
                test_series=args.series or CLINIC_TEST_SERIES,
                validation_series=args.validation_series,
                matrix=args.matrix,
                noise_sigma=args.noise_sigma,
                site=SITES[args.site],
            )
            if args.split:
                specs = [s for s in specs if s.split == args.split]
        elif args.mode == "dataset":
            specs = dataset_specs(
                seed=args.seed,
                large=args.large,
                num_slices=args.slices,
                matrix=args.matrix,
                noise_sigma=args.noise_sigma,
            )
            if args.split:
                specs = [s for s in specs if s.split is not None and s.split.startswith(args.split)]
        else:
            specs = series_specs(
                count=args.series or 1,
                seed=args.seed,
                num_slices=args.slices,
                anomaly=anomaly,
                matrix=args.matrix,
                noise_sigma=args.noise_sigma,
            )
        # Fail on impossible geometry before touching the output folder.
        count_slices(specs[0])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    prepare_output(args.out, args.force)
    command = "gatekeeper " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("gatekeeper") else None
    protocol = "dataset-clinic" if args.clinic else ("dataset-large" if args.large else "dataset")
    meta: dict[str, Any] = {
        "seed": args.seed,
        "protocol": protocol if args.mode else "series",
        "summary": spec_summary(specs),
        "command": command,
    }
    if args.clinic:
        meta["severity_summary"] = severity_summary(specs)
    if args.site != DEFAULT_SITE.name:  # the default site's manifest stays as it was
        meta["site"] = args.site
    manifest = generate_run(specs, args.out, jobs=args.jobs, progress=not args.quiet, meta=meta)
    print_manifest(manifest, args.out)
    return 0


def print_manifest(manifest: dict[str, Any], out: Path) -> None:
    """Print one line per series written: folder, slices, anomaly and the slices it affects."""
    print(f"Wrote {len(manifest['series'])} series under {out} (manifest: {out / 'manifest.json'})")
    print(f"{'folder':34} {'slices':>6} {'spacing':>8} {'anomaly':15} {'severity':9} {'range':15} affected slices")
    for entry in manifest["series"]:
        g = entry["geometry"]
        anomaly = entry["anomaly"]
        affected = "-"
        if anomaly:
            s = anomaly["slices"]
            affected = f"{len(s)} ({s[0]}–{s[-1]})"
        kind = "off_target" if entry["category"] == "off_target" else (anomaly or {}).get("type", "normal")
        grade = (anomaly or {}).get("severity", {}).get("grade", "-")
        print(
            f"{entry['folder']:34} {g['num_slices']:>6} {g['slice_thickness_mm']:>6g}mm "
            f"{kind:15} {grade:9} {entry['scan_range']['kind']:15} {affected}"
        )
