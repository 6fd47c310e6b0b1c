"""Exceptions raised for bad user input; every message names the offending field."""

from __future__ import annotations


class SwitchRLError(Exception):
    """Base class of switchrl's user-facing errors."""


class ConfigError(SwitchRLError, ValueError):
    """A config value is missing, unknown or out of range. The message names the key (and file)."""


class CheckpointError(SwitchRLError, ValueError):
    """A checkpoint path or tokenizer cannot be used as a candidate or switcher."""


class ScorerFailureError(SwitchRLError):
    """A scorer failed on more samples than the run's ``max_scorer_failure_rate`` allows."""


RESTART_HINT = "rerun with --overwrite to start over, or use a new out_dir"


def with_restart_hint(err: CheckpointError) -> CheckpointError:
    """``err`` with the two ways out when it says an out_dir was written with another configuration
    (and does not name them yet)."""
    text = str(err)
    if "different configuration" not in text or "--overwrite" in text:
        return err
    return CheckpointError(f"{text.removesuffix('; use a new out_dir to start over')}; {RESTART_HINT}")


class PromptTooLongError(SwitchRLError, ValueError):
    """A query's prompt plus the token budget does not fit a candidate's positions (names trace and limit)."""
