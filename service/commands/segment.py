"""`gatekeeper segment SERIES_DIR --out FILE.dcm [--format seg|rtstruct]`: segment the liver in one CT series.

Uses the configured segmenter (ONNX Runtime only; default: the model shipped in
models/segmenter/default, or `--model DIR` for any model that follows the contract in
`service.segmentation`) and writes the liver as a DICOM-SEG (`--format seg`, the default) or as
an RT Structure Set with one ROI (`--format rtstruct`; ROI name `--roi-name`, default the
`rtstruct_roi_name` setting's default "Liver"). Exit 0: file written. Exit 1: the segmenter found
no liver (nothing written). Exit 2: bad input (no CT series, several without `--series`,
unreadable series, a DICOM file without its SOP Instance or Series Instance UID — the message names
the file and the attribute —, an unknown `--format`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pydicom

from service import dicom_series
from service.errors import UsageError

log = logging.getLogger(__name__)

EXIT_NO_LIVER = 1
# --format: what `segment` writes.
FORMATS = ("seg", "rtstruct")
# The default ROIName of the liver in an RT Structure Set (the `rtstruct_roi_name` setting's default).
DEFAULT_ROI_NAME = "Liver"


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment the liver in one CT series and write a DICOM-SEG or an RT Structure Set",
        description="Run the liver segmenter (ONNX Runtime) on one CT series in SERIES_DIR and write the result "
        "to --out as a DICOM Segmentation (BINARY, segment Liver, AUTOMATIC) or, with --format rtstruct, as an "
        "RT Structure Set (one ROI of closed planar contours).",
    )
    p.add_argument("series_dir", type=Path, metavar="SERIES_DIR", help="folder holding the CT series' files")
    p.add_argument("--out", required=True, type=Path, help="DICOM file to write")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="seg",
        help="seg: DICOM Segmentation (default); rtstruct: RT Structure Set",
    )
    p.add_argument(
        "--roi-name",
        default=DEFAULT_ROI_NAME,
        help=f"ROIName of the liver with --format rtstruct (default {DEFAULT_ROI_NAME!r})",
    )
    p.add_argument("--model", type=Path, default=None, help="segmenter folder (model.json + ONNX; default: shipped)")
    p.add_argument("--series", default=None, metavar="UID", help="SeriesInstanceUID, if SERIES_DIR holds several")
    p.add_argument(
        "--series-version",
        type=int,
        default=1,
        help="reception version of the series (part of the SEG's deterministic UIDs; default 1)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from service.dicom_rtstruct import build_liver_rtstruct, check_lo
    from service.dicom_seg import build_liver_seg
    from service.segmentation import DEFAULT_MODEL_DIR, Segmenter

    if not args.series_dir.exists():
        raise UsageError(f"{args.series_dir}: no such folder")
    if args.series_version < 1:
        raise UsageError(f"--series-version must be >= 1, got {args.series_version}")
    try:
        roi_name = check_lo("--roi-name", args.roi_name.strip())
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        groups = dicom_series.ct_series_in(dicom_series.scan_tree_strict(args.series_dir))
    except dicom_series.UnidentifiedFilesError as exc:
        raise UsageError(str(exc)) from None
    if args.series:
        groups = [g for g in groups if g.series_instance_uid == args.series]
    if not groups:
        raise UsageError(f"{args.series_dir}: no CT image series" + (f" with UID {args.series}" if args.series else ""))
    if len(groups) > 1:
        raise UsageError(f"{args.series_dir}: {len(groups)} CT series; choose one with --series UID")
    try:
        series = dicom_series.load_series(groups[0])
    except dicom_series.SeriesError as exc:
        raise UsageError(str(exc)) from None
    model_dir = args.model or DEFAULT_MODEL_DIR
    try:
        segmenter = Segmenter(model_dir)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise UsageError(f"segmenter {model_dir}: {exc}") from None
    result = segmenter.segment(series)
    if not result.mask.any():
        log.error("no liver found in the series; nothing written")
        return EXIT_NO_LIVER
    by_uid = {i.sop_instance_uid: i.path for i in groups[0].instances}
    sources = [pydicom.dcmread(by_uid[uid]) for uid in series.sop_instance_uids]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "rtstruct":
        rtstruct = build_liver_rtstruct(
            source_images=sources,
            mask=result.mask,
            algorithm_name=segmenter.name[:64],
            algorithm_version=segmenter.version[:64],
            source_series_version=args.series_version,
            roi_name=roi_name,
        )
        rtstruct.save_as(args.out, enforce_file_format=True)
    else:
        seg = build_liver_seg(
            source_images=sources,
            mask=result.mask,
            algorithm_name=segmenter.name,
            algorithm_version=segmenter.version,
            source_series_version=args.series_version,
        )
        seg.save_as(args.out)
    slices = result.liver_slices()
    print(
        f"{args.out}: liver on slices {slices.min() + 1}–{slices.max() + 1} of {series.num_slices}, "
        f"{result.liver_volume_ml:.0f} ml, segmenter {segmenter.name} {segmenter.version}"
    )
    return 0
