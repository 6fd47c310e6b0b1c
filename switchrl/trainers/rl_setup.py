"""What the RL trainers share besides episodes: the run's set-up, the trainable switcher, metrics.

:func:`prepare` resolves a run config for RL (the candidate pool, local or on Ray; the ``rl.split``
instances; each task's scorer), :func:`build_switcher` makes the switcher to train (through the one
factory :func:`switchrl.policies.factory.build_switcher`), and :class:`MetricsLogger`,
:func:`switch_stats` and :class:`RLResult` are how every algorithm reports. The algorithms
(:mod:`~switchrl.trainers.grpo`, :mod:`~switchrl.trainers.ppo`, :mod:`~switchrl.trainers.sb3`) build
on this module and :mod:`~switchrl.trainers.episodes`; :mod:`~switchrl.trainers.rl` dispatches to them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switchrl.backends.base import Pool
from switchrl.backends.pool import CandidatePool
from switchrl.errors import ConfigError
from switchrl.executors.remote_pool import RayCandidatePool
from switchrl.policies.factory import LoraSettings
from switchrl.policies.factory import build_switcher as make_switcher
from switchrl.policies.lm_switcher import LMSwitcher
from switchrl.rewards.registry import resolve_reward
from switchrl.rewards.router import TaskScorers
from switchrl.run_config import ResolvedRun, RLSection, RunConfig
from switchrl.tasks.base import TaskInstance
from switchrl.utils.environment import offline_defaults


@dataclass
class RLSetup:
    """Everything an RL run needs besides the policy."""

    resolved: ResolvedRun
    rl: RLSection
    pool: Pool
    instances: list[TaskInstance]
    rewards: TaskScorers

    @property
    def names(self) -> list[str]:
        return self.pool.names

    @property
    def out_dir(self) -> Path:
        return Path(self.rl.out_dir)


def prepare(
    config: RunConfig, rl: RLSection | None = None, reward: Any = None, pool: Pool | None = None
) -> RLSetup:
    """Resolve ``config`` for RL: candidates as a pool, the ``rl.split`` instances and their rewards.

    ``reward``: a scorer spec for every task (e.g. the CLI's ``--reward`` list), overriding the config.
    With ``executor: ray`` the candidates run on Ray actors (:class:`~switchrl.executors.remote_pool.
    RayCandidatePool`; one set per process under ``accelerate launch``) and the switcher stays here.
    """
    rl = rl or config.rl
    resolved = ResolvedRun(config)
    by_task = resolved.instances(rl.split, rl.limit)
    if rl.tasks is not None:
        unknown = sorted(set(rl.tasks) - set(by_task))
        if unknown:
            raise ConfigError(
                f"rl.tasks: unknown task(s) {unknown}; the {rl.split!r} split has {sorted(by_task)}"
            )
        by_task = {t: by_task[t] for t in rl.tasks}
    instances = [inst for items in by_task.values() for inst in items]
    if not instances:
        raise ConfigError(f"rl.split: no {rl.split!r} instances in the configured tasks")
    if reward is not None:
        scorer = resolve_reward(reward)
        scorers = {t: scorer for t in by_task}
    else:
        scorers = resolved.scorers(list(by_task))
    gen = resolved.generation
    if pool is None and config.executor.executor == "ray":
        pool = RayCandidatePool(
            resolved.candidates,
            patch_tokens=gen.patch_tokens,
            seed=gen.seed,
            executor=config.executor,
            truncate=gen.truncate,
        )
    elif pool is None:
        pool = CandidatePool.from_configs(
            resolved.candidates, patch_tokens=gen.patch_tokens, seed=gen.seed, truncate=gen.truncate
        )
    return RLSetup(resolved, rl, pool, instances, TaskScorers(scorers))


def build_switcher(setup: RLSetup) -> LMSwitcher:
    """The trainable switcher: ``rl.init`` (a saved switcher, its adapter unfrozen) or a fresh LoRA on
    ``rl.base`` (initial weights from ``rl.seed``), set to sample with ``rl.top_p`` / ``rl.temperature``
    from ``rl.seed``."""
    rl, resolved = setup.rl, setup.resolved
    common: dict[str, Any] = dict(
        seed=rl.seed, trainable=True, greedy=False, top_p=rl.top_p, temperature=rl.temperature
    )
    if rl.init:
        switcher = make_switcher(setup.names, saved=rl.init, where="rl.init", **common)
    else:
        switcher = make_switcher(
            setup.names,
            base=resolved.switcher_base(rl.base, "rl.base"),
            label_tokens=resolved.label_tokens,
            lora=LoraSettings(rl.lora_r, rl.lora_alpha, rl.lora_dropout),
            patch_tokens=resolved.generation.patch_tokens,
            where="rl.base",
            **common,
        )
    if not switcher.sequence.incremental:
        raise ConfigError(
            "rl: the switcher's prompt_format must be 'switchrl' (one growing sequence per episode)"
        )
    return switcher


def save_switcher(switcher: LMSwitcher, directory: Path, inference_top_p: float = 0.7) -> Path:
    """Save the trained switcher with inference settings (``top_p`` as the paper: 0.7)."""
    sampling = switcher.top_p
    switcher.top_p = inference_top_p
    try:
        return switcher.save_pretrained(directory)
    finally:
        switcher.top_p = sampling


def switch_stats(authors: Sequence[Sequence[int]], names: Sequence[str]) -> dict[str, float]:
    """From each episode's authors: the switch rate (changes of author per boundary between patches),
    patches per episode, and each candidate's share of the patches."""
    boundaries = sum(max(0, len(a) - 1) for a in authors)
    switches = sum(x != y for a in authors for x, y in zip(a, a[1:]))
    flat = [x for a in authors for x in a]
    stats = {
        "switch/rate": switches / boundaries if boundaries else 0.0,
        "switch/patches_per_episode": len(flat) / max(1, len(authors)),
    }
    for i, name in enumerate(names):
        stats[f"switch/share/{name}"] = flat.count(i) / len(flat) if flat else 0.0
    return stats


class MetricsLogger:
    """Writes metrics to ``<out>/metrics.jsonl`` and, if asked, to TensorBoard or Weights & Biases.

    W&B runs offline unless ``WANDB_MODE`` says otherwise (:mod:`switchrl.utils.environment`),
    so no login is ever needed.
    """

    def __init__(self, out_dir: Path, report_to: str = "none", config: dict | None = None):
        if report_to not in ("none", "wandb", "tensorboard"):
            raise ConfigError(f"report_to must be none, wandb or tensorboard, got {report_to!r}")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._tb = self._wandb = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("report_to: wandb is not installed (pip install wandb)") from None
            offline_defaults()
            self._wandb = wandb.init(project="switchrl", dir=str(out_dir), config=config or {})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


@dataclass
class RLResult:
    """Where a run saved its policy, and its per-step metrics."""

    out_dir: Path
    policy_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)
