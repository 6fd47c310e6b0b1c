"""A tokenizer with Llama-3's interfaces, for the text tests (patch text, stop strings, BOS).

Byte-level BPE trained with ``tokenizers`` on a little English and multi-byte text, Llama-3's special
tokens, ``<|begin_of_text|>`` added by the post-processor, and a Llama-3/Tulu-style chat template that
starts with ``{{ bos_token }}``; plus a tiny random Llama over it.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIALS = [BOS, EOS, EOT, "<|start_header_id|>", "<|end_header_id|>"]
CORPUS = [
    "Question: what is two plus two?\nAnswer: four. The price is 5 €, the café is open.",
    "The river runs under the bridge in the town; a blue school is near the park.",
    "日本語のテキストも少し。Emoji: 🙂 🚀 and accents: é è ü ß.",
    "Question: how much is it?\nAnswer: it costs 12 € in the café near the river.",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
    "\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def llama3_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Byte-level BPE (merges learned from :data:`CORPUS`), BOS added by the post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=SPECIALS[2:],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """A random tiny Llama (float64) over ``tokenizer``, EOS = ``<|end_of_text|>`` and ``<|eot_id|>``."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(EOT)],
    )
    return LlamaForCausalLM(cfg).double().eval()


def scripted_llama(tokenizer: PreTrainedTokenizerFast, script: list[int]) -> LlamaForCausalLM:
    """A Llama whose greedy next token depends only on the current one: ``script[i]`` -> ``script[i + 1]``,
    any other token -> EOS. (Attention and MLP write nothing; embeddings of the scripted tokens are
    orthogonal and the head maps each to its successor.)"""
    follow = dict(zip(script, script[1:]))
    if any(follow[a] != b for a, b in zip(script, script[1:])):
        raise ValueError("script: a token must always be followed by the same token")
    model = tiny_llama(tokenizer)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        basis = torch.eye(emb.shape[1], dtype=emb.dtype)
        emb.copy_(basis[0].expand_as(emb))
        head.zero_()
        head[tokenizer.eos_token_id] = basis[0]
        for i, (a, b) in enumerate(follow.items(), start=1):
            emb[a] = basis[i]
            head[b] += 10 * basis[i]
    return model
