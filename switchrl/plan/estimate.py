"""Peak memory per device of ``simulate``, ``eval`` and ``rl`` for a run config, and the fix when it overflows.

The rules (upper bounds: every sequence runs to ``prompt + max_new_tokens`` positions):

* weights: parameters x dtype bytes (``auto``: bfloat16 on CUDA, float32 on CPU), per model;
* KV: a candidate keeps a cache of every in-flight sequence it has read, and under switching every
  candidate reads every sequence; one batched call adds a padded working copy of the rows it writes
  (sequences / candidates per candidate) and ~16 B x vocab per row of float32 sampling buffers;
* in flight: simulate ``states_per_batch x candidates x k`` finishes; eval ``eval.batch_size`` traces
  (plus the LM switcher's own cache of them); rl ``queries_per_step x num_generations`` episodes;
* the RL switcher (LoRA on its base): base weights, LoRA weights + gradients + Adam in float32
  (16 B per LoRA parameter, ``all-linear``), and the larger of the rollout cache and one training
  step's activations. Without checkpointing (``--algo ppo``, ``ppo.minibatch_size`` episodes) autograd
  keeps dtype bytes x (20 x hidden + 5 x intermediate) per layer per token (measured on a Hugging Face
  Llama with LoRA ``all-linear``; SDPA keeps no attention scores); with it (GRPO: TRL's default, all
  ``queries_per_step x num_generations`` episodes at once) hidden x dtype bytes per layer per token plus
  one layer's full set while it is recomputed; both + 2 x vocab x dtype bytes per token (the logits and
  their gradient). ``--algo sb3-ppo`` trains no LM switcher;
* vLLM candidates reserve ``gpu_memory_utilization`` (default 0.9) of their device.

A device fits when the peak is at most :data:`USABLE` of its capacity (the rest is for the CUDA
context, allocator fragmentation and activations of a prefill).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from switchrl.plan.models import DTYPE_BYTES, ModelShape

USABLE = 0.9
SAMPLING_BYTES_PER_LOGIT = 16  # float32 logits, softmax, sorted probabilities, their cumulative sum
ACTIVATIONS_PER_HIDDEN = 20  # saved activations per layer per token, in dtype units per hidden unit
ACTIVATIONS_PER_INTERMEDIATE = 5  # ... and per unit of the MLP's width (tests/test_plan.py measures both)
ADAM_BYTES = 16  # float32 weight + gradient + two moments per trainable parameter
COMMANDS = ("simulate", "eval", "rl")


@dataclass(frozen=True)
class Model:
    """One model of the run, where it sits and in which dtype."""

    name: str
    shape: ModelShape | None  # None: a remote (OpenAI-compatible) candidate, nothing local
    dtype: str
    device: str
    reserve: float | None = None  # vLLM: the share of the device its engine takes


@dataclass(frozen=True)
class Workload:
    """What the three commands run: candidates, switchers, positions and the section knobs."""

    candidates: list[Model]
    eval_switcher: Model | None
    rl_switcher: Model | None
    positions: int  # prompt + max_new_tokens
    states_per_batch: int
    k: int
    eval_batch: int
    queries_per_step: int
    num_generations: int
    lora_r: int
    algo: str = "grpo"  # grpo | ppo | sb3-ppo
    ppo_minibatch: int = 8


@dataclass
class CommandPlan:
    """Bytes per device (each as named items) of one command, against each device's capacity."""

    command: str
    items: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def add(self, device: str, what: str, nbytes: int) -> None:
        self.items.setdefault(device, []).append((what, int(nbytes)))

    def peak(self, device: str) -> int:
        return sum(b for _, b in self.items.get(device, []))

    def over(self, capacity: dict[str, int]) -> list[str]:
        """Devices whose peak exceeds their usable capacity."""
        return [d for d in self.items if self.peak(d) > USABLE * capacity[d]]


def _candidates(plan: CommandPlan, w: Workload, sequences: int, capacity: dict[str, int]) -> None:
    n = len(w.candidates)
    rows = math.ceil(sequences / n)
    for c in w.candidates:
        if c.shape is None:
            continue
        if c.reserve is not None:
            plan.add(
                c.device,
                f"{c.name} weights + KV: vLLM engine ({c.reserve:.0%})",
                c.reserve * capacity[c.device],
            )
            continue
        kv = c.shape.kv_bytes_per_token(c.dtype)
        plan.add(c.device, f"{c.name} weights", c.shape.weight_bytes(c.dtype))
        plan.add(c.device, f"{c.name} KV {sequences} seq x {w.positions} pos", sequences * w.positions * kv)
        plan.add(c.device, f"{c.name} batch copy {rows} rows", rows * w.positions * kv)
        plan.add(c.device, f"{c.name} sampling {rows} rows", rows * c.shape.vocab * SAMPLING_BYTES_PER_LOGIT)


