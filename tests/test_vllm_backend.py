"""VLLMBackend at its API boundary (a fake engine that mimics ``vllm.LLM.generate``) and, when vLLM is
importable, against a real engine on a tiny checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from switchrl.backends import CandidatePool, CandidateSampling, Trace
from switchrl.backends.tokens import load_tokenizer
from switchrl.backends.transformers_backend import TransformersBackend, load_causal_lm
from switchrl.backends.vllm_backend import VLLMBackend, import_vllm
from switchrl.bench.setup import build_setup
from switchrl.bench.vllm_throughput import vllm_throughput
from switchrl.errors import SwitchRLError

QUERIES = ["the town of red river", "one two three", "the answer is", "a blue bridge in the park"]
GREEDY = CandidateSampling(temperature=0)
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


class FakeLLM:
    """``generate(prompts, sampling_params, use_tqdm)`` like ``vllm.LLM``, backed by a transformers model.

    As vLLM does, the EOS id is kept in ``token_ids``, a matched stop string ends the output with
    ``finish_reason="stop"`` and ``stop_reason=<the string>``, and EOS gives ``stop_reason=None``.
    """

    def __init__(self, path):
        self.model, self.tokenizer = load_causal_lm(str(path), "float64"), load_tokenizer(str(path))
        self.calls: list[tuple[list[dict], list[dict]]] = []

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        eos = self.tokenizer.eos_token_id
        outputs = []
        for prompt, params in zip(prompts, sampling_params, strict=True):
            assert params["temperature"] == 0, "the fake engine is greedy only"
            x = torch.tensor([prompt["prompt_token_ids"]])
            out = self.model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=params["max_tokens"],
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=0,
            )
            ids = out[0, x.shape[1] :].tolist()
            finish, stop_reason = "length", None
            for n in range(1, len(ids) + 1):
                if ids[n - 1] == eos:
                    ids, finish = ids[:n], "stop"
                    break
                hit = [
                    s
                    for s in params["stop"] or ()
                    if s in self.tokenizer.decode(ids[:n], skip_special_tokens=True)
                ]
                if hit:
                    ids, finish, stop_reason = ids[:n], "stop", hit[0]
                    break
            outputs.append(
                SimpleNamespace(
                    outputs=[SimpleNamespace(token_ids=ids, finish_reason=finish, stop_reason=stop_reason)]
                )
            )
        return outputs


class SleepyLLM:
    """``generate`` like ``vllm.LLM`` that takes ``seconds`` (an engine busy elsewhere) and writes one token."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def generate(self, prompts, sampling_params, use_tqdm=True):
        time.sleep(self.seconds)
        done = SimpleNamespace(token_ids=[5], finish_reason="length", stop_reason=None)
        return [SimpleNamespace(outputs=[done]) for _ in prompts]


