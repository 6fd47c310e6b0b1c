"""Where a model runs and in which dtype: one rule for the switcher and the candidates of every command.

A device string is ``auto`` | ``cpu`` | ``mps`` | ``cuda`` | ``cuda:N`` (also ``xpu``). Under a
multi-process launch (``accelerate launch`` / ``torchrun`` set ``LOCAL_RANK`` and ``WORLD_SIZE``) the
unindexed ``cuda`` and ``auto`` mean *this rank's* GPU, ``cuda:{LOCAL_RANK}``, so the ranks never stack
on ``cuda:0``; an explicit ``cuda:N`` would be the same GPU in every rank and is refused there
(:func:`check_per_rank`). ``auto`` dtype is bfloat16 on a CUDA device that supports it, else float32.
"""

from __future__ import annotations

import os
import re

import torch

from switchrl.errors import ConfigError

DEVICE_PATTERN = r"auto|cpu|mps|(cuda|xpu)(:\d+)?"
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def check_device(device: str) -> str:
    """``device`` if it is a device string this project places models on (a pydantic validator's core)."""
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N, got {device!r}")
    return device


def world_size() -> int:
    """Processes of this launch (``WORLD_SIZE``; 1 outside ``accelerate launch`` / ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 outside a launch)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def place(device: str) -> str:
    """The concrete device of ``device`` in this process: ``auto`` is CUDA if available, else CPU; under a
    launch of several processes an unindexed ``cuda`` is ``cuda:{LOCAL_RANK}``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world_size() > 1:
        return f"cuda:{local_rank()}"
    return device


def check_per_rank(devices: dict[str, str], fix: str) -> None:
    """Refuse explicit GPU indices under a launch of several processes: every rank would load those
    models onto the same GPU. ``devices``: config field -> device string; ``fix``: what to do instead."""
    if world_size() <= 1:
        return
    pinned = {field: d for field, d in devices.items() if re.fullmatch(r"(cuda|xpu):\d+", d)}
    if pinned:
        named = ", ".join(f"{field}: {d}" for field, d in pinned.items())
        raise ConfigError(
            f"{named}: under a launch of {world_size()} processes every rank would load these models onto "
            f"the same GPU; {fix}"
        )


def check_available(devices: dict[str, str]) -> None:
    """Refuse a ``cuda:N`` beyond this machine's GPUs (config field -> device string); without CUDA
    nothing is checked (the config may be meant for another machine)."""
    if not torch.cuda.is_available():
        return
    count = torch.cuda.device_count()
    for field, device in devices.items():
        match = re.fullmatch(r"cuda:(\d+)", device)
        if match and int(match.group(1)) >= count:
            raise ConfigError(
                f"{field}: {device}, but this process sees {count} GPU(s) (cuda:0..cuda:{count - 1})"
            )


def torch_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype of a config's ``dtype`` on (concrete) ``device``: ``auto`` is bfloat16 on a CUDA
    device with bf16 support, else float32."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
        return DTYPES[dtype]
    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the config spelling)."""
    return str(dtype).removeprefix("torch.")


def training_settings(device: str, dtype: str) -> dict[str, bool]:
    """``TrainingArguments``' ``use_cpu`` / ``bf16`` / ``fp16`` for a switcher configured with ``device`` and
    ``dtype``: mixed precision in the weights' own half type (the trainable LoRA weights stay float32),
    full precision otherwise. Refused: float16 on a CPU (its autocast needs a GPU) and, in a single
    process, a GPU other than ``cuda:0`` (Transformers' trainers move the model to ``cuda:0`` there)."""
    placed = place(device)
    weights = torch_dtype(dtype, placed)
    cuda = placed.startswith("cuda")
    if weights == torch.float16 and not cuda:
        raise ConfigError(
            f"switcher.dtype: float16 training needs a CUDA device (the switcher is on {placed}); "
            "use bfloat16 or float32"
        )
    if cuda and world_size() == 1 and placed not in ("cuda", "cuda:0"):
        raise ConfigError(
            f"switcher.device: {device}: in a single process the trainers (TRL/Transformers) train on "
            "cuda:0; set switcher.device: cuda and put the candidates on the other GPUs, or launch one "
            "process per GPU with `accelerate launch` (each rank's switcher on cuda:LOCAL_RANK)"
        )
    return {"use_cpu": not cuda, "bf16": weights == torch.bfloat16, "fp16": weights == torch.float16}
