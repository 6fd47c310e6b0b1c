"""OpenAIBackend against a local server that speaks the /v1/completions protocol with a real tiny model."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from switchrl.backends import CandidatePool, CandidateSampling, Trace, build_backend
from switchrl.backends.http_client import RetryPolicy, retry_after
from switchrl.backends.openai_backend import OpenAIBackend, ServerError
from switchrl.backends.transformers_backend import TransformersBackend
from switchrl.config import CandidateConfig, parse
from switchrl.errors import ConfigError
from switchrl.run_config import ResolvedRun, RunConfig
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


# ------------------------------------------------- a fault-injecting server: retries, keep-alive, concurrency
class _FaultyHandler(BaseHTTPRequestHandler):
    """``/v1/completions`` that answers every prompt with ``srv.ids``, after playing ``srv.faults`` in turn:
    an HTTP status, ``(status, retry_after)`` (with that ``Retry-After`` header), ``"stall"`` (no answer
    for 2 s), ``"drop"`` (close without answering) or ``"reset"`` (abort the connection: RST). HTTP/1.1, so connections stay open like vLLM's."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:  # one handler per TCP connection
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvicorn (vLLM's server)
        with self.server.lock:
            self.server.connections += 1

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append(body)
            srv.headers.append(dict(self.headers))
            fault = srv.faults.pop(0) if srv.faults else None
            srv.in_flight += 1
            srv.peak = max(srv.peak, srv.in_flight)
        try:
            self._answer(fault, body)
        finally:
            with srv.lock:
                srv.in_flight -= 1

    def _answer(self, fault, body: dict) -> None:
        if fault in ("drop", "reset", "stall"):
            if fault == "stall":
                time.sleep(2)
            if fault == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if fault is not None:
            status, after = fault if isinstance(fault, tuple) else (fault, None)
            return self._send(status, {"error": {"message": f"injected HTTP {status}"}}, after)
        time.sleep(self.server.delay)
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        choices = [
            {"index": i, "text": "", "token_ids": self.server.ids, "finish_reason": "length"}
            for i in range(len(prompts))
        ]
        self._send(200, {"choices": choices})

    def _send(self, status: int, payload: dict, retry_after: str | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        if retry_after is not None:
            self.send_header("Retry-After", retry_after)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def faulty(word_tokenizer):
    """A factory: (base_url, server) of a fault-injecting server playing ``faults`` then answering."""
    servers = []

    def start(faults=(), delay: float = 0.0):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _FaultyHandler)
        srv.faults, srv.delay, srv.ids = (
            list(faults),
            delay,
            word_tokenizer.convert_tokens_to_ids(["one", "two"]),
        )
        srv.requests, srv.headers, srv.lock = [], [], threading.Lock()
        srv.connections = srv.in_flight = srv.peak = 0
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_port}/v1", srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _candidate(tmp_path, word_tokenizer, url, **settings) -> OpenAIBackend:
    """An openai candidate built the way a run builds it: YAML -> CandidateConfig -> build_backend."""
    word_tokenizer.save_pretrained(tmp_path)
    text = yaml.safe_dump(
        {
            "name": "c0",
            "path": str(tmp_path),
            "backend": "openai",
            "base_url": url,
            "served_model": "tiny",
            **settings,
        }
    )
    backend = build_backend(parse(CandidateConfig, yaml.safe_load(text), "run.yaml"))
    assert isinstance(backend, OpenAIBackend)
    return backend


def _traces(n: int) -> list[Trace]:
    return [Trace(key=f"q{i}", query="one two three", max_new_tokens=20) for i in range(n)]


@pytest.mark.parametrize("fault", [500, 502, 429, "stall", "drop", "reset"])
def test_a_transient_failure_is_retried(tmp_path, word_tokenizer, faulty, fault):
    url, srv = faulty([fault])
    backend = _candidate(
        tmp_path, word_tokenizer, url, timeout=0.5, max_retries=1, retry_backoff=0, temperature=0
    )
    [patch] = backend.write_patches(_traces(1), 0, 4, seed=0)
    assert patch.token_ids == srv.ids and patch.text == "one two"
    assert len(srv.requests) == 2 and srv.requests[0] == srv.requests[1]


