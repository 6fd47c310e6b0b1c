"""Supervised fine-tuning of the switcher on simulated rollouts (TRL ``SFTTrainer`` + a peft LoRA adapter).

Each simulated state becomes one example in the single sequence format: the switcher's prompt, the
prefix patches each preceded by its author's label, then the target label token. The loss is on
that last label only, over the label tokens (the same constrained distribution the switcher samples
from at inference): cross-entropy to the argmax label (the paper), or, with ``soft_labels``, to
``softmax(utilities / soft_temperature)``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from switchrl.devices import training_settings
from switchrl.errors import ConfigError
from switchrl.executors import ShardStore, writable_dir
from switchrl.policies.factory import LoraSettings, build_switcher
from switchrl.policies.sequence import SwitchSequence
from switchrl.preflight import check_config
from switchrl.records import SimulatedState, parse_record, read_records
from switchrl.run_config import ResolvedRun, RunConfig, load_config
from switchrl.utils.training import one_device, trainer_args


def build_examples(
    records: Sequence[SimulatedState | dict], sequence: SwitchSequence, drop_all_equal: bool = False
) -> Dataset:
    """(prefix -> label) examples: ``input_ids``, ``labels`` (-100 but on the label token), ``target``, ``utilities``."""
    rows: dict[str, list] = {"input_ids": [], "labels": [], "target": [], "utilities": []}
    for r in (parse_record(SimulatedState, r, "sft records") for r in records):
        if r.candidates != sequence.candidate_names:
            raise ConfigError(
                f"record {r.id}: candidates {r.candidates} differ from the switcher's "
                f"{sequence.candidate_names}"
            )
        if drop_all_equal and r.all_equal:
            continue
        enc = sequence.encode(r.query, [p.to_patch() for p in r.prefix], next_action=r.label)
        rows["input_ids"].append(enc.input_ids)
        rows["labels"].append([-100] * (len(enc.input_ids) - 1) + [enc.input_ids[-1]])
        rows["target"].append(r.label)
        rows["utilities"].append(r.utilities)
    if not rows["input_ids"]:
        raise ConfigError(
            "sft: no training examples (are all states' utilities equal? try drop_all_equal: false)"
        )
    return Dataset.from_dict(rows)


class _Collator:
    """TRL's language-modeling collator plus the label target and the utilities of each example."""

    def __init__(self, pad_token_id: int):
        self.lm = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.lm([{k: e[k] for k in ("input_ids", "labels")} for e in examples])
        batch["target"] = torch.tensor([e["target"] for e in examples])
        batch["utilities"] = torch.tensor([e["utilities"] for e in examples], dtype=torch.float32)
        return batch


class SwitcherSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss is the label cross-entropy restricted to the candidates' label tokens."""

    def __init__(
        self, *args: Any, label_ids: Sequence[int], soft_temperature: float | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.label_ids = torch.tensor(list(label_ids))
        self.soft_temperature = soft_temperature

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        # the logits that predict the label token sit one position before it
        rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        logits = out.logits[rows, cols][:, self.label_ids.to(labels.device)].float()
        logp = torch.log_softmax(logits, dim=-1)
        if self.soft_temperature is None:
            loss = torch.nn.functional.nll_loss(logp, inputs["target"][rows])
        else:
            soft = torch.softmax(inputs["utilities"][rows] / self.soft_temperature, dim=-1)
            loss = -(soft * logp).sum(-1).mean()
        mode = "train" if model.training else "eval"
        self._metrics[mode]["label_accuracy"].append(
            (logp.argmax(-1) == inputs["target"][rows]).float().mean().item()
        )
        return (loss, out) if return_outputs else loss


def train_sft(config: RunConfig, records: Sequence[SimulatedState | dict] | None = None) -> Path:
    """Train the switcher and save it (adapter + tokenizer + metadata) to ``sft.out_dir``."""
    resolved = ResolvedRun(config)
    section = config.sft
    out = writable_dir(section.out_dir, "sft.out_dir")  # before training, not at the save
    if records is None:
        store = ShardStore(section.data_dir or config.simulate.out_dir, readonly=True)
        records = read_records(SimulatedState, store)
    names = [c.name for c in resolved.candidates]
    device, dtype = config.switcher.device, config.switcher.dtype
    if section.init is not None:  # a saved switcher trained further (its adapter, its label tokens)
        switcher = build_switcher(
            names,
            saved=section.init,
            device=device,
            dtype=dtype,
            seed=section.seed,
            trainable=True,
            where="sft.init",
        )
    else:
        switcher = build_switcher(
            names,
            base=resolved.switcher_base(section.base, "sft.base"),
            label_tokens=resolved.label_tokens,
            lora=LoraSettings(section.lora_r, section.lora_alpha, section.lora_dropout),
            patch_tokens=resolved.generation.patch_tokens,
            device=device,
            dtype=dtype,
            seed=section.seed,
            where="sft.base",
        )
    dataset = build_examples(records, switcher.sequence, section.drop_all_equal)
    args = SFTConfig(
        **trainer_args(
            str(out / "trainer"),
            seed=section.seed,
            report_to=section.report_to,
            logging_steps=max(1, len(dataset) // section.batch_size // 4),
            **training_settings(config.switcher.device, config.switcher.dtype),
        ),
        num_train_epochs=section.epochs,
        max_steps=section.max_steps,
        learning_rate=section.learning_rate,
        per_device_train_batch_size=section.batch_size,
        lr_scheduler_type="constant",
        save_strategy="no",
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = SwitcherSFTTrainer(
        model=switcher.model,
        args=one_device(args),
        train_dataset=dataset,
        processing_class=switcher.tokenizer,
        data_collator=_Collator(switcher.lm.pad_token_id),
        label_ids=switcher.sequence.label_ids,
        soft_temperature=section.soft_temperature if section.soft_labels else None,
    )
    trainer.train()
    switcher.model.eval()
    switcher.reset_cache()
    switcher.save_pretrained(out)
    history = [h for h in trainer.state.log_history if "loss" in h]
    (out / "sft_log.json").write_text(
        json.dumps({"examples": len(dataset), "seed": section.seed, "history": history}, indent=2)
    )
    return out


def main(args) -> int:
    """``switchrl sft --config X [--report-to none|wandb|tensorboard]``."""
    config = load_config(args.config)
    if args.report_to:
        config.sft.report_to = args.report_to
    check_config(config, "sft")
    print(f"switcher saved to {train_sft(config)}")
    return 0
