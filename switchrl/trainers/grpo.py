"""GRPO for the LM switcher through TRL's own ``GRPOTrainer`` and its ``rollout_func`` hook.

An episode is one switch-generated response in the single sequence format::

    prompt_ids     = the switcher's prompt for the query  (+ the shared prefix in ``fork`` credit)
    completion_ids = <c_k> patch by c_k <c_j> patch by c_j ...
    env_mask       = 1 on the sampled label tokens (actions, trained), 0 on patch tokens (environment)
    logprobs       = the behaviour log-prob of each sampled label, 0.0 elsewhere

How TRL 1.16 calls the hook (``GRPOTrainer._generate``): its ``RepeatSampler`` already repeats
every prompt ``num_generations`` times in a row, so ``rollout_func(prompts, trainer)`` receives the
per-process slice *with* that duplication (the docstring's "no duplication" does not match the
code) and must return exactly one completion per entry. :func:`make_rollout_func` checks the groups
and samples them together. Extra keys (``response``, ``num_switches``, ``authors``) are merged into
each example and reach the reward functions as keyword lists. ``mask_truncated_completions`` stays
False: an episode may end on a patch without EOS.

Label-restricted policy. The switcher samples from the softmax over the label tokens only, but
``GRPOTrainer`` scores completions with a log-softmax over the whole vocabulary. :func:`restricted_head`
reconciles the two exactly: while training, a frozen bias on the switcher's output embedding lowers
every non-label logit by ``1e4``, so at label positions TRL's log-prob, ratio, KL and entropy are
those of the restricted distribution the switcher samples from (``rl.top_p`` = 1, the default;
``rl.temperature`` is passed to TRL as its ``temperature``). The bias never changes a decision (the
switcher reads only the label logits) and is removed before saving. At patch positions the values are
finite and masked out by ``env_mask``. The ``logprobs`` we return are the behaviour log-probs of the
distribution actually sampled (nucleus-renormalised if ``rl.top_p`` < 1); without vLLM, TRL uses
them only for its off-policy mask (``off_policy_mask_threshold``), not for the importance ratio,
which it computes from the training model itself (``old_per_token_logps``).

Rewards: one TRL reward function per run: the task scorer on the final response (``score``), plus
``switch_cost`` (weight ``rl.switch_cost``, value ``-num_switches``, ramped up over
``rl.switch_cost_warmup_steps``) when a switch cost is set; the
switch rate and each candidate's share of patches are logged with ``log_metric``. TRL logs the
reward, KL (``rl.beta`` > 0), entropy of the switch distribution and clip ratios per step.
``rl_log.json`` also records, per optimiser step, the wall-clock and CPU seconds since training began
(``clock``), so a learning curve can charge each checkpoint what it cost.
Checkpoints are TRL's own (``save_steps``); a rerun resumes from the last complete one, and refuses
when ``rl.out_dir`` was written with another configuration (:func:`~switchrl.trainers.rl_setup.claim_out_dir`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback

from switchrl.devices import training_settings
from switchrl.errors import ConfigError
from switchrl.policies.lm_switcher import LMSwitcher
from switchrl.rewards.router import TaskScorers
from switchrl.run_config import RLSection
from switchrl.tasks.base import TaskInstance
from switchrl.trainers.episodes import sample_episodes
from switchrl.trainers.rl_setup import (
    RLResult,
    RLSetup,
    build_switcher,
    check_failures,
    claim_out_dir,
    last_complete_checkpoint,
    save_switcher,
    switch_stats,
)
from switchrl.utils.training import one_device, trainer_args

LABEL_ONLY_BIAS = -1e4  # exp(-1e4) underflows to 0: the softmax is exactly the label-restricted one


@contextmanager
def restricted_head(model: torch.nn.Module, label_ids: Sequence[int]) -> Iterator[None]:
    """Within the block, ``model``'s output embedding adds ``LABEL_ONLY_BIAS`` to every logit but ``label_ids``.

    A (frozen) bias rather than a forward hook, because TRL's fused LM head reads ``lm_head.weight``
    and ``lm_head.bias`` directly instead of calling the module. This also covers peft's
    ``TrainableTokensWrapper`` around the head (trainable label rows), whose ``weight`` is the merged one.
    """
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ConfigError(
            f"the switcher's output embedding ({type(head).__name__}) has no [vocab, hidden] weight; "
            "cannot restrict it to the label tokens"
        )
    own = "bias" in head._parameters
    original = head._parameters.get("bias")
    offset = torch.full((weight.shape[0],), LABEL_ONLY_BIAS, dtype=weight.dtype, device=weight.device)
    offset[list(label_ids)] = 0.0
    if original is not None:
        offset = offset + original.detach()
    head.bias = torch.nn.Parameter(offset, requires_grad=False)
    try:
        yield
    finally:
        if own:
            head.bias = original
        else:
            del head.bias


def instances_dataset(instances: Sequence[TaskInstance]) -> Dataset:
    """The GRPO prompt dataset: ``prompt`` (the query), ``reference``, ``task``, ``instance_id``, ``meta`` (JSON)."""
    return Dataset.from_list(
        [
            {
                "prompt": i.query,
                "reference": i.reference,
                "task": i.task,
                "instance_id": i.id,
                "meta": json.dumps(i.meta),
            }
            for i in instances
        ]
    )


def make_rollout_func(switcher: LMSwitcher, setup: RLSetup) -> Callable[[list, Any], dict[str, list]]:
    """TRL's ``rollout_func``: the prompts (grouped ``num_generations`` in a row) -> switch episodes."""
    rl = setup.rl
    max_new_tokens = setup.resolved.generation.max_new_tokens

    def rollout(prompts: list, trainer: Any) -> dict[str, list]:
        g = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
        if len(prompts) % g or any(prompts[i] != prompts[i - i % g] for i in range(len(prompts))):
            raise RuntimeError(
                f"rollout_func expects each prompt repeated num_generations={g} times in a row"
            )
        if any(not isinstance(p, str) for p in prompts):
            raise ConfigError("GRPO prompts must be the query strings (no chat messages)")
        mode = "train" if trainer.model.training else "eval"
        prefix = f"grpo/{mode}/s{trainer.state.global_step}/p{trainer.accelerator.process_index}"
        episodes = sample_episodes(
            switcher,
            setup.pool,
            prompts[::g],
            g,
            prefix,
            max_new_tokens,
            credit=rl.credit,
            seed=rl.seed,
            scheduling=setup.resolved.generation.scheduling(),
        )
        return {
            "prompt_ids": [e.prompt_ids for e in episodes],
            "completion_ids": [e.completion_ids for e in episodes],
            "logprobs": [e.completion_logprobs for e in episodes],
            "env_mask": [e.completion_mask for e in episodes],
            "response": [e.trace.text for e in episodes],
            "num_switches": [e.trace.num_switches for e in episodes],
            "authors": [e.trace.authors for e in episodes],
        }

    return rollout


