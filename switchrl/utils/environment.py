"""Environment variables switchrl sets for the libraries it drives, in one place (never overriding the user's)."""

from __future__ import annotations

import os

OFFLINE_SAFE_DEFAULTS = {
    "TRL_EXPERIMENTAL_SILENCE": "1",  # TRL's notes about experimental features, once per trainer
    "WANDB_MODE": "offline",  # report_to: wandb never needs a login; `wandb sync` uploads later
}


def offline_defaults() -> None:
    """Set :data:`OFFLINE_SAFE_DEFAULTS` where the user has not set them."""
    for key, value in OFFLINE_SAFE_DEFAULTS.items():
        os.environ.setdefault(key, value)
