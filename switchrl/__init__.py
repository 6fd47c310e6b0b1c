"""switchrl: Switch Generation as reinforcement learning.

The public API, importable from the top level (``from switchrl import CandidatePool, LMSwitcher``):

* candidates: :class:`CandidatePool` (and the :class:`Pool` contract it shares with the Ray pool),
  :class:`Trace`, :class:`Patch`, :class:`CandidateSampling`;
* generation: :func:`run_switch_generation`, :func:`estimate_utilities` (simulated rollouts), the
  :class:`SwitchPolicy` protocol and its :class:`Decision`;
* switchers: :class:`LMSwitcher`, :class:`RandomSwitcher`, :class:`FixedSwitcher`, :class:`RoundRobinSwitcher`;
* environments: :class:`SwitchEnv` (``switchrl/Switch-v0``), :class:`SwitchVectorEnv`, :class:`FeatureObservation`;
* configs and stages: :func:`load_config` / :class:`RunConfig`, :func:`simulate`, :func:`train_sft`,
  :func:`evaluate`, :func:`train_rl`;
* rewards and tasks: :func:`register_scorer`, :func:`resolve_reward`, :class:`TaskInstance`, :func:`load_jsonl`;
* the testbed: :func:`build_family`.

Names load on first use (PEP 562), so ``import switchrl`` and ``switchrl --help`` do not import
torch; the submodules' own ``__all__`` list everything else.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, tuple[str, str]] = {
    # name: (module, attribute)
    "CandidatePool": ("switchrl.backends", "CandidatePool"),
    "Pool": ("switchrl.backends", "Pool"),
    "Trace": ("switchrl.backends", "Trace"),
    "Patch": ("switchrl.backends", "Patch"),
    "CandidateSampling": ("switchrl.backends", "CandidateSampling"),
    "run_switch_generation": ("switchrl.rollout", "run_switch_generation"),
    "estimate_utilities": ("switchrl.rollout", "estimate_utilities"),
    "SwitchPolicy": ("switchrl.rollout", "SwitchPolicy"),
    "Decision": ("switchrl.rollout", "Decision"),
    "LMSwitcher": ("switchrl.policies", "LMSwitcher"),
    "RandomSwitcher": ("switchrl.policies", "RandomSwitcher"),
    "FixedSwitcher": ("switchrl.policies", "FixedSwitcher"),
    "RoundRobinSwitcher": ("switchrl.policies", "RoundRobinSwitcher"),
    "SwitchEnv": ("switchrl.envs", "SwitchEnv"),
    "SwitchEnvConfig": ("switchrl.envs", "SwitchEnvConfig"),
    "SwitchVectorEnv": ("switchrl.envs", "SwitchVectorEnv"),
    "FeatureObservation": ("switchrl.envs", "FeatureObservation"),
    "CandidateConfig": ("switchrl.config", "CandidateConfig"),
    "SwitchGenerationConfig": ("switchrl.config", "SwitchGenerationConfig"),
    "RunConfig": ("switchrl.run_config", "RunConfig"),
    "load_config": ("switchrl.run_config", "load_config"),
    "simulate": ("switchrl.trainers.simulate", "simulate"),
    "train_sft": ("switchrl.trainers.sft", "train_sft"),
    "evaluate": ("switchrl.eval", "evaluate"),
    "train_rl": ("switchrl.trainers.rl", "train"),
    "register_scorer": ("switchrl.rewards", "register_scorer"),
    "resolve_reward": ("switchrl.rewards", "resolve_reward"),
    "TaskInstance": ("switchrl.tasks", "TaskInstance"),
    "load_jsonl": ("switchrl.tasks", "load_jsonl"),
    "build_family": ("switchrl.testbed", "build_family"),
    "SwitchRLError": ("switchrl.errors", "SwitchRLError"),
    "ConfigError": ("switchrl.errors", "ConfigError"),
}

__all__ = [
    "__version__",
    "CandidateConfig",
    "CandidatePool",
    "CandidateSampling",
    "ConfigError",
    "Decision",
    "FeatureObservation",
    "FixedSwitcher",
    "LMSwitcher",
    "Patch",
    "Pool",
    "RandomSwitcher",
    "RoundRobinSwitcher",
    "RunConfig",
    "SwitchEnv",
    "SwitchEnvConfig",
    "SwitchGenerationConfig",
    "SwitchPolicy",
    "SwitchRLError",
    "SwitchVectorEnv",
    "TaskInstance",
    "Trace",
    "build_family",
    "estimate_utilities",
    "evaluate",
    "load_config",
    "load_jsonl",
    "register_scorer",
    "resolve_reward",
    "run_switch_generation",
    "simulate",
    "train_rl",
    "train_sft",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'switchrl' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from switchrl.backends import CandidatePool, CandidateSampling, Patch, Pool, Trace
    from switchrl.config import CandidateConfig, SwitchGenerationConfig
    from switchrl.envs import FeatureObservation, SwitchEnv, SwitchEnvConfig, SwitchVectorEnv
    from switchrl.errors import ConfigError, SwitchRLError
    from switchrl.eval import evaluate
    from switchrl.policies import FixedSwitcher, LMSwitcher, RandomSwitcher, RoundRobinSwitcher
    from switchrl.rewards import register_scorer, resolve_reward
    from switchrl.rollout import Decision, SwitchPolicy, estimate_utilities, run_switch_generation
    from switchrl.run_config import RunConfig, load_config
    from switchrl.tasks import TaskInstance, load_jsonl
    from switchrl.testbed import build_family
    from switchrl.trainers.rl import train as train_rl
    from switchrl.trainers.sft import train_sft
    from switchrl.trainers.simulate import simulate
