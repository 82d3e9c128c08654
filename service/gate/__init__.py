"""The gate's decision: every piece of evidence on one series, each calibrated on normals, fused into one route.

This package owns the fusion (issue 15). The pipeline segments every series, then asks the gate:

    gate = Gate.load(folder)                       # gate.json (+ the files it names), or Gate.rules_only()
    assessment = gate.assess(series=ct, segmenter=segmenter, detector=evidence, geometry_findings=findings)
    assessment.segmentation                        # the segmenter's result (sent, or kept as a draft)
    assessment.decision.manual                     # True: worklist; False: the SEG goes to the PACS
    assessment.decision.findings                   # every signal, its value, threshold, slices, plain words

Evidence (`SIGNALS`; each measured by `observe` + `signal_values`, one number per series plus, where it has
one, a profile along the slices that says where):

* `gan_score`, `gan_peak` — the GAN detector's series score and its largest slice score;
* `entropy` — the segmenter's mean binary entropy around its liver;
* `mahalanobis` — mean Mahalanobis distance of the segmenter's bottleneck features on the liver slices to
  the normal series' liver slices (mean and shrunk-covariance precision in the reference `.npz`);
* `tta_dice` — the smallest pairwise Dice between the segmentation and test-time views of the same series
  (left-right flip, a small shift: each view is one more pass of the segmenter at its 128² input);
* `liver_volume`, `liver_extent` — the liver's volume (ml) and cranio-caudal extent (mm), two-sided;
* `liver_pieces` — the share of the thresholded probability outside its largest 3-D connected piece;
* `metal` — pixels above `bands.metal_hu` (2,000 HU; normal bodies stay below ~1,355 HU; stents
  2,400–2,800, hip prostheses more);
* `liver_hu` — the share of (eroded) liver voxels outside the normal liver's HU band (3×3 mean);
* `fluid_border` — the share of a 10 mm rim around the liver, inside the body, at fluid density.

Off-target rules (plain thresholds in gate.json `rules`, each its own `RouteReason`): not an abdominal
CT (the body's median cross-section is small, as in a head or a limb, or bone makes up too much of it,
as in a head), no liver in the field of view, a liver cut by the first or the last slice. The rules that
existed stay: ingest geometry findings, and (only in `Gate.rules_only()` unless gate.json asks for it)
the detector's own flag.

Fusion (`fuse`): each signal's value is transformed (log for positive, skewed ones) and turned into a
z-score against the normal validation series (median, and the larger of 1.4826·MAD and the standard
deviation as the scale, with a floor so that a signal constant on normals — metal — does not fire on noise); its tail probability is the Gaussian
upper tail (both tails for volume and extent). The fused statistic is −log10 of the smallest tail
probability across the signals. Why: the pieces of evidence see different failures (metal sees a stent,
fluid_border sees ascites, tta_dice sees the segmenter's instability), so an OR over calibrated signals
keeps each one's sensitivity, where an average would dilute a single strong signal among many quiet
ones. The cut is Bonferroni's −log10(false_flag_rate / number of signals), raised to the empirical
(1 − false_flag_rate) quantile of the leave-one-out fused statistic on the calibration normals when
that is higher (the Gaussian tails are an approximation; the normals have the last word). Nothing is
fitted on labelled failures. The calibration (`calibrate`) and the thresholds live in a versioned
`gate.json` (`models/gate/default/gate.json`, written by `gatekeeper calibrate gate`).

No patient data here: values, slice indices and UIDs only.

The package, one idea per module (each module imports only modules listed above it):

* `findings` — what the pipeline and the web app read: `DetectorEvidence`, `Finding`, `GateDecision`;
* `signals` — `SIGNALS` and the measurements on arrays (metal, agreement, pieces, extent, body, HU, rim);
* `views` — the test-time views (shift, zoom, flip) run through the segmenter;
* `reference` — the references fitted on normals (Mahalanobis, the liver's HU band);
* `observation` — measuring one series (`observe`) and each signal's value (`signal_values`);
* `statistics` — transforms, robust normal ranges, Gaussian tails, `SignalSpec`;
* `fusion` — the fused statistic and its cut;
* `calibration` — `calibrate` on normal series;
* `rules` — the plain off-target, geometry and detector-flag rules;
* `config` — gate.json: checks, reading (with its reference), writing, version;
* `words` — findings in words;
* `decision` — `Gate` and `Assessment`: a series in, its route out.

Every name below is re-exported here, so `from service.gate import Gate` is the way in.
"""

from service.gate.calibration import (
    SLICE_QUANTILE,
    calibrate,
)
from service.gate.config import (
    GATE_FORMAT,
    KIND,
    REFERENCE_FILE,
    content_version,
    file_version,
    read_config,
    read_reference,
    validate_config,
    write_gate,
)
from service.gate.decision import (
    Assessment,
    Gate,
)
from service.gate.findings import (
    DetectorEvidence,
    Finding,
    GateDecision,
)
from service.gate.fusion import (
    fuse,
)
from service.gate.observation import (
    Observation,
    observe,
    signal_values,
)
from service.gate.reference import (
    Reference,
    fit_mahalanobis,
    hu_band,
    liver_hu_outside,
)
from service.gate.rules import (
    DEFAULT_RULES,
    geometry_finding,
    no_liver_finding,
)
from service.gate.signals import (
    BODY_HU,
    BONE_HU,
    DEFAULT_BANDS,
    HU_BINS,
    SIGNALS,
    body_composition,
    end_ratio,
    fluid_rim,
    liver_extent_mm,
    liver_hu_histogram,
    metal_pixels,
    pairwise_agreement,
    probability_pieces,
)
from service.gate.statistics import (
    DECREASING,
    SIGNAL_MODEL,
    TAILS,
    TRANSFORMS,
    SignalSpec,
    robust_center_scale,
    tail_probability,
    z_for,
)
from service.gate.views import (
    DEFAULT_VIEWS,
    SHIFT_FRACTION,
    VIEWS,
    ZOOM,
)
from service.gate.words import (
    signal_words,
    slice_run,
)

__all__ = [
    "Assessment",
    "BODY_HU",
    "BONE_HU",
    "DECREASING",
    "DEFAULT_BANDS",
    "DEFAULT_RULES",
    "DEFAULT_VIEWS",
    "DetectorEvidence",
    "Finding",
    "GATE_FORMAT",
    "Gate",
    "GateDecision",
    "HU_BINS",
    "KIND",
    "Observation",
    "REFERENCE_FILE",
    "Reference",
    "SHIFT_FRACTION",
    "SIGNALS",
    "SIGNAL_MODEL",
    "SLICE_QUANTILE",
    "SignalSpec",
    "TAILS",
    "TRANSFORMS",
    "VIEWS",
    "ZOOM",
    "body_composition",
    "calibrate",
    "content_version",
    "end_ratio",
    "file_version",
    "fit_mahalanobis",
    "fluid_rim",
    "fuse",
    "geometry_finding",
    "hu_band",
    "liver_extent_mm",
    "liver_hu_histogram",
    "liver_hu_outside",
    "metal_pixels",
    "no_liver_finding",
    "observe",
    "pairwise_agreement",
    "probability_pieces",
    "read_config",
    "read_reference",
    "robust_center_scale",
    "signal_values",
    "signal_words",
    "slice_run",
    "tail_probability",
    "validate_config",
    "write_gate",
    "z_for",
]
