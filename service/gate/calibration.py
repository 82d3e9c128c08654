"""Calibrating the gate on normal series: the references, each signal's normal range, the fused cut.

Leave-one-series-out throughout: each normal's Mahalanobis distance and liver-HU share are measured
against references fitted without it, and the empirical cut uses fused statistics whose centres and
scales were fitted without it, so that the normals do not look more typical than an unseen one. Nothing
is fitted on labelled failures. `calibrate` returns gate.json's fitted fields and the reference;
`service.gate.config.write_gate` writes them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from service.gate.fusion import fused_cut, leave_one_out_fused
from service.gate.observation import Observation, signal_values
from service.gate.reference import Reference, fit_mahalanobis, hu_band
from service.gate.signals import DEFAULT_BANDS, SIGNALS
from service.gate.statistics import SIGNAL_MODEL, TRANSFORMS, SignalSpec, robust_center_scale, z_for

SLICE_QUANTILE = 99.0  # a slice is "where" a signal is when its profile exceeds the normals' 99th percentile

#: Each normal's signal values: signal name → (series value, per-slice profile or None).
SignalValues = dict[str, tuple[float, np.ndarray | None]]


def calibrate(
    observations: Sequence[Observation],
    *,
    false_flag_rate: float,
    shrink: float = 0.1,
) -> tuple[dict[str, Any], Reference]:
    """Fit the references and every signal's calibration on normal series; return (gate.json fields, reference).

    Leave-one-series-out throughout (see the module's docstring).

    Raises:
        ValueError: fewer than 5 observations with a liver, or a false-flag rate outside (0, 0.5).
    """
    if not 0 < false_flag_rate < 0.5:
        raise ValueError(f"false_flag_rate must be in (0, 0.5), got {false_flag_rate}")
    usable = [o for o in observations if o.liver_slices.size > 0]
    if len(usable) < 5:
        raise ValueError(f"calibration needs >= 5 normal series with a liver, got {len(usable)}")
    reference, dim = fit_reference(usable, shrink)
    values = leave_one_out_values(usable, reference, shrink)

    m_signals = [s for s in SIGNALS if sum(math.isfinite(v[s][0]) for v in values) >= 5]
    specs: dict[str, dict[str, Any]] = {}
    transformed: dict[str, np.ndarray] = {}
    for name in m_signals:
        specs[name], transformed[name] = signal_calibration(name, values)

    n_signals = len(m_signals)
    loo_fused = leave_one_out_fused(transformed, len(usable))
    bonferroni, empirical, threshold = fused_cut(loo_fused, n_signals, false_flag_rate)
    for name, spec in specs.items():
        set_thresholds(name, spec, p_cut=10.0**-threshold, false_flag_rate=false_flag_rate)
    loo_rate = float(np.mean(np.array(loo_fused) > threshold))
    band = reference.liver_hu_band
    config = {
        "signals": specs,
        "fusion": {
            "rule": "min_tail_probability",
            "statistic": "-log10(smallest tail probability across signals)",
            "signals": n_signals,
            "bonferroni_threshold": bonferroni,
            "empirical_threshold": empirical,
            "threshold": threshold,
            "loo_false_flag_rate": loo_rate,
        },
        "false_flag_rate": false_flag_rate,
        "bands": {**DEFAULT_BANDS, "liver_hu": [band[0], band[1]]},
        "reference": {"mahalanobis_shrink": shrink, "feature_dim": dim, "series": len(usable)},
    }
    return config, reference


def _pooled_hu_histogram(usable: Sequence[Observation]) -> np.ndarray:
    """The liver HU histogram of all normals together (summed over their slices and series)."""
    pooled: np.ndarray = np.sum([h.sum(axis=0) for o in usable if (h := o.liver_hu_hist) is not None], axis=0)
    return pooled


def _have_features(usable: Sequence[Observation]) -> bool:
    """Whether every normal has the segmenter's features on its liver slices (else no Mahalanobis fit)."""
    return all(o.liver_features is not None and len(o.liver_features) > 0 for o in usable)


def fit_reference(usable: Sequence[Observation], shrink: float) -> tuple[Reference, int]:
    """(The reference fitted on all normals, the feature dimension: 0 without features).

    Without features the Mahalanobis mean and precision are placeholders (zeros(1), eye(1)).
    """
    band = hu_band(_pooled_hu_histogram(usable))
    dim = 0
    if _have_features(usable):
        all_f = np.concatenate([f for o in usable if (f := o.liver_features) is not None])
        mean, precision = fit_mahalanobis(all_f, shrink)
        dim = all_f.shape[1]
    else:
        mean, precision = np.zeros(1), np.eye(1)
    return Reference(mean, precision, band), dim


def leave_one_out_values(usable: Sequence[Observation], reference: Reference, shrink: float) -> list[SignalValues]:
    """Each normal's signal values, measured against references fitted without it.

    `reference` (fitted on all normals) supplies the HU band when the others have no liver voxels, and the
    Mahalanobis placeholders when there are no features.
    """
    feats = [o.liver_features for o in usable]
    have_features = _have_features(usable)
    pooled = _pooled_hu_histogram(usable)
    values: list[SignalValues] = []
    for i, o in enumerate(usable):
        others = [f for j, f in enumerate(feats) if j != i and f is not None]
        own_hist = o.liver_hu_hist
        loo_hist = pooled - own_hist.sum(axis=0) if own_hist is not None else pooled
        loo_band = hu_band(loo_hist) if loo_hist.sum() else reference.liver_hu_band
        if have_features:
            m, prec = fit_mahalanobis(np.concatenate(others), shrink)
            loo_ref = Reference(m, prec, loo_band)
        else:
            loo_ref = Reference(reference.mahalanobis_mean, reference.mahalanobis_precision, loo_band)
        values.append(signal_values(o, loo_ref))
    return values


def signal_calibration(name: str, values: Sequence[SignalValues]) -> tuple[dict[str, Any], np.ndarray]:
    """(gate.json `signals.NAME` without its thresholds, the transformed value of each normal: NaN = not measured).

    The centre and scale are robust (`robust_center_scale`) on the measured normals; the slice threshold is
    the `SLICE_QUANTILE` percentile of the normals' non-zero profile values (all values for `gan_peak`;
    0 for `metal`: any metal pixel marks its slice).
    """
    transform, tails, floor = SIGNAL_MODEL[name]
    t = np.array([TRANSFORMS[transform][0](v[name][0]) for v in values if math.isfinite(v[name][0])])
    center, scale = robust_center_scale(t, floor)
    transformed = np.array(
        [TRANSFORMS[transform][0](v[name][0]) if math.isfinite(v[name][0]) else np.nan for v in values]
    )
    profiles: list[np.ndarray] = [q for v in values if (q := v[name][1]) is not None]
    slice_threshold = None
    if profiles:
        pooled_profile = np.concatenate([q[q > 0] if name != "gan_peak" else q for q in profiles])
        if pooled_profile.size:
            slice_threshold = float(np.percentile(pooled_profile, SLICE_QUANTILE))
    if name == "metal":
        slice_threshold = 0.0
    raw = [v[name][0] for v in values if math.isfinite(v[name][0])]
    spec = {
        "transform": transform,
        "tails": tails,
        "center": center,
        "scale": scale,
        "scale_floor": floor,
        "n": len(t),
        "slice_threshold": slice_threshold,
        "normals": {
            "min": float(np.min(raw)),
            "p50": float(np.median(raw)),
            "p95": float(np.percentile(raw, 95)),
            "max": float(np.max(raw)),
        },
    }
    return spec, transformed


def set_thresholds(name: str, spec: dict[str, Any], *, p_cut: float, false_flag_rate: float) -> None:
    """Add to a signal's gate.json entry the values where it fires: inside the fused gate (tail probability
    `p_cut`) and alone (`false_flag_rate`); the low side too for a two-sided signal."""
    tails = spec["tails"]
    probe = SignalSpec(name, spec["transform"], tails, spec["center"], spec["scale"], spec["n"], 0, None, 0, None, None)
    z_in, z_alone = z_for(p_cut, tails), z_for(false_flag_rate, tails)
    # value_at(+z) is the unusual side for every transform (for log1m a low Dice); value_at(−z) the other.
    spec["threshold"], spec["threshold_alone"] = probe.value_at(z_in), probe.value_at(z_alone)
    if tails == "both":
        spec["threshold_low"], spec["threshold_alone_low"] = probe.value_at(-z_in), probe.value_at(-z_alone)
