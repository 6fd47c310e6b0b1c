"""Switcher policies: the LM switcher and the baselines."""

from switchrl.policies.baselines import FixedSwitcher, RandomSwitcher, RoundRobinSwitcher
from switchrl.policies.label_tokens import add_label_tokens
from switchrl.policies.lm_switcher import LMSwitcher
from switchrl.policies.sequence import EncodedSequence, SwitchSequence, default_label_tokens
from switchrl.rollout import Decision, SwitchPolicy

__all__ = [
    "Decision",
    "EncodedSequence",
    "FixedSwitcher",
    "LMSwitcher",
    "RandomSwitcher",
    "RoundRobinSwitcher",
    "SwitchPolicy",
    "SwitchSequence",
    "add_label_tokens",
    "default_label_tokens",
]