def test_a_retry_waits_as_long_as_the_servers_retry_after(tmp_path, word_tokenizer, faulty):
    url, srv = faulty([(429, "1"), (503, "0")])
    backend = _candidate(tmp_path, word_tokenizer, url, max_retries=2, retry_backoff=0, temperature=0)
    start = time.perf_counter()
    [patch] = backend.write_patches(_traces(1), 0, 4, seed=0)
    assert patch.token_ids == srv.ids and len(srv.requests) == 3
    assert 1.0 <= time.perf_counter() - start < 2.0  # the 429's second; "0" and backoff 0 add nothing


def test_retry_after_reads_seconds_and_http_dates_and_is_capped():
    assert retry_after(None) == retry_after("") == retry_after("soon") == 0.0
    assert retry_after("2") == 2.0 and retry_after("-3") == 0.0 and retry_after("3600") == 60.0
    assert retry_after("Wed, 01 Dec 2026 12:00:05 GMT", now=1796126400.0) == 5.0


def test_retries_end_in_one_error_naming_server_status_attempts_and_fix(tmp_path, word_tokenizer, faulty):
    url, srv = faulty([500, 503, 500])
    backend = _candidate(tmp_path, word_tokenizer, url, max_retries=2, retry_backoff=0.01, temperature=0)
    with pytest.raises(ServerError) as err:
        backend.write_patches(_traces(1), 0, 4, seed=0)
    message = str(err.value)
    for part in (
        f"{url}/completions",
        "failed 3 attempts",
        "HTTP 500",
        "injected HTTP 500",
        "max_retries: 2",
    ):
        assert part in message
    assert len(srv.requests) == 3


def test_a_timeout_on_every_attempt_says_so(tmp_path, word_tokenizer, faulty):
    url, _ = faulty(["stall", "stall"])
    backend = _candidate(tmp_path, word_tokenizer, url, timeout=0.3, max_retries=1, retry_backoff=0)
    with pytest.raises(
        ServerError, match=r"failed 2 attempts, the last with no answer within 0.3 s \(ReadTimeout\)"
    ):
        backend.write_patches(_traces(1), 0, 4, seed=0)


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_a_client_error_fails_at_once_with_the_servers_message(tmp_path, word_tokenizer, faulty, status):
    url, srv = faulty([status])
    backend = _candidate(tmp_path, word_tokenizer, url, max_retries=3, retry_backoff=0)
    with pytest.raises(ServerError, match=f"answered HTTP {status}: .*injected HTTP {status}") as err:
        backend.write_patches(_traces(1), 0, 4, seed=0)
    assert len(srv.requests) == 1
    assert ("api_key" in str(err.value)) == (status == 401)


def test_an_unreachable_server_is_retried_then_named(tiny_family):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    backend = OpenAIBackend.from_pretrained(
        "c0", str(tiny_family[0]), url, "tiny", max_retries=2, retry_backoff=0
    )
    with pytest.raises(
        ServerError, match=f"cannot reach the completions server at {url} .*ConnectError.*3 attempts"
    ):
        backend.write_patches([Trace("q0", "one two", 10)], 0, 4, seed=0)


def test_requests_reuse_keep_alive_connections(tmp_path, word_tokenizer, faulty):
    url, srv = faulty()
    backend = _candidate(tmp_path, word_tokenizer, url, max_concurrency=2)  # sampling: one request per trace
    for step in range(3):
        backend.write_patches(_traces(6), 0, 2, seed=step)
    assert len(srv.requests) == 18 and srv.connections <= 2
    backend.close()
    backend.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        backend.write_patches(_traces(1), 0, 2, seed=0)


def test_servers_are_addressed_directly_not_through_environment_proxies(
    tmp_path, word_tokenizer, faulty, monkeypatch
):
    url, srv = faulty()
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    backend = _candidate(tmp_path, word_tokenizer, url, max_retries=0)
    assert backend.write_patches(_traces(1), 0, 2, seed=0)[0].token_ids == srv.ids


