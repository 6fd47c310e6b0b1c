"""What the RL trainers share besides episodes: the run's set-up, the trainable switcher, metrics.

:func:`prepare` resolves a run config for RL (the candidate pool, local or on Ray; the ``rl.split``
instances; each task's scorer), :func:`build_switcher` makes the switcher to train (through the one
factory :func:`switchrl.policies.factory.build_switcher`), and :class:`MetricsLogger`,
:func:`switch_stats`, :func:`zero_variance_share` and :class:`RLResult` are how every algorithm
reports. :func:`claim_out_dir` writes the run's fingerprint into ``rl.out_dir`` and refuses to resume
another configuration, :func:`last_complete_checkpoint` skips a checkpoint a kill left half-written, :func:`checkpoint_switcher`
makes a GRPO checkpoint a switcher directory, and
:func:`check_failures` enforces ``max_scorer_failure_rate``. The algorithms
(:mod:`~switchrl.trainers.grpo`, :mod:`~switchrl.trainers.ppo`, :mod:`~switchrl.trainers.sb3`) build
on this module and :mod:`~switchrl.trainers.episodes`; :mod:`~switchrl.trainers.rl` dispatches to them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from switchrl.backends.base import Pool
from switchrl.backends.pool import CandidatePool, rank_candidates
from switchrl.errors import CheckpointError, ConfigError
from switchrl.executors import writable_dir
from switchrl.executors.remote_pool import RayCandidatePool
from switchrl.policies.factory import LoraSettings
from switchrl.policies.factory import build_switcher as make_switcher
from switchrl.policies.lm_switcher import METADATA_FILE, LMSwitcher
from switchrl.rewards.provenance import scorer_label
from switchrl.rewards.registry import resolve_reward
from switchrl.rewards.router import TaskScorers
from switchrl.run_config import ResolvedRun, RLSection, RunConfig
from switchrl.tasks.base import TaskInstance
from switchrl.utils.environment import offline_defaults
from switchrl.utils.files import dir_signature

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "switchrl_run.json"
NO_EFFECT = {"out_dir", "steps", "save_steps", "logging_steps", "report_to", "ppo", "sb3"}
"""rl fields that cannot change what a resumed run computes: where it writes, how far it goes (a rerun
with more ``steps`` continues), how often it saves or logs; the other algorithms' sections."""
ALGO_SECTION = {"ppo": "ppo", "sb3-ppo": "sb3"}
RESUMABLE = ("trainer/checkpoint-*", "checkpoint-*", "checkpoints/*", "switcher")
"""What a rerun in ``rl.out_dir`` would resume from or keep (GRPO, PPO, SB3 checkpoints; the policy)."""


@dataclass
class RLSetup:
    """Everything an RL run needs besides the policy."""

    resolved: ResolvedRun
    rl: RLSection
    pool: Pool
    instances: list[TaskInstance]
    rewards: TaskScorers
    reward_spec: Any = None  # the reward override (the CLI's --reward), part of the run's fingerprint

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
            rank_candidates(resolved.candidates),
            patch_tokens=gen.patch_tokens,
            seed=gen.seed,
            truncate=gen.truncate,
        )
    return RLSetup(resolved, rl, pool, instances, TaskScorers(scorers), reward_spec=reward)


def run_fingerprint(setup: RLSetup, algo: str) -> dict:
    """What the checkpoints in ``rl.out_dir`` depend on: the rl section (less :data:`NO_EFFECT`; the
    algorithm's own section), the algorithm, the switcher's start, and the run's candidates, reward
    (spec and scorer sources) and tasks (content hashes)."""
    rl = setup.rl
    section = rl.model_dump(mode="json", exclude=NO_EFFECT | {"init", "base"})  # both: in "start"
    if algo in ALGO_SECTION:
        own = getattr(rl, ALGO_SECTION[algo]).model_dump(mode="json")
        section[ALGO_SECTION[algo]] = {k: v for k, v in own.items() if k != "total_timesteps"}
    kind, start_dir = setup.resolved.rl_start(rl)
    start = {kind: start_dir, "signature": dir_signature(start_dir)}
    spec = setup.reward_spec
    override = None if spec is None else json.loads(json.dumps(spec, default=scorer_label))  # no addresses
    return {
        "algo": algo,
        "rl": section,
        "start": start,
        "reward_override": override,
        **setup.resolved.fingerprint(setup.rewards),
    }


def claim_out_dir(setup: RLSetup, algo: str) -> None:
    """Write the run's fingerprint into ``rl.out_dir``; refuse (:class:`ConfigError` naming the changed
    keys) to resume checkpoints written with a different one."""
    out = writable_dir(setup.out_dir, "rl.out_dir")  # one message for a file in the path, read-only, ...
    fingerprint = json.loads(json.dumps(run_fingerprint(setup, algo)))
    path = out / FINGERPRINT_FILE
    resumable = [p for pattern in RESUMABLE for p in out.glob(pattern)]
    if not resumable:  # nothing to resume (a fresh run, or a start that failed): this run's fingerprint
        tmp = out / f".{FINGERPRINT_FILE}.{os.getpid()}.tmp"  # every process of a launch writes the same
        tmp.write_text(json.dumps(fingerprint, indent=1))
        tmp.replace(path)
        return
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        changed = _changed(old, fingerprint)
        if changed:
            raise ConfigError(
                f"rl.out_dir {out} holds a run with a different configuration (differs in: "
                f"{', '.join(changed)}); rerun with `switchrl rl --overwrite` to start over, "
                "or set a new rl.out_dir"
            )
        return
    raise ConfigError(
        f"rl.out_dir {out} holds checkpoints but no {FINGERPRINT_FILE} (a run of an older version?); "
        "rerun with `switchrl rl --overwrite` to start over, or set a new rl.out_dir"
    )


