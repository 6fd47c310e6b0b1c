"""The ``TrainingArguments`` keys that every TRL/Transformers training run of switchrl sets the same way.

SFT, GRPO and the testbed's SFT/DPO stages share reporting, the CPU fallback, precision, seeds and
progress bars through :func:`trainer_args`, so the three cannot drift apart; it also applies the
environment defaults of :mod:`switchrl.utils.environment` that the trainers read.
"""

from __future__ import annotations

import torch

from switchrl.utils.environment import offline_defaults


def trainer_args(
    output_dir: str,
    *,
    seed: int,
    report_to: str = "none",
    logging_steps: int = 1,
    data_seed: int | None = None,
    use_cpu: bool | None = None,
    progress: bool | None = None,
) -> dict:
    """The shared ``TrainingArguments`` keys: ``report_to`` (``none`` | ``wandb`` | ``tensorboard``),
    ``seed`` (and ``data_seed``, the data order; default: ``seed``), the CPU fallback (``use_cpu``,
    default: no CUDA device), full precision (no bf16/fp16 autocast) and progress bars (default:
    Transformers')."""
    offline_defaults()
    return dict(
        output_dir=output_dir,
        report_to=[] if report_to == "none" else [report_to],
        logging_steps=logging_steps,
        seed=seed,
        data_seed=data_seed,
        use_cpu=not torch.cuda.is_available() if use_cpu is None else use_cpu,
        bf16=False,
        fp16=False,
        disable_tqdm=None if progress is None else not progress,
    )
