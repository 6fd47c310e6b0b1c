"""OpenAIBackend against a local server that speaks the /v1/completions protocol with a real tiny model."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from switchrl.backends import CandidatePool, CandidateSampling, Trace, build_backend
from switchrl.backends.openai_backend import OpenAIBackend, ServerError
from switchrl.backends.transformers_backend import TransformersBackend
from switchrl.config import CandidateConfig
from switchrl.errors import ConfigError
from switchrl.utils.seeding import derive_seed

QUERIES = ["the town of red river", "one two three", "the answer is", "a blue bridge in the park"]


def _local(paths, sampling):
    return [
        TransformersBackend.from_pretrained(f"c{i}", str(p), dtype="float64", sampling=sampling)
        for i, p in enumerate(paths)
    ]


def _switch(backends, schedule, patch_tokens=5, max_new_tokens=30):
    pool = CandidatePool(backends, patch_tokens=patch_tokens, seed=3)
    traces = [Trace(key=f"q{i}", query=q, max_new_tokens=max_new_tokens) for i, q in enumerate(QUERIES)]
    for a in schedule:
        live = [t for t in traces if not t.done]
        if live:
            pool.step(live, [a] * len(live))
    return [(t.authors, t.text, [p.token_ids for p in t.patches], t.stop_reason) for t in traces]


@pytest.mark.parametrize("token_ids", [True, False], ids=["token_ids", "retokenized"])
def test_served_candidate_writes_what_the_local_one_writes(serve, tiny_family, token_ids):
    greedy = CandidateSampling(temperature=0)
    url, srv = serve(tiny_family[0], token_ids=token_ids)
    remote = OpenAIBackend.from_pretrained("c0", str(tiny_family[0]), url, "tiny", sampling=greedy)
    schedule = [0, 1, 0, 2, 0, 1]
    want = _switch(_local(tiny_family, greedy), schedule)
    got = _switch([remote, *_local(tiny_family, greedy)[1:]], schedule)
    assert got == want
    # one request per step with every live trace in the prompt list, prompts are the candidate's view
    batched = [r for r in srv.requests if isinstance(r["prompt"][0], list)]
    assert len(srv.requests) == 3 and len(batched[0]["prompt"]) == len(QUERIES)
    assert batched[0]["prompt"][0] == remote.prompt_ids(QUERIES[0])
    assert all(r["max_tokens"] == 5 and r["temperature"] == 0 for r in srv.requests)


def test_sampling_sends_one_seeded_request_per_trace(serve, tiny_family):
    url, srv = serve(tiny_family[0])
    sampling = CandidateSampling(temperature=1.0, top_p=0.9)
    backend = OpenAIBackend.from_pretrained("c0", str(tiny_family[0]), url, "tiny", sampling=sampling)
    traces = [Trace(key=f"q{i}", query=q, max_new_tokens=20) for i, q in enumerate(QUERIES)]
    first = backend.write_patches(traces, 0, 6, seed=11)
    again = backend.write_patches(traces, 0, 6, seed=11)
    assert [p.token_ids for p in first] == [p.token_ids for p in again]
    seeds = sorted(r["seed"] for r in srv.requests[: len(QUERIES)])
    assert seeds == sorted(derive_seed(11, t.key, 0, "c0") % 2**31 for t in traces)
    assert all(r["top_p"] == 0.9 and len(r["prompt"]) == 1 for r in srv.requests)
    assert sorted(r["prompt"][0] for r in srv.requests[: len(QUERIES)]) == sorted(
        backend.view(t) for t in traces
    )


def test_unreachable_server_is_one_clear_error(tiny_family):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    backend = OpenAIBackend.from_pretrained("c0", str(tiny_family[0]), url, "tiny", timeout=5, max_retries=0)
    with pytest.raises(ServerError, match=f"cannot reach the completions server at {url}"):
        backend.write_patches([Trace("q0", "one two", 10)], 0, 4, seed=0)


def test_server_error_names_status_and_detail(serve, tiny_family):
    url, _ = serve(tiny_family[0])
    backend = OpenAIBackend.from_pretrained("c0", str(tiny_family[0]), url, "not-served")
    with pytest.raises(ServerError, match="HTTP 400.*unknown model 'not-served'"):
        backend.write_patches([Trace("q0", "one two", 10)], 0, 4, seed=0)


def test_build_backend_and_config_errors(serve, tiny_family):
    url, _ = serve(tiny_family[0])
    cfg = CandidateConfig(
        name="c0",
        path=str(tiny_family[0]),
        backend="openai",
        base_url=url,
        served_model="tiny",
        temperature=0,
    )
    backend = build_backend(cfg)
    assert isinstance(backend, OpenAIBackend) and backend.sampling.greedy
    with pytest.raises(ConfigError, match="base_url"):
        build_backend(cfg.model_copy(update={"base_url": None}))
    with pytest.raises(ValueError, match="base_url must start with http"):
        OpenAIBackend("c0", "127.0.0.1:8000", "tiny", backend.tokenizer)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("SWITCHRL_VLLM_PYTHON"),
    reason="set SWITCHRL_VLLM_PYTHON to a python with vLLM (e.g. /work/venv-vllm/bin/python)",
)
def test_against_a_real_vllm_server(tmp_path, word_tokenizer):
    """The vLLM OpenAI server (started from SWITCHRL_VLLM_PYTHON) writes what the local candidate writes."""
    torch.manual_seed(0)  # vLLM's CPU attention needs head_dim >= 32
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        os.environ["SWITCHRL_VLLM_PYTHON"],
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tmp_path),
        "--served-model-name",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--enable-prefix-caching",
        "--gpu-memory-utilization",
        "0.2",
    ]
    server = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, "the vLLM server exited during startup"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
                break
            except OSError:
                assert time.monotonic() < deadline, "the vLLM server did not start within 600 s"
                time.sleep(2)
        url, greedy = f"http://127.0.0.1:{port}/v1", CandidateSampling(temperature=0)
        remote = OpenAIBackend.from_pretrained("c0", str(tmp_path), url, "tiny", sampling=greedy)
        local = TransformersBackend.from_pretrained("c0", str(tmp_path), dtype="float32", sampling=greedy)
        traces = [Trace(key=f"q{i}", query=q, max_new_tokens=12) for i, q in enumerate(QUERIES)]
        for _ in range(2):
            got, want = remote.write_patches(traces, 0, 6, seed=0), local.write_patches(traces, 0, 6, seed=0)
            assert [(p.token_ids, p.text) for p in got] == [(p.token_ids, p.text) for p in want]
            for t, p in zip(traces, want):
                t.patches.append(p)
        sampler = OpenAIBackend.from_pretrained(
            "c0", str(tmp_path), url, "tiny", sampling=CandidateSampling(1.0, 0.9)
        )
        fresh = [Trace(key=f"q{i}", query=q, max_new_tokens=12) for i, q in enumerate(QUERIES)]
        first, again = (sampler.write_patches(fresh, 0, 6, seed=1) for _ in range(2))
        assert [p.token_ids for p in first] == [p.token_ids for p in again]
    finally:
        server.terminate()
        server.wait(timeout=60)
