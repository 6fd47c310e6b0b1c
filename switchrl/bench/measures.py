"""The benchmarks: each runs the compared paths in one process on the same inputs and prints one
JSON line per measurement with the ratio measured in that run."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from functools import partial

import torch
from tqdm.auto import tqdm

from switchrl.backends.base import Trace
from switchrl.backends.pool import CandidatePool
from switchrl.backends.transformers_backend import TransformersBackend
from switchrl.bench.setup import (
    BenchSetup,
    check_sizes,
    compare,
    device_name,
    emit,
    match_rate,
    prefill_seconds,
    run_generation,
    tokens_read,
)
from switchrl.policies.baselines import FixedSwitcher, RandomSwitcher
from switchrl.rollout import StateUtilities, advance, estimate_utilities


def hf_generate_single(
    setup: BenchSetup, queries: Sequence[str], max_new_tokens: int, tag: str
) -> list[Trace]:
    """The plain baseline: candidate 0 alone, all ``queries`` in one batched Hugging Face ``generate`` call.

    The queries have equal token lengths (:meth:`BenchSetup.queries`), so no row is padded.
    """
    backend = setup.backends[0]
    prompts = torch.tensor([backend.prompt_ids(q) for q in queries], device=setup.device)
    gen = backend.model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=sorted(backend.stop_ids),
    )
    traces = [Trace(key=f"{tag}/q{i}", query=q, max_new_tokens=max_new_tokens) for i, q in enumerate(queries)]
    for trace, row in zip(traces, gen[:, prompts.shape[1] :].tolist()):
        trace.patches.append(backend.patch_from_ids(trace, 0, row))
    return traces


def switch_vs_single(
    setup: BenchSetup,
    batch_sizes: Sequence[int] = (1, 8, 32),
    prompt_len: int = 128,
    max_new_tokens: int = 256,
    patch_tokens: int = 50,
    seed: int = 0,
    repeats: int = 1,
    out: Callable[[str], None] = print,
) -> list[dict]:
    """Switched generation (random switcher, a decision every patch) vs candidate 0 alone, same engine;
    and candidate 0 alone through one batched Hugging Face ``generate`` call (``hf_generate_*``)."""
    check_sizes(
        batch_sizes=batch_sizes,
        prompt_len=prompt_len,
        max_new_tokens=max_new_tokens,
        patch_tokens=patch_tokens,
        repeats=repeats,
    )
    switched = CandidatePool(setup.backends, patch_tokens=patch_tokens, seed=seed)
    single = CandidatePool(setup.backends[:1], patch_tokens=max_new_tokens, seed=seed)
    # the same weights, one forward pass per candidate (what switchrl did before fusing candidates)
    unfused = CandidatePool(
        [TransformersBackend(b.name, b.model, b.tokenizer, sampling=b.sampling) for b in setup.backends],
        patch_tokens=patch_tokens,
        seed=seed,
        fuse=False,
    )
    policy = RandomSwitcher(len(setup.backends), seed=seed)
    warm = setup.queries(2, prompt_len, seed)
    for pool in (switched, unfused):
        run_generation(pool, policy, warm, min(max_new_tokens, 2 * patch_tokens), "warmup")
    run_generation(single, FixedSwitcher(1, 0), warm, min(max_new_tokens, 2 * patch_tokens), "warmup")
    hf_generate_single(setup, warm, min(max_new_tokens, 2 * patch_tokens), "warmup")
    records = []
    for b in tqdm(batch_sizes, desc="switch_vs_single", unit="batch", file=sys.stderr):
        queries = setup.queries(b, prompt_len, seed)
        (
            (t_single, single_traces, mem_single),
            (t_switch, traces, mem_switch),
            (t_unfused, unfused_traces, _),
            (t_hf, hf_traces, mem_hf),
        ) = compare(
            setup.device,
            repeats,
            partial(run_generation, single, FixedSwitcher(1, 0), queries, max_new_tokens, f"single{b}"),
            partial(run_generation, switched, policy, queries, max_new_tokens, f"switch{b}"),
            partial(run_generation, unfused, policy, queries, max_new_tokens, f"switch{b}"),
            partial(hf_generate_single, setup, queries, max_new_tokens, f"hf{b}"),
        )  # same keys: same decisions
        tok_single = sum(t.num_tokens for t in single_traces)
        tok_switch = sum(t.num_tokens for t in traces)
        tok_unfused = sum(t.num_tokens for t in unfused_traces)
        tok_hf = sum(t.num_tokens for t in hf_traces)
        read = {
            name: sum(tokens_read(t, prompt_len) for t in ts)
            for name, ts in (("single", single_traces), ("switched", traces))
        }
        # switching makes the candidates read (prefill) more tokens than one model does; reading them
        # at this engine's prompt-prefill speed alone caps the ratio at `ratio_cap_from_reading`
        prefill_tok_s = b * prompt_len / prefill_seconds(setup, queries, repeats)
        t_reading = (read["switched"] - read["single"]) / prefill_tok_s
        records.append(
            emit(
                {
                    "bench": "switch_vs_single",
                    "arch": setup.arch,
                    "device": device_name(setup.device),
                    "dtype": str(setup.dtype).removeprefix("torch."),
                    "batch": b,
                    "prompt_len": prompt_len,
                    "max_new_tokens": max_new_tokens,
                    "patch_tokens": patch_tokens,
                    "candidates": len(setup.backends),
                    "single_tok_s": round(tok_single / t_single, 1),
                    "switched_tok_s": round(tok_switch / t_switch, 1),
                    "ratio": round((tok_switch / t_switch) / (tok_single / t_single), 3),
                    "unfused_tok_s": round(tok_unfused / t_unfused, 1),
                    "unfused_ratio": round((tok_unfused / t_unfused) / (tok_single / t_single), 3),
                    "same_tokens_unfused": match_rate(traces, unfused_traces),
                    "hf_generate_tok_s": round(tok_hf / t_hf, 1),
                    # > 1: switchrl's engine with one candidate is faster than transformers' generate
                    "single_vs_hf_generate": round((tok_single / t_single) / (tok_hf / t_hf), 3),
                    "same_tokens_hf_generate": match_rate(single_traces, hf_traces),
                    "switches_per_response": round(sum(t.num_switches for t in traces) / len(traces), 2),
                    "read_tokens_per_response": {name: round(n / b, 1) for name, n in read.items()},
                    "prefill_tok_s": round(prefill_tok_s, 1),
                    "ratio_cap_from_reading": round(t_single / (t_single + t_reading), 3),
                    "repeats": repeats,
                    "single_mem": mem_single,
                    "switched_mem": mem_switch,
                    "hf_generate_mem": mem_hf,
                },
                out,
            )
        )
    return records


def reencode_generation(
    setup: BenchSetup,
    policy: RandomSwitcher,
    queries: Sequence[str],
    max_new_tokens: int,
    patch_tokens: int,
    tag: str,
) -> list[Trace]:
    """The reference style: one query at a time, every patch re-encodes the whole prefix with ``generate``."""
    traces = []
    for i, query in enumerate(queries):
        trace = Trace(key=f"{tag}/q{i}", query=query, max_new_tokens=max_new_tokens)
        ids = setup.backends[0].prompt_ids(query)
        while not trace.done:
            author = policy.decide([trace])[0].action
            backend = setup.backends[author]
            prefix = torch.tensor([ids], device=setup.device)
            limit = min(patch_tokens, trace.remaining_tokens)
            gen = backend.model.generate(
                prefix,
                attention_mask=torch.ones_like(prefix),
                max_new_tokens=limit,
                min_new_tokens=limit,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=sorted(backend.stop_ids),
            )
            new = gen[0, prefix.shape[1] :].tolist()
            trace.patches.append(backend.patch_from_ids(trace, author, new))
            ids.extend(new)
        traces.append(trace)
    for backend in setup.backends:
        backend.release([t.key for t in traces])
    return traces


def switch_vs_reencode(
    setup: BenchSetup,
    batch_sizes: Sequence[int] = (1, 8),
    prompt_len: int = 128,
    max_new_tokens: int = 256,
    patch_tokens: int = 50,
    seed: int = 0,
    repeats: int = 1,
    out: Callable[[str], None] = print,
) -> list[dict]:
    """switchrl's batched KV-reuse path vs re-encoding the prefix with ``generate`` every patch."""
    check_sizes(
        batch_sizes=batch_sizes,
        prompt_len=prompt_len,
        max_new_tokens=max_new_tokens,
        patch_tokens=patch_tokens,
        repeats=repeats,
    )
    pool = CandidatePool(setup.backends, patch_tokens=patch_tokens, seed=seed)
    policy = RandomSwitcher(len(setup.backends), seed=seed)
    warm = setup.queries(1, prompt_len, seed)
    reencode_generation(setup, policy, warm, min(max_new_tokens, 2 * patch_tokens), patch_tokens, "warmup")
    records = []
    for b in tqdm(batch_sizes, desc="switch_vs_reencode", unit="batch", file=sys.stderr):
        queries = setup.queries(b, prompt_len, seed)
        (t_ref, ref, _), (t_kv, got, mem) = compare(
            setup.device,
            repeats,
            partial(reencode_generation, setup, policy, queries, max_new_tokens, patch_tokens, f"b{b}"),
            partial(run_generation, pool, policy, queries, max_new_tokens, f"b{b}"),
        )
        tokens = sum(t.num_tokens for t in got)
        records.append(
            emit(
                {
                    "bench": "switch_vs_reencode",
                    "arch": setup.arch,
                    "device": device_name(setup.device),
                    "dtype": str(setup.dtype).removeprefix("torch."),
                    "batch": b,
                    "prompt_len": prompt_len,
                    "max_new_tokens": max_new_tokens,
                    "patch_tokens": patch_tokens,
                    "candidates": len(setup.backends),
                    "reencode_tok_s": round(sum(t.num_tokens for t in ref) / t_ref, 1),
                    "kv_reuse_tok_s": round(tokens / t_kv, 1),
                    "ratio": round(t_ref / t_kv, 3),
                    "same_tokens": match_rate(got, ref),
                    "repeats": repeats,
                    **mem,
                },
                out,
            )
        )
    return records


