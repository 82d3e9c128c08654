"""`gatekeeper train segmenter --pool`: fine-tune the active segmenter on its base data plus the pool; a candidate.

    gatekeeper train segmenter --pool --data BASE --out DIR [--pool-dir POOL] [--max-series N]
                               [--fine-tune-steps 300] [--fine-tune-lr 5e-4] [--by NAME]

1. The model registry's active segmenter (the shipped one on first use) is rebuilt in torch from
   its ONNX file (`models.segmenter.onnx_weights`); its input size, context and width are kept.
2. Training series: the base data's normal training series (`--data`, split as `train segmenter`
   splits it; `--max-series` limits them) plus every contoured series of the pool (all of them:
   the pool is what the model must learn). Validation: the base data's validation normals, so the
   best state is the one that keeps normals right.
3. Fine-tuning: the same loop, losses and augmentation as `train segmenter`
   (`models.segmenter.train.fit_and_export`), `--fine-tune-steps` steps at `--fine-tune-lr`
   (cosine), progress bar and log lines; export of segmenter.onnx + model.json to `--out`.
4. The result is registered as a **candidate** with its training data (pool entry ids, base data
   hash, parent version). Nothing changes for the pipeline until someone promotes it after
   `gatekeeper evaluate candidate segmenter VERSION`.
"""

from __future__ import annotations

import argparse
import logging
import time

from models.active_learning.pool import active_folder, find_pool, register_candidate
from models.detector.data import cpu_count
from models.segmenter.data import SegDataset, load_contoured_series, load_dataset
from models.segmenter.onnx_weights import unet_from_onnx
from models.segmenter.train import Schedule, fit_and_export, prepare_run
from service.db.tables import ModelKind
from service.errors import UsageError
from service.settings import load_settings_or_exit

log = logging.getLogger(__name__)


def run_cli(args: argparse.Namespace) -> int:
    """Fine-tune, export, register; print the candidate's version. Exit 0."""
    from service.db.schema import open_database

    if args.fine_tune_steps < 1 or not args.fine_tune_lr > 0:
        raise UsageError("--fine-tune-steps must be >= 1 and --fine-tune-lr > 0")
    schedule = Schedule(
        steps=args.fine_tune_steps,
        lr=args.fine_tune_lr,
        val_every=min(args.val_every, max(1, args.fine_tune_steps // 3)),
    )
    device = prepare_run(args)
    settings = load_settings_or_exit()
    t0 = time.monotonic()
    with open_database(settings) as sessions:
        parent, folder = active_folder(sessions=sessions, settings=settings, kind=ModelKind.SEGMENTER)
        pool = find_pool(args=args, sessions=sessions, settings=settings)
        log.info("fine-tuning the active segmenter %s (%s)", parent.version, folder)
        try:
            net, spec, parent_meta = unet_from_onnx(folder)
        except ValueError as exc:
            raise UsageError(f"cannot fine-tune segmenter {parent.version}: {exc}") from None
        jobs = args.jobs or cpu_count()
        try:
            base = load_dataset(args.data, spec, jobs=jobs, seed=args.seed, max_series=args.max_series)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        pool_series, skipped = load_contoured_series(pool.folder, spec, jobs=jobs)
        if not pool_series:
            raise UsageError(f"no usable contoured CT series in the pool ({pool.folder}); {len(skipped)} skipped")
        base_hash = SegDataset(base.train, base.validation, base.source).data_hash()
        data = SegDataset(base.train + pool_series, base.validation, f"{base.source} + pool", base.skipped + skipped)
        log.info(
            "fine-tuning on %d base + %d pool series (%d slices), validation on %d base normals; %d steps",
            len(base.train),
            len(pool_series),
            sum(s.num_slices for s in data.train),
            len(base.validation),
            schedule.steps,
        )
        training = {
            "pool_entry_ids": pool.entry_ids,
            "pool_source": pool.source,
            "pool_series": len(pool_series),
            "pool_kinds": pool.kinds,
            "base_data": str(args.data),
            "base_data_hash": base_hash,
            "base_train_series": len(base.train),
            "parent_version": parent.version,
        }
        meta = fit_and_export(
            args,
            net=net,
            spec=spec,
            data=data,
            device=device,
            schedule=schedule,
            training_extra={"fine_tuned_from": parent.version, "parent_name": parent_meta.get("name"), **training},
        )
        record = register_candidate(
            sessions=sessions,
            settings=settings,
            kind=ModelKind.SEGMENTER,
            folder=args.out,
            actor=args.by,
            training_data=training,
        )
    print(
        f"segmenter {record.version} registered as a {record.status} in {time.monotonic() - t0:.0f} s "
        f"(fine-tuned from {parent.version} on {len(base.train)} base + {len(pool_series)} pool series; "
        f"validation Dice {meta['metrics']['validation_dice_mean']:.4f}); compare it with "
        f"`gatekeeper evaluate candidate segmenter {record.version}`"
    )
    return 0
