"""``benchmarks/grouped_profile.py`` counts what the engine did: prefill calls, tokens read and
padded, decoding steps; and leaves the engine as it found it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import switchrl.backends.cached_lm as cached_lm
from switchrl.backends.base import CandidateSampling
from switchrl.backends.cached_lm import CachedLM
from tests.conftest import load_script
from tests.test_cached_lm_mask import llama

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "grouped_profile.py"


def test_counted_splits_reading_from_decoding_and_restores_the_engine() -> None:
    profile = load_script(SCRIPT)
    state = cached_lm._BatchState
    originals = (state.__dict__["start"], state.step, cached_lm._prefill, cached_lm.read_packed)
    lm, acc = CachedLM(llama()), Counter()
    with profile.counted(acc):
        lm.extend(["a"], [[5, 6, 7, 8]])
        lm.generate(["a", "b"], [[3], [4, 5, 6]], [3, 3], CandidateSampling(temperature=0.0))
    assert (state.__dict__["start"], state.step, cached_lm._prefill, cached_lm.read_packed) == originals
    assert (
        acc["prefill_calls"] == 2
    )  # the extend, then the generate's chunks of 1 and 3 tokens, packed in one
    assert acc["tokens_read"] == 4 + 1 + 3 and acc["tokens_padded"] == acc["tokens_read"]
    assert acc["attended"] == 4 * 4 + 1 * 5 + 3 * 3
    assert acc["decode_steps"] == 2  # 3 tokens each: the prefill samples the first
    assert acc["read_s"] > 0 and acc["decode_s"] > 0
