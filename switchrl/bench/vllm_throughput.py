"""``vllm_throughput``: switched generation on the vLLM backend vs vLLM's own ``LLM.generate`` with one
model, over the same queries, in one run (needs vLLM: run it in vLLM's environment).

The candidates are the bench's random-weight models, saved as checkpoint directories and served by
one ``vllm.LLM`` each. Three paths write the same responses' worth of tokens: candidate 0 alone
through ``LLM.generate`` (every query in one call, what a vLLM user runs), candidate 0 alone through
switchrl in patches (the cost of writing in patches: a call per patch, the prefix re-sent and
found in vLLM's prefix cache), and the candidates switched by a seeded random switcher. Each timed
run starts from an empty prefix cache.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from switchrl.backends.base import Trace
from switchrl.backends.pool import CandidatePool, places
from switchrl.backends.vllm_backend import VLLMBackend, import_vllm
from switchrl.bench.setup import GREEDY, BenchSetup, check_sizes, compare, emit, tok_per_s
from switchrl.policies.baselines import FixedSwitcher, RandomSwitcher
from switchrl.rollout import SwitchPolicy, run_switch_generation


def save_candidates(setup: BenchSetup, root: Path) -> list[Path]:
    """Each candidate of ``setup`` as a checkpoint directory (weights, config, tokenizer) under ``root``."""
    paths = []
    for backend in setup.backends:
        path = root / backend.name
        backend.model.save_pretrained(path)
        backend.tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def vllm_generate(engine: VLLMBackend, queries: Sequence[str], max_new_tokens: int, tag: str) -> list[Trace]:
    """The baseline: ``engine``'s model alone, every query in one ``LLM.generate`` call, greedy."""
    params = engine.params_factory(max_tokens=max_new_tokens, temperature=0.0, skip_special_tokens=True)
    outputs = engine.llm.generate(
        [{"prompt_token_ids": engine.prompt_ids(q)} for q in queries], params, use_tqdm=False
    )
    traces = [Trace(f"{tag}/q{i}", q, max_new_tokens) for i, q in enumerate(queries)]
    for trace, out in zip(traces, outputs):
        trace.patches.append(engine.patch_from_ids(trace, 0, out.outputs[0].token_ids))
    return traces


def switched(
    pool: CandidatePool, policy: SwitchPolicy, queries: Sequence[str], max_new_tokens: int, tag: str
) -> list[Trace]:
    """Every query in flight at once: each pass, every engine writes one patch for all its rows."""
    keys = [f"{tag}/q{i}" for i in range(len(queries))]
    n = len(queries)
    return run_switch_generation(
        pool, policy, queries, max_new_tokens, keys=keys, batch_size=n, max_inflight=n
    )


def cold(engines: Sequence[VLLMBackend], fn: Callable[[], list[Trace]]) -> list[Trace]:
    """``fn()`` after emptying every engine's prefix cache, so no run reads what an earlier one cached."""
    for engine in engines:
        engine.llm.reset_prefix_cache()
    return fn()


def close(engines: Sequence[VLLMBackend]) -> None:
    """Stop the engines' background processes now rather than at interpreter exit."""
    for engine in engines:
        core = getattr(getattr(engine.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()


def same_tokens(a: Sequence[Trace], b: Sequence[Trace]) -> float:
    """The share of responses whose tokens agree, however each was cut into patches."""
    same = sum(
        [i for p in x.patches for i in p.token_ids] == [i for p in y.patches for i in p.token_ids]
        for x, y in zip(a, b, strict=True)
    )
    return round(same / max(1, len(a)), 3)


def vllm_throughput(
    setup: BenchSetup,
    queries: int = 64,
    prompt_len: int = 128,
    max_new_tokens: int = 256,
    patch_tokens: int = 50,
    seed: int = 0,
    repeats: int = 1,
    device: str = "auto",
    engine_kwargs: dict[str, Any] | None = None,
    out: Callable[[str], None] = print,
) -> dict:
    """Tokens/s of switched generation on vLLM engines vs ``LLM.generate`` with candidate 0 alone
    (``ratio``), and of candidate 0 alone in patches (``ratio_single_patched``); ``same_tokens``: the
    share of responses on which candidate 0 in patches wrote what ``LLM.generate`` did (greedy).
    ``engine_kwargs`` go to every ``vllm.LLM`` (default: eager, 256 MiB of KV cache, room for one
    response)."""
    check_sizes(
        queries=queries,
        prompt_len=prompt_len,
        max_new_tokens=max_new_tokens,
        patch_tokens=patch_tokens,
        repeats=repeats,
    )
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries the JSON line
    vllm = import_vllm()
    options = dict(
        max_model_len=prompt_len + max_new_tokens,
        max_num_seqs=queries,
        enforce_eager=True,
        kv_cache_memory_bytes=256 * 2**20,
    )
    options.update(engine_kwargs or {})
    dtype = str(setup.dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory(prefix="switchrl-vllm-bench-") as root:
        engines = [
            VLLMBackend.from_pretrained(
                f"c{i}", str(path), dtype=dtype, device=device, engine_kwargs=options, sampling=GREEDY
            )
            for i, path in enumerate(save_candidates(setup, Path(root)))
        ]
        try:
            pool = CandidatePool(engines, patch_tokens=patch_tokens, seed=seed)
            single = CandidatePool(engines[:1], patch_tokens=patch_tokens, seed=seed)
            policy, alone = RandomSwitcher(len(engines), seed=seed), FixedSwitcher(1, 0)
            texts = setup.queries(queries, prompt_len, seed)
            warm, short = texts[: min(queries, 4)], min(max_new_tokens, 2 * patch_tokens)
            vllm_generate(engines[0], warm, short, "warmup")
            switched(pool, policy, warm, short, "warmup")
            (t_base, base, _), (t_single, single_traces, _), (t_switch, switch_traces, _) = compare(
                "cpu",  # vLLM's generate returns when its engine is done: nothing to synchronise
                repeats,
                partial(cold, engines, partial(vllm_generate, engines[0], texts, max_new_tokens, "generate")),
                partial(cold, engines, partial(switched, single, alone, texts, max_new_tokens, "single")),
                partial(cold, engines, partial(switched, pool, policy, texts, max_new_tokens, "switch")),
            )
        finally:
            close(engines)
    tok_s = tok_per_s(
        {
            "vllm_generate": (t_base, base),
            "single_patched": (t_single, single_traces),
            "switched": (t_switch, switch_traces),
        }
    )
    return emit(
        {
            "bench": "vllm_throughput",
            "arch": setup.arch,
            "device": device,
            "engine_devices": [list(e.devices or ()) for e in engines],
            "places": len(places(pool.engines)),
            "vllm": vllm.__version__,
            "dtype": dtype,
            "queries": queries,
            "prompt_len": prompt_len,
            "max_new_tokens": max_new_tokens,
            "patch_tokens": patch_tokens,
            "candidates": len(engines),
            **{f"{name}_tok_s": round(v, 1) for name, v in tok_s.items()},
            "ratio": round(tok_s["switched"] / tok_s["vllm_generate"], 3),
            "ratio_single_patched": round(tok_s["single_patched"] / tok_s["vllm_generate"], 3),
            "same_tokens": same_tokens(single_traces, base),
            "switches_per_response": round(sum(t.num_switches for t in switch_traces) / queries, 2),
            "engine_kwargs": options,
            "repeats": repeats,
        },
        out,
    )
