"""RL episodes of the LM switcher: one switch-generated response in the single sequence format.

An :class:`Episode` has the shape verl's ``AgentLoopOutput`` and TRL's ``rollout_func`` use: prompt
ids, completion ids, an environment mask (1 on the sampled label tokens, the policy's actions; 0 on
the patches the candidates wrote) and the behaviour log-probs. :func:`sample_episodes` samples them
for GRPO and PPO, all live traces advancing together over the candidate pool.

Credit. With ``credit: episode`` a group is ``num_generations`` independent episodes of one query;
every sampled label token is an action. With ``credit: fork`` (per-decision credit) the group shares
a prefix: one *trunk* episode is sampled up to a decision index ``d`` drawn from ``(seed, key)``,
then ``num_generations`` branches continue from that state, each sampling its own decision ``d``
onwards. Labels before ``d`` are context (not trained), so the group-relative advantage credits the
decision at ``d`` and the ones after it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from switchrl.backends.base import Pool, Trace
from switchrl.policies.lm_switcher import LMSwitcher
from switchrl.policies.sequence import EncodedSequence
from switchrl.rollout import advance
from switchrl.utils.sampling import nucleus_logprob
from switchrl.utils.seeding import generator


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


def _to_episode(switcher: LMSwitcher, trace: Trace, branch: int) -> Episode:
    enc = switcher.sequence.encode(trace.query, trace.patches)
    trained, logprobs = [], []
    for j, patch in enumerate(trace.patches):
        own = j >= branch and not switcher.forces(trace, j)
        if own and patch.probs is None:
            raise RuntimeError(f"trace {trace.key!r}: patch {j} carries no switch distribution")
        trained.append(own)
        logprobs.append(nucleus_logprob(patch.probs, patch.author, switcher.top_p) if own else 0.0)
    return Episode(trace.query, trace, enc, branch, trained, logprobs)


def _decide_and_step(pool: Pool, switcher: LMSwitcher, traces: list[Trace]) -> None:
    decisions = switcher.decide(traces)
    pool.step(traces, [d.action for d in decisions])
    for t, d in zip(traces, decisions):
        t.patches[-1].probs = d.probs


@torch.no_grad()
def sample_episodes(
    switcher: LMSwitcher,
    pool: Pool,
    queries: Sequence[str],
    group_size: int,
    key_prefix: str,
    max_new_tokens: int,
    credit: str = "episode",
    seed: int = 0,
    scheduling: Mapping[str, Any] | None = None,
) -> list[Episode]:
    """``group_size`` episodes per query (query-major order), sampled by ``switcher`` over ``pool``.

    All live traces advance together (one batched call per chosen candidate per step). ``key_prefix``
    must be unique per call (e.g. contain the training step): trace keys seed every random draw.
    ``scheduling``: :func:`~switchrl.rollout.advance`'s ``schedule`` / ``max_inflight_bytes``.
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
            advance(pool, switcher, traces, **(scheduling or {}))
            return [_to_episode(switcher, t, 0) for t in traces]
        return _forked_episodes(
            switcher, pool, queries, group_size, key_prefix, max_new_tokens, seed, scheduling or {}
        )
    finally:
        switcher.model.train(was_training)


def _forked_episodes(
    switcher: LMSwitcher,
    pool: Pool,
    queries: Sequence[str],
    group_size: int,
    key_prefix: str,
    max_new_tokens: int,
    seed: int,
    scheduling: Mapping[str, Any],
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
    advance(pool, switcher, branches, **scheduling)
    return [_to_episode(switcher, t, d) for t, d in zip(branches, points)]
