"""Exceptions raised for bad user input; every message names the offending field."""

from __future__ import annotations


class SwitchRLError(Exception):
    """Base class of switchrl's user-facing errors."""


class ConfigError(SwitchRLError, ValueError):
    """A config value is missing, unknown or out of range. The message names the key (and file)."""


class CheckpointError(SwitchRLError, ValueError):
    """A checkpoint path or tokenizer cannot be used as a candidate or switcher."""


class PromptTooLongError(SwitchRLError, ValueError):
    """A query's prompt plus the token budget does not fit a candidate's positions (names trace and limit)."""
