"""`gatekeeper evaluate detector`: the detector against its baselines on a labelled phantom split.

Uses the same ONNX Runtime path as `gatekeeper score` (no torch). Needs the phantom
`manifest.json` for ground truth (anomaly type per series, affected slice indices) and each
anomalous series' `ground_truth/anomaly.seg.dcm` (read with highdicom) for localisation.

A *method* is anything that gives, for one `CTSeries`, per-slice scores, a series score and
(optionally) per-slice evidence maps on a square grid in the slice's own image geometry
(`models.detector.evaluation.methods.Scored`). Every detector family scores as a method
(`models/detector/<family>/scoring.py`: the slice recipe's `SliceModel` maps on its input grid, the
patch recipe's `PatchModel` its `PATCH_MAP_SIZE`² z-maps, the autoencoder's `AutoencoderModel`);
`models.detector.family.load_method` picks the family from model.json.
Methods, all scored on the same series in one run, in this report order:

* `detector` — the model under test (`--model`, format 1 or 2);
* `twin` — the conditioned GAN trained with exactly the ablation's recipe (`--ablation-twin`, optional):
  when the detector was trained elsewhere (a GPU run) and its unconditioned twin cannot be
  trained here, the condition is tested on a matched pair (same data, seed, family and budget), and
  the ablation target reads `twin − ablation` instead of `detector − ablation`;
* `ablation` — the same GAN trained without the position condition (`--ablation`, optional;
  `gatekeeper train detector --unconditioned`);
* comparison models (`--compare NAME=DIR`, repeatable, optional): any other detector (e.g. the
  shipped format-1 model `models/detector/default` next to a new format-2 one) or autoencoder folder;
* `autoencoder` — an autoencoder's reconstruction residual (`--autoencoder`, optional;
  `gatekeeper train autoencoder`, plain or `--noise coarse`, the coarse-noise denoising autoencoder);
* `hu_histogram` — a HU-histogram statistic (always), fitted here on the normal training series of
  `--train-data` (default: the same phantom run's `train` split; its threshold on the `validation`
  split), with the detector's slice positions and series aggregation
  (`models.detector.baselines.HistogramBaseline`).

The parts: `evaluation/run.py` (load the methods, score every series, report.json),
`evaluation/statistics.py`, `evaluation/localisation.py`, `evaluation/histogram.py`,
`evaluation/report.py` (report.md) and `evaluation/plots.py`.

Writes to `--out`: report.json, report.md and PNG plots linked from it — ROC curves per anomaly
type (every method), slice-score profiles along the body axis for example series, evidence
heat-maps of the top affected slice of example anomalous series (every method with maps). Reported
per method: series AUROC and AUPRC per anomaly type and overall with bootstrap 95 % CIs, the paired
bootstrap CI of the AUROC difference to the detector, slice-level AUROC, the false-flag rate of the
unseen normals at the method's own threshold (set on validation normals), the scoring time, and
localisation:

    on the highest-scoring affected slice (affected = the anomaly mask, mapped to the method's map
    grid the way preprocessing resizes the image, is not empty), the argmax of the evidence map
    smoothed with a Gaussian (σ = 1 px), searched inside the body mask, lies in the anomaly mask
    dilated by 2 px ("hit_rate", one per series). "chance" is the fraction of the body inside that
    dilated mask (a random body pixel's hit probability). The same test on every affected slice
    gives "slice_hit_rate" (the fraction of anomalous slices localised).

Map grids: the slice recipe's input size, the patch recipe's `PATCH_MAP_SIZE` (128), the
autoencoder's size; the body mask is `imaging.preprocess_slices`' at that grid.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from models.detector import diagnose
from models.detector.evaluation.plots import write_plots
from models.detector.evaluation.report import report_markdown
from models.detector.evaluation.run import METHOD_LABELS, Run, evaluate
from service.errors import UsageError

#: Keys a `--compare` name may not take (the fixed roles and the matched-pair difference).
RESERVED_NAMES = (*METHOD_LABELS, "twin_minus_ablation")


def register(what: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `evaluate detector` to the `evaluate` group of `gatekeeper`."""
    d = what.add_parser(
        "detector",
        help="evaluate an exported detector and its baselines on a phantom split",
        description="Score the test series of a phantom run (manifest.json) with the detector (model.json "
        "format 1 or 2), the HU-histogram baseline and optionally the unconditioned ablation, its "
        "conditioned twin, comparison models and the autoencoder; write report.json, report.md and PNG "
        "plots to --out.",
    )
    d.add_argument("--data", required=True, type=Path, help="phantom run folder with manifest.json")
    d.add_argument("--model", required=True, type=Path, help="model folder (model.json + ONNX files)")
    d.add_argument("--out", required=True, type=Path, help="report folder")
    d.add_argument("--split", default="test", help="manifest split to evaluate (default test)")
    d.add_argument(
        "--ablation",
        type=Path,
        default=None,
        help="model folder of the unconditioned ablation (gatekeeper train detector --unconditioned)",
    )
    d.add_argument(
        "--ablation-twin",
        type=Path,
        default=None,
        help="the conditioned model trained with exactly the ablation's command except --unconditioned; "
        "the ablation is then judged against it (use when --model was trained differently)",
    )
    d.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="another detector (either format) or autoencoder folder scored as a comparison method, e.g. "
        "shipped=models/detector/default; repeatable; NAME defaults to the folder's name",
    )
    d.add_argument(
        "--autoencoder",
        type=Path,
        default=None,
        help="model folder of the autoencoder baseline (gatekeeper train autoencoder [--noise coarse])",
    )
    d.add_argument(
        "--train-data",
        type=Path,
        default=None,
        help="normal series to fit the HU-histogram baseline on: a phantom run (its train split; "
        "threshold on its validation split) or any DICOM tree (default: --data)",
    )
    d.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    d.add_argument(
        "--diagnose",
        action="store_true",
        help="instead of the evaluation: diagnose what hides anomalies from the detector (model input, "
        "reconstruction and residual at the lesion, scores against the normals' band, scan range) on every "
        "phantom series under --data (models/detector/diagnose.py)",
    )
    d.set_defaults(func=run)


