"""Stage 2 — train the site's detector and fine-tune the active segmenter on the site's contours.

Both go through the project's own trainers: the detector through `gatekeeper train detector` (the
command's parser and function, so the recipe, its options and its model.json are those of that
command), the segmenter through `models.segmenter.train.fit_and_export` as `train segmenter --pool`
does. Their training data are *views*: folders of symbolic links to the site's files (plus, for the
detector, a manifest that names each series' split), so that a trainer sees exactly the series of its
role and nothing is copied.

A stage whose model.json exists is done (a stopped run resumes); a stopped detector run continues
from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.commission.split import Split
from service import dicom_series
from service.errors import UsageError

log = logging.getLogger(__name__)


def link_view(target: Path, groups: Iterable[dicom_series.SeriesFiles], extra_files: Iterable[Path] = ()) -> int:
    """Fill `target` with symbolic links to every file of `groups` (one sub-folder per series) and
    `extra_files` (contour objects); return the number of links. Existing links are kept."""
    n = 0
    for g in groups:
        folder = target / g.series_instance_uid
        folder.mkdir(parents=True, exist_ok=True)
        for i, inst in enumerate(sorted(g.instances, key=lambda i: str(i.path))):
            link = folder / f"{i:06d}.dcm"
            if not link.is_symlink():
                os.symlink(inst.path.resolve(), link)
            n += 1
    contours = target / "contours"
    for i, path in enumerate(sorted(set(extra_files), key=str)):
        contours.mkdir(parents=True, exist_ok=True)
        link = contours / f"{i:06d}.dcm"
        if not link.is_symlink():
            os.symlink(Path(path).resolve(), link)
        n += 1
    return n


def _parse(argv: list[str]) -> argparse.Namespace:
    """`argv` parsed by the `gatekeeper` parser itself (the command and its defaults as a user gets them)."""
    from service.commands.main import build_parser

    return build_parser().parse_args(argv)


@dataclass(frozen=True)
class DetectorRecipe:
    """How the site's detector is trained: the shipped detector's family and size unless told otherwise."""

    family: str
    size: int
    position: str
    minutes: float
    steps: int | None  # cap of every phase's steps (a smoke test), None: the time budget alone
    batch: int
    false_flag_rate: float

    @classmethod
    def like(
        cls,
        shipped: Mapping[str, Any],
        *,
        family: str | None,
        size: int | None,
        minutes: float,
        steps: int | None,
        batch: int,
    ) -> DetectorRecipe:
        return cls(
            family=str(family or shipped.get("family") or "stylegan2"),
            size=int(size or shipped.get("size") or 128),
            position=str((shipped.get("position") or {}).get("method") or "bpr"),
            minutes=minutes,
            steps=steps,
            batch=batch,
            false_flag_rate=float(shipped.get("target_false_flag_rate") or 0.05),
        )


def train_detector(
    *,
    out: Path,
    view: Path,
    split: Split,
    groups: Mapping[str, dicom_series.SeriesFiles],
    recipe: DetectorRecipe,
    jobs: int,
    progress: bool,
) -> Path:
    """Train the detector on the `train` role, normalise it on `detector_validation`; return its folder.

    Raises:
        UsageError: the trainer refused its data or options (its message).
    """
    model = out / "model.json"
    if model.is_file():
        log.info("detector: %s exists; training skipped", model)
        return out
    train_uids, val_uids = split.roles["train"], split.roles["detector_validation"]
    link_view(view, [groups[u] for u in train_uids + val_uids])
    entries = [{"series_instance_uid": u, "split": "train", "anomaly": None} for u in train_uids]
    entries += [{"series_instance_uid": u, "split": "validation", "anomaly": None} for u in val_uids]
    (view / "manifest.json").write_text(json.dumps({"generator": "gatekeeper commission", "series": entries}))
    argv = [
        "train", "detector", "--data", str(view), "--out", str(out), "--family", recipe.family,
        "--size", str(recipe.size), "--position", recipe.position, "--minutes", str(recipe.minutes),
        "--batch", str(recipe.batch), "--false-flag-rate", str(recipe.false_flag_rate), "--jobs", str(jobs),
    ]  # fmt: skip
    if recipe.steps is not None:
        for phase in ("position", "gan", "encoder"):
            argv += [f"--{phase}-steps", str(recipe.steps)]
    if not progress:
        argv.append("--no-progress")
    if (out / "checkpoint.pt").is_file():
        argv.append("--resume")
    args = _parse(argv)
    code = int(args.func(args))
    if code != 0 or not model.is_file():
        raise UsageError(f"detector training ended with code {code} and no {model}")
    ensure_series_lists(model, trained_on=train_uids, calibrated_on=val_uids)
    return out


def ensure_series_lists(model_json: Path, *, trained_on: list[str], calibrated_on: list[str]) -> None:
    """Make sure `training.trained_on_series` / `calibrated_on_series` of `model_json` name these series.

    The trainers write them; a trainer that does not yet (a recipe added later) gets them here, so that
    the leakage check never depends on it. A list that disagrees with the split is an error.

    Raises:
        UsageError: the model.json lists other series than the split gave its trainer.
    """
    doc = json.loads(model_json.read_text())
    training = doc.setdefault("training", {})
    changed = False
    for key, uids in (("trained_on_series", trained_on), ("calibrated_on_series", calibrated_on)):
        if key not in training:
            training[key] = sorted(uids)
            changed = True
        elif sorted(training[key]) != sorted(uids):
            raise UsageError(f"{model_json}: training.{key} lists other series than the split gave its trainer")
    if changed:
        model_json.write_text(json.dumps(doc, indent=1) + "\n")


@dataclass(frozen=True)
class FineTune:
    """The outcome of the segmenter fine-tune: its folder, or why there is none."""

    folder: Path | None
    reason: str
    train_series: list[str]
    validation_series: list[str]


def fine_tune_segmenter(
    *,
    out: Path,
    views: Path,
    split: Split,
    groups: Mapping[str, dicom_series.SeriesFiles],
    contour_files: Mapping[str, Path],
    active_folder: Path,
    steps: int,
    minutes: float,
    jobs: int,
    progress: bool,
) -> FineTune:
    """Fine-tune the active segmenter on the contoured series outside `held_out`; validation (the best
    state) on the contoured series of the validation roles, else one training series set aside.

    Returns FineTune(None, why) with fewer than 2 contoured series outside held-out.
    """
    import torch

    from models.segmenter.data import SegDataset, load_contoured_series
    from models.segmenter.onnx_weights import unet_from_onnx
    from models.segmenter.train import Schedule, fit_and_export

    outside = [u for u in split.contoured if split.role_of(u) not in ("held_out", None)]
    if len(outside) < 2:
        return FineTune(None, f"{len(outside)} contoured series outside held-out; 2 needed", [], [])
    val = [u for u in outside if split.role_of(u) != "train"] or outside[-1:]
    train = [u for u in outside if u not in val]
    if (out / "model.json").is_file():
        log.info("segmenter fine-tune: %s exists; skipped", out / "model.json")
        return FineTune(out, "", train, val)
    for name, uids in (("train", train), ("validation", val)):
        link_view(views / name, [groups[u] for u in uids], [contour_files[u] for u in uids])
    net, spec, parent_meta = unet_from_onnx(active_folder)
    tr, skipped_tr = load_contoured_series(views / "train", spec, jobs=jobs)
    va, skipped_va = load_contoured_series(views / "validation", spec, jobs=jobs)
    if not tr or not va:
        return FineTune(None, f"contours unusable ({len(skipped_tr) + len(skipped_va)} skipped)", train, val)
    data = SegDataset(tr, va, str(views), skipped_tr + skipped_va)
    argv = ["train", "segmenter", "--pool", "--data", str(views / "train"), "--out", str(out)]
    argv += ["--minutes", str(minutes), "--fine-tune-steps", str(steps), "--jobs", str(jobs)]
    if not progress:
        argv.append("--no-progress")
    if (out / "checkpoint.pt").is_file():
        argv.append("--resume")
    args = _parse(argv)
    schedule = Schedule(steps=steps, lr=args.fine_tune_lr, val_every=min(args.val_every, max(1, steps // 3)))
    torch.manual_seed(args.seed)
    fit_and_export(
        args,
        net=net,
        spec=spec,
        data=data,
        device=torch.device("cpu"),
        schedule=schedule,
        training_extra={
            "fine_tuned_from": parent_meta.get("version"),
            "parent_name": parent_meta.get("name"),
            "recipe": "commission fine-tune on the site's liver contours",
        },
    )
    ensure_series_lists(out / "model.json", trained_on=train, calibrated_on=val)
    return FineTune(out, "", train, val)