def single_finishes(
    pool: CandidatePool, contexts: Sequence[str], rows_per_context: Sequence[int], new_tokens: int, tag: str
) -> list[Trace]:
    """One model's version of simulate's finishes: each context is read once, forked into its rows,
    and every row writes ``new_tokens`` tokens, all rows in flight at once (one candidate: one pass)."""
    roots = [Trace(f"{tag}/s{i}", c, new_tokens) for i, c in enumerate(contexts)]
    pool.prefill(roots)
    rows: list[Trace] = []
    for root, n in zip(roots, rows_per_context):
        keys = [f"{root.key}/f{j}" for j in range(n)]
        pool.fork(root.key, keys)
        rows += [root.fork(key) for key in keys]
    pool.release([r.key for r in roots])
    advance(pool, FixedSwitcher(1, 0), rows)
    pool.release([r.key for r in rows])
    return rows


def _outcomes(results: Sequence[StateUtilities]) -> list[tuple]:
    """What a simulated state's record holds (next patches, finishes, scores), without timings."""
    return [
        ([(p.author, p.token_ids, p.stop_reason) for p in u.next_patches], u.responses, u.scores, u.switches)
        for u in results
    ]


def simulate_throughput(
    setup: BenchSetup,
    states: Sequence[int] = (1, 2, 4),
    k: int = 32,
    prompt_len: int = 64,
    prefix_patches: int = 1,
    max_new_tokens: int = 128,
    patch_tokens: int = 32,
    seed: int = 0,
    repeats: int = 1,
    out: Callable[[str], None] = print,
) -> list[dict]:
    """Scored finishes per second of :func:`estimate_utilities` (k finishes per candidate and state)
    through the scheduler (``auto``) and lock-step, and one model writing the same rows.

    ``single_tok_s_same_rows``: candidate 0 alone over as many rows as simulate's finishes, each
    forked from a context as long as theirs (prompt, prefix and next patch) and writing as many tokens
    (EOS is unreachable, so every finish writes its whole budget); ``ratio_single`` is simulate's tok/s
    (next patches and finishes) over it."""
    check_sizes(
        batch_sizes=states,
        prompt_len=prompt_len,
        max_new_tokens=max_new_tokens,
        patch_tokens=patch_tokens,
        k=k,
        repeats=repeats,
    )
    if prefix_patches < 0 or (prefix_patches + 1) * patch_tokens >= max_new_tokens:
        raise ValueError(
            "prefix_patches must be >= 0 and leave room for a patch and a finish in max_new_tokens"
        )
    pool = CandidatePool(setup.backends, patch_tokens=patch_tokens, seed=seed)
    single = CandidatePool(setup.backends[:1], patch_tokens=max_new_tokens, seed=seed)
    policy = RandomSwitcher(len(setup.backends), seed=seed)
    context_len = prompt_len + (prefix_patches + 1) * patch_tokens
    finish_tokens = max_new_tokens - (prefix_patches + 1) * patch_tokens

    def scorer(query: str, response: str, reference: str, **meta) -> float:
        return float(reference in response)

    records = []
    for s in tqdm(states, desc="simulate_throughput", unit="batch", file=sys.stderr):
        queries = setup.queries(s, prompt_len, seed)
        prefixes = [
            Trace(key=f"s{s}/q{i}", query=q, max_new_tokens=max_new_tokens) for i, q in enumerate(queries)
        ]
        for _ in range(prefix_patches):
            pool.step(prefixes, [d.action for d in policy.decide(prefixes)])
        refs = [p.text.split()[-1] if p.text.split() else "" for p in prefixes]
        run = partial(estimate_utilities, pool, prefixes, refs, scorer, k=k, finisher=policy)
        warm = run()  # warm-up; the scheduler measures its pass cost here, once per pool
        # rows in flight: k per distinct next patch (candidates that wrote the same one share them)
        per_state = [k * len({tuple(r) for r in u.responses}) for u in warm]
        contexts = setup.queries(s, context_len, seed + 1)
        single_finishes(single, contexts[:1], [2], finish_tokens, "warmup")
        [(t_auto, auto, mem), (t_lock, lock, _), (t_single, single_rows, _)] = compare(
            setup.device,
            repeats,
            partial(run, schedule="auto"),
            partial(run, schedule="lockstep"),
            partial(single_finishes, single, contexts, per_state, finish_tokens, f"single{s}"),
        )
        pool.release([p.key for p in prefixes])
        finishes = s * len(setup.backends) * k
        # every candidate writes its next patch; each distinct one is finished k times
        written = sum(per_state) * finish_tokens + sum(len(p.token_ids) for u in auto for p in u.next_patches)
        tok_s = written / t_auto
        single_tok_s = sum(t.num_tokens for t in single_rows) / t_single
        records.append(
            emit(
                {
                    "bench": "simulate_throughput",
                    "arch": setup.arch,
                    "device": device_name(setup.device),
                    "dtype": str(setup.dtype).removeprefix("torch."),
                    "states": s,
                    "k": k,
                    "candidates": len(setup.backends),
                    "prompt_len": prompt_len,
                    "max_new_tokens": max_new_tokens,
                    "patch_tokens": patch_tokens,
                    "finishes": finishes,
                    "rows_in_flight": sum(per_state),
                    "seconds": round(t_auto, 2),
                    "finishes_per_s": round(finishes / t_auto, 2),
                    "lockstep_finishes_per_s": round(finishes / t_lock, 2),
                    "speedup_vs_lockstep": round(t_lock / t_auto, 3),
                    "same_records": _outcomes(auto) == _outcomes(lock),
                    "tok_s": round(tok_s, 1),
                    "single_tok_s_same_rows": round(single_tok_s, 1),
                    "ratio_single": round(tok_s / single_tok_s, 3),
                    "repeats": repeats,
                    **mem,
                },
                out,
            )
        )
    return records
