"""One way to build an LM switcher, shared by SFT, RL and eval, so the three cannot disagree.

Every switcher of a run starts from a base model (the ``untuned`` system; a fresh LoRA adapter for
SFT or RL) or from a saved switcher directory (evaluated, or RL's warm start), on one device and
dtype rule (:mod:`switchrl.devices`: CUDA if present, else CPU, each rank its own GPU under
``accelerate launch``; bf16 on a GPU that has it), with the same label-token check and the same
candidate check (:func:`check_saved_switcher`, also run before any weight loads). A fresh adapter's
initial weights come from the given seed, so two runs of one config train the same switcher.
Arguments are plain values: the run config's defaults are resolved by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from switchrl.backends.tokens import check_model_dir
from switchrl.devices import dtype_name, place, torch_dtype
from switchrl.errors import CheckpointError, ConfigError
from switchrl.policies.lm_switcher import LMSwitcher, SavedSwitcherConfig, read_metadata


@dataclass(frozen=True)
class LoraSettings:
    """A fresh LoRA adapter on every linear layer (plus the label rows, see ``LMSwitcher.attach_adapter``)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"

    def peft_kwargs(self) -> dict[str, Any]:
        modules = self.target_modules
        return {
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": modules if isinstance(modules, str) else list(modules),
        }


def usable_label_tokens(label_tokens: Sequence[str] | None, n_candidates: int) -> list[str] | None:
    """The first ``n_candidates`` of ``label_tokens`` if there are enough, else ``None`` (the default
    ``<c0>``, ``<c1>``, ...)."""
    if label_tokens is None or len(label_tokens) < n_candidates:
        return None
    return list(label_tokens[:n_candidates])


def make_adapter_trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Unfreeze the LoRA weights of a peft model loaded for inference; returns the trainable parameters."""
    for config in getattr(model, "peft_config", {}).values():
        config.inference_mode = False
    params = []
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(True)
            params.append(param)
    if not params:
        raise ConfigError("the switcher has no LoRA weights to train (start from a saved adapter switcher)")
    return params


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` (a switcher named on the command line or in a config) is meant as a path."""
    return "/" in spec or "\\" in spec or spec.startswith((".", "~"))


def check_saved_switcher(
    saved: str, candidate_names: Sequence[str], where: str, trainable: bool = False
) -> SavedSwitcherConfig:
    """What :func:`build_switcher` would refuse about a saved switcher directory, from its metadata
    alone (no weights): a missing directory or metadata, other candidates, a full model to train, a
    missing base model under an adapter."""
    if not Path(saved).is_dir():
        raise CheckpointError(
            f"{where}: switcher directory {saved} does not exist; give a directory written by "
            "`switchrl sft` / `switchrl rl`"
        )
    meta = read_metadata(Path(saved))
    if meta.candidate_names != list(candidate_names):
        raise CheckpointError(
            f"{where}: the switcher at {saved} was trained for candidates "
            f"{meta.candidate_names}, but this run has {list(candidate_names)}"
        )
    if trainable and not meta.adapter:
        raise ConfigError(f"{where}: {saved} holds a full model, not a LoRA adapter; only adapters train")
    if meta.adapter and meta.base_model_path:
        check_model_dir(meta.base_model_path)
    return meta


def build_switcher(
    candidate_names: Sequence[str],
    *,
    base: str | None = None,
    saved: str | None = None,
    label_tokens: Sequence[str] | None = None,
    lora: LoraSettings | None = None,
    patch_tokens: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    seed: int = 0,
    trainable: bool = False,
    where: str = "switcher",
    **settings: Any,
) -> LMSwitcher:
    """An :class:`LMSwitcher` over ``candidate_names``, from exactly one of ``base`` or ``saved``.

    Args:
        base: a causal LM to put the switcher on, with a fresh ``lora`` adapter if given (its initial
            weights drawn after ``torch.manual_seed(seed)``).
        saved: a directory written by :meth:`LMSwitcher.save_pretrained`; its candidates must be
            ``candidate_names``.
        label_tokens: one per candidate for a ``base`` switcher (used if there are enough).
        patch_tokens: the patch size recorded with a ``base`` switcher (default: the switcher's 50).
        device: default ``auto``: ``cuda`` if available, else ``cpu``; ``cuda`` is this rank's GPU under
            a multi-process launch (:func:`switchrl.devices.place`); ``dtype``: ``auto`` is bf16
            on a CUDA device with bf16 support, else float32 (:func:`switchrl.devices.torch_dtype`).
        seed: the switcher's sampling seed and the seed of a fresh adapter.
        trainable: unfreeze the LoRA weights (a ``saved`` switcher must hold an adapter).
        where: the config field named in errors (e.g. ``rl.init``).
        settings: further :class:`LMSwitcher` settings (``top_p``, ``greedy``, ``temperature``, ...).
    """
    if (base is None) == (saved is None):
        raise ConfigError(f"{where}: give exactly one of a base model and a saved switcher directory")
    device = place(device or "auto")
    dtype = dtype_name(torch_dtype(dtype, device))
    names = list(candidate_names)
    if saved is not None:
        if lora is not None:
            raise ConfigError(f"{where}: a saved switcher keeps its adapter; a fresh lora needs a base")
        check_saved_switcher(saved, names, where, trainable=trainable)
        switcher = LMSwitcher.from_pretrained(saved, device=device, dtype=dtype, seed=seed, **settings)
    else:
        if patch_tokens is not None:
            settings["patch_tokens"] = patch_tokens
        switcher = LMSwitcher.from_base(
            base,
            names,
            label_tokens=usable_label_tokens(label_tokens, len(names)),
            device=device,
            dtype=dtype,
            seed=seed,
            **settings,
        )
        if lora is not None:
            torch.manual_seed(seed)  # the adapter's initial weights (LoRA A) come from the run's seed
            switcher.attach_adapter(None, lora.peft_kwargs())
    if trainable:
        make_adapter_trainable(switcher.model)
    return switcher
