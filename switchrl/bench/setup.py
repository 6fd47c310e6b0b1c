"""Benchmark fixtures: random-weight candidates of one architecture over a synthetic tokenizer, and
timing that alternates the compared paths and keeps each one's best run (robust to a shared machine)."""

from __future__ import annotations

import gc
import json
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from switchrl.backends.base import CandidateSampling, Trace
from switchrl.backends.pool import CandidatePool
from switchrl.backends.transformers_backend import TransformersBackend, resolve_device, resolve_dtype
from switchrl.bench.archs import ARCHS, candidate_rows
from switchrl.rollout import SwitchPolicy, run_switch_generation
from switchrl.utils.seeding import derive_seed, generator

GREEDY = CandidateSampling(temperature=0.0)
_T = TypeVar("_T")


@dataclass
class BenchSetup:
    """Random-weight candidates of one architecture over synthetic word tokenizers (``tokenizer``: the base's)."""

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


def synthetic_tokenizer(
    vocab_size: int, eos_id: int | None = None, added: int = 0
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids 3..vocab_size-1 are ``w<id>``, then ``added`` tokens
    ``<added_i>``, and whose EOS is id ``eos_id`` (default: the next id).

    A model with no row for that EOS can never emit it, so responses run to their budget.
    """
    extra = {f"<added_{i}>": vocab_size + i for i in range(added)}
    vocab = {
        "<pad>": 0,
        "<bos>": 1,
        "<unk>": 2,
        **{f"w{i}": i for i in range(3, vocab_size)},
        **extra,
        "<eos>": vocab_size + added if eos_id is None else eos_id,
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
    """``n_candidates`` random-weight models of ``arch`` (different weights; one tokenizer, unless the
    arch gives candidates more embedding rows: those add one token, like Tulu-3's ``<pad>``)."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    spec = ARCHS[arch]
    rows = [candidate_rows(arch, i) for i in range(n_candidates)]
    tokenizers = {
        n: synthetic_tokenizer(spec["vocab_size"], max(rows), int(n > spec["vocab_size"])) for n in set(rows)
    }
    backends = []
    for i in range(n_candidates):
        cfg = LlamaConfig(
            **{**spec, "vocab_size": rows[i]},
            max_position_embeddings=8192,
            bos_token_id=1,
            eos_token_id=None,
            pad_token_id=0,
        )
        torch.manual_seed(derive_seed(seed, "bench-model", arch, i))
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(torch_dtype).eval()
        backends.append(TransformersBackend(f"c{i}", model, tokenizers[rows[i]], sampling=sampling))
    return BenchSetup(arch, device, torch_dtype, backends, tokenizers[rows[0]])


# ---------------------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory_stats(device: str) -> dict:
    """Peak resident memory of this process so far, and peak CUDA memory since the last reset."""
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.startswith("cuda"):
        out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def timed(device: str, fn: Callable[[], _T]) -> tuple[float, _T]:
    gc.collect()
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def compare(
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
            seconds, traces = timed(device, fn)
            if best[i] is None or seconds < best[i][0]:
                best[i] = (seconds, traces, memory_stats(device))
    return best  # type: ignore[return-value]


def match_rate(a: Sequence[Trace], b: Sequence[Trace]) -> float:
    same = sum(
        x.authors == y.authors and [p.token_ids for p in x.patches] == [p.token_ids for p in y.patches]
        for x, y in zip(a, b)
    )
    return round(same / max(1, len(a)), 3)


def tok_per_s(runs: dict[str, tuple[float, Sequence[Trace]]]) -> dict[str, float]:
    """Tokens written per second by each named path: ``{name: (seconds, traces)}``."""
    return {name: sum(t.num_tokens for t in traces) / seconds for name, (seconds, traces) in runs.items()}


def tokens_read(trace: Trace, prompt_len: int) -> int:
    """Tokens the candidates of ``trace`` prefilled: each writer reads the prompt and what others wrote before its turns."""
    total = 0
    for c in set(trace.authors):
        last = max(i for i, p in enumerate(trace.patches) if p.author == c)
        total += prompt_len + sum(len(p.token_ids) for p in trace.patches[:last] if p.author != c)
    return total


def prefill_seconds(setup: BenchSetup, queries: Sequence[str], repeats: int) -> float:
    """Best time for candidate 0 to read ``queries`` as one batch (the prefill speed of this engine)."""
    backend = setup.backends[0]
    ids = [backend.prompt_ids(q) for q in queries]
    keys = [f"prefill/q{i}" for i in range(len(queries))]
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        seconds, _ = timed(setup.device, partial(backend.lm.extend, keys, ids))
        best = min(best, seconds)
        backend.lm.release(keys)
    return best


def emit(record: dict, out: Callable[[str], None]) -> dict:
    out(json.dumps(record))
    return record


def run_generation(
    pool: CandidatePool, policy: SwitchPolicy, queries: Sequence[str], max_new_tokens: int, tag: str
) -> list[Trace]:
    keys = [f"{tag}/q{i}" for i in range(len(queries))]
    return run_switch_generation(pool, policy, queries, max_new_tokens, keys=keys, batch_size=len(queries))


def check_sizes(**sizes: int | Sequence[int]) -> None:
    for name, value in sizes.items():
        values = value if isinstance(value, Sequence) else [value]
        if not values or any(int(v) <= 0 for v in values):
            raise ValueError(f"{name} must be positive integers, got {value!r}")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu x{torch.get_num_threads()} threads"