def activation_bytes_per_token(shape: ModelShape, dtype: str, checkpointing: bool) -> int:
    """What one training step keeps per token for the backward pass (see the module's rules)."""
    per_layer = ACTIVATIONS_PER_HIDDEN * shape.hidden + ACTIVATIONS_PER_INTERMEDIATE * shape.intermediate
    kept = shape.layers * shape.hidden + per_layer if checkpointing else shape.layers * per_layer
    return DTYPE_BYTES[dtype] * (kept + 2 * shape.vocab)


def plan_command(command: str, w: Workload, capacity: dict[str, int]) -> CommandPlan:
    """Peak bytes per device of ``command`` (``simulate`` | ``eval`` | ``rl``) on workload ``w``."""
    plan = CommandPlan(command)
    if command == "simulate":
        _candidates(plan, w, w.states_per_batch * len(w.candidates) * w.k, capacity)
    elif command == "eval":
        _candidates(plan, w, w.eval_batch, capacity)
        s = w.eval_switcher
        if s is not None and s.shape is not None:
            plan.add(s.device, "switcher weights", s.shape.weight_bytes(s.dtype))
            kv = w.eval_batch * w.positions * s.shape.kv_bytes_per_token(s.dtype)
            plan.add(s.device, f"switcher KV {w.eval_batch} seq", kv)
    elif command == "rl":
        episodes = w.queries_per_step * w.num_generations
        _candidates(plan, w, episodes, capacity)
        s = w.rl_switcher
        if s is not None and s.shape is not None and w.algo != "sb3-ppo":
            shape = s.shape
            plan.add(s.device, "switcher weights", shape.weight_bytes(s.dtype))
            plan.add(s.device, "LoRA + Adam", w.lora_r * shape.lora_params_per_rank * ADAM_BYTES)
            rollout = episodes * w.positions * shape.kv_bytes_per_token(s.dtype)
            grpo = w.algo == "grpo"
            trained = episodes if grpo else min(episodes, w.ppo_minibatch)
            train = trained * w.positions * activation_bytes_per_token(shape, s.dtype, checkpointing=grpo)
            plan.add(
                s.device,
                f"switcher {'training' if train >= rollout else 'rollout KV'} {episodes} ep",
                max(rollout, train),
            )
    else:
        raise ValueError(f"unknown command {command!r}; expected one of {COMMANDS}")
    return plan


def _largest(command: str, w: Workload, capacity: dict[str, int], knob: str, top: int) -> int:
    """The largest value <= ``top`` of ``knob`` at which ``command`` fits (0: none)."""
    lo, hi = 0, top
    while lo < hi:
        mid = (lo + hi + 1) // 2
        fits = not plan_command(command, replace(w, **{knob: mid}), capacity).over(capacity)
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    return lo


KNOBS = {
    "simulate": [("states_per_batch", "simulate.states_per_batch"), ("k", "simulate.k")],
    "eval": [("eval_batch", "eval.batch_size")],
    "rl": [("queries_per_step", "rl.queries_per_step"), ("num_generations", "rl.num_generations")],
}
PPO_KNOB = ("ppo_minibatch", "rl.ppo.minibatch_size")


def fix_for(plan: CommandPlan, w: Workload, capacity: dict[str, int]) -> str:
    """What to change so that ``plan`` fits: the knob to lower (to the largest value that fits), else
    where the weights must go."""
    over = plan.over(capacity)
    gib = 2**30
    where = ", ".join(
        f"{d} needs {plan.peak(d) / gib:.1f} GiB of {USABLE * capacity[d] / gib:.1f} usable" for d in over
    )
    weights = {d: sum(b for what, b in plan.items[d] if "weights" in what) for d in over}
    if any(weights[d] > USABLE * capacity[d] for d in over):
        return (
            f"{plan.command}: {where}, and the weights alone do not fit; give each model its own device "
            "(candidates.N.device: cuda:N), run on Ray with executor.placement: spread, or use bigger devices"
        )
    shared = any(sum("weights" in what for what, _ in plan.items[d]) > 1 for d in over)
    spread = ", or give each model its own device (candidates.N.device: cuda:N)" if shared else ""
    knobs = KNOBS[plan.command] if (plan.command, w.algo) != ("rl", "ppo") else [PPO_KNOB, *KNOBS["rl"]]
    for i, (knob, key) in enumerate(knobs):
        fixed = {k: 1 if k != "num_generations" else 2 for k, _ in knobs[:i]}
        base = replace(w, **fixed)
        best = _largest(plan.command, base, capacity, knob, getattr(w, knob))
        if best >= (2 if knob == "num_generations" else 1):
            earlier = "".join(f"{k2} to {fixed[k]} and " for k, k2 in knobs[:i])
            return f"{plan.command}: {where}; lower {earlier}{key} to {best}{spread}"
    return (
        f"{plan.command}: {where} even at the smallest batch; lower generation.max_new_tokens, or give each "
        "model its own device (candidates.N.device, executor.placement: spread)"
    )