class ScoreReward:
    """TRL reward function: the task's scorer on the episode's response (``response`` from the rollout)."""

    __name__ = "score"

    def __init__(self, rewards: TaskScorers, names: Sequence[str]):
        self.rewards, self.names = rewards, list(names)

    def __call__(
        self,
        prompts: list[str],
        completions: list,
        *,
        response: list[str],
        reference: list[str],
        task: list[str],
        instance_id: list[str],
        meta: list[str],
        authors: list[list[int]],
        log_metric: Callable[[str, float], None] | None = None,
        **_: Any,
    ) -> list[float]:
        instances = [
            TaskInstance(id=i, query=q, reference=r, task=t, meta=json.loads(m))
            for i, q, r, t, m in zip(instance_id, prompts, reference, task, meta)
        ]
        values, failures = self.rewards.score(instances, response)
        if log_metric is not None:
            for name, value in {
                **switch_stats(authors, self.names),
                "score/failures": float(failures),
            }.items():
                log_metric(name, value)
        return values


class SwitchCost:
    """TRL reward function ``-num_switches`` x the warm-up ramp (weighted by ``rl.switch_cost``, so the
    charge is ``rl.switch_cost_at(step)`` per switch)."""

    __name__ = "switch_cost"

    def __init__(self, rl: RLSection):
        self.rl = rl

    def __call__(
        self,
        num_switches: list[int],
        trainer_state: Any = None,
        log_metric: Callable[[str, float], None] | None = None,
        **_: Any,
    ) -> list[float]:
        cost = self.rl.switch_cost_at(
            trainer_state.global_step if trainer_state is not None else self.rl.steps
        )
        if log_metric is not None:
            log_metric("switch_cost", cost)
        return [-cost / self.rl.switch_cost * n for n in num_switches]


