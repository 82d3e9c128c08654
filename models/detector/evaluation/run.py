"""One evaluation run: load every method, score every series of the split with each, and build
report.json (`evaluate`). What the methods are and what the report says: `models.detector.evaluate`."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from models.detector.autoencoder.scoring import AutoencoderBaseline, AutoencoderModel
from models.detector.baselines import HistogramBaseline, hu_histograms
from models.detector.evaluation import statistics
from models.detector.evaluation.histogram import fit_histogram_baseline
from models.detector.evaluation.localisation import localise
from models.detector.evaluation.methods import DetectorMethod, Method, SeriesInputs, training_summary
from models.detector.family import describe, family_of, load_method
from service import dicom_series

log = logging.getLogger(__name__)

#: Method keys with fixed roles, in report order, with the names the report shows (`--compare`
#: methods come after the ablation, under their own names).
METHOD_LABELS = {
    "detector": "GAN detector",
    "twin": "GAN, conditioned (ablation's recipe)",
    "ablation": "GAN, unconditioned",
    "autoencoder": "conv autoencoder",
    "hu_histogram": "HU histogram",
}


@dataclass
class Panel:
    """One method's evidence on its localisation slice of an example series (the heat-map figure)."""

    label: str
    image: np.ndarray  # the slice, preprocessed [S, S]
    residual: np.ndarray  # the method's map [S, S]
    anomaly: np.ndarray  # the anomaly mask on the grid [S, S]
    localisation: dict[str, Any]


@dataclass
class Example:
    """What the plots show of one series: the detector's profile, every map method's heat map."""

    folder: str
    type: str
    slice_scores: np.ndarray
    affected: list[int]
    panels: list[Panel] = field(default_factory=list)


@dataclass
class Run:
    """Everything one evaluation computed; `report` is what report.json holds."""

    report: dict[str, Any]
    examples: list[Example] = field(default_factory=list)


def load_detector_method(model_dir: Path, label: str, option: str) -> DetectorMethod:
    """`load_method` for an option that needs a GAN detector.

    Raises:
        ValueError: `model_dir` holds an autoencoder (message names `option`).
    """
    method = load_method(model_dir, label)
    if isinstance(method, AutoencoderModel):
        raise ValueError(f"{option} {model_dir} is an autoencoder, not a detector")
    return cast(DetectorMethod, method)  # every family but the autoencoder scores as a detector


def load_methods(
    model: Path,
    *,
    ablation: Path | None,
    ablation_twin: Path | None,
    compare: list[tuple[str, Path]],
    autoencoder: Path | None,
) -> tuple[DetectorMethod, dict[str, Method]]:
    """The detector under test and every method in report order (the detector first), each by its family.

    Raises:
        ValueError: see `evaluate`.
    """
    if ablation_twin is not None and ablation is None:
        raise ValueError("--ablation-twin needs --ablation (the twin is the ablation's conditioned counterpart)")
    detector = load_detector_method(model, METHOD_LABELS["detector"], "--model")
    variant = family_of(detector.meta).variant(detector.meta)
    if variant is not None:
        detector.label += f" ({variant})"
    methods: dict[str, Method] = {"detector": detector}
    if ablation_twin is not None:
        methods["twin"] = load_detector_method(ablation_twin, METHOD_LABELS["twin"], "--ablation-twin")
        if not methods["twin"].meta.get("conditioned", True):
            raise ValueError(f"--ablation-twin {ablation_twin} is unconditioned (model.json conditioned: false)")
    if ablation is not None:
        methods["ablation"] = load_detector_method(ablation, METHOD_LABELS["ablation"], "--ablation")
        if methods["ablation"].meta.get("conditioned", True):
            log.warning("--ablation %s is a conditioned model (model.json conditioned: true)", ablation)
    for name, folder in compare:
        compared = load_method(folder)
        compared.label = f"{name} ({compared.label})"
        methods[name] = compared
    if autoencoder is not None:
        ae = AutoencoderBaseline(autoencoder)
        methods["autoencoder"] = AutoencoderModel(ae, describe(ae.meta), str(autoencoder))
    return detector, methods


