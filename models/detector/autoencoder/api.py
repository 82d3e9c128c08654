"""The autoencoder baselines' entry points (`Family`): a plain conv autoencoder or the coarse-noise
denoising U-Net (Kascenas et al. 2022), trained by `gatekeeper train autoencoder` and scored as
comparison methods of `gatekeeper evaluate detector`. Training code is imported when a command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

from models.detector.autoencoder import scoring
from models.detector.interface import Family


def train(args: argparse.Namespace) -> int:
    """`gatekeeper train autoencoder`."""
    from models.detector.autoencoder.train import run_cli

    return run_cli(args)


def variant(meta: dict[str, Any]) -> str | None:
    """Which autoencoder is the description itself; no separate version."""
    return None


FAMILY = Family(
    name="autoencoder",
    recipe=None,
    train=train,
    export=None,
    load_method=scoring.load_method,
    describe=scoring.describe,
    variant=variant,
    bench=None,
    diagnose=None,
)
