"""Switcher policies: the LM switcher and the baselines."""

from switchrl.policies.base import Decision, SwitchPolicy
from switchrl.policies.baselines import FixedSwitcher, RandomSwitcher, RoundRobinSwitcher

__all__ = ["Decision", "FixedSwitcher", "RandomSwitcher", "RoundRobinSwitcher", "SwitchPolicy"]