def test_one_steps_requests_run_max_concurrency_at_a_time(tmp_path, word_tokenizer, faulty):
    """8 sampled traces are 8 requests; the server takes 0.2 s for each: 0.2 s together, 1.6 s in turn."""
    url, srv = faulty(delay=0.2)
    seconds = {}
    for width in (8, 2):
        backend = _candidate(tmp_path, word_tokenizer, url, max_concurrency=width)
        backend.write_patches(_traces(8), 0, 2, seed=0)  # opens the connections (later steps reuse them)
        srv.peak = 0
        start = time.perf_counter()
        backend.write_patches(_traces(8), 0, 2, seed=1)
        seconds[width] = (time.perf_counter() - start, srv.peak)
    assert seconds[8][0] < 0.8 and seconds[8][1] >= 4, seconds
    assert seconds[2][0] >= 0.8 and seconds[2][1] == 2, seconds  # four rounds of two


def test_api_key_is_sent_but_never_fingerprinted(tmp_path, word_tokenizer, faulty, monkeypatch):
    url, srv = faulty()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    _candidate(tmp_path, word_tokenizer, url).write_patches(_traces(1), 0, 2, seed=0)
    _candidate(tmp_path, word_tokenizer, url, api_key="sk-from-yaml").write_patches(_traces(1), 0, 2, seed=0)
    assert [h["Authorization"] for h in srv.headers] == ["Bearer sk-from-env", "Bearer sk-from-yaml"]
    monkeypatch.delenv("OPENAI_API_KEY")
    _candidate(tmp_path, word_tokenizer, url).write_patches(_traces(1), 0, 2, seed=0)
    assert "Authorization" not in srv.headers[-1]

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"query": "one two", "answer": "three"}) + "\n")
    plain = {"name": "c0", "path": str(tmp_path), "backend": "openai", "base_url": url}
    keyed = {**plain, "api_key": "sk-from-yaml", "timeout": 9, "max_retries": 5, "max_concurrency": 3}
    runs = [
        ResolvedRun(parse(RunConfig, {"candidates": [c], "tasks": [{"path": str(tasks)}]}))
        for c in (plain, keyed)
    ]
    prints = [run.fingerprint(run.scorers(["qa"])) for run in runs]
    assert prints[0] == prints[1]  # how the server is talked to changes no record
    assert "sk-from-yaml" not in json.dumps(prints[1]) and "sk-from-yaml" not in repr(
        parse(CandidateConfig, keyed)
    )


def test_yaml_settings_reach_the_client(tmp_path, word_tokenizer):
    backend = _candidate(
        tmp_path,
        word_tokenizer,
        "http://127.0.0.1:1/v1",
        timeout=7.5,
        max_concurrency=5,
        max_retries=4,
        retry_backoff=0.25,
    )
    assert backend.max_concurrency == 5 and backend.http.timeout == 7.5
    assert backend.http.retry == RetryPolicy(max_retries=4, backoff=0.25)
    defaults = CandidateConfig(name="c0", path="p", backend="openai")
    assert (defaults.timeout, defaults.max_concurrency, defaults.max_retries, defaults.retry_backoff) == (
        300,
        32,
        2,
        0.5,
    )
    local = CandidateConfig(name="c0", path="p")
    assert CandidateConfig.model_validate(local.model_dump()) == local  # workers get configs as dumps
    with pytest.raises(ConfigError, match=r"candidates\.0: max_retries, timeout: only for backend: openai"):
        parse(RunConfig, {"candidates": [{"name": "c0", "path": "p", "timeout": 5, "max_retries": 1}]})
    with pytest.raises(ConfigError, match=r"max_concurrency: Input should be greater than 0"):
        parse(CandidateConfig, {**defaults.model_dump(), "max_concurrency": 0})


def test_backoff_doubles_with_jitter_and_a_ceiling():
    policy = RetryPolicy(max_retries=9, backoff=0.5)
    assert [policy.delay(a, 0.0) for a in range(4)] == [0.25, 0.5, 1.0, 2.0]  # half of it at the least
    assert [policy.delay(a, 1.0) for a in range(4)] == [0.5, 1.0, 2.0, 4.0]  # all of it at the most
    assert policy.delay(9, 0.999) < 60
    with pytest.raises(ValueError, match="retry_backoff must be >= 0"):
        RetryPolicy(backoff=-1)
