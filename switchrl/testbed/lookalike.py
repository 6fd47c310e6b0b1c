"""Look-alike checkpoints: three tiny models with the *interfaces* of Llama-3.1-8B -> Tulu-3-8B-SFT ->
Tulu-3-8B, so the real trio's code path (``configs/tulu3_llama31_8b.yaml``) runs on a CPU in CI.

What they share with the real trio (and what the word-level testbed family lacks):

* one byte-level BPE tokenizer (ByteLevel pre-tokenizer and decoder, like Llama-3) on which rare
  multi-byte characters (€, 日本語, emoji) are several tokens each, with Llama-3's special tokens at the
  end of the vocabulary, ``<|begin_of_text|>`` added by a TemplateProcessing post-processor, and three
  EOS ids (``<|end_of_text|>``, ``<|eom_id|>``, ``<|eot_id|>``) in ``generation_config.json``;
* the base: ``N`` embedding rows, no pad token, no chat template (prompted ``Question: ...\\nAnswer:``);
* SFT and aligned: ``N + 8`` rows, an added ``<pad>`` (id ``N``) and Tulu-3's chat template, which
  starts with ``{{ bos_token }}``;
* LlamaForCausalLM with grouped-query attention, untied embeddings, saved in bfloat16.

The weights are trained briefly (plain AdamW, one thread, fixed seeds: the same bytes on one machine)
so generations are text-like: the base answers and goes on to write the next ``Question:``, the chat
models answer ``... The answer is N . ✅``. "Aligned" is the SFT model trained further on a second
stream of chat turns, not preference-tuned: these checkpoints rehearse interfaces, not the phenomenon
(that is the testbed family's job).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from switchrl.errors import CheckpointError
from switchrl.testbed.family import STAGES, cache_root
from switchrl.testbed.lookalike_text import base_documents, chat_turns, task_rows, tokenizer_text
from switchrl.testbed.stages import _atomic_dir
from switchrl.testbed.world import World
from switchrl.utils.seeding import derive_seed
from switchrl.utils.threads import torch_threads

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<pad>"
LLAMA3_SPECIALS = (
    BOS,
    EOS,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    *(f"<|reserved_special_token_{i}|>" for i in range(3, 8)),
)
"""Llama-3's special tokens in its order (ids ``N - 16 .. N - 1`` here, ``128000 ..`` there)."""
GENERATION_EOS = (EOS, "<|eom_id|>", "<|eot_id|>")
"""``generation_config.eos_token_id`` of every checkpoint, as in Llama-3.1's."""
EXTRA_ROWS = 8
"""SFT and aligned have ``N + 8`` embedding rows (Tulu-3: 128264 = 128256 + 8), ``<pad>`` in the first."""
TULU_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}"
    "{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}"
)
"""Tulu-3's chat template: ``<|user|>`` / ``<|assistant|>`` are plain text, BOS and EOS are specials."""
TASKS_FILE = "tasks.jsonl"
MARKER = "lookalike.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LookalikeSettings:
    """Sizes and steps; the defaults build all three in well under a minute on one CPU thread."""

    bpe_vocab: int = 1008  # a cap: seed 0 runs out of pairs seen twice at 822 (+ 16 specials: N = 838)
    tokenizer_documents: int = 3000
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 192
    max_positions: int = 1024
    batch: int = 16
    seq_len: int = 96
    base_steps: int = 300
    base_lr: float = 3e-3
    sft_steps: int = 150
    sft_lr: float = 2e-3
    aligned_steps: int = 60
    aligned_lr: float = 5e-4


def default_lookalike_root(seed: int) -> Path:
    """``$SWITCHRL_CACHE/lookalike/<seed>`` (default cache root: ``~/.cache/switchrl``)."""
    return cache_root() / "lookalike" / str(seed)


def build_tokenizer(world: World, settings: LookalikeSettings) -> PreTrainedTokenizerFast:
    """The base's byte-level BPE tokenizer (vocabulary ``N``; no pad token, no chat template)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=settings.bpe_vocab,
        min_frequency=2,  # text seen once (the multi-byte samples) is never merged
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_text(world, settings.tokenizer_documents), trainer=trainer)
    tok.add_special_tokens(list(LLAMA3_SPECIALS))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, clean_up_tokenization_spaces=False
    )


def chat_tokenizer(base: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The SFT/aligned tokenizer: the base's plus ``<pad>`` (id ``N``) and Tulu-3's chat template."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(base.backend_tokenizer.to_str()),
        bos_token=BOS,
        eos_token=EOS,
        clean_up_tokenization_spaces=False,
    )
    tok.add_special_tokens({"pad_token": PAD})
    tok.chat_template = TULU_CHAT_TEMPLATE
    return tok


def _packed_batches(
    world: World, tokenizer: PreTrainedTokenizerFast, s: LookalikeSettings
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless ``[batch, seq_len]`` blocks of one packed stream: BOS document EOS BOS ..."""
    docs = base_documents(world)
    size = s.batch * s.seq_len
    stream: list[int] = []
    while True:
        while len(stream) < size:
            for ids in tokenizer(list(itertools.islice(docs, 64)))["input_ids"]:
                stream += [*ids, tokenizer.eos_token_id]
        block = torch.tensor(stream[:size]).view(s.batch, s.seq_len)
        stream = stream[size:]
        yield block, block, torch.ones_like(block)


