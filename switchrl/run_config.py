"""The YAML run config shared by ``switchrl generate | simulate | sft | eval | rl`` and its resolution.

A config names its candidates (or ``testbed: {seed: S}`` for the built-in family), the tasks, the
reward and one section per command. :func:`load_config` validates the whole file up front so a
typo fails in a second, naming the key and the file, not after an hour of simulation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator

from switchrl.config import (
    CLIENT_SETTINGS,
    SCHEDULING,
    CandidateConfig,
    StrictModel,
    SwitcherConfig,
    SwitchGenerationConfig,
    TaskSourceConfig,
    load_yaml,
)
from switchrl.errors import ConfigError
from switchrl.executors.base import ExecutorConfig
from switchrl.rewards.base import Scorer
from switchrl.rewards.registry import RewardConfig
from switchrl.rewards.router import TaskScorers
from switchrl.tasks.base import TaskInstance
from switchrl.utils.files import dir_signature, file_sha256

ReportTo = Literal["none", "wandb", "tensorboard"]


__all__ = [
    "EvalSection",
    "PPOSection",
    "RLSection",
    "ResolvedRun",
    "RunConfig",
    "SB3Section",
    "SFTSection",
    "SimulateSection",
    "TestbedSection",
    "load_config",
]


class TestbedSection(StrictModel):
    """Use the built-in testbed family (built on first use) as candidates and task source."""

    __test__ = False  # not a pytest class
    seed: int = 0
    root: str | None = Field(None, description="family directory (default ~/.cache/switchrl/testbed/<seed>)")


class SimulateSection(StrictModel):
    k: int = Field(32, gt=0, description="random finishes per candidate and state (the paper: 32)")
    states_per_query: int = Field(4, gt=0)
    states_per_batch: int = Field(8, gt=0, description="states labelled together in one batched rollout")
    split: str = "train"
    limit: int | None = Field(None, gt=0, description="use only the first N queries of each task")
    out_dir: str = "runs/simulate"
    chunk_size: int = Field(16, gt=0, description="states per shard (the unit of resume and of a Ray task)")
    switch_cost: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="cost-aware labels: utilities are the mean of score - cost x author changes of each finish",
    )
    finisher: str = Field(
        "random",
        description="who writes the finishes: random (the paper's random switching) or a saved switcher "
        "directory (on-policy labels: sampled with its top_p, seeded per finish)",
    )


class SFTSection(StrictModel):
    base: str | None = Field(
        None, description="switcher base model (testbed default: the aligned checkpoint)"
    )
    init: str | None = Field(
        None,
        description="continue training a saved switcher directory (e.g. round 1 of on-policy labels) "
        "instead of a fresh LoRA adapter on base",
    )
    data_dir: str | None = Field(None, description="simulate output (default: simulate.out_dir)")
    out_dir: str = "runs/sft"
    epochs: float = Field(5, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(32, gt=0)
    max_steps: int = Field(-1, description="stop after this many optimiser steps (-1: use epochs)")
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    drop_all_equal: bool = Field(False, description="drop states whose utilities are all equal (no signal)")
    soft_labels: bool = Field(False, description="cross-entropy to softmax(utilities / temperature)")
    soft_temperature: float = Field(0.1, gt=0)
    report_to: ReportTo = "none"
    seed: int = 0


class EvalSection(StrictModel):
    split: str = "test"
    limit: int | None = Field(None, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0])
    systems: list[str] = Field(
        default_factory=lambda: ["singles", "random", "untuned", "sft"],
        description="singles | random | round_robin | untuned | sft | rl | oracle | a saved switcher dir",
    )
    sft_path: str | None = None
    rl_path: str | None = None
    out_dir: str = "runs/eval"
    batch_size: int = Field(64, gt=0)


class PPOSection(StrictModel):
    """The LM-switcher PPO of :mod:`switchrl.trainers.ppo`."""

    epochs: int = Field(4, gt=0, description="optimisation passes over each batch of episodes")
    minibatch_size: int = Field(8, gt=0, description="episodes per gradient step")
    value_coef: float = Field(0.5, ge=0)
    value_learning_rate: float = Field(1e-3, gt=0, description="learning rate of the value head")
    entropy_coef: float = Field(0.0, ge=0, description="bonus on the entropy of the switch distribution")
    max_grad_norm: float = Field(1.0, gt=0)


class SB3Section(StrictModel):
    """stable-baselines3 ``PPO`` on ``FeatureObservation(SwitchEnv)`` (:mod:`switchrl.trainers.sb3`)."""

    total_timesteps: int = Field(2048, gt=0, description="environment steps (one step = one patch)")
    num_envs: int = Field(
        4,
        gt=0,
        validation_alias=AliasChoices("num_envs", "n_envs"),
        description="envs stepped together (also: n_envs)",
    )
    n_steps: int = Field(64, gt=0, description="steps per env between updates")
    batch_size: int = Field(64, gt=0)
    n_epochs: int = Field(10, gt=0)
    learning_rate: float = Field(3e-4, gt=0)
    ent_coef: float = Field(0.01, ge=0)
    n_features: int = Field(256, gt=0, description="hashed n-gram features of the query and of the trace")
    history: int = Field(4, ge=0, description="one-hot authors of the last N patches")
    net_arch: list[int] = Field(default_factory=lambda: [64, 64])


class RLSection(StrictModel):
    """The ``rl:`` section of a run config."""

    init: str | None = Field(None, description="warm start: a saved switcher directory (e.g. sft.out_dir)")
    base: str | None = Field(
        None,
        description="untuned start: base model for a fresh LoRA switcher "
        "(testbed default: the aligned checkpoint)",
    )
    out_dir: str = "runs/rl"
    split: str = "train"
    tasks: list[str] | None = Field(None, description="train on these task names only (default: all)")
    limit: int | None = Field(None, gt=0, description="use only the first N queries of each task")
    steps: int = Field(50, gt=0, description="optimiser updates (GRPO/PPO)")
    queries_per_step: int = Field(4, gt=0)
    num_generations: int = Field(4, ge=2, description="episodes per query (the GRPO group size G)")
    credit: Literal["episode", "fork"] = Field(
        "episode",
        description="episode: one advantage per episode; "
        "fork: groups branch from a shared state (per-decision credit)",
    )
    learning_rate: float = Field(1e-4, gt=0)
    beta: float = Field(0.02, ge=0, description="KL penalty to the starting switcher (GRPO)")
    clip_epsilon: float = Field(0.2, gt=0, description="PPO/GRPO ratio clipping")
    switch_cost: float = Field(0.0, ge=0, allow_inf_nan=False, description="subtracted per change of author")
    switch_cost_warmup_steps: int = Field(
        0,
        ge=0,
        description="GRPO/PPO: the cost rises linearly from 0 to switch_cost over the first N updates, "
        "so the policy first learns where switches pay before they are charged",
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="GRPO: divide each advantage by the std of its group's rewards (TRL's default), of the "
        "whole batch's, or not at all; per group, a switch cost alone (equal scores) gets full weight",
    )
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="nucleus of the switch distribution while sampling "
        "episodes (1.0: exactly the policy being trained)",
    )
    temperature: float = Field(1.0, gt=0)
    lora_r: int = Field(8, gt=0)
    lora_alpha: int = Field(16, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    save_steps: int = Field(25, gt=0, description="checkpoint every N updates (resumable)")
    logging_steps: int = Field(1, gt=0)
    report_to: ReportTo = "none"
    seed: int = 0
    ppo: PPOSection = Field(default_factory=PPOSection)
    sb3: SB3Section = Field(default_factory=SB3Section)

    @model_validator(mode="after")
    def _warmup(self) -> RLSection:
        if self.switch_cost_warmup_steps and not self.switch_cost:
            raise ValueError("switch_cost_warmup_steps needs a switch_cost > 0 (there is nothing to ramp up)")
        if self.switch_cost_warmup_steps >= self.steps:
            raise ValueError(
                f"switch_cost_warmup_steps ({self.switch_cost_warmup_steps}) must be below steps "
                f"({self.steps}), else the full switch_cost is never charged"
            )
        return self

    def switch_cost_at(self, step: int) -> float:
        """The switch cost charged at update ``step`` (0-based): ``switch_cost`` x min(1, step / warm-up)."""
        warmup = self.switch_cost_warmup_steps
        return self.switch_cost * min(1.0, step / warmup) if warmup else self.switch_cost


class RunConfig(StrictModel):
    testbed: TestbedSection | None = None
    candidates: list[CandidateConfig] = Field(default_factory=list)
    generation: SwitchGenerationConfig | None = None
    tasks: list[TaskSourceConfig] = Field(default_factory=list)
    reward: RewardConfig | None = Field(
        None, description="default: each task's own scorer (testbed) or exact_match"
    )
    max_scorer_failure_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="simulate, eval and rl exit non-zero (after writing their records) when a scorer "
        "fails on more than this share of its samples; 1.0 disables the check",
    )
    switcher: SwitcherConfig = Field(default_factory=SwitcherConfig)
    simulate: SimulateSection = Field(default_factory=SimulateSection)
    sft: SFTSection = Field(default_factory=SFTSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    rl: RLSection = Field(default_factory=RLSection)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @model_validator(mode="after")
    def _has_candidates(self) -> RunConfig:
        if self.testbed is None and not self.candidates:
            raise ValueError("give either 'candidates' (a list) or 'testbed: {seed: N}'")
        if self.testbed is not None and self.candidates:
            raise ValueError("give either 'candidates' or 'testbed', not both")
        return self


def load_config(path: str | Path) -> RunConfig:
    return load_yaml(path, RunConfig)


class ResolvedRun:
    """A :class:`RunConfig` with its testbed family (if any) built and its defaults filled in."""

    def __init__(self, config: RunConfig):
        self.config = config
        self.family = None
        from switchrl.tasks.loaders import check_task_file

        for i, src in enumerate(config.tasks):  # a missing task file fails here, before any model loads
            if src.source == "jsonl" and src.path:
                check_task_file(src.path, f"tasks.{i}.path")
        if config.testbed is not None:
            from switchrl.testbed import build_family

            self.family = build_family(seed=config.testbed.seed, out=config.testbed.root)

    @property
    def candidates(self) -> list[CandidateConfig]:
        return self.family.candidate_configs() if self.family else list(self.config.candidates)

    @property
    def generation(self) -> SwitchGenerationConfig:
        if self.config.generation is not None:
            return self.config.generation
        return self.family.generation_config() if self.family else SwitchGenerationConfig()

    def switcher_base(self, base: str | None, field: str) -> str:
        """The base model of a fresh switcher: ``base`` (the config's ``field``), else the testbed's
        aligned checkpoint."""
        if base:
            return base
        if self.family is not None:
            return str(self.family.aligned)
        raise ConfigError(f"{field}: name the switcher's base model (a local checkpoint directory)")

    def rl_start(self, rl: RLSection) -> tuple[str, str]:
        """Where RL's switcher starts: ``("init", rl.init)`` (a saved switcher) or ``("base", model)`` (a
        fresh LoRA on ``rl.base``, the testbed's aligned checkpoint by default)."""
        if rl.init:
            return "init", rl.init
        if rl.base or self.family is not None:
            return "base", self.switcher_base(rl.base, "rl.base")
        raise ConfigError(
            "rl: give rl.init (a switcher saved by `switchrl sft`, e.g. the sft.out_dir "
            f"{self.config.sft.out_dir}) or rl.base (a base model for a fresh LoRA switcher)"
        )

    @property
    def label_tokens(self) -> list[str] | None:
        """The switcher's label tokens: the testbed family reserves its own; ``None``: the default."""
        return list(self.family.label_tokens) if self.family is not None else None

    def task_sources(self) -> list[TaskSourceConfig]:
        if self.config.tasks:
            return list(self.config.tasks)
        if self.family:
            return [
                TaskSourceConfig(source="testbed", task=t) for t in ("recall", "arithmetic", "compositional")
            ]
        raise ConfigError("tasks: give at least one task source (e.g. {source: jsonl, path: tasks.jsonl})")

    def instances(self, split: str, limit: int | None = None) -> dict[str, list[TaskInstance]]:
        """Task name -> instances of ``split`` (each source's ``limit`` or ``limit``, whichever is smaller)."""
        from switchrl.tasks import load_jsonl

        out: dict[str, list[TaskInstance]] = {}
        for n, src in enumerate(self.task_sources()):
            if src.source == "testbed" and src.split is not None and src.split != split:
                continue  # the source names its split: it gives nothing to another one
            if src.source == "testbed":
                if self.family is None:
                    raise ConfigError("tasks: source 'testbed' needs 'testbed: {seed: N}' in the config")
                if src.task is None:
                    raise ConfigError(
                        "tasks: a testbed source needs 'task' (recall | arithmetic | compositional | two_attributes "
                        "| three_towns)"
                    )
                items = self.family.tasks(src.task, split)
            else:
                if not src.path:
                    raise ConfigError("tasks: a jsonl source needs 'path'")
                items = _split_rows(load_jsonl(src.path, task=src.task), src, split, f"tasks.{n}")
            cap = min(x for x in (src.limit, limit, len(items)) if x is not None)
            for inst in items[:cap]:
                out.setdefault(inst.task, []).append(inst)
        return out

    def fingerprint(self, scorers: TaskScorers | dict[str, Scorer]) -> dict:
        """What every command's records depend on (each adds its own section): candidates (and a signature
        of each local checkpoint directory), generation (less :data:`SCHEDULING`), switcher, the reward spec and each task's
        scorer source, and each task source's content (a JSONL file's sha256; the testbed's world
        seed). Resume refuses a run whose fingerprint differs."""
        dump = self.config.model_dump(mode="json", include={"testbed", "switcher", "reward"})
        family_seed = self.family.seed if self.family is not None else None
        return {
            "candidates": [c.model_dump(mode="json", exclude=CLIENT_SETTINGS) for c in self.candidates],
            "checkpoints": {c.name: dir_signature(c.path) for c in self.candidates},
            "generation": self.generation.model_dump(mode="json", exclude=SCHEDULING),
            "testbed": dump["testbed"],
            "switcher": dump["switcher"],
            "reward": {"spec": dump["reward"], "scorers": TaskScorers(scorers).fingerprint()},
            "tasks": [
                {
                    **src.model_dump(mode="json"),
                    "content": family_seed if src.source == "testbed" else file_sha256(src.path or ""),
                }
                for src in self.task_sources()
            ],
        }

    def scorers(self, tasks: list[str]) -> dict[str, Scorer]:
        """The reward of each task: the config's ``reward`` for all, else the task's own scorer."""
        if self.config.reward is not None:
            scorer = self.config.reward.build()
            return {t: scorer for t in tasks}
        from switchrl.rewards import exact_match
        from switchrl.testbed.tasks import ALL_TASKS

        return {t: (self.family.scorer(t) if self.family and t in ALL_TASKS else exact_match) for t in tasks}


def _split_rows(
    items: list[TaskInstance], src: TaskSourceConfig, split: str, where: str
) -> list[TaskInstance]:
    """The rows of ``split``: a row's own ``split`` key, else the source's ``split``; with
    ``allow_overlap``, rows without a key are in every split. Rows without a key and no ``split`` on the
    source count as ``test``; reading them for another split is an error (train/test overlap)."""
    unsplit = sum("split" not in i.meta for i in items)
    if unsplit and src.split is None and not src.allow_overlap and split != "test":
        raise ConfigError(
            f"{where} ({src.path}): {unsplit} row(s) have no 'split' key and the source sets no 'split', "
            f"so they are 'test' rows (eval's); reading them for split {split!r} would train on the "
            f"queries eval tests on. Set 'split: {split}' on this source (and give eval its own file), add "
            "a 'split' key to each row, or set 'allow_overlap: true' on the source if the overlap is intended"
        )
    own = split if src.allow_overlap else (src.split or "test")
    return [i for i in items if i.meta.get("split", own) == split]
