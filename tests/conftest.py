"""Shared fixtures: tiny tokenizers and random-weight models built from configs (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

WORDS = ("the a of in is and to it was on for as with by at from this that he she they we you one two three "
         "four five six seven eight nine ten red blue green town river bridge park school road answer").split()


def make_word_tokenizer(words=WORDS, extra=()) -> PreTrainedTokenizerFast:
    tokens = list(dict.fromkeys(["<pad>", "<bos>", "<eos>", "<unk>", *words, *extra]))  # unique, in order
    vocab = {w: i for i, w in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    return fast


def save_tiny_model(path: Path, arch: str, tokenizer, seed: int, dtype=torch.float32) -> Path:
    torch.manual_seed(seed)
    v = len(tokenizer)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
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
    return [save_tiny_model(root / f"m{i}", arch, word_tokenizer, seed=i)
            for i, arch in enumerate(["llama", "gpt2", "llama"])]


def make_pool(paths, patch_tokens: int = 2, seed: int = 0, temperature: float = 1.0):
    """A candidate pool over checkpoint ``paths`` named c0, c1, ..."""
    from switchrl.backends import CandidatePool, SamplingParams
    from switchrl.backends.transformers_backend import TransformersBackend

    backends = [TransformersBackend.from_pretrained(f"c{i}", str(p), sampling=SamplingParams(temperature=temperature))
                for i, p in enumerate(paths)]
    return CandidatePool(backends, patch_tokens=patch_tokens, seed=seed)