def _chat_batches(
    world: World, tokenizer: PreTrainedTokenizerFast, s: LookalikeSettings, stream: str
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless right-padded batches of chat turns, the loss on the answer and its EOS only."""
    turns = chat_turns(world, stream)
    while True:
        rows = []
        for query, answer in itertools.islice(turns, s.batch):
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": query}], tokenize=False, add_generation_prompt=True
            )
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = [*tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
            rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
        width = max(len(ids) for ids, _ in rows)
        pad = width - torch.tensor([len(ids) for ids, _ in rows])
        ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        mask = (torch.arange(width)[None, :] < (width - pad)[:, None]).long()
        yield ids, labels, mask


def _fit(
    model: LlamaForCausalLM,
    batches: Iterator[tuple[torch.Tensor, ...]],
    steps: int,
    lr: float,
    desc: str,
    progress: bool,
) -> float:
    """AdamW with a linear warm-up and a linear decay; returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: (t + 1) / warmup if t < warmup else max(0.1, (steps - t) / max(1, steps - warmup))
    )
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(steps), desc=f"lookalike {desc}", unit="step", disable=not progress):
        ids, labels, mask = next(batches)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def _base_model(tokenizer: PreTrainedTokenizerFast, s: LookalikeSettings, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(derive_seed(seed, "lookalike-init"))
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=s.hidden_size,
            intermediate_size=s.intermediate_size,
            num_hidden_layers=s.layers,
            num_attention_heads=s.heads,
            num_key_value_heads=s.kv_heads,
            max_position_embeddings=s.max_positions,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )


def _add_rows(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    """Grow the embeddings to ``N + 8`` rows, the new ones at the mean of the old (as Tulu's resize)."""
    n = model.config.vocab_size
    with torch.no_grad():
        means = [model.get_input_embeddings().weight.mean(0), model.get_output_embeddings().weight.mean(0)]
        model.resize_token_embeddings(n + EXTRA_ROWS, mean_resizing=False)
        model.get_input_embeddings().weight[n:] = means[0]
        model.get_output_embeddings().weight[n:] = means[1]
    model.config.pad_token_id = tokenizer.pad_token_id


def _save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Save a bfloat16 copy of ``model`` (the float32 original trains on) with ``tokenizer``."""
    copy = LlamaForCausalLM(model.config)
    copy.load_state_dict(model.state_dict())
    copy.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in GENERATION_EOS],
        pad_token_id=tokenizer.pad_token_id,
    )
    copy.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _train_all(root: Path, seed: int, s: LookalikeSettings, progress: bool) -> dict:
    """Train the tokenizer and the three stages into ``root``; returns what the marker records."""
    world = World(seed)
    seconds, losses = {}, {}
    start = time.perf_counter()
    base_tok = build_tokenizer(world, s)
    model = _base_model(base_tok, s, seed)
    losses["pretrained"] = _fit(
        model, _packed_batches(world, base_tok, s), s.base_steps, s.base_lr, "pretrained", progress
    )
    _save(model, base_tok, root / "pretrained")
    seconds["pretrained"] = time.perf_counter() - start
    chat_tok = chat_tokenizer(base_tok)
    _add_rows(model, chat_tok)
    for name, steps, lr in (("finetuned", s.sft_steps, s.sft_lr), ("aligned", s.aligned_steps, s.aligned_lr)):
        start = time.perf_counter()
        losses[name] = _fit(model, _chat_batches(world, chat_tok, s, name), steps, lr, name, progress)
        _save(model, chat_tok, root / name)
        seconds[name] = time.perf_counter() - start
    with open(root / TASKS_FILE, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in task_rows(world))
    return {
        "vocab": {"pretrained": len(base_tok), "finetuned": len(chat_tok), "aligned": len(chat_tok)},
        "final_loss": {k: round(v, 3) for k, v in losses.items()},
        "build_seconds": {k: round(v, 1) for k, v in seconds.items()},
    }


def build_lookalike(
    out: str | Path | None = None,
    seed: int = 0,
    force: bool = False,
    settings: LookalikeSettings | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Build the look-alike trio for world ``seed`` into ``out`` (default :func:`default_lookalike_root`),
    or reuse a complete build there. Returns ``{"pretrained", "finetuned", "aligned", "tasks"}`` paths.

    The build goes to a temporary directory renamed into place, so a directory with the marker is
    complete; a build with other ``settings`` or another seed is rebuilt. An ``out`` that exists without
    the marker (a file, a non-empty directory) raises :class:`CheckpointError` (the build would replace it).
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    settings = settings or LookalikeSettings()
    root = Path(out).expanduser() if out is not None else default_lookalike_root(seed)
    marker = root / MARKER
    wanted = {"format_version": FORMAT_VERSION, "seed": seed, "settings": asdict(settings)}
    built = json.loads(marker.read_text()) if marker.is_file() else None
    if built is None and root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise CheckpointError(
            f"{root} exists and holds no look-alike build (no {MARKER}); a build replaces the whole "
            "directory, so give a new or empty one with --out"
        )
    if force or built is None or any(built.get(k) != v for k, v in wanted.items()):
        with _atomic_dir(root) as tmp, torch_threads(1):
            info = _train_all(tmp, seed, settings, progress)
            (tmp / MARKER).write_text(json.dumps({**wanted, **info}, indent=2))
    return {**{name: root / name for name in STAGES}, "tasks": root / TASKS_FILE}


def lookalike_info(root: str | Path) -> dict:
    """What a build recorded (seed, settings, vocabulary sizes, final losses, seconds per stage)."""
    return json.loads((Path(root) / MARKER).read_text())
