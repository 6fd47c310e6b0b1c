"""``switchrl rl``: refine the switcher with RL (GRPO through TRL, a small PPO, or stable-baselines3 PPO).

This module holds what the three algorithms share: the ``rl:`` config section, the setup (candidate
pool, task instances, per-task rewards), the trainable LM switcher, the episode sampler (one episode
= one switch-generated response in the single sequence format of
:mod:`switchrl.policies.sequence`), the reward of an episode, switch statistics and a small metrics
logger. :mod:`~switchrl.trainers.grpo`, :mod:`~switchrl.trainers.ppo` and
:mod:`~switchrl.trainers.sb3` build on it.

Episodes. With ``credit: episode`` a group is ``num_generations`` independent episodes of one
query; every sampled label token is an action. With ``credit: fork`` (per-decision credit) the
group shares a prefix: one *trunk* episode is sampled up to a decision index ``d`` drawn from
``(seed, key)``, then ``num_generations`` branches continue from that state, each sampling its own
decision ``d`` onwards. Labels before ``d`` are context (not trained), so the group-relative
advantage credits the decision at ``d`` and the ones after it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from switchrl.backends.base import Trace
from switchrl.backends.pool import CandidatePool
from switchrl.errors import ConfigError
from switchrl.executors.remote_pool import RayCandidatePool
from switchrl.policies.lm_switcher import LMSwitcher
from switchrl.policies.sequence import EncodedSequence
from switchrl.rewards.base import Scorer, safe_score_batch
from switchrl.rewards.registry import resolve_reward
from switchrl.rollout import advance
from switchrl.run_config import ResolvedRun, RLSection, RunConfig, load_run_config
from switchrl.tasks.base import TaskInstance
from switchrl.utils.seeding import generator

Algo = Literal["grpo", "ppo", "sb3-ppo"]
ALGOS: tuple[str, ...] = ("grpo", "ppo", "sb3-ppo")


# ---------------------------------------------------------------------------------------------- setup
class TaskRewards:
    """Scores responses with their task's scorer (failures are recorded, never raised)."""

    def __init__(self, scorers: dict[str, Scorer]):
        if not scorers:
            raise ConfigError("reward: no scorer for any task")
        self.scorers = scorers

    def scorer(self, task: str) -> Scorer:
        if task not in self.scorers:
            raise ConfigError(f"reward: no scorer for task {task!r} (known: {sorted(self.scorers)})")
        return self.scorers[task]

    def score(self, instances: Sequence[TaskInstance], responses: Sequence[str]) -> tuple[list[float], int]:
        """One score per (instance, response) and the number of scorer failures (scored 0)."""
        values, failures = [0.0] * len(instances), 0
        for task in dict.fromkeys(i.task for i in instances):
            rows = [k for k, inst in enumerate(instances) if inst.task == task]
            results = safe_score_batch(
                self.scorer(task),
                [instances[k].query for k in rows],
                [responses[k] for k in rows],
                [instances[k].reference for k in rows],
                [instances[k].meta for k in rows],
            )
            for k, r in zip(rows, results):
                values[k] = r.value
                failures += r.failed
        return values, failures


@dataclass
class RLSetup:
    """Everything an RL run needs besides the policy."""

    resolved: ResolvedRun
    rl: RLSection
    pool: CandidatePool | RayCandidatePool
    instances: list[TaskInstance]
    rewards: TaskRewards

    @property
    def names(self) -> list[str]:
        return self.pool.names

    @property
    def out_dir(self) -> Path:
        return Path(self.rl.out_dir)


def prepare(
    config: RunConfig, rl: RLSection | None = None, reward: Any = None, pool: CandidatePool | None = None
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
            resolved.candidates, patch_tokens=gen.patch_tokens, seed=gen.seed, executor=config.executor
        )
    elif pool is None:
        pool = CandidatePool.from_configs(resolved.candidates, patch_tokens=gen.patch_tokens, seed=gen.seed)
    return RLSetup(resolved, rl, pool, instances, TaskRewards(scorers))