def _changed(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys where ``old`` and ``new`` differ (two levels deep at most)."""
    if old == new:
        return []
    if isinstance(old, dict) and isinstance(new, dict) and prefix.count(".") < 2:
        return [
            k
            for key in sorted(old.keys() | new.keys())
            for k in _changed(old.get(key), new.get(key), f"{prefix}{key}.")
        ]
    return [prefix.rstrip(".") or "(all)"]


def remove_run(out_dir: str | Path) -> None:
    """``switchrl rl --overwrite``: delete a previous run's ``rl.out_dir``."""
    out = Path(out_dir)
    if out.is_dir():
        logger.warning("rl --overwrite: removing %s", out)
        shutil.rmtree(out)
    elif out.exists():
        raise ConfigError(f"rl.out_dir {out} exists and is not a directory")


def last_complete_checkpoint(directory: Path) -> Path | None:
    """The TRL/Transformers ``checkpoint-N`` with the largest N that holds ``trainer_state.json`` (the
    last file a save writes); newer ones a kill left half-written are skipped with a warning."""
    if not directory.is_dir():
        return None
    found = sorted(
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    )
    for _, path in reversed(found):
        if (path / "trainer_state.json").is_file():
            return path
        logger.warning("%s is incomplete (no trainer_state.json; a save was interrupted): skipped", path)
    return None


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def checkpoint_switcher(out_dir: str | Path, step: int, dest: str | Path) -> Path:
    """A saved switcher directory at ``dest`` holding the weights of a finished GRPO run's
    ``trainer/checkpoint-<step>``: the run's switcher (metadata, tokenizer) with the checkpoint's adapter,
    so a learning curve evaluates its checkpoints like any switcher.

    Only the switcher's own tensors are taken, and the output head's bias (frozen) from the switcher: the
    checkpoint was saved inside :func:`~switchrl.trainers.grpo.restricted_head`, so its head bias holds
    the label-only offset (harmless to decisions, but not the switcher's weights)."""
    from safetensors.torch import load_file, save_file

    out, dest = Path(out_dir), Path(dest)
    checkpoint, final = out / "trainer" / f"checkpoint-{step}", out / "switcher"
    needed = [checkpoint / "trainer_state.json", final / METADATA_FILE]
    needed += [d / f for d in (checkpoint, final) for f in ADAPTER_FILES]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"cannot make a switcher of step {step} of {out}: missing {', '.join(missing)}; "
            "save that step (rl.save_steps) and let the run finish"
        )
    weights, config = ADAPTER_FILES
    trained, own = load_file(checkpoint / weights), load_file(final / weights)
    if not own.keys() <= trained.keys():
        raise CheckpointError(f"{checkpoint} lacks tensors of {final}: {sorted(own.keys() - trained.keys())}")
    frozen = {k for k in own if k.endswith(".bias") and "lora_" not in k}
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(final, dest, ignore=shutil.ignore_patterns(METADATA_FILE, weights))
    save_file({k: own[k] if k in frozen else trained[k] for k in own}, dest / weights, {"format": "pt"})
    shutil.copy2(final / METADATA_FILE, dest / METADATA_FILE)  # last: a directory with it is complete
    return dest


def check_failures(setup: RLSetup) -> None:
    """Raise when a scorer failed on more episodes than ``max_scorer_failure_rate`` allows (call after
    saving what the run has)."""
    rate = setup.resolved.config.max_scorer_failure_rate
    setup.rewards.tally.check(rate, f"rl ({setup.out_dir})")


def build_switcher(setup: RLSetup) -> LMSwitcher:
    """The trainable switcher: ``rl.init`` (a saved switcher, its adapter unfrozen) or a fresh LoRA on
    ``rl.base`` (initial weights from ``rl.seed``), set to sample with ``rl.top_p`` / ``rl.temperature``
    from ``rl.seed``."""
    rl, resolved = setup.rl, setup.resolved
    placement = resolved.config.switcher
    common: dict[str, Any] = dict(
        seed=rl.seed,
        trainable=True,
        greedy=False,
        top_p=rl.top_p,
        temperature=rl.temperature,
        device=placement.device,
        dtype=placement.dtype,
    )
    kind, start = resolved.rl_start(rl)
    if kind == "init":
        switcher = make_switcher(setup.names, saved=start, where="rl.init", **common)
    else:
        switcher = make_switcher(
            setup.names,
            base=start,
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


def zero_variance_share(rewards: Sequence[float], group_size: int) -> float:
    """The share of groups (``group_size`` consecutive episodes of one query) whose rewards are all equal:
    they carry no advantage, so no gradient (TRL's GRPO logs it as ``frac_reward_zero_std``)."""
    groups = [rewards[i : i + group_size] for i in range(0, len(rewards), group_size)]
    return sum(len(set(g)) == 1 for g in groups) / len(groups) if groups else 0.0


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