def score_entry(
    data: Path,
    entry: dict[str, Any],
    methods: dict[str, Method],
    histogram: HistogramBaseline,
    seconds: dict[str, float],
    examples: dict[str, Example],
) -> dict[str, Any]:
    """Score one manifest entry's series with every method and the HU histogram; return its row.

    Adds each method's scoring time to `seconds`; the first series of each type becomes its `Example`.

    Raises:
        OSError: the series cannot be read. ValueError: the manifest's series is not in its folder.
    """
    groups = dicom_series.ct_series_in(dicom_series.scan_tree(data / entry["folder"]))
    matching = [g for g in groups if g.series_instance_uid == entry["series_instance_uid"]]
    if len(matching) != 1:
        raise ValueError(f"{data / entry['folder']}: series {entry['series_instance_uid']} not found")
    series = dicom_series.load_series(matching[0])
    kind = entry["anomaly"]["type"] if entry.get("anomaly") else "normal"
    affected = sorted(entry["anomaly"]["slices"]) if entry.get("anomaly") else []
    inputs = SeriesInputs(series, data / entry["folder"] / entry["anomaly"]["seg"] if affected else None)
    example = None
    if kind not in examples:
        example = examples[kind] = Example(entry["folder"], kind, np.zeros(0), affected)
    slice_scores: dict[str, np.ndarray] = {}
    series_scores: dict[str, float] = {}
    localisation: dict[str, dict[str, Any] | None] = {}
    main_positions = None
    for name, method in methods.items():
        t1 = time.monotonic()
        scored = method.score(inputs)
        seconds[name] += time.monotonic() - t1
        slice_scores[name], series_scores[name] = scored.slice_scores, scored.series_score
        if name == "detector":
            main_positions = scored.positions
            if example is not None:
                example.slice_scores = scored.slice_scores
        located = None
        if affected and scored.maps is not None:
            images, masks = inputs.slices(scored.grid, scored.window)
            truth = inputs.anomaly(scored.grid)
            located = localise(scored.slice_scores, scored.maps, truth, masks)
            if located is not None and example is not None:
                t = located["slice"]
                example.panels.append(Panel(method.label, images[t], scored.maps[t], truth[t], located))
        localisation[name] = located
        del scored
    assert main_positions is not None  # "detector" is always a method, and detectors have positions
    t1 = time.monotonic()
    slice_scores["hu_histogram"] = histogram.slice_scores(hu_histograms(series.hu), main_positions)
    series_scores["hu_histogram"] = histogram.series_score(slice_scores["hu_histogram"])
    seconds["hu_histogram"] += time.monotonic() - t1
    return {
        "folder": entry["folder"],
        "type": kind,
        "affected": affected,
        "slice_scores": slice_scores,
        "scores": series_scores,
        "localisation": localisation,
    }


def evaluate(
    data: Path,
    model: Path,
    split: str = "test",
    n_boot: int = 1000,
    *,
    ablation: Path | None = None,
    autoencoder: Path | None = None,
    train_data: Path | None = None,
    ablation_twin: Path | None = None,
    compare: list[tuple[str, Path]] | None = None,
) -> Run:
    """Score the `split` series of the phantom run `data` with every method; return the report and plot data.

    `model`, `ablation`, `ablation_twin` are detector folders of any detector family; `compare`
    [(name, folder)] further detectors or autoencoders; `autoencoder` an autoencoder folder.

    Raises:
        OSError: a model, the manifest or a series cannot be read.
        ValueError: no series in the split, a model.json is invalid, a detector option names an
            autoencoder, or no normal training series for the HU histogram (messages name the folder).
    """
    manifest = json.loads((data / "manifest.json").read_text())
    entries = [e for e in manifest["series"] if e.get("split") == split]
    if not entries:
        raise ValueError(f"{data}/manifest.json has no series in split {split!r}")
    detector, methods = load_methods(
        model, ablation=ablation, ablation_twin=ablation_twin, compare=compare or [], autoencoder=autoencoder
    )
    t0 = time.monotonic()
    histogram = fit_histogram_baseline(train_data or data, detector)
    fit_seconds = time.monotonic() - t0
    seconds = dict.fromkeys([*methods, "hu_histogram"], 0.0)
    rows: list[dict[str, Any]] = []
    examples: dict[str, Example] = {}
    t0 = time.monotonic()
    for n, e in enumerate(entries, 1):
        rows.append(score_entry(data, e, methods, histogram, seconds, examples))
        if n % 10 == 0 or n == len(entries):
            log.info("evaluated %d/%d series (%.0f s)", n, len(entries), time.monotonic() - t0)
    report = build_report(
        rows,
        detector=detector,
        methods=methods,
        histogram=histogram,
        seconds=seconds,
        run={"data": str(data), "model": str(model), "split": split, "seconds": round(time.monotonic() - t0, 1)},
        histogram_data=train_data or data,
        fit_seconds=fit_seconds,
        n_boot=n_boot,
    )
    return Run(report, list(examples.values()))


