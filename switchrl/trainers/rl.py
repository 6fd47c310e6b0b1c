"""``switchrl rl``: refine the switcher with RL (GRPO through TRL, a small PPO, or stable-baselines3 PPO).

Only the dispatcher: :data:`ALGORITHMS` names each algorithm's entry point as ``module:function``,
imported when the algorithm runs (each pulls in its own dependencies: TRL, stable-baselines3), and
:func:`train` / :func:`main` run one. The algorithms build on :mod:`~switchrl.trainers.episodes` and
:mod:`~switchrl.trainers.rl_setup`, never on this module, so imports go one way.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from typing import Any

from switchrl.errors import ConfigError
from switchrl.executors.remote_pool import RayCandidatePool
from switchrl.plan import check_fits
from switchrl.run_config import RLSection, RunConfig, load_config
from switchrl.trainers.rl_setup import RLResult, RLSetup, prepare, remove_run

ALGORITHMS: dict[str, str] = {
    "grpo": "switchrl.trainers.grpo:train_grpo",
    "ppo": "switchrl.trainers.ppo:train_ppo",
    "sb3-ppo": "switchrl.trainers.sb3:train_sb3",
}
ALGOS: tuple[str, ...] = tuple(ALGORITHMS)


def algorithm(algo: str) -> Callable[[RLSetup], RLResult]:
    """The trainer function of ``algo`` (its module imported now)."""
    if algo not in ALGORITHMS:
        raise ConfigError(f"algo must be one of {ALGOS}, got {algo!r}")
    module, function = ALGORITHMS[algo].split(":")
    return getattr(importlib.import_module(module), function)


def train(
    config: RunConfig,
    algo: str,
    rl: RLSection | None = None,
    reward: Any = None,
    report_to: str | None = None,
    overwrite: bool = False,
) -> RLResult:
    """Run ``algo`` (grpo | ppo | sb3-ppo) on ``config``; see each trainer module. A rerun in the same
    ``rl.out_dir`` resumes only the same configuration; ``overwrite=True`` deletes the old run first."""
    run = algorithm(algo)
    rl = (rl or config.rl).model_copy()
    if report_to is not None:
        rl.report_to = report_to
    if overwrite:
        remove_run(rl.out_dir)
    setup = prepare(config, rl, reward)
    try:
        return run(setup)
    finally:
        if isinstance(setup.pool, RayCandidatePool):
            setup.pool.close()


def main(args: Any) -> int:
    """``switchrl rl --config X --algo grpo|ppo|sb3-ppo [--reward SPEC ...] [--report-to ...]
    [--executor local|ray] [--ray-address A] [--overwrite]``."""
    config = load_config(args.config)
    config.executor = config.executor.overridden(
        executor=getattr(args, "executor", None), ray_address=getattr(args, "ray_address", None)
    )
    check_fits(config, "rl", algo=args.algo)  # memory per device, before a weight is loaded
    result = train(
        config,
        args.algo,
        reward=args.reward or None,
        report_to=args.report_to,
        overwrite=bool(getattr(args, "overwrite", False)),
    )
    print(f"{args.algo}: policy saved to {result.policy_dir}")
    if result.history:
        last = result.history[-1]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}))
    return 0