def make_adapter_trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Unfreeze the LoRA weights of a peft model loaded for inference; returns the trainable parameters."""
    for config in getattr(model, "peft_config", {}).values():
        config.inference_mode = False
    params = []
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
            params.append(param)
    if not params:
        raise ConfigError(
            "the switcher has no LoRA weights to train (rl.init must be a saved adapter switcher)"
        )
    return params


def build_switcher(setup: RLSetup) -> LMSwitcher:
    """The trainable switcher: ``rl.init`` (a saved switcher, its adapter unfrozen) or a fresh LoRA on the
    base model, set to sample with ``rl.top_p`` / ``rl.temperature`` from ``rl.seed``."""
    from switchrl.trainers.sft import switcher_base

    rl, gen = setup.rl, setup.resolved.generation
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if rl.init:
        switcher = LMSwitcher.from_pretrained(rl.init, device=device)
        if switcher.candidate_names != setup.names:
            raise ConfigError(
                f"rl.init: the switcher's candidates {switcher.candidate_names} differ from the "
                f"run's {setup.names}"
            )
        if not hasattr(switcher.model, "peft_config"):
            raise ConfigError(
                f"rl.init: {rl.init} holds a full model, not a LoRA adapter; RL trains adapters"
            )
    else:
        base, label_tokens = switcher_base(setup.resolved, rl)
        n = len(setup.names)
        switcher = LMSwitcher.from_base(
            base,
            setup.names,
            label_tokens=label_tokens[:n] if label_tokens else None,
            device=device,
            patch_tokens=gen.patch_tokens,
            lora={
                "r": rl.lora_r,
                "lora_alpha": rl.lora_alpha,
                "lora_dropout": rl.lora_dropout,
                "target_modules": "all-linear",
            },
        )
    if not switcher.sequence.incremental:
        raise ConfigError(
            "rl: the switcher's prompt_format must be 'switchrl' (one growing sequence per episode)"
        )
    make_adapter_trainable(switcher.model)
    switcher.greedy, switcher.top_p, switcher.temperature, switcher.seed = (
        False,
        rl.top_p,
        rl.temperature,
        rl.seed,
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


# ---------------------------------------------------------------------------------------------- episodes
@dataclass
class Episode:
    """One switch-generated response and its switcher sequence.

    ``encoded`` is the whole sequence; labels ``branch`` onwards are the episode's own decisions
    (earlier ones are a shared prefix in ``fork`` credit). ``trained[j]`` tells whether label ``j``
    was sampled from the policy (not forced, not prefix); ``logprobs[j]`` is its log-probability
    under the distribution it was actually sampled from.
    """

    query: str
    trace: Trace
    encoded: EncodedSequence
    branch: int
    trained: list[bool]
    logprobs: list[float]

    @property
    def split(self) -> int:
        """Where the completion starts in ``encoded.input_ids``: the first own label."""
        pos = self.encoded.label_positions
        return pos[self.branch] if self.branch < len(pos) else len(self.encoded.input_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.encoded.input_ids[: self.split]

    @property
    def completion_ids(self) -> list[int]:
        return self.encoded.input_ids[self.split :]

    @property
    def completion_mask(self) -> list[int]:
        """1 on trained label tokens, 0 on patch (environment) tokens and forced labels."""
        mask = [0] * (len(self.encoded.input_ids) - self.split)
        for pos, trained in zip(self.encoded.label_positions, self.trained):
            if trained:
                mask[pos - self.split] = 1
        return mask

    @property
    def completion_logprobs(self) -> list[float]:
        """Behaviour log-prob per completion token (0.0 on environment tokens and forced labels)."""
        out = [0.0] * (len(self.encoded.input_ids) - self.split)
        for pos, trained, lp in zip(self.encoded.label_positions, self.trained, self.logprobs):
            if trained:
                out[pos - self.split] = lp
        return out


def nucleus_logprob(probs: Sequence[float], action: int, top_p: float) -> float:
    """log P(action) under top-p sampling from ``probs`` (the rule of ``sample_next``: the smallest
    prefix of the sorted probabilities whose mass reaches ``top_p``, renormalised)."""
    p = torch.tensor(probs, dtype=torch.float64)
    if top_p < 1.0:
        sorted_p, order = p.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        p = torch.zeros_like(p).scatter(0, order, sorted_p * keep)
    return math.log(max(float(p[action] / p.sum()), 1e-45))


def forced(switcher: LMSwitcher, trace: Trace, j: int) -> bool:
    """Whether decision ``j`` of ``trace`` was forced by the switcher's ``aligned_first_last`` rule."""
    if not switcher.aligned_first_last:
        return False
    used = sum(len(p.token_ids) for p in trace.patches[:j])
    return j == 0 or trace.max_new_tokens - used <= switcher.patch_tokens


def _to_episode(switcher: LMSwitcher, trace: Trace, branch: int) -> Episode:
    enc = switcher.sequence.encode(trace.query, trace.patches)
    trained, logprobs = [], []
    for j, patch in enumerate(trace.patches):
        own = j >= branch and not forced(switcher, trace, j)
        if own and patch.probs is None:
            raise RuntimeError(f"trace {trace.key!r}: patch {j} carries no switch distribution")
        trained.append(own)
        logprobs.append(nucleus_logprob(patch.probs, patch.author, switcher.top_p) if own else 0.0)
    return Episode(trace.query, trace, enc, branch, trained, logprobs)


def _decide_and_step(pool: CandidatePool, switcher: LMSwitcher, traces: list[Trace]) -> None:
    decisions = switcher.decide(traces)
    pool.step(traces, [d.action for d in decisions])
    for t, d in zip(traces, decisions):
        t.patches[-1].probs = d.probs


