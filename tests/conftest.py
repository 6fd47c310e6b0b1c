"""Shared fixtures: tiny tokenizers and random-weight models built from configs (no downloads), and a fake
completions server."""

from __future__ import annotations

import importlib.util
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from switchrl.backends.tokens import load_tokenizer  # noqa: E402
from switchrl.backends.transformers_backend import load_causal_lm  # noqa: E402

WORDS = (
    "the a of in is and to it was on for as with by at from this that he she they we you one two three "
    "four five six seven eight nine ten red blue green town river bridge park school road answer"
).split()


def make_word_tokenizer(words=WORDS, extra=()) -> PreTrainedTokenizerFast:
    tokens = list(dict.fromkeys(["<pad>", "<bos>", "<eos>", "<unk>", *words, *extra]))  # unique, in order
    vocab = {w: i for i, w in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    return fast


def save_tiny_model(path: Path, arch: str, tokenizer, seed: int, dtype=torch.float32) -> Path:
    torch.manual_seed(seed)
    v = len(tokenizer)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=v,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(
            vocab_size=v,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(cfg)
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def word_tokenizer():
    return make_word_tokenizer()


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory, word_tokenizer) -> list[Path]:
    """Three tiny random checkpoints (Llama, GPT-2, Llama) sharing one word-level tokenizer."""
    root = tmp_path_factory.mktemp("tiny_family")
    return [
        save_tiny_model(root / f"m{i}", arch, word_tokenizer, seed=i)
        for i, arch in enumerate(["llama", "gpt2", "llama"])
    ]


def make_pool(paths, patch_tokens: int = 2, seed: int = 0, temperature: float = 1.0):
    """A candidate pool over checkpoint ``paths`` named c0, c1, ..."""
    from switchrl.backends import CandidatePool, CandidateSampling
    from switchrl.backends.transformers_backend import TransformersBackend

    backends = [
        TransformersBackend.from_pretrained(
            f"c{i}", str(p), sampling=CandidateSampling(temperature=temperature)
        )
        for i, p in enumerate(paths)
    ]
    return CandidatePool(backends, patch_tokens=patch_tokens, seed=seed)


# ------------------------------------------------- a fake OpenAI-compatible completions server
class _CompletionsHandler(BaseHTTPRequestHandler):
    """``POST /v1/completions`` in the vLLM dialect: token-id prompts, ``token_ids`` in each choice."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.requests.append(body)
        if self.path != "/v1/completions" or body.get("model") != srv.served_model:
            return self._send(
                400 if self.path == "/v1/completions" else 404,
                {"error": {"message": f"unknown model {body.get('model')!r}"}},
            )
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        choices = []
        for i, ids in enumerate(prompts):
            x = torch.tensor([ids])
            kwargs = dict(do_sample=False)
            if body["temperature"] > 0:
                kwargs = dict(do_sample=True, temperature=body["temperature"], top_p=body["top_p"], top_k=0)
            with srv.lock:
                torch.manual_seed(body.get("seed", 0))
                out = srv.model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=body["max_tokens"],
                    eos_token_id=srv.eos,
                    pad_token_id=0,
                    **kwargs,
                )
            new = out[0, len(ids) :].tolist()
            ended = srv.eos in new
            new = new[: new.index(srv.eos) + 1] if ended else new  # vLLM returns the EOS id, not its text
            choice = {
                "index": i,
                "text": srv.tokenizer.decode(new, skip_special_tokens=True),
                "finish_reason": "stop" if ended else "length",
                "stop_reason": None,
            }
            if srv.token_ids and body.get("return_token_ids"):
                choice["token_ids"] = new
            choices.append(choice)
        self._send(200, {"object": "text_completion", "model": srv.served_model, "choices": choices})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def serve(tiny_family):
    """Start a fake OpenAI-compatible completions server (a real tiny model behind it) for a checkpoint;
    yields a factory returning (base_url, server)."""
    servers = []

    def start(path, token_ids: bool = True):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _CompletionsHandler)
        srv.model, srv.tokenizer = load_causal_lm(str(path), "float64"), load_tokenizer(str(path))
        srv.eos, srv.served_model, srv.token_ids = srv.tokenizer.eos_token_id, "tiny", token_ids
        srv.requests, srv.lock = [], threading.Lock()
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_port}/v1", srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    """The README's ``switchrl demo`` (world seed 0, its default sizes) run once, into ``<root>/runs/demo``
    (where the README's Python example looks for the switcher): the root and what the demo printed."""
    import contextlib
    import io

    from switchrl.cli import main

    root = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(root / "runs" / "demo")]) == 0
    return root, printed.getvalue()


@pytest.fixture(scope="session")
def lookalike() -> dict[str, Path]:
    """The look-alike trio and its tasks file (``switchrl testbed lookalike``): built into the cache on first
    use (about half a minute on one thread), reused after that."""
    from switchrl.testbed.lookalike import build_lookalike

    return build_lookalike()


def load_script(path: Path) -> ModuleType:
    """A script of the repository (``configs/experiments/*.py``, ``benchmarks/*.py``) imported as a module,
    so that tests can call its functions."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
