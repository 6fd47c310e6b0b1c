"""``dataset_throughput``: switched generation over a dataset, per-candidate queues vs lock-step vs
one model alone, at the same forward batch, in one run."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from switchrl.backends.base import Trace
from switchrl.backends.pool import CandidatePool
from switchrl.bench.measures import hf_generate_single
from switchrl.bench.setup import (
    BenchSetup,
    check_sizes,
    compare,
    device_name,
    emit,
    match_rate,
    prefill_seconds,
    tok_per_s,
    tokens_read,
)
from switchrl.policies.baselines import FixedSwitcher, RandomSwitcher
from switchrl.rollout import SwitchPolicy
from switchrl.scheduler import Schedule, Scheduler, pass_cost


def scheduled(
    pool: CandidatePool,
    policy: SwitchPolicy,
    queries: Sequence[str],
    max_new_tokens: int,
    max_batch: int,
    max_inflight: int,
    schedule: Schedule,
    tag: str,
    passes: list[list[int]] | None = None,
) -> list[Trace]:
    """One response per query through a :class:`Scheduler`; ``passes`` receives its passes."""
    traces = [Trace(f"{tag}/q{i}", q, max_new_tokens) for i, q in enumerate(queries)]
    scheduler = Scheduler(pool, policy, max_batch, max_inflight, schedule)
    scheduler.run(traces)
    if passes is not None:
        passes[:] = scheduler.passes
    return traces


def hf_generate(setup: BenchSetup, queries: Sequence[str], max_new_tokens: int, batch: int) -> list[Trace]:
    """What a user would run instead: candidate 0 alone through Hugging Face ``generate``, greedy, in
    batches of ``batch`` (the prompts have one length, so there is no padding)."""
    return [
        trace
        for start in range(0, len(queries), batch)
        for trace in hf_generate_single(setup, queries[start : start + batch], max_new_tokens, f"hf/{start}")
    ]


def dataset_throughput(
    setup: BenchSetup,
    queries: int = 64,
    batch_sizes: Sequence[int] = (8,),
    prompt_len: int = 128,
    max_new_tokens: int = 256,
    patch_tokens: int = 50,
    seed: int = 0,
    repeats: int = 1,
    out: Callable[[str], None] = print,
) -> list[dict]:
    """Tokens/s over ``queries`` responses at forward batch B: candidate 0 alone (B rows per pass),
    switched lock-step (B traces in flight, every pass fused over all of them), switched through the
    scheduler (every trace in flight, at most B rows per pass) and HF ``generate`` (candidate 0)."""
    check_sizes(
        queries=queries,
        batch_sizes=batch_sizes,
        prompt_len=prompt_len,
        max_new_tokens=max_new_tokens,
        patch_tokens=patch_tokens,
        repeats=repeats,
    )
    switched = CandidatePool(setup.backends, patch_tokens=patch_tokens, seed=seed)
    single = CandidatePool(setup.backends[:1], patch_tokens=max_new_tokens, seed=seed)
    policy, alone = RandomSwitcher(len(setup.backends), seed=seed), FixedSwitcher(1, 0)
    texts = setup.queries(queries, prompt_len, seed)
    warm = texts[: 2 * max(batch_sizes)]
    short = min(max_new_tokens, 2 * patch_tokens)
    for b in batch_sizes:  # warm-up; the scheduler measures its pass cost here, once per pool
        scheduled(switched, policy, warm, short, b, len(warm), "auto", "warmup")
        scheduled(switched, policy, warm, short, b, b, "lockstep", "warmup")
        scheduled(single, alone, warm, short, b, b, "lockstep", "warmup")
        hf_generate(setup, warm[:b], short, b)
    records = []
    for b in batch_sizes:
        passes: list[list[int]] = []
        (t_single, single_traces, _), (t_lock, lock_traces, _), (t_group, group_traces, _), (t_hf, hf, _) = (
            compare(
                setup.device,
                repeats,
                partial(scheduled, single, alone, texts, max_new_tokens, b, b, "lockstep", "single"),
                partial(scheduled, switched, policy, texts, max_new_tokens, b, b, "lockstep", "switch"),
                partial(
                    scheduled, switched, policy, texts, max_new_tokens, b, queries, "auto", "switch", passes
                ),
                partial(hf_generate, setup, texts, max_new_tokens, b),
            )
        )
        tok_s = tok_per_s(
            {
                "single": (t_single, single_traces),
                "lockstep": (t_lock, lock_traces),
                "grouped": (t_group, group_traces),
                "hf_generate": (t_hf, hf),
            }
        )
        # reading the other candidates' patches, at this engine's prompt-prefill speed, caps the ratio
        extra = sum(tokens_read(t, prompt_len) for t in group_traces) - queries * prompt_len
        t_reading = extra / (b * prompt_len / prefill_seconds(setup, texts[:b], repeats))
        members = switched.engine_candidates[0]
        cost = pass_cost(switched, members) if len(members) > 1 else None
        records.append(
            emit(
                {
                    "bench": "dataset_throughput",
                    "arch": setup.arch,
                    "device": device_name(setup.device),
                    "dtype": str(setup.dtype).removeprefix("torch."),
                    "queries": queries,
                    "batch": b,
                    "prompt_len": prompt_len,
                    "max_new_tokens": max_new_tokens,
                    "patch_tokens": patch_tokens,
                    "candidates": len(setup.backends),
                    **{f"{name}_tok_s": round(v, 1) for name, v in tok_s.items()},
                    "ratio_grouped": round(tok_s["grouped"] / tok_s["single"], 3),
                    "ratio_lockstep": round(tok_s["lockstep"] / tok_s["single"], 3),
                    "ratio_cap_from_reading": round(t_single / (t_single + t_reading), 3),
                    "single_vs_hf_generate": round(tok_s["single"] / tok_s["hf_generate"], 3),
                    "same_tokens": match_rate(group_traces, lock_traces),
                    "same_tokens_hf": match_rate(single_traces, hf),
                    "passes": len(passes),
                    "one_candidate_passes": round(sum(len(set(p)) == 1 for p in passes) / len(passes), 3),
                    "rows_per_pass": round(sum(len(p) for p in passes) / len(passes), 2),
                    "pass_cost_ms": None
                    if cost is None
                    else {k: round(1e3 * getattr(cost, k), 4) for k in ("alpha", "beta", "gamma")},
                    "repeats": repeats,
                },
                out,
            )
        )
    return records
