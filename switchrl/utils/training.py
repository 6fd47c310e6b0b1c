"""The ``TrainingArguments`` keys that every TRL/Transformers training run of switchrl sets the same way.

SFT, GRPO and the testbed's SFT/DPO stages share reporting, the CPU fallback, precision, seeds and
progress bars through :func:`trainer_args`, so the three cannot drift apart; it also applies the
environment defaults of :mod:`switchrl.utils.environment` that the trainers read.
"""

from __future__ import annotations

from typing import Any

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
    bf16: bool = False,
    fp16: bool = False,
) -> dict:
    """The shared ``TrainingArguments`` keys: ``report_to`` (``none`` | ``wandb`` | ``tensorboard``),
    ``seed`` (and ``data_seed``, the data order; default: ``seed``), the CPU fallback (``use_cpu``,
    default: no CUDA device), the precision (default: full, no bf16/fp16 autocast; the switcher's
    trainers pass :func:`switchrl.devices.training_settings`) and progress bars (default:
    Transformers')."""
    offline_defaults()
    return dict(
        output_dir=output_dir,
        report_to=[] if report_to == "none" else [report_to],
        logging_steps=logging_steps,
        seed=seed,
        data_seed=data_seed,
        use_cpu=not torch.cuda.is_available() if use_cpu is None else use_cpu,
        bf16=bf16,
        fp16=fp16,
        disable_tqdm=None if progress is None else not progress,
    )


def one_device(args: Any) -> Any:
    """``args`` training on the model's one device: in a single process that sees several GPUs,
    Transformers would wrap the model in ``nn.DataParallel`` over all of them, copying the switcher
    onto the candidates' GPUs. Sets ``n_gpu`` to 1 the way the ``Trainer`` does for a model-parallel
    model."""
    if args.n_gpu > 1:
        args._n_gpu = 1
    return args
