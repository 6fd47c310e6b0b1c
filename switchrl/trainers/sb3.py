"""``switchrl rl --algo sb3-ppo``: stable-baselines3 ``PPO`` on ``FeatureObservation(SwitchEnv)``.

The cheap non-LM baseline switcher: an MLP over hashed n-grams of the query and the trace so far
plus the recent authors (:class:`~switchrl.envs.wrappers.FeatureObservation`). ``rl.sb3.num_envs``
envs share one candidate pool and write their patches of a step in one pool call
(:class:`~switchrl.envs.sb3_vec_env.SB3SwitchVecEnv` over a ``SwitchVectorEnv``). The
reward is the task score at the end of the episode minus ``rl.switch_cost`` per switch. Metrics
(episode reward, score, switch rate, share per candidate, and SB3's ``train/*`` values) go to
``<out>/metrics.jsonl`` (and TensorBoard / W&B) after every rollout. Checkpoints are SB3 zips under
``<out>/checkpoints``; a rerun resumes from the last one. The trained policy is saved as an
:class:`~switchrl.policies.sb3_switcher.SB3Switcher` in ``<out>/switcher``.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from switchrl.envs.switch_env import DEFAULT_CHARSET, ObservationLayout, SwitchEnvConfig
from switchrl.envs.vector_env import SwitchVectorEnv
from switchrl.errors import ConfigError
from switchrl.policies.sb3_switcher import SavedSB3SwitcherConfig, SB3Switcher
from switchrl.rewards.provenance import FailureTally
from switchrl.trainers.rl_setup import MetricsLogger, RLResult, RLSetup, check_failures, claim_out_dir

log = logging.getLogger(__name__)


def env_config(setup: RLSetup) -> SwitchEnvConfig:
    """The ``SwitchEnv`` of the run: its train instances, reward (each task's scorer) and switch cost."""
    reward, tasks = setup.rewards.for_env(setup.instances)
    return SwitchEnvConfig(
        generation=setup.resolved.generation,
        reward=reward,
        switch_cost=setup.rl.switch_cost,
        tasks=tasks,
        info_timings=False,
    )


def _metrics_callback(
    logger: MetricsLogger, names: list[str], history: list[dict], tally: FailureTally, scorer: str
) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback

    class SwitchMetrics(BaseCallback):
        """Per rollout: episode reward and score, switch rate, share per candidate, SB3's train/* values."""

        def _on_rollout_start(self) -> None:
            self.rewards: list[float] = []
            self.scores: list[float] = []
            self.authors: Counter[int] = Counter()
            self.switched = self.steps = 0

        def _on_step(self) -> bool:
            for info, reward in zip(self.locals["infos"], self.locals["rewards"]):
                self.authors[info["author"]] += 1
                self.steps += 1
                self.switched += bool(info["switched"])
                if "score" in info:
                    self.scores.append(float(info["score"]))
                    tally.add(scorer, 1, [info["score_error"]] if info.get("score_error") else [])
                    self.rewards.append(float(info["episode"]["r"]) if "episode" in info else float(reward))
            return True

        def _on_rollout_end(self) -> None:
            metrics = {
                k: float(v) for k, v in self.model.logger.name_to_value.items() if k.startswith("train/")
            }
            if self.rewards:
                metrics.update(
                    reward=sum(self.rewards) / len(self.rewards),
                    score=sum(self.scores) / len(self.scores),
                    episodes=float(len(self.rewards)),
                )
            metrics["switch/rate"] = self.switched / max(1, self.steps)
            for i, name in enumerate(names):
                metrics[f"switch/share/{name}"] = self.authors[i] / max(1, self.steps)
            logger.log(self.num_timesteps, metrics)
            history.append({"step": self.num_timesteps, **metrics})

    return SwitchMetrics()


def last_checkpoint(directory: Path) -> Path | None:
    """The newest ``sb3_ppo_N_steps.zip`` that is a whole zip; one a kill cut short is skipped."""
    found = sorted(
        (int(m.group(1)), p)
        for p in directory.glob("sb3_ppo_*_steps.zip")
        if (m := re.fullmatch(r"sb3_ppo_(\d+)_steps\.zip", p.name))
    )
    for _, path in reversed(found):
        if zipfile.is_zipfile(path):
            return path
        log.warning("%s is incomplete (a save was interrupted): skipped", path)
    return None


def train_sb3(setup: RLSetup) -> RLResult:
    """Train SB3 PPO on the run's switch env; saves an :class:`SB3Switcher` to ``<rl.out_dir>/switcher``."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import CallbackList, CheckpointCallback
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.vec_env import VecMonitor

    from switchrl.envs.sb3_vec_env import SB3SwitchVecEnv

    rl, opts, out = setup.rl, setup.rl.sb3, setup.out_dir
    if rl.switch_cost_warmup_steps:
        raise ConfigError(
            "rl.switch_cost_warmup_steps: sb3-ppo charges the env's fixed switch_cost; "
            "remove the warm-up or use --algo grpo / ppo"
        )
    claim_out_dir(setup, "sb3-ppo")
    config = env_config(setup)
    venv = SwitchVectorEnv(config, num_envs=opts.num_envs, pool=setup.pool, autoreset_mode="SameStep")
    features = SB3SwitchVecEnv(venv, opts.n_features, opts.history)
    env = VecMonitor(features)
    env.seed(rl.seed)
    checkpoints = out / "checkpoints"
    resume = last_checkpoint(checkpoints)
    if resume is not None:
        model = PPO.load(resume, env=env, device="cpu")
    else:
        model = PPO(
            "MlpPolicy",
            env,
            n_steps=opts.n_steps,
            batch_size=opts.batch_size,
            n_epochs=opts.n_epochs,
            learning_rate=opts.learning_rate,
            ent_coef=opts.ent_coef,
            seed=rl.seed,
            device="cpu",
            policy_kwargs={"net_arch": list(opts.net_arch)},
            verbose=0,
        )
    model.set_logger(configure(str(out / "sb3_log"), ["csv"]))
    logger = MetricsLogger(out, rl.report_to, config=rl.model_dump())
    history: list[dict] = []
    callbacks = CallbackList(
        [
            _metrics_callback(logger, setup.names, history, setup.rewards.tally, _scorer_label(setup)),
            CheckpointCallback(
                save_freq=opts.n_steps * rl.save_steps, save_path=str(checkpoints), name_prefix="sb3_ppo"
            ),
        ]
    )
    remaining = opts.total_timesteps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=callbacks, reset_num_timesteps=resume is None, progress_bar=False)
        last = {k: float(v) for k, v in model.logger.name_to_value.items() if k.startswith("train/")}
        if last:  # the values of the final update (SB3 dumps them only before the next rollout)
            logger.log(model.num_timesteps, last)
            history.append({"step": model.num_timesteps, **last})
    logger.close()
    ngrams = list(features.features.ngrams)
    env.close()
    layout = ObservationLayout.from_config(config, len(setup.names))
    meta = SavedSB3SwitcherConfig(
        candidate_names=setup.names,
        max_patches=layout.max_patches,
        max_query_length=config.max_query_length,
        max_text_length=config.text_length,
        charset=config.charset or DEFAULT_CHARSET,
        replacement_char=config.replacement_char,
        n_features=opts.n_features,
        history=opts.history,
        ngrams=ngrams,
    )
    policy_dir = SB3Switcher(model, meta, seed=rl.seed).save_pretrained(out / "switcher")
    (out / "rl_log.json").write_text(json.dumps({"algo": "sb3-ppo", "history": history}, indent=2))
    check_failures(setup)
    return RLResult(out, policy_dir, history)


def _scorer_label(setup: RLSetup) -> str:
    """The scorer's name in a failure message (the env sees one reward; several tasks: all of them)."""
    labels = sorted({setup.rewards.label(i.task) for i in setup.instances})
    return labels[0] if len(labels) == 1 else f"reward ({', '.join(labels)})"
