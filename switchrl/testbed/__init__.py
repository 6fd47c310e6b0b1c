"""The testbed: a tiny pretrained -> finetuned -> aligned family in which switching helps.

``build_family(seed)`` trains it (or reuses a cached one), ``check_family(family)`` measures the
phenomenon the family is designed to show. Names are imported lazily, so the light modules
(``world``, used by :mod:`switchrl.tasks.testbed`) do not pull in the trainers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TestbedFamily": "family",
    "build_family": "family",
    "default_root": "family",
    "PATCH_TOKENS": "family",
    "check_family": "check",
    "format_check": "check",
    "StageSettings": "stages",
    "LABEL_TOKENS": "tokenizer",
    "World": "world",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'switchrl.testbed' has no attribute {name!r}")
    return getattr(importlib.import_module(f"switchrl.testbed.{_EXPORTS[name]}"), name)