def parse_compare(values: list[str]) -> list[tuple[str, Path]]:
    """`--compare` values ("NAME=DIR" or "DIR") → [(name, folder)] in the order given.

    Raises:
        ValueError: a name that is not a plain identifier, is one of `RESERVED_NAMES`, or is used twice.
    """
    out: list[tuple[str, Path]] = []
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or "/" in name:
            folder, name = value, Path(value.rstrip("/")).name
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name):
            raise ValueError(f"--compare {value!r}: name {name!r} must start with a letter (letters, digits, _ . -)")
        if name in RESERVED_NAMES:
            raise ValueError(f"--compare {value!r}: {name!r} is a fixed method name; give NAME=DIR")
        if name in (n for n, _ in out):
            raise ValueError(f"--compare: name {name!r} used twice; give NAME=DIR")
        out.append((name, Path(folder)))
    return out


def write_report(run: Run, out: Path) -> None:
    """report.json, the plots and report.md (which links them) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(run.report, indent=1))
    plots = write_plots(run.report, run.examples, out)
    (out / "report.md").write_text(report_markdown(run.report, plots))


def run(args: argparse.Namespace) -> int:
    """`gatekeeper evaluate detector` (or `--diagnose`): write the report to --out and print report.md."""
    if args.diagnose:
        if not args.data.is_dir():
            raise UsageError(f"--data {args.data} is not a folder")
        try:
            diagnose.run(
                data=args.data, model=args.model, out=args.out, command=shlex.join(["gatekeeper", *sys.argv[1:]])
            )
        except (OSError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        print((args.out / "report.md").read_text())
        return 0
    if args.bootstrap < 10:
        raise UsageError(f"--bootstrap must be >= 10, got {args.bootstrap}")
    try:
        import matplotlib  # noqa: F401 — the plots need it; say so before an hour of scoring
    except ImportError:
        raise UsageError("the evaluation plots need matplotlib: pip install -e '.[train]'") from None
    try:
        result = evaluate(
            args.data,
            args.model,
            args.split,
            args.bootstrap,
            ablation=args.ablation,
            autoencoder=args.autoencoder,
            train_data=args.train_data,
            ablation_twin=args.ablation_twin,
            compare=parse_compare(args.compare),
        )
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    write_report(result, args.out)
    print((args.out / "report.md").read_text())
    return 0
