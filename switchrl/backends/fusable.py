"""Which models may share one forward pass (:mod:`switchrl.backends.fused`), and how their weights stack.

Models fuse when they have the same class, config and parameter layout. The vocabulary's size is
the exception: the checkpoints of one pipeline may add tokens (Llama-3.1-8B has 128256 rows, the
Tulu-3 models fine-tuned from it 128264), so the embeddings' row count and the config's vocabulary
entries are left out of the signature, and vocabulary-indexed weights are stacked padded with zero
rows to the largest count (the fused model masks the logits of the padded ids).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import torch
from torch import nn

_CONFIG_IGNORED = {"_name_or_path", "name_or_path", "transformers_version", "architectures", "_commit_hash"}
# the vocabulary's size and special ids do not change the forward pass of the ids a model has
_VOCAB_CONFIG = {"vocab_size", "pad_token_id", "bos_token_id", "eos_token_id"}


class NotFusable(ValueError):
    """These models cannot share one forward pass (the message says why)."""


def _config_dict(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    data = config.to_dict() if hasattr(config, "to_dict") else {}
    return {k: v for k, v in data.items() if k not in _CONFIG_IGNORED | _VOCAB_CONFIG}


def vocab_parameters(model: nn.Module) -> set[str]:
    """Names of the parameters with one row per vocabulary id: the input and output embeddings'."""
    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if isinstance(module, nn.Module):
            ids |= {id(p) for p in module.parameters()}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}


def vocab_rows(model: nn.Module) -> int | None:
    """How many vocabulary ids ``model`` has rows for (None without embeddings); NotFusable if its
    input and output embeddings disagree."""
    params = dict(model.named_parameters(remove_duplicate=False))
    rows = {params[n].shape[0] for n in vocab_parameters(model)}
    if len(rows) > 1:
        raise NotFusable(f"{type(model).__name__}: input and output embeddings have {sorted(rows)} rows")
    return rows.pop() if rows else None


def architecture_signature(model: nn.Module) -> str:
    """Equal for models that may be fused: same class, config (but its name, vocabulary size and
    special ids) and parameter layout, the embeddings' row count aside."""
    vocab = vocab_parameters(model)
    params = [
        (n, ("vocab", *p.shape[1:]) if n in vocab else tuple(p.shape), str(p.dtype), str(p.device))
        for n, p in model.named_parameters(remove_duplicate=False)
    ]
    return json.dumps([type(model).__qualname__, _config_dict(model), params], sort_keys=True, default=str)


def check_same_architecture(models: Sequence[nn.Module]) -> None:
    """Raise :class:`NotFusable` naming the first model whose class, signature or buffers differ from model 0's."""
    first = models[0]
    signature = architecture_signature(first)
    for i, model in enumerate(models[1:], 1):
        if type(model) is not type(first):
            raise NotFusable(f"model {i} is a {type(model).__name__}, model 0 a {type(first).__name__}")
        if architecture_signature(model) != signature:
            raise NotFusable(
                f"model {i} differs from model 0 in its config or in its parameters' names, "
                "shapes, dtypes or devices"
            )
        for (name, b0), (_, b) in zip(first.named_buffers(), model.named_buffers()):
            if b0.shape != b.shape or not torch.equal(b0, b):
                raise NotFusable(f"buffer {name!r} differs between model 0 and model {i}")


def stack_padded(tensors: Sequence[torch.Tensor], by_vocab: bool) -> torch.Tensor:
    """``torch.stack``; vocabulary-indexed tensors are first padded with zero rows to the longest."""
    if not by_vocab or len({t.shape[0] for t in tensors}) == 1:
        return torch.stack(tensors)
    out = tensors[0].new_zeros((len(tensors), max(t.shape[0] for t in tensors), *tensors[0].shape[1:]))
    for c, t in enumerate(tensors):
        out[c, : t.shape[0]] = t
    return out
