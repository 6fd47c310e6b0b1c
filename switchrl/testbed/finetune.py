"""The SFT stage of the testbed family: learning-rate tries until the alignment tax appears, side by
side on Ray workers where a build has free cores.

Each try starts from the pretrained checkpoint with its own rate and the same seeds, so the tries do
not depend on each other: running the next ``workers`` rates at once and keeping the first that passes,
in rate order, gives the sequential build's weights and record, a try sooner for every try it runs
beside another (seed 0 on the Intel CPU needs two: ~70 s of a ~8.5-minute build).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from switchrl.errors import ConfigError
from switchrl.executors.base import ExecutorConfig, WorkerContext, WorkerSpec, chunked
from switchrl.executors.local import LocalExecutor
from switchrl.executors.ray_executor import RayExecutor
from switchrl.testbed import corpus, stages
from switchrl.testbed.recall import fact_patch_recall
from switchrl.testbed.world import World
from switchrl.utils.threads import torch_threads


def sft_try(
    world: World,
    tokenizer: PreTrainedTokenizerFast,
    base: Path,
    lr: float,
    settings: stages.StageConfig,
    progress: bool = True,
) -> tuple[torch.nn.Module, float]:
    """TRL ``SFTTrainer`` at rate ``lr`` from ``base`` on prompt/completion pairs in the one answer
    format (loss on completions); returns the model and its fact-patch recall."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    s = settings
    data = Dataset.from_list(corpus.sft_examples(world, s.sft_steps * s.sft_batch // 4))
    model = LlamaForCausalLM.from_pretrained(base)
    with tempfile.TemporaryDirectory() as tmp, stages._quiet_trl():
        args = SFTConfig(
            **stages._trainer_kwargs(world, "sft", s.sft_steps, s.sft_batch, lr, tmp, progress),
            max_length=128,
            completion_only_loss=True,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
    return trainer.model.eval(), fact_patch_recall(trainer.model, tokenizer, world)


def default_workers(settings: stages.StageConfig) -> int:
    """Tries to run at once when the caller does not say: one per core this process may use (at most
    one per rate) when Ray is installed, else 1 (in this process)."""
    if importlib.util.find_spec("ray") is None:
        return 1
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return max(1, min(len(settings.sft_lrs), len(usable)))  # (no affinity on macOS: all cores)


def check_workers(workers: int) -> None:
    """A :class:`ConfigError` unless ``workers`` is a count this machine can run."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"testbed build: workers must be an integer >= 1, got {workers!r}")
    if workers > 1 and importlib.util.find_spec("ray") is None:
        raise ConfigError(
            f"testbed build: workers={workers} runs SFT tries on Ray, which is not installed: "
            "pip install 'switchrl[ray]', or use --workers 1"
        )


def finetune(
    world: World,
    tokenizer: PreTrainedTokenizerFast,
    base: Path,
    out: Path,
    settings: stages.StageConfig,
    progress: bool = True,
    workers: int = 1,
) -> dict:
    """SFT (:func:`sft_try`) with the alignment tax as a stopping rule, saved to ``out``.

    SFT runs at the first rate of ``sft_lrs`` and, while the finetuned model still writes both fact
    patches of more than ``sft_recall_ceiling`` % of the validation compositional queries (it
    remembers too many outside facts for the tax), again from the pretrained model at the next rate;
    with no rate passing, the last try is kept. The rates go in waves of ``workers`` tries: one in
    this process, or several at once on Ray actors (one CPU each), with the same result. Returns the
    rate kept and every try's recall up to it.
    """
    check_workers(workers)
    s = settings
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-tries-", dir=out.parent))
    spec = WorkerSpec(
        _TryWorker,  # the factory: a top-level class, which Ray pickles by reference
        {
            "world": world,
            "tokenizer": tokenizer,
            "base": str(base),
            "settings": s,
            "scratch": str(scratch),
            "progress": progress and workers == 1,  # the trainer's own bar, unless tries run elsewhere
        },
    )
    executor = (
        LocalExecutor()
        if workers == 1
        else RayExecutor(ExecutorConfig(executor="ray", replicas=workers, gpus_per_candidate=0))
    )
    tried: list[dict] = []
    kept: dict[str, Any] = {}
    try:
        with (
            executor,
            tqdm(
                total=len(s.sft_lrs),
                desc=f"sft tries ({workers} at once)",
                unit="try",
                disable=not progress or workers == 1,
            ) as bar,
        ):
            for wave in chunked(list(s.sft_lrs), workers):
                chunks = [[{"id": f"lr{i}-{lr:g}", "lr": lr}] for i, lr in enumerate(wave)]
                done = [r for chunk in executor.map_chunks(spec, chunks) for r in chunk.records]
                bar.update(len(done))
                kept, passed = keep(
                    sorted(done, key=lambda r: wave.index(r["lr"])), s.sft_recall_ceiling, tried
                )
                if passed:
                    break
        info = {
            "steps": s.sft_steps,
            "lr": kept["lr"],
            "fact_patch_recall": kept["fact_patch_recall"],
            "tried": tried,
        }
        final = Path(kept["dir"])
        (final / stages.STAGE_INFO).write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(final, out)  # the same filesystem: a directory that exists is complete
        return info
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class _TryWorker:
    """Runs one SFT try per item (``{"id", "lr"}``) and saves it under ``scratch``; built once per
    process from the :class:`~switchrl.executors.base.WorkerSpec` (the class is its factory)."""

    def __init__(self, config: dict, context: WorkerContext):
        self.config = config

    def process(self, items: list[dict]) -> list[dict]:
        c, records = self.config, []
        for item in items:
            with torch_threads(1):  # the build's thread count: it decides the weights
                model, recall = sft_try(
                    c["world"], c["tokenizer"], Path(c["base"]), item["lr"], c["settings"], c["progress"]
                )
            path = Path(c["scratch"]) / item["id"]
            stages._save(model, c["tokenizer"], path)
            records.append(
                {"id": item["id"], "lr": item["lr"], "fact_patch_recall": recall, "dir": str(path)}
            )
        return records


def keep(records: list[dict], ceiling: float, tried: list[dict]) -> tuple[dict, bool]:
    """Walk a wave's tries in rate order as one loop over the rates would: append each to ``tried`` up
    to the first whose recall is at most ``ceiling``; returns the try to keep (that one, else the
    last) and whether it passed. Tries after the first passing one are dropped, as if never run."""
    for record in records:
        tried.append({"lr": record["lr"], "fact_patch_recall": record["fact_patch_recall"]})
        if record["fact_patch_recall"] <= ceiling:
            return record, True
    return records[-1], False
