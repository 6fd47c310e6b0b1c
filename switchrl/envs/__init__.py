"""Environments and batched rollouts.

Importing this module registers ``switchrl/Switch-v0``, so ``gymnasium.make("switchrl/Switch-v0",
config=...)`` works (or, without an import, ``gymnasium.make("switchrl.envs:switchrl/Switch-v0", ...)``).
"""

import gymnasium

from switchrl.envs.switch_env import ObservationLayout, SwitchEnv, SwitchEnvConfig
from switchrl.envs.vector_env import SwitchVectorEnv
from switchrl.envs.wrappers import FeatureObservation

ENV_ID = "switchrl/Switch-v0"


def register_envs() -> None:
    """Register ``switchrl/Switch-v0`` with Gymnasium (idempotent; also the ``gymnasium.envs`` entry point)."""
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(
            id=ENV_ID,
            entry_point="switchrl.envs.switch_env:SwitchEnv",
            vector_entry_point="switchrl.envs.vector_env:SwitchVectorEnv",
        )


register_envs()

__all__ = [
    "ENV_ID",
    "FeatureObservation",
    "ObservationLayout",
    "SwitchEnv",
    "SwitchEnvConfig",
    "SwitchVectorEnv",
    "register_envs",
]
