"""What a checkpoint costs in memory, from its ``config.json`` alone (no weights are read).

The parameter count comes from instantiating the architecture on the meta device (exact for any
Hugging Face causal LM, tied embeddings counted once); the KV cache per token from the attention
shape: ``2 (keys, values) x layers x kv_heads x head_dim x dtype bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from switchrl.errors import ConfigError

DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


class ConfigUnavailable(ConfigError):
    """A checkpoint's ``config.json`` is neither a local directory nor in the hub cache."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes of one checkpoint that memory depends on."""

    path: str
    params: int
    layers: int
    hidden: int
    intermediate: int  # the MLP's width
    kv_heads: int
    head_dim: int
    vocab: int
    lora_params_per_rank: int  # sum of (in + out) over the linear layers LoRA "all-linear" wraps

    def weight_bytes(self, dtype: str) -> int:
        return self.params * DTYPE_BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * DTYPE_BYTES[dtype]


def _read_config(path: str, hub_cache: str | None):
    from transformers import AutoConfig

    if Path(path).exists() and not (Path(path) / "config.json").is_file():
        raise ConfigUnavailable(f"{path} has no config.json (not a Hugging Face checkpoint directory)")
    try:
        return AutoConfig.from_pretrained(path, cache_dir=hub_cache, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigUnavailable(
            f"{path}: config.json is neither a local directory nor in the hub cache ({type(err).__name__}); "
            f"fetch it with `hf download {path} config.json` or give a local checkpoint directory"
        ) from None


@lru_cache(maxsize=32)
def model_shape(path: str, hub_cache: str | None = None) -> ModelShape:
    """The :class:`ModelShape` of checkpoint ``path`` (a local directory or a hub id in the cache)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = _read_config(path, hub_cache)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    head = model.get_output_embeddings()
    lora = sum(
        m.in_features + m.out_features
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(
        path=path,
        params=sum(p.numel() for p in model.parameters()),
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=text.vocab_size,
        lora_params_per_rank=lora,
    )
