"""The candidates' label tokens in the switcher's model: added as special tokens, rows trained by LoRA.

A switcher decides by the logits of one label token per candidate. Base models do not have them, so
they are added with reproducible embedding rows, and a fresh LoRA adapter also trains those rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from switchrl.utils.seeding import generator


def add_label_tokens(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, label_tokens: Sequence[str]
) -> list[str]:
    """Make ``label_tokens`` special tokens of ``tokenizer`` and give ``model`` embedding rows for them.

    New rows are initialised deterministically from the token string (mean of the existing rows plus
    noise seeded by the token), so reloading the same base model reproduces them exactly. Returns
    the tokens that were not yet special tokens.
    """
    special = set(tokenizer.get_added_vocab())
    missing = [t for t in label_tokens if t not in special]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            tables = {id(model.get_input_embeddings().weight): model.get_input_embeddings().weight}
            out = model.get_output_embeddings()
            if out is not None:
                tables.setdefault(id(out.weight), out.weight)
            for weight in tables.values():
                base = weight[:old].float()
                mean, std = base.mean(0), base.std(0)
                for row in range(old, weight.shape[0]):
                    g = generator("switchrl-label-embedding", tokenizer.convert_ids_to_tokens(row))
                    noise = torch.randn(weight.shape[1], generator=g)
                    weight[row] = (mean + std * noise).to(weight.dtype)
    return missing


def label_row_modules(model: torch.nn.Module, label_ids: Sequence[int]) -> dict[str, list[int]]:
    """peft ``trainable_token_indices`` for the label rows of the input embeddings and, when it is
    not tied to them, of the LM head."""
    names = {id(m): n for n, m in model.named_modules()}
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    modules = {names[id(inp)].rsplit(".", 1)[-1]: list(label_ids)}
    if out is not None and out.weight is not inp.weight:
        modules[names[id(out)].rsplit(".", 1)[-1]] = list(label_ids)
    return modules
