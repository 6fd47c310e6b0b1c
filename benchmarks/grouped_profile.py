"""Where the time of ``dataset_throughput``'s grouped path goes, beside the single model's, in CPU seconds.

Runs the grouped path (every query in flight, at most B rows of one candidate per pass) and the
single model (B rows per pass, one call per response) alternately, ``--repeats`` times each, and
splits each run's CPU time (``time.process_time``: robust to other processes on a shared machine)
into reading (the prefill that starts each generate call: the prompt, and for a switched trace the
other candidates' patches since this candidate's last turn), decoding steps, and the rest (scheduler,
pool, cache bookkeeping). It counts the tokens read, the padded tokens and the attended cache
positions (real and padded) of the prefills. Then, on the same engine, it times reading 8 chunks of
100 tokens on top of 0 and of 250 cached tokens (per token: what attention over a long past adds).

``ratio_cap_measured`` = single / (single + grouped's reading - single's reading): what grouped /
single would be if decoding and everything else cost exactly what they cost the single model.

    python benchmarks/grouped_profile.py --batch 8 --queries 64 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

import switchrl.backends.cached_lm as cached_lm
from switchrl.backends.pool import CandidatePool
from switchrl.bench.dataset import scheduled
from switchrl.bench.setup import build_setup
from switchrl.policies.baselines import FixedSwitcher, RandomSwitcher


@contextmanager
def counted(acc: Counter) -> Iterator[None]:
    """Accumulate CPU seconds of prefills (``start``) and decoding steps, and the prefills' shapes, in ``acc``."""
    state, prefill, packed = cached_lm._BatchState, cached_lm._prefill, cached_lm.read_packed
    start, step = state.__dict__["start"], state.step

    def timed_start(cls: type, *args: Any, **kwargs: Any) -> Any:
        t = time.process_time()
        out = start.__func__(cls, *args, **kwargs)
        acc["read_s"] += time.process_time() - t
        return out

    def timed_step(self: Any, *args: Any) -> Any:
        t = time.process_time()
        out = step(self, *args)
        acc["decode_s"] += time.process_time() - t
        acc["decode_steps"] += 1
        return out

    def shaped(read: Callable[..., Any], padded: bool) -> Callable[..., Any]:
        """``read`` (a padded or a packed reading call), counting the tokens it reads and attends."""

        def call(lm: Any, rows: Any, entries: Any, past: list[int], new_ids: list, room: int) -> Any:
            n = [len(ids) for ids in new_ids]
            attended = sum(k * (p + k) for k, p in zip(n, past))
            acc["prefill_calls"] += 1
            acc["tokens_read"] += sum(n)
            acc["tokens_padded"] += len(n) * max(n) if padded else sum(n)
            acc["attended"] += attended
            acc["attended_padded"] += len(n) * max(n) * (max(past) + max(n)) if padded else attended
            return read(lm, rows, entries, past, new_ids, room)

        return call

    state.start, state.step = classmethod(timed_start), timed_step
    cached_lm._prefill, cached_lm.read_packed = shaped(prefill, True), shaped(packed, False)
    try:
        yield
    finally:
        state.start, state.step, cached_lm._prefill, cached_lm.read_packed = start, step, prefill, packed


def chunk_read_us(lm: Any, past: int, rows: int = 8, new: int = 100, repeats: int = 5) -> float:
    """Best CPU microseconds per token to read ``rows`` chunks of ``new`` tokens on ``past`` cached ones."""
    rng, keys, best = random.Random(0), [(0, f"chunk/{i}") for i in range(rows)], float("inf")
    for _ in range(repeats):
        lm.release(keys)
        if past:
            lm.extend(keys, [[rng.randrange(3, 1000) for _ in range(past)] for _ in keys])
        ids = [[rng.randrange(3, 1000) for _ in range(new)] for _ in keys]
        t = time.process_time()
        lm.extend(keys, ids)
        best = min(best, time.process_time() - t)
    lm.release(keys)
    return 1e6 * best / (rows * new)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    setup = build_setup(args.arch, 3, "cpu", "float32", 0)
    switched = CandidatePool(setup.backends, patch_tokens=50, seed=0)
    single = CandidatePool(setup.backends[:1], patch_tokens=256, seed=0)
    policy, alone = RandomSwitcher(3, seed=0), FixedSwitcher(1, 0)
    texts, b = setup.queries(args.queries, 128, 0), args.batch
    scheduled(switched, policy, texts[: 2 * b], 100, b, 2 * b, "auto", "warmup")
    scheduled(single, alone, texts[: 2 * b], 100, b, b, "lockstep", "warmup")
    paths: dict[str, Callable[[], object]] = {
        "grouped": lambda: scheduled(switched, policy, texts, 256, b, args.queries, "auto", "grouped"),
        "single": lambda: scheduled(single, alone, texts, 256, b, b, "lockstep", "single"),
    }
    best: dict[str, Counter] = {}
    for _ in range(args.repeats):
        for name, run in paths.items():
            acc: Counter = Counter()
            with counted(acc):
                t = time.process_time()
                run()
                acc["cpu_s"] = time.process_time() - t
            acc["other_s"] = acc["cpu_s"] - acc["read_s"] - acc["decode_s"]
            if name not in best or acc["cpu_s"] < best[name]["cpu_s"]:
                best[name] = acc
    g, s = best["grouped"], best["single"]
    lm = setup.backends[0].lm.fused
    record = {
        "bench": "grouped_profile",
        "arch": args.arch,
        "batch": b,
        "queries": args.queries,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **{f"{name}_{k}": round(v, 3) for name, acc in best.items() for k, v in sorted(acc.items())},
        "ratio_cpu": round(s["cpu_s"] / g["cpu_s"], 3),
        "ratio_cap_measured": round(s["cpu_s"] / (s["cpu_s"] + g["read_s"] - s["read_s"]), 3),
        "read_us_per_token_past0": round(chunk_read_us(lm, 0), 1),
        "read_us_per_token_past250": round(chunk_read_us(lm, 250), 1),
        "repeats": args.repeats,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