class StepClock(TrainerCallback):
    """At the end of each optimiser step, the wall-clock and CPU seconds (this
    process) since training began; the step's checkpoint save comes after it, so is charged to the next."""

    def __init__(self) -> None:
        self.marks: list[dict[str, float]] = []
        self._start = (time.perf_counter(), time.process_time())

    def on_train_begin(self, *_: Any, **__: Any) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_step_end(self, args: Any, state: Any, *_: Any, **__: Any) -> None:
        wall, cpu = self._start
        self.marks.append(
            {"step": state.global_step, "wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
        )


def grpo_config(setup: RLSetup, switcher: LMSwitcher) -> Any:
    """The ``GRPOConfig`` of a run (one generation batch per optimiser step, no vLLM), in the switcher's
    precision on its one device (``switcher.dtype`` / ``switcher.device``)."""
    from trl import GRPOConfig

    rl, placement = setup.rl, setup.resolved.config.switcher
    args = GRPOConfig(
        **trainer_args(
            str(setup.out_dir / "trainer"),
            seed=rl.seed,
            report_to=rl.report_to,
            logging_steps=rl.logging_steps,
            **training_settings(placement.device, placement.dtype),
        ),
        max_steps=rl.steps,
        learning_rate=rl.learning_rate,
        lr_scheduler_type="constant",
        per_device_train_batch_size=rl.queries_per_step * rl.num_generations,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=rl.num_generations,
        beta=rl.beta,
        epsilon=rl.clip_epsilon,
        temperature=switcher.temperature,
        mask_truncated_completions=False,
        disable_dropout=True,
        scale_rewards=rl.scale_rewards,
        reward_weights=[1.0] + ([rl.switch_cost] if rl.switch_cost else []),
        save_strategy="steps",
        save_steps=rl.save_steps,
        remove_unused_columns=False,
    )
    return one_device(args)


def train_grpo(setup: RLSetup, switcher: LMSwitcher | None = None) -> RLResult:
    """Train the switcher with GRPO; saves it to ``<rl.out_dir>/switcher`` and the log to ``rl_log.json``."""
    claim_out_dir(setup, "grpo")
    switcher = switcher or build_switcher(setup)
    args = grpo_config(setup, switcher)  # also applies the environment defaults GRPOTrainer reads
    from trl import GRPOTrainer

    reward_funcs: list[Callable] = [ScoreReward(setup.rewards, setup.names)]
    if setup.rl.switch_cost:
        reward_funcs.append(SwitchCost(setup.rl))
    clock = StepClock()
    trainer = GRPOTrainer(
        model=switcher.model,
        callbacks=[clock],
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=instances_dataset(setup.instances),
        processing_class=switcher.tokenizer,
        rollout_func=make_rollout_func(switcher, setup),
    )
    last = last_complete_checkpoint(Path(args.output_dir))
    with restricted_head(switcher.model, switcher.sequence.label_ids):
        trainer.train(resume_from_checkpoint=last)
    model = switcher.model
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")  # TRL's frozen copy of the starting adapter (the KL reference)
    model.eval()
    switcher.reset_cache()
    policy_dir = setup.out_dir / "switcher"
    history = [h for h in trainer.state.log_history if "reward" in h]
    if (
        trainer.accelerator.is_main_process
    ):  # one writer under accelerate launch (the ranks' weights are equal)
        save_switcher(switcher, policy_dir)
        (setup.out_dir / "rl_log.json").write_text(
            json.dumps(
                {"algo": "grpo", "credit": setup.rl.credit, "history": history, "clock": clock.marks},
                indent=2,
            )
        )
    trainer.accelerator.wait_for_everyone()
    check_failures(setup)
    return RLResult(setup.out_dir, policy_dir, history)
