"""Numbers of the detector's calibration and evaluation: AUROC, AUPRC, ROC curve, bootstrap CIs,
threshold at a false-flag rate. numpy/scipy only (used by training and by the torch-free evaluation).

Conventions: `neg` are scores of normal series (or slices), `pos` of anomalous ones; a higher score
means more anomalous; a series is flagged when its score is strictly above the threshold.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Area under the ROC curve: P(anomalous scores above normal), ties counted half (Mann–Whitney U).
    NaN when either group is empty."""
    neg, pos = np.asarray(neg, np.float64).ravel(), np.asarray(pos, np.float64).ravel()
    if neg.size == 0 or pos.size == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([neg, pos]))  # average ranks over ties
    r_pos = ranks[neg.size :].sum()
    return float((r_pos - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def auprc(neg: np.ndarray, pos: np.ndarray) -> float:
    """Average precision with the anomalous series as positives."""
    scores = np.concatenate([np.asarray(neg, np.float64).ravel(), np.asarray(pos, np.float64).ravel()])
    labels = np.concatenate([np.zeros(np.size(neg)), np.ones(np.size(pos))])
    order = np.argsort(-scores, kind="mergesort")
    labels = labels[order]
    tp = np.cumsum(labels)
    precision = tp / np.arange(1, labels.size + 1)
    return float((precision * labels).sum() / max(labels.sum(), 1))


def roc_curve(neg: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    neg, pos = np.asarray(neg, np.float64).ravel(), np.asarray(pos, np.float64).ravel()
    thresholds = np.unique(np.concatenate([neg, pos]))[::-1]
    fpr = np.array([0.0] + [float(np.mean(neg >= t)) for t in thresholds])
    tpr = np.array([0.0] + [float(np.mean(pos >= t)) for t in thresholds])
    return fpr, tpr


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float], neg: np.ndarray, pos: np.ndarray, n: int, seed: int = 0
) -> list[float]:
    """95 % percentile-bootstrap interval of `metric(neg, pos)`, resampling each group on its own."""
    neg, pos = np.asarray(neg, np.float64), np.asarray(pos, np.float64)
    if neg.size == 0 or pos.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    vals = [metric(rng.choice(neg, neg.size), rng.choice(pos, pos.size)) for _ in range(n)]
    return [round(float(v), 4) for v in np.nanpercentile(vals, [2.5, 97.5])]


def paired_bootstrap_difference(
    neg_a: npt.ArrayLike, pos_a: npt.ArrayLike, neg_b: npt.ArrayLike, pos_b: npt.ArrayLike, n: int, seed: int = 0
) -> tuple[float, list[float]]:
    """AUROC(a) − AUROC(b) on the same series and its paired 95 % bootstrap interval.

    `neg_a[i]` and `neg_b[i]` (and `pos_a[j]`, `pos_b[j]`) are two methods' scores of the same series;
    every resample draws the same series for both methods, so series difficulty cancels out.

    Raises:
        ValueError: the two methods' score arrays differ in length.
    """
    neg_a, pos_a, neg_b, pos_b = (np.asarray(v, np.float64).ravel() for v in (neg_a, pos_a, neg_b, pos_b))
    if neg_a.size != neg_b.size or pos_a.size != pos_b.size:
        raise ValueError(
            f"paired scores must cover the same series: {neg_a.size}/{neg_b.size} normal, "
            f"{pos_a.size}/{pos_b.size} anomalous."
        )
    diff = auroc(neg_a, pos_a) - auroc(neg_b, pos_b)
    if neg_a.size == 0 or pos_a.size == 0:
        return float("nan"), [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    vals = np.empty(n)
    for k in range(n):
        i = rng.integers(0, neg_a.size, neg_a.size)
        j = rng.integers(0, pos_a.size, pos_a.size)
        vals[k] = auroc(neg_a[i], pos_a[j]) - auroc(neg_b[i], pos_b[j])
    return float(diff), [round(float(v), 4) for v in np.percentile(vals, [2.5, 97.5])]


def threshold_at_false_flag_rate(normal_scores: np.ndarray, rate: float) -> float:
    """Smallest threshold from the data such that at most ⌊rate·n⌋ normal series score above it.

    A series is flagged when its score is strictly greater than the threshold.
    """
    s = np.sort(np.asarray(normal_scores, np.float64))
    allowed = int(np.floor(rate * s.size + 1e-9))
    return float(s[s.size - 1 - allowed])