@torch.no_grad()
def sample_episodes(
    switcher: LMSwitcher,
    pool: CandidatePool,
    queries: Sequence[str],
    group_size: int,
    key_prefix: str,
    max_new_tokens: int,
    credit: str = "episode",
    seed: int = 0,
) -> list[Episode]:
    """``group_size`` episodes per query (query-major order), sampled by ``switcher`` over ``pool``.

    All live traces advance together (one batched call per chosen candidate per step). ``key_prefix``
    must be unique per call (e.g. contain the training step): trace keys seed every random draw.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if credit not in ("episode", "fork"):
        raise ValueError(f"credit must be 'episode' or 'fork', got {credit!r}")
    was_training = switcher.model.training
    switcher.model.eval()
    switcher.reset_cache()  # the weights changed since the last rollout
    try:
        if credit == "episode":
            traces = [
                Trace(f"{key_prefix}/q{i}/g{g}", q, max_new_tokens)
                for i, q in enumerate(queries)
                for g in range(group_size)
            ]
            advance(pool, switcher, traces)
            return [_to_episode(switcher, t, 0) for t in traces]
        return _forked_episodes(switcher, pool, queries, group_size, key_prefix, max_new_tokens, seed)
    finally:
        switcher.model.train(was_training)


def _forked_episodes(
    switcher: LMSwitcher,
    pool: CandidatePool,
    queries: Sequence[str],
    group_size: int,
    key_prefix: str,
    max_new_tokens: int,
    seed: int,
) -> list[Episode]:
    max_decisions = math.ceil(max_new_tokens / pool.patch_tokens)
    trunks = [Trace(f"{key_prefix}/q{i}/trunk", q, max_new_tokens) for i, q in enumerate(queries)]
    targets = [
        int(torch.randint(max_decisions, (), generator=generator(seed, t.key, "branch-point")))
        for t in trunks
    ]
    live = [t for t, d in zip(trunks, targets) if d > 0]
    while live:
        _decide_and_step(pool, switcher, live)
        live = [t for t, d in zip(trunks, targets) if not t.done and 0 < len(t.patches) < d]
    branches: list[Trace] = []
    points: list[int] = []
    pool.prefill([t for t in trunks if t.patches and not t.done])  # every candidate reads a trunk once
    for i, trunk in enumerate(trunks):
        keys = [f"{key_prefix}/q{i}/g{g}" for g in range(group_size)]
        if trunk.done or not trunk.patches:  # ended before the target: branch at its last decision
            point = max(0, len(trunk.patches) - 1) if trunk.done else 0
            group = [Trace(k, trunk.query, max_new_tokens, list(trunk.patches[:point])) for k in keys]
        else:  # branch where the trunk stands, sharing its KV caches
            point = len(trunk.patches)
            pool.fork(trunk.key, keys)
            switcher.fork(trunk.key, keys)
            group = [trunk.fork(k) for k in keys]
        branches.extend(group)
        points.extend([point] * group_size)
    pool.release([t.key for t in trunks])
    switcher.release([t.key for t in trunks])
    advance(pool, switcher, branches)
    return [_to_episode(switcher, t, d) for t, d in zip(branches, points)]


# ---------------------------------------------------------------------------------------------- metrics
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

    W&B runs offline unless ``WANDB_MODE`` says otherwise, so no login is ever needed.
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
            os.environ.setdefault("WANDB_MODE", "offline")
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


def train(
    config: RunConfig,
    algo: str,
    rl: RLSection | None = None,
    reward: Any = None,
    report_to: str | None = None,
) -> RLResult:
    """Run ``algo`` (grpo | ppo | sb3-ppo) on ``config``; see each trainer module."""
    if algo not in ALGOS:
        raise ConfigError(f"algo must be one of {ALGOS}, got {algo!r}")
    rl = (rl or config.rl).model_copy()
    if report_to is not None:
        rl.report_to = report_to
    setup = prepare(config, rl, reward)
    try:
        return _algorithm(algo)(setup)
    finally:
        if isinstance(setup.pool, RayCandidatePool):
            setup.pool.close()


def _algorithm(algo: str) -> Callable[[RLSetup], RLResult]:
    """The trainer function of ``algo`` (imported on demand: each pulls in its own dependencies)."""
    if algo == "grpo":
        from switchrl.trainers.grpo import train_grpo as run
    elif algo == "ppo":
        from switchrl.trainers.ppo import train_ppo as run
    else:
        from switchrl.trainers.sb3 import train_sb3 as run
    return run


def main(args: Any) -> int:
    """``switchrl rl --config X --algo grpo|ppo|sb3-ppo [--reward SPEC ...] [--report-to ...]
    [--executor local|ray] [--ray-address A]``."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    config = load_run_config(args.config)
    config.executor = config.executor.overridden(
        executor=getattr(args, "executor", None), ray_address=getattr(args, "ray_address", None)
    )
    result = train(config, args.algo, reward=args.reward or None, report_to=args.report_to)
    print(f"{args.algo}: policy saved to {result.policy_dir}")
    if result.history:
        last = result.history[-1]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}))
    return 0