@pytest.mark.parametrize(
    "a, b, devices, apart",
    [
        (("cuda:0", {}), ("cuda:1", {}), [("cuda:0",), ("cuda:1",)], True),
        (("cpu", {}), ("auto", {}), [("cpu",), ("cuda:0",)], True),
        (("cuda:1", {}), ("cuda:1", {}), [("cuda:1",), ("cuda:1",)], False),
        (("cuda", {"tensor_parallel_size": 2}), ("cuda:1", {}), [("cuda:0", "cuda:1"), ("cuda:1",)], False),
    ],
    ids=["two-gpus", "cpu-and-gpu", "one-gpu", "tensor-parallel-overlaps"],
)
def test_vllm_engines_on_different_devices_write_at_the_same_time(
    tiny_family, monkeypatch, a, b, devices, apart
):
    """A step over two vLLM engines takes the slower one's time when they share no device, the sum
    when they do (one GPU serves one engine at a time)."""
    seconds = iter([0.2, 0.3])
    monkeypatch.setitem(
        sys.modules, "vllm", SimpleNamespace(LLM=lambda **o: SleepyLLM(next(seconds)), SamplingParams=dict)
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    backends = [
        VLLMBackend.from_pretrained(
            name, str(tiny_family[0]), device=device, engine_kwargs=kwargs, sampling=GREEDY
        )
        for name, (device, kwargs) in zip("ab", (a, b))
    ]
    assert [e.devices for e in backends] == devices
    pool = CandidatePool(backends, patch_tokens=2)
    traces = [Trace("x", "one two", 4), Trace("y", "one two", 4)]
    start = time.perf_counter()
    patches = pool.step(traces, [0, 1])
    elapsed = time.perf_counter() - start
    assert [p.author for p in patches] == [0, 1] and [p.token_ids for p in patches] == [[5], [5]]
    assert elapsed < 0.45 if apart else elapsed >= 0.5
    assert os.environ.get("CUDA_VISIBLE_DEVICES") is None  # restored after each engine started


def _switch(backends, schedule, patch_tokens=5, max_new_tokens=30):
    pool = CandidatePool(backends, patch_tokens=patch_tokens, seed=5)
    traces = [Trace(key=f"q{i}", query=q, max_new_tokens=max_new_tokens) for i, q in enumerate(QUERIES)]
    for a in schedule:
        live = [t for t in traces if not t.done]
        if live:
            pool.step(live, [a] * len(live))
    pool.release([t.key for t in traces])
    return [(t.authors, t.text, [p.token_ids for p in t.patches], t.stop_reason) for t in traces]


def _local(path, name, **kwargs):
    return TransformersBackend.from_pretrained(name, str(path), dtype="float64", sampling=GREEDY, **kwargs)


@pytest.mark.parametrize("stop_strings", [(), ("three",)], ids=["plain", "stop-string"])
def test_vllm_candidate_writes_what_the_local_one_writes(tiny_family, stop_strings):
    fake = FakeLLM(tiny_family[0])
    tok = load_tokenizer(str(tiny_family[0]))
    engine = VLLMBackend("c0", fake, tok, sampling=GREEDY, stop_strings=stop_strings, params_factory=dict)
    schedule = [0, 1, 0, 2, 0, 1, 0]
    others = [_local(tiny_family[1], "c1"), _local(tiny_family[2], "c2")]
    want = _switch([_local(tiny_family[0], "c0", stop_strings=stop_strings), *others], schedule)
    got = _switch([engine, *others], schedule)
    assert got == want
    # one generate call per step with every live trace; per-trace seeded params; views as prompts
    prompts, params = fake.calls[0]
    assert len(prompts) == len(QUERIES) and prompts[1]["prompt_token_ids"] == engine.prompt_ids(QUERIES[1])
    assert len({p["seed"] for p in params}) == len(QUERIES)
    assert all(p["max_tokens"] == 5 and p["include_stop_str_in_output"] for p in params)


def test_engine_must_generate_and_missing_vllm_is_clear(tiny_family, monkeypatch):
    tok = load_tokenizer(str(tiny_family[0]))
    with pytest.raises(TypeError, match="generate"):
        VLLMBackend("c0", object(), tok, params_factory=dict)
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(SwitchRLError, match=r"pip install 'switchrl\[vllm\]'"):
        import_vllm()
    with pytest.raises(SwitchRLError, match="needs vLLM"):
        VLLMBackend.from_pretrained("c0", str(tiny_family[0]))
    with pytest.raises(SwitchRLError, match="needs vLLM"):
        vllm_throughput(build_setup("tiny", 1))


@needs_vllm
def test_real_vllm_engine_matches_transformers(tmp_path, word_tokenizer):
    # vLLM's CPU attention kernels need head_dim >= 32 (the shared tiny family has head_dim 8)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(word_tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        bos_token_id=word_tokenizer.bos_token_id,
        eos_token_id=word_tokenizer.eos_token_id,
        pad_token_id=word_tokenizer.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    engine = VLLMBackend.from_pretrained(
        "c0",
        str(tmp_path),
        dtype="float32",
        sampling=GREEDY,
        engine_kwargs=dict(max_model_len=256, gpu_memory_utilization=0.2),
    )
    local = TransformersBackend.from_pretrained("c0", str(tmp_path), dtype="float32", sampling=GREEDY)
    traces = [Trace(key=f"q{i}", query=q, max_new_tokens=12) for i, q in enumerate(QUERIES)]
    for _ in range(2):  # the second patch re-sends the first as prompt: a prefix-cache hit
        got = engine.write_patches(traces, 0, 6, seed=0)
        want = local.write_patches(traces, 0, 6, seed=0)
        assert [(p.token_ids, p.text, p.stop_reason) for p in got] == [
            (p.token_ids, p.text, p.stop_reason) for p in want
        ]
        for t, p in zip(traces, want):
            t.patches.append(p)


@needs_vllm
def test_vllm_throughput_benchmark_record():
    """The benchmark on two tiny vLLM engines: candidate 0 in patches writes what vLLM's own
    ``generate`` writes, and the JSON line holds every field RESULTS.md reports (not timings)."""
    lines: list[str] = []
    tiny = dict(queries=3, prompt_len=6, max_new_tokens=8, patch_tokens=3)
    record = vllm_throughput(build_setup("tiny", 2), **tiny, out=lines.append)
    assert [json.loads(line) for line in lines] == [record]
    assert record["same_tokens"] == 1.0 and record["vllm"] == import_vllm().__version__
    assert {k: record[k] for k in tiny} == tiny and record["candidates"] == 2
    speeds = (
        "vllm_generate_tok_s",
        "single_patched_tok_s",
        "switched_tok_s",
        "ratio",
        "ratio_single_patched",
    )
    assert all(record[k] > 0 for k in speeds)
    # both engines on this machine's one device: one place, so they write in turn
    assert record["engine_devices"][0] == record["engine_devices"][1] and record["places"] == 1
    assert record["switches_per_response"] > 0 and record["engine_kwargs"]["max_model_len"] == 14