def build_report(
    rows: list[dict[str, Any]],
    *,
    detector: DetectorMethod,
    methods: dict[str, Method],
    histogram: HistogramBaseline,
    seconds: dict[str, float],
    run: dict[str, Any],
    histogram_data: Path,
    fit_seconds: float,
    n_boot: int,
) -> dict[str, Any]:
    """report.json of one run: `run` ({"data", "model", "split", "seconds"}), the detector under test,
    every method's summary, the differences, the targets and one line per series."""
    main_meta = detector.meta
    report: dict[str, Any] = {
        **{k: run[k] for k in ("data", "model", "split")},
        "threshold": detector.threshold,
        "aggregation": detector.aggregation,
        "provider": detector.provider,
        "recipe": main_meta.get("recipe", family_of(main_meta).recipe),
        "model_format": main_meta.get("format"),
        "description": describe(main_meta),
        "family": main_meta.get("family"),
        "size": main_meta.get("size", main_meta.get("patch")),
        "conditioned": main_meta.get("conditioned", True),
        "series": len(rows),
        "normal_series": sum(r["type"] == "normal" for r in rows),
        "seconds": run["seconds"],
        "bootstrap": n_boot,
        "methods": {},
    }
    names = [*methods, "hu_histogram"]
    for name in names:
        threshold = histogram.threshold if name == "hu_histogram" else methods[name].threshold
        summary = statistics.method_summary(rows, name, threshold, n_boot)
        if name == "hu_histogram":
            summary |= {"label": METHOD_LABELS[name], "aggregation": histogram.aggregation}
            summary["model"] = str(histogram_data)
        else:
            m = methods[name]
            summary |= {"label": m.label, "aggregation": m.aggregation, "model": m.source}
            summary["description"] = describe(m.meta)
            summary["training"] = training_summary(m.meta)
        summary["scoring_seconds"] = round(seconds[name], 2)
        report["methods"][name] = summary
    main = report["methods"]["detector"]
    # The fields of the first report format (main detector only), kept for readers of report.json.
    report["per_type"] = main["per_type"]
    report["slice_auroc"] = main["slice_auroc"]
    report["false_flag_rate_normals"] = main["false_flag_rate_normals"]
    report["differences"] = statistics.differences(rows, names, n_boot)
    report["targets"] = statistics.targets(report)
    report["hu_histogram_fit"] = histogram.as_dict() | {"data": str(histogram_data), "seconds": round(fit_seconds, 1)}
    report["position_quality_validation"] = main_meta.get("metrics", {}).get("position_quality_validation", {})
    report["model_training"] = {k: main_meta.get("training", {}).get(k) for k in ("command", "device_name", "steps")}
    report["rows"] = [
        {
            "folder": r["folder"],
            "type": r["type"],
            "scores": {k: round(float(v), 5) for k, v in r["scores"].items()},
            "score": round(float(r["scores"]["detector"]), 5),
            "flagged": bool(r["scores"]["detector"] > detector.threshold),
            "localisation": {k: v for k, v in r["localisation"].items() if v is not None},
        }
        for r in rows
    ]
    return report
