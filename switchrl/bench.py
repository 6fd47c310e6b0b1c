"""Throughput benchmarks for switched generation (``switchrl bench`` and ``benchmarks/*.py``).

Every benchmark builds random-weight Llama models from a config (``--arch tiny|1b|8b``, nothing is
downloaded), runs the compared paths in the same process on the same inputs, and prints one JSON
line per measurement with the ratio measured in that run. EOS is unreachable (the tokenizer's EOS id
lies outside the model's vocabulary), so every response uses its whole token budget and paths are
compared on equal work. Greedy decoding is used throughout; ``switch_vs_reencode`` reports the
fraction of responses on which both paths wrote the same tokens (``same_tokens``).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from switchrl.backends.base import CandidateSampling, Trace
from switchrl.backends.pool import CandidatePool
from switchrl.backends.transformers_backend import TransformersBackend, resolve_device, resolve_dtype
from switchrl.policies.baselines import FixedSwitcher, RandomSwitcher
from switchrl.rollout import SwitchPolicy, estimate_utilities, run_switch_generation
from switchrl.utils.seeding import derive_seed, generator

ARCHS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
    ),
}
GREEDY = CandidateSampling(temperature=0.0)
_T = TypeVar("_T")


@dataclass
class BenchSetup:
    """Random-weight candidates of one architecture sharing one synthetic word tokenizer."""

    arch: str
    device: str
    dtype: torch.dtype
    backends: list[TransformersBackend]
    tokenizer: PreTrainedTokenizerFast

    def queries(self, n: int, prompt_len: int, seed: int) -> list[str]:
        """``n`` prompts of exactly ``prompt_len`` tokens (BOS + words), drawn from ``seed``."""
        vocab = self.backends[0].model.config.vocab_size
        g = generator(seed, "bench-queries")
        ids = torch.randint(3, vocab, (n, prompt_len - 1), generator=g)
        return [" ".join(f"w{i}" for i in row.tolist()) for row in ids]


def synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids 3..vocab_size-1 are ``w<id>`` and whose EOS is id ``vocab_size``.

    A model with ``vocab_size`` outputs can never emit that EOS, so responses run to their budget.
    """
    vocab = {
        "<pad>": 0,
        "<bos>": 1,
        "<unk>": 2,
        **{f"w{i}": i for i in range(3, vocab_size)},
        "<eos>": vocab_size,
    }
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def build_setup(
    arch: str,
    n_candidates: int = 3,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    sampling: CandidateSampling = GREEDY,
) -> BenchSetup:
    """``n_candidates`` random-weight models of ``arch`` (different weights, one tokenizer)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    spec = ARCHS[arch]
    tokenizer = synthetic_tokenizer(spec["vocab_size"])
    backends = []
    for i in range(n_candidates):
        cfg = LlamaConfig(
            **spec, max_position_embeddings=8192, bos_token_id=1, eos_token_id=None, pad_token_id=0
        )
        torch.manual_seed(derive_seed(seed, "bench-model", arch, i))
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(torch_dtype).eval()
        backends.append(TransformersBackend(f"c{i}", model, tokenizer, sampling=sampling))
    return BenchSetup(arch, device, torch_dtype, backends, tokenizer)


# ---------------------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory_stats(device: str) -> dict:
    """Peak resident memory of this process so far, and peak CUDA memory since the last reset."""
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda"):
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def _timed(device: str, fn: Callable[[], _T]) -> tuple[float, _T]:
    gc.collect()
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def _compare(
    device: str, repeats: int, *fns: Callable[[], list[Trace]]
) -> list[tuple[float, list[Trace], dict]]:
    """Run ``fns`` in turn ``repeats`` times; per fn the best time, its traces and its peak memory.

    Alternating the compared paths and keeping each one's best run makes a ratio robust to other
    processes sharing the machine.
    """
    best: list[tuple[float, list[Trace], dict] | None] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            seconds, traces = _timed(device, fn)
            if best[i] is None or seconds < best[i][0]:
                best[i] = (seconds, traces, memory_stats(device))
    return best  # type: ignore[return-value]


def _match(a: Sequence[Trace], b: Sequence[Trace]) -> float:
    same = sum(
        x.authors == y.authors and [p.token_ids for p in x.patches] == [p.token_ids for p in y.patches]
        for x, y in zip(a, b)
    )
    return round(same / max(1, len(a)), 3)


def _tokens_read(trace: Trace, prompt_len: int) -> int:
    """Tokens the candidates of ``trace`` prefilled: each writer reads the prompt and what others wrote before its turns."""
    total = 0
    for c in set(trace.authors):
        last = max(i for i, p in enumerate(trace.patches) if p.author == c)
        total += prompt_len + sum(len(p.token_ids) for p in trace.patches[:last] if p.author != c)
    return total


def _prefill_seconds(setup: BenchSetup, queries: Sequence[str], repeats: int) -> float:
    """Best time for candidate 0 to read ``queries`` as one batch (the prefill speed of this engine)."""
    backend = setup.backends[0]
    ids = [backend.prompt_ids(q) for q in queries]
    keys = [f"prefill/q{i}" for i in range(len(queries))]
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        seconds, _ = _timed(setup.device, partial(backend.lm.extend, keys, ids))
        best = min(best, seconds)
        backend.lm.release(keys)
    return best


def _emit(record: dict, out: Callable[[str], None]) -> dict:
    out(json.dumps(record))
    return record


def _run(
    pool: CandidatePool, policy: SwitchPolicy, queries: Sequence[str], max_new_tokens: int, tag: str
) -> list[Trace]:
    keys = [f"{tag}/q{i}" for i in range(len(queries))]
    return run_switch_generation(pool, policy, queries, max_new_tokens, keys=keys, batch_size=len(queries))


# ---------------------------------------------------------------------------------------- benchmarks
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
    """Switched generation (random switcher, a decision every patch) vs candidate 0 alone, same engine."""
    _check_sizes(
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
        _run(pool, policy, warm, min(max_new_tokens, 2 * patch_tokens), "warmup")
    _run(single, FixedSwitcher(1, 0), warm, min(max_new_tokens, 2 * patch_tokens), "warmup")
    records = []
    for b in tqdm(batch_sizes, desc="switch_vs_single", unit="batch", file=sys.stderr):
        queries = setup.queries(b, prompt_len, seed)
        (
            (t_single, single_traces, mem_single),
            (t_switch, traces, mem_switch),
            (t_unfused, unfused_traces, _),
        ) = _compare(
            setup.device,
            repeats,
            partial(_run, single, FixedSwitcher(1, 0), queries, max_new_tokens, f"single{b}"),
            partial(_run, switched, policy, queries, max_new_tokens, f"switch{b}"),
            partial(_run, unfused, policy, queries, max_new_tokens, f"switch{b}"),
        )  # same keys: same decisions
        tok_single = sum(t.num_tokens for t in single_traces)
        tok_switch = sum(t.num_tokens for t in traces)
        tok_unfused = sum(t.num_tokens for t in unfused_traces)
        read = {
            name: sum(_tokens_read(t, prompt_len) for t in ts)
            for name, ts in (("single", single_traces), ("switched", traces))
        }
        # switching makes the candidates read (prefill) more tokens than one model does; reading them
        # at this engine's prompt-prefill speed alone caps the ratio at `ratio_cap_from_reading`
        prefill_tok_s = b * prompt_len / _prefill_seconds(setup, queries, repeats)
        t_reading = (read["switched"] - read["single"]) / prefill_tok_s
        records.append(
            _emit(
                {
                    "bench": "switch_vs_single",
                    "arch": setup.arch,
                    "device": _device_name(setup.device),
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
                    "same_tokens_unfused": _match(traces, unfused_traces),
                    "switches_per_response": round(sum(t.num_switches for t in traces) / len(traces), 2),
                    "read_tokens_per_response": {name: round(n / b, 1) for name, n in read.items()},
                    "prefill_tok_s": round(prefill_tok_s, 1),
                    "ratio_cap_from_reading": round(t_single / (t_single + t_reading), 3),
                    "repeats": repeats,
                    "single_mem": mem_single,
                    "switched_mem": mem_switch,
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
    _check_sizes(
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
        (t_ref, ref, _), (t_kv, got, mem) = _compare(
            setup.device,
            repeats,
            partial(reencode_generation, setup, policy, queries, max_new_tokens, patch_tokens, f"b{b}"),
            partial(_run, pool, policy, queries, max_new_tokens, f"b{b}"),
        )
        tokens = sum(t.num_tokens for t in got)
        records.append(
            _emit(
                {
                    "bench": "switch_vs_reencode",
                    "arch": setup.arch,
                    "device": _device_name(setup.device),
                    "dtype": str(setup.dtype).removeprefix("torch."),
                    "batch": b,
                    "prompt_len": prompt_len,
                    "max_new_tokens": max_new_tokens,
                    "patch_tokens": patch_tokens,
                    "candidates": len(setup.backends),
                    "reencode_tok_s": round(sum(t.num_tokens for t in ref) / t_ref, 1),
                    "kv_reuse_tok_s": round(tokens / t_kv, 1),
                    "ratio": round(t_ref / t_kv, 3),
                    "same_tokens": _match(got, ref),
                    "repeats": repeats,
                    **mem,
                },
                out,
            )
        )
    return records


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
    """Scored finishes per second of :func:`estimate_utilities` (k finishes per candidate and state)."""
    _check_sizes(
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
    policy = RandomSwitcher(len(setup.backends), seed=seed)

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
        [(elapsed, _, mem)] = _compare(
            setup.device,
            repeats,
            partial(estimate_utilities, pool, prefixes, refs, scorer, k=k, finisher=policy),
        )
        pool.release([p.key for p in prefixes])
        finishes = s * len(setup.backends) * k
        tokens = finishes * (max_new_tokens - prefix_patches * patch_tokens)
        records.append(
            _emit(
                {
                    "bench": "simulate_throughput",
                    "arch": setup.arch,
                    "device": _device_name(setup.device),
                    "dtype": str(setup.dtype).removeprefix("torch."),
                    "states": s,
                    "k": k,
                    "candidates": len(setup.backends),
                    "prompt_len": prompt_len,
                    "max_new_tokens": max_new_tokens,
                    "patch_tokens": patch_tokens,
                    "finishes": finishes,
                    "seconds": round(elapsed, 2),
                    "finishes_per_s": round(finishes / elapsed, 2),
                    "tok_s": round(tokens / elapsed, 1),
                    "repeats": repeats,
                    **mem,
                },
                out,
            )
        )
    return records


def _check_sizes(**sizes: int | Sequence[int]) -> None:
    for name, value in sizes.items():
        values = value if isinstance(value, Sequence) else [value]
        if not values or any(int(v) <= 0 for v in values):
            raise ValueError(f"{name} must be positive integers, got {value!r}")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu x{torch.get_num_threads()} threads"


# ---------------------------------------------------------------------------------------- command line
BENCHMARKS = ("switch_vs_single", "switch_vs_reencode", "simulate_throughput")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="switchrl bench", description=__doc__.splitlines()[0])
    p.add_argument("benchmark", choices=[*BENCHMARKS, "all"])
    p.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--candidates", type=int, default=3)
    p.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=None,
        help="switch_vs_single: 1,8,32; switch_vs_reencode: 1,8",
    )
    p.add_argument("--states", type=_int_list, default=[1, 2, 4], help="simulate_throughput: states per call")
    p.add_argument("--k", type=int, default=32, help="simulate_throughput: finishes per candidate and state")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--patch-tokens", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per path; each path's best run is reported")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``switchrl bench NAME [options]``: prints one JSON line per measurement to stdout."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads <= 0:
            raise SystemExit(f"--threads must be > 0, got {args.threads}")
        torch.set_num_threads(args.threads)
    setup = build_setup(args.arch, args.candidates, args.device, args.dtype, args.seed)
    names = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    common = dict(
        prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens,
        patch_tokens=args.patch_tokens,
        seed=args.seed,
        repeats=args.repeats,
    )
    if "switch_vs_single" in names:
        switch_vs_single(setup, batch_sizes=args.batch_sizes or (1, 8, 32), **common)
    if "switch_vs_reencode" in names:
        switch_vs_reencode(setup, batch_sizes=args.batch_sizes or (1, 8), **common)
    if "simulate_throughput" in names:
        simulate_throughput(setup, states=args.states, k=args.k, **common)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
