"""Which series a person should contour next: active learning ranked by the value of a manual contour.

`gatekeeper pool suggest --budget K [--strategy NAME]` ranks the CT series that were processed and
have no returned contour yet (auto-routed, withheld, or open / claimed on the worklist) by the
expected value of a manual contour for the segmenter's next fine-tune (`models/active_learning/`):

- `gan`: the detector's series score ÷ its threshold (`SeriesScore`): the more unusual the series,
  the more the segmenter may learn from it;
- `gate`: the gate's fused evidence ÷ its threshold (the `gate` decision the pipeline stored with
  the series' events or worklist item): how surely the gate thinks the segmenter fails there;
- `entropy`: the segmenter's own uncertainty, its mean binary entropy near the liver (the gate's
  `entropy` finding; computed with the ONNX segmenter when it was not stored);
- `diverse`: coverage of the detector's latent space (k-center greedy): each next series is the one
  farthest from every series chosen before it, in the encoder's series embedding (the mean and
  spread of its slices' latent vectors, `encoder.onnx`; the segmenter's bottleneck features for a
  detector without one); the score is that distance;
- `random`: a seeded draw, the baseline of the label-efficiency experiment.

A series without the evidence a strategy reads (never scored, rules-only gate) comes last with
score None. The ranking functions take plain `Candidate` records, so the experiment in
`models/active_learning/curve.py` ranks its phantom pool with the same code. ONNX Runtime only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db.tables import PoolEntry, Series, SeriesEvent, SeriesScore, WorklistItem, WorklistStatus
from service.lifecycle import SeriesState

if TYPE_CHECKING:
    from service.dicom_series import CTSeries
    from service.segmentation import Segmenter
    from service.settings import Settings

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = ("gan", "gate", "entropy", "diverse", "random")
#: Series states after the pipeline decided (the evidence is stored) and before a contour came back.
CANDIDATE_STATES: tuple[str, ...] = tuple(
    s.value
    for s in (
        SeriesState.EXPORTING,
        SeriesState.DELIVERED,
        SeriesState.EXPORT_FAILED,
        SeriesState.WITHHELD,
        SeriesState.WORKLISTED,
        SeriesState.CLAIMED,
    )
)
#: Worklist items still waiting for a person ("most informative first" sorts these).
OPEN_WORKLIST = (WorklistStatus.OPEN.value, WorklistStatus.CLAIMED.value)


@dataclass(frozen=True)
class Candidate:
    """One series that a person could contour, with the evidence the strategies read (None: not known).

    Attributes:
        series_instance_uid: the DICOM SeriesInstanceUID.
        series_id: the `Series` row (None outside the database, e.g. the phantom experiment).
        worklist_status: its worklist item's status, None when it is not on the worklist.
        detector_score, detector_threshold: the detector's series score and threshold.
        gate_fused, gate_fused_threshold: the gate's fused statistic (−log10 p) and its threshold.
        entropy: the segmenter's mean binary entropy near the liver (nats).
        embedding: the series' vector in the detector's latent space (or the segmenter's features).
    """

    series_instance_uid: str
    series_id: int | None = None
    series_version: int = 1
    worklist_status: str | None = None
    detector_score: float | None = None
    detector_threshold: float | None = None
    gate_fused: float | None = None
    gate_fused_threshold: float | None = None
    entropy: float | None = None
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Suggestion:
    """One ranked series: `rank` 1 is the one to contour first; `score` is what the strategy ranked by."""

    series_instance_uid: str
    series_id: int | None
    rank: int
    score: float | None
    strategy: str
    evidence: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "series_instance_uid": self.series_instance_uid,
            "series_id": self.series_id,
            "rank": self.rank,
            "score": self.score,
            "strategy": self.strategy,
            "evidence": self.evidence,
        }


# --- scores per strategy (one function each) ----------------------------------------------------------


def _ratio(value: float | None, threshold: float | None) -> float:
    if value is None or not math.isfinite(value):
        return math.nan
    if threshold is None or not math.isfinite(threshold) or threshold <= 0:
        return float(value)
    return float(value) / float(threshold)


def gan_scores(candidates: Sequence[Candidate]) -> np.ndarray:
    """The detector's series score ÷ threshold per candidate (NaN: never scored); higher: contour first."""
    return np.array([_ratio(c.detector_score, c.detector_threshold) for c in candidates], float)


def gate_scores(candidates: Sequence[Candidate]) -> np.ndarray:
    """The gate's fused evidence ÷ its threshold per candidate (NaN: no calibrated gate decided it)."""
    return np.array([_ratio(c.gate_fused, c.gate_fused_threshold) for c in candidates], float)


def entropy_scores(candidates: Sequence[Candidate]) -> np.ndarray:
    """The segmenter's uncertainty (mean binary entropy near the liver, nats) per candidate (NaN: unknown)."""
    return np.array([math.nan if c.entropy is None else float(c.entropy) for c in candidates], float)


def random_scores(candidates: Sequence[Candidate], *, seed: int = 0) -> np.ndarray:
    """A seeded uniform draw per candidate: the random baseline (same seed and pool, same order)."""
    return np.random.default_rng([seed, 0x5A3]).random(len(candidates))


def k_center_greedy(
    features: np.ndarray, budget: int, *, centres: np.ndarray | None = None
) -> tuple[list[int], list[float]]:
    """Pick `budget` rows of `features` [n, d] that cover the set: each next row is the farthest from all picked.

    `centres` [m, d]: rows already covered (e.g. series already contoured); without them the first pick
    is the row farthest from the mean. Features are standardised per column first (z-scores over the
    rows and centres together), distances Euclidean.

    Returns:
        (row indices in pick order, the distance of each pick to its nearest earlier centre).

    Raises:
        ValueError: `features` is not 2-D, `centres` has another width, or `budget` < 1.
    """
    if features.ndim != 2:
        raise ValueError(f"features must be 2-D [n, d], got shape {features.shape}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    known = np.zeros((0, features.shape[1])) if centres is None else np.asarray(centres, float)
    if known.ndim != 2 or known.shape[1] != features.shape[1]:
        raise ValueError(f"centres must be [m, {features.shape[1]}], got shape {known.shape}")
    everything = np.concatenate([features.astype(float), known])
    mean, scale = everything.mean(0), everything.std(0)
    scale[scale < 1e-12] = 1.0
    x = (features - mean) / scale
    if len(known):
        nearest = np.min(np.linalg.norm(x[:, None] - ((known - mean) / scale)[None], axis=2), axis=1)
    else:
        nearest = np.linalg.norm(x, axis=1)  # distance to the mean: the first pick is the most atypical row
    picks: list[int] = []
    distances: list[float] = []
    for _ in range(min(budget, len(x))):
        i = int(np.argmax(nearest))
        picks.append(i)
        distances.append(float(nearest[i]))
        nearest = np.minimum(nearest, np.linalg.norm(x - x[i], axis=1))
        nearest[picks] = -1.0
    return picks, distances


def diverse_scores(candidates: Sequence[Candidate], budget: int, *, centres: np.ndarray | None = None) -> np.ndarray:
    """k-center greedy over the candidates' embeddings: the pick distance for the first `budget`
    picks (decreasing), then −1 … for the rest in pick order; NaN for a candidate without embedding."""
    scores = np.full(len(candidates), math.nan)
    have = [i for i, c in enumerate(candidates) if c.embedding is not None]
    if not have:
        return scores
    features = np.stack([np.asarray(candidates[i].embedding, float).ravel() for i in have])
    picks, distances = k_center_greedy(features, len(have), centres=centres)
    for order, (row, distance) in enumerate(zip(picks, distances)):
        # Beyond the budget the order still is the greedy one; the score says "not in this batch".
        scores[have[row]] = distance if order < budget else -1.0 - order
    return scores


# --- ranking ----------------------------------------------------------------------------------------


def check_request(*, strategy: str, budget: int) -> None:
    """Raises ValueError naming the field when `strategy` or `budget` is not usable."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")


def strategy_scores(
    candidates: Sequence[Candidate], *, strategy: str, budget: int, seed: int = 0, centres: np.ndarray | None = None
) -> np.ndarray:
    """The score of every candidate under `strategy` (higher: contour first; NaN: no evidence).

    Raises:
        ValueError: an unknown strategy or a budget < 1.
    """
    check_request(strategy=strategy, budget=budget)
    by_name: dict[str, Callable[[], np.ndarray]] = {
        "gan": lambda: gan_scores(candidates),
        "gate": lambda: gate_scores(candidates),
        "entropy": lambda: entropy_scores(candidates),
        "diverse": lambda: diverse_scores(candidates, budget, centres=centres),
        "random": lambda: random_scores(candidates, seed=seed),
    }
    return by_name[strategy]()


def evidence_of(c: Candidate) -> dict[str, Any]:
    """What is known about a candidate, for a person reading the suggestion (no patient data)."""

    def num(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else round(float(x), 4)

    return {
        "series_version": c.series_version,
        "worklist_status": c.worklist_status,
        "detector_score": num(c.detector_score),
        "detector_threshold": num(c.detector_threshold),
        "gate_fused": num(c.gate_fused),
        "gate_fused_threshold": num(c.gate_fused_threshold),
        "entropy": num(c.entropy),
        "embedding": c.embedding is not None,
    }


def rank(
    candidates: Sequence[Candidate],
    *,
    strategy: str,
    budget: int,
    seed: int = 0,
    centres: np.ndarray | None = None,
) -> list[Suggestion]:
    """The first `budget` candidates under `strategy`, best first; ties and missing evidence by UID.

    Raises:
        ValueError: an unknown strategy or a budget < 1.
    """
    scores = strategy_scores(candidates, strategy=strategy, budget=budget, seed=seed, centres=centres)
    order = sorted(
        range(len(candidates)),
        key=lambda i: (
            math.isnan(scores[i]),
            -scores[i] if not math.isnan(scores[i]) else 0.0,
            candidates[i].series_instance_uid,
        ),
    )
    out = []
    for position, i in enumerate(order[:budget], start=1):
        value = None if math.isnan(scores[i]) else round(float(scores[i]), 6)
        c = candidates[i]
        out.append(Suggestion(c.series_instance_uid, c.series_id, position, value, strategy, evidence_of(c)))
    return out


def informativeness(*, detail: dict[str, Any] | None, score: float | None, threshold: float | None) -> float | None:
    """ "Most informative first" for the worklist, from what the item stores: the gate's fused evidence ÷
    threshold when a calibrated gate decided, else the detector's score ÷ threshold; None: neither."""
    fused, fused_threshold, _ = gate_evidence(detail)
    value = _ratio(fused, fused_threshold)
    if math.isnan(value):
        value = _ratio(score, threshold)
    return None if math.isnan(value) else value


# --- what the pipeline stored ------------------------------------------------------------------------


def gate_evidence(detail: dict[str, Any] | None) -> tuple[float | None, float | None, float | None]:
    """(fused, fused threshold, segmenter entropy) from an event's or worklist item's `detail["gate"]`."""
    gate = (detail or {}).get("gate")
    if not isinstance(gate, dict):
        return None, None, None
    entropy = None
    for finding in gate.get("findings") or []:
        if isinstance(finding, dict) and finding.get("signal") == "entropy" and finding.get("value") is not None:
            entropy = float(finding["value"])
    fused, threshold = gate.get("fused"), gate.get("fused_threshold")
    return (
        None if fused is None else float(fused),
        None if threshold is None else float(threshold),
        entropy,
    )


def pool_candidates(*, session: Session) -> list[Candidate]:
    """Every processed CT series version without a (current) returned contour, with its stored evidence.

    Included: not superseded, state in `CANDIDATE_STATES`, no `PoolEntry` that is not superseded, and
    either not on the worklist or an open / claimed item (a "done" item waits for its contour).
    Evidence: the newest `SeriesScore`; the newest gate decision of its worklist item or events.
    """
    contoured = select(PoolEntry.series_id).where(PoolEntry.superseded.is_(False))
    found = session.execute(
        select(Series, WorklistItem)
        .outerjoin(WorklistItem, WorklistItem.series_id == Series.id)
        .where(
            Series.modality == "CT",
            Series.superseded.is_(False),
            Series.state.in_(CANDIDATE_STATES),
            Series.id.not_in(contoured),
        )
        .order_by(Series.id)
    ).all()
    rows: list[tuple[Series, WorklistItem | None]] = [
        (s, w) for s, w in found if w is None or w.status in OPEN_WORKLIST
    ]
    ids = [s.id for s, _ in rows]
    if not ids:
        return []
    scores: dict[int, SeriesScore] = {}
    for score in session.scalars(
        select(SeriesScore).where(SeriesScore.series_id.in_(ids)).order_by(SeriesScore.created_at, SeriesScore.id)
    ):
        scores[score.series_id] = score
    gates: dict[int, dict[str, Any]] = {}
    for series_id, detail in session.execute(
        select(SeriesEvent.series_id, SeriesEvent.detail).where(SeriesEvent.series_id.in_(ids)).order_by(SeriesEvent.id)
    ):
        if isinstance(detail, dict) and isinstance(detail.get("gate"), dict):
            gates[series_id] = detail
    out = []
    for series, item in rows:
        detail = item.detail if item is not None and isinstance((item.detail or {}).get("gate"), dict) else None
        fused, fused_threshold, entropy = gate_evidence(detail or gates.get(series.id))
        latest = scores.get(series.id)
        out.append(
            Candidate(
                series_instance_uid=series.series_instance_uid,
                series_id=series.id,
                series_version=series.version,
                worklist_status=item.status if item is not None else None,
                detector_score=float(latest.score) if latest is not None else None,
                detector_threshold=float(latest.threshold) if latest is not None else None,
                gate_fused=fused,
                gate_fused_threshold=fused_threshold,
                entropy=entropy,
            )
        )
    return out


# --- what is computed when it was not stored (ONNX Runtime) -------------------------------------------


class SeriesEmbedder:
    """The series' vector in the detector's latent space: `encoder.onnx` (image, position → z) on every
    body slice, then the mean and the standard deviation of z over them ([2 · z_dim]).

    A detector without an encoder (the patch recipe) gives way to the segmenter's bottleneck features
    (mean and standard deviation over the slices with liver, or all slices when it finds none).
    """

    def __init__(self, *, detector_dir: Path, segmenter: Segmenter | None) -> None:
        import onnxruntime as ort

        from service.inference import Detector, read_model_json

        self.segmenter = segmenter
        self.detector: Detector | None = None
        self.encoder: Any = None
        meta = read_model_json(Path(detector_dir))
        encoder_file = (meta.get("files") or {}).get("encoder")
        if meta.get("format") == 1 and encoder_file and (Path(detector_dir) / encoder_file).is_file():
            self.detector = Detector(detector_dir)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            self.encoder = ort.InferenceSession(
                str(Path(detector_dir) / encoder_file), options, providers=["CPUExecutionProvider"]
            )
            self.source = "detector_latent"
        elif segmenter is not None:
            self.source = "segmenter_features"
        else:
            raise ValueError(f"{detector_dir}: the detector has no encoder.onnx and no segmenter was given")

    def embed(self, series: CTSeries) -> np.ndarray:
        """The series' embedding (float32, 1-D)."""
        from service import imaging

        if self.detector is not None:
            images, masks = imaging.preprocess_slices(series.hu, self.detector.size, self.detector.window)
            positions = self.detector.positions(images, series.locations_mm)
            z = np.concatenate(
                [
                    self.encoder.run(
                        ["z"],
                        {
                            "image": np.ascontiguousarray(images[i : i + 32, None], np.float32),
                            "position": np.ascontiguousarray(positions[i : i + 32], np.float32),
                        },
                    )[0]
                    for i in range(0, len(images), 32)
                ]
            )
            body = masks.mean(axis=(1, 2)) > 0.05
            z = z[body] if body.any() else z
        else:
            assert self.segmenter is not None
            segmentation = self.segmenter.segment(series)
            if segmentation.features is None:
                raise ValueError(f"segmenter {self.segmenter.version} has no 'features' output to embed with")
            liver = segmentation.liver_slices()
            z = segmentation.features[liver] if len(liver) else segmentation.features
        return np.concatenate([z.mean(0), z.std(0)]).astype(np.float32)


def fill_missing(
    candidates: Sequence[Candidate],
    *,
    strategy: str,
    load: Callable[[Candidate], CTSeries],
    settings: Settings,
) -> list[Candidate]:
    """The candidates with what `strategy` needs and the database did not hold, computed from the series.

    `entropy`: the ONNX segmenter's entropy where none was stored. `diverse`: every candidate's
    embedding (`SeriesEmbedder`). A series that cannot be read keeps its gap (logged) and ranks last.
    """
    if strategy not in ("entropy", "diverse"):
        return list(candidates)
    from service.dicom_series import SeriesError
    from service.segmentation import Segmenter

    todo = [c for c in candidates if (c.entropy is None if strategy == "entropy" else c.embedding is None)]
    if not todo:
        return list(candidates)
    segmenter = Segmenter(settings.segmenter_model_dir)
    embedder = (
        SeriesEmbedder(detector_dir=settings.detector_model_dir, segmenter=segmenter) if strategy == "diverse" else None
    )
    filled: dict[str, Candidate] = {}
    for c in todo:
        try:
            series = load(c)
        except (SeriesError, OSError) as exc:
            log.warning("series id %s cannot be read to rank it: %s", c.series_id, exc)
            continue
        if embedder is not None:
            filled[c.series_instance_uid] = replace(c, embedding=embedder.embed(series))
        else:
            filled[c.series_instance_uid] = replace(c, entropy=segmenter.segment(series).entropy)
    return [filled.get(c.series_instance_uid, c) for c in candidates]


def suggest(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    strategy: str,
    budget: int,
    seed: int = 0,
) -> list[Suggestion]:
    """The `budget` series a person should contour first under `strategy` (see the module docstring).

    Raises:
        ValueError: an unknown strategy or a budget < 1 (before the database is read).
    """
    check_request(strategy=strategy, budget=budget)
    from service.pipeline import instance_paths, load_stored_series

    with sessions() as session:
        candidates = pool_candidates(session=session)

    def load(c: Candidate) -> CTSeries:
        assert c.series_id is not None
        with sessions() as session:
            paths = instance_paths(session=session, storage_dir=settings.storage_dir, series_id=c.series_id)
        return load_stored_series(paths.values())

    candidates = fill_missing(candidates, strategy=strategy, load=load, settings=settings)
    return rank(candidates, strategy=strategy, budget=budget, seed=seed)
