"""The testbed: a tiny pretrained -> finetuned -> aligned family in which switching helps.

``build_family(seed)`` trains it (or reuses a cached one), ``check_family(family)`` measures the
phenomenon the family is designed to show; :mod:`~switchrl.testbed.tasks` holds its tasks and scorers.
"""

from switchrl.testbed.check import check_family, format_check
from switchrl.testbed.family import PATCH_TOKENS, TestbedFamily, build_family, default_root
from switchrl.testbed.stages import StageConfig
from switchrl.testbed.tokenizer import LABEL_TOKENS
from switchrl.testbed.world import World

__all__ = [
    "LABEL_TOKENS",
    "PATCH_TOKENS",
    "StageConfig",
    "TestbedFamily",
    "World",
    "build_family",
    "check_family",
    "default_root",
    "format_check",
]
