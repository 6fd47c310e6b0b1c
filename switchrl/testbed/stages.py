"""The three training stages of the testbed family: pretrain -> SFT (TRL) -> DPO (TRL).

Each stage writes a normal Hugging Face checkpoint (safetensors + config + tokenizer) to a
temporary directory and renames it into place, so a directory that exists is complete.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from switchrl.testbed import corpus
from switchrl.testbed.world import World
from switchrl.utils.seeding import derive_seed
from switchrl.utils.training import trainer_args


@dataclass(frozen=True)
class StageConfig:
    """The sizes and steps of the family.

    Pretraining decides fact recall, hence the oracle: at 1,100 steps of 32 x 64 tokens world seed 0
    recalled 99% but seed 1 only 43% (lr 3e-3: 49%); 1,500 steps of 24 x 64 (same compute) was worse
    on both seeds (48% / 63%). 1,400 steps of 32 x 64 recall 100% on both, but then SFT at lr 5e-4
    kept 87% of the outside facts (no alignment tax: best single 64% on compositional); SFT at
    lr 1e-3 restores the tax (recall 52% / 70%, best single 27.5% / 47.5%).
    """

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 384
    pretrain_steps: int = 1400
    pretrain_batch: int = 32
    pretrain_seq_len: int = 64
    pretrain_lr: float = 2e-3
    sft_steps: int = 200
    sft_batch: int = 64
    sft_lr: float = 1e-3
    dpo_steps: int = 60
    dpo_batch: int = 32
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.1


@contextmanager
def _atomic_dir(final: Path):
    """Yield a temporary directory next to ``final``; rename it to ``final`` on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, final: Path) -> None:
    with _atomic_dir(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def pretrain(
    world: World,
    tokenizer: PreTrainedTokenizerFast,
    out: Path,
    settings: StageConfig,
    progress: bool = True,
) -> None:
    """Train a small Llama from scratch on packed pretraining documents (plain AdamW loop)."""
    s = settings
    torch.manual_seed(derive_seed(world.seed, "pretrain-init"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)

    # one packed token stream: <bos> document <eos> <bos> document <eos> ...
    need = s.pretrain_steps * s.pretrain_batch * s.pretrain_seq_len
    stream: list[int] = []
    docs = corpus.pretraining_documents(world)
    while len(stream) < need:
        batch = list(itertools.islice(docs, 512))
        for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            stream.extend(ids)
            stream.append(tokenizer.eos_token_id)
    blocks = torch.tensor(stream[:need]).view(s.pretrain_steps, s.pretrain_batch, s.pretrain_seq_len)

    opt = torch.optim.AdamW(model.parameters(), lr=s.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, s.pretrain_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, s.pretrain_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    bar = tqdm(range(s.pretrain_steps), desc="pretrain", unit="step", disable=not progress)
    for step in bar:
        ids = blocks[step]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    _save(model, tokenizer, out)


def _trainer_kwargs(
    world: World, stage: str, steps: int, batch: int, lr: float, tmp: str, progress: bool
) -> dict:
    return dict(
        **trainer_args(
            tmp,
            seed=derive_seed(world.seed, stage) % (2**31),
            data_seed=derive_seed(world.seed, stage, "data") % (2**31),
            logging_steps=max(1, steps // 4),
            use_cpu=True,
            progress=progress,
        ),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        save_strategy="no",
        dataloader_num_workers=0,
    )


@contextmanager
def _quiet_trl():
    """Silence TRL/transformers chatter (experimental-feature notes, per-step logs) during a stage."""
    names = ("transformers", "trl", "accelerate")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for n, lvl in levels.items():
                logging.getLogger(n).setLevel(lvl)


def finetune(
    world: World,
    tokenizer: PreTrainedTokenizerFast,
    base: Path,
    out: Path,
    settings: StageConfig,
    progress: bool = True,
) -> None:
    """TRL ``SFTTrainer`` on prompt/completion pairs in the one answer format (loss on completions)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    s = settings
    data = Dataset.from_list(corpus.sft_examples(world, s.sft_steps * s.sft_batch // 4))
    model = LlamaForCausalLM.from_pretrained(base)
    with tempfile.TemporaryDirectory() as tmp, _quiet_trl():
        args = SFTConfig(
            **_trainer_kwargs(world, "sft", s.sft_steps, s.sft_batch, s.sft_lr, tmp, progress),
            max_length=128,
            completion_only_loss=True,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
    _save(trainer.model.eval(), tokenizer, out)


def align(
    world: World,
    tokenizer: PreTrainedTokenizerFast,
    base: Path,
    out: Path,
    settings: StageConfig,
    progress: bool = True,
) -> None:
    """TRL ``DPOTrainer`` (sigmoid DPO plus an SFT term on the chosen answer), reference log-probs precomputed."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    s = settings
    data = Dataset.from_list(corpus.dpo_pairs(world, s.dpo_steps * s.dpo_batch // 2))
    model = LlamaForCausalLM.from_pretrained(base)
    with tempfile.TemporaryDirectory() as tmp, _quiet_trl():
        args = DPOConfig(
            **_trainer_kwargs(world, "dpo", s.dpo_steps, s.dpo_batch, s.dpo_lr, tmp, progress),
            beta=s.dpo_beta,
            loss_type=["sigmoid", "sft"],
            loss_weights=[1.0, 1.0],
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=256,
            max_length=128,
        )
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
    _save(trainer.model.eval(), tokenizer, out)
