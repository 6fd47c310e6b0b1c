"""The switcher loads in ``switcher.dtype`` on ``switcher.device``, and SFT / GRPO train in that
precision (bf16 mixed precision for bfloat16 weights, never float16 on a CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from switchrl.backends.transformers_backend import load_causal_lm
from switchrl.config import CandidateConfig, SwitcherConfig, SwitchGenerationConfig
from switchrl.errors import ConfigError
from switchrl.run_config import RLSection, RunConfig


class Stop(Exception):
    """Raised by the fake trainer once it has the arguments: nothing needs to train."""


@pytest.fixture
def loads(monkeypatch):
    """Every switcher load as (path, dtype, device); the model itself is loaded on the CPU."""
    calls: list[tuple[str, str, str]] = []

    def record(path, dtype="auto", device="cpu"):
        calls.append((str(path), dtype, device))
        return load_causal_lm(path, dtype, "cpu")

    monkeypatch.setattr("switchrl.policies.lm_switcher.load_causal_lm", record)
    return calls


def _config(tiny_family, tmp_path, **switcher) -> RunConfig:
    return RunConfig(
        candidates=[CandidateConfig(name=f"c{i}", path=str(p)) for i, p in enumerate(tiny_family)],
        generation=SwitchGenerationConfig(patch_tokens=2, max_new_tokens=6),
        switcher=SwitcherConfig(**switcher),
        sft={"base": str(tiny_family[0]), "out_dir": str(tmp_path / "sft")},
    )


def _sft_args(config: RunConfig, monkeypatch):
    """The SFT run's ``SFTConfig`` (the trainer stops on construction)."""
    from switchrl.trainers import sft

    seen = {}

    def fake_trainer(*, model, args, **kwargs):
        seen["args"], seen["model"] = args, model
        raise Stop

    monkeypatch.setattr(sft, "SwitcherSFTTrainer", fake_trainer)
    monkeypatch.setattr(sft, "build_examples", lambda *a: Dataset.from_dict({"input_ids": [[1, 2]] * 4}))
    with pytest.raises(Stop):
        sft.train_sft(config, records=[])
    return seen["args"], seen["model"]


def test_sft_loads_bf16_and_trains_in_bf16(tiny_family, tmp_path, loads, monkeypatch):
    config = _config(tiny_family, tmp_path, dtype="bfloat16", device="cpu")
    args, model = _sft_args(config, monkeypatch)
    assert loads == [(str(tiny_family[0]), "bfloat16", "cpu")]
    assert args.bf16 and not args.fp16 and args.use_cpu
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_sft_auto_on_a_cpu_is_float32(tiny_family, tmp_path, loads, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args, _ = _sft_args(_config(tiny_family, tmp_path), monkeypatch)
    assert loads == [(str(tiny_family[0]), "float32", "cpu")]
    assert not args.bf16 and not args.fp16 and args.use_cpu


def test_auto_is_bf16_on_a_gpu_with_bf16_only(monkeypatch):
    from switchrl.devices import torch_dtype, training_settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert torch_dtype("auto", "cuda") == torch.bfloat16
    assert training_settings("auto", "auto") == {"use_cpu": False, "bf16": True, "fp16": False}
    assert training_settings("cuda", "float16") == {"use_cpu": False, "bf16": False, "fp16": True}
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert torch_dtype("auto", "cuda:0") == torch.float32
    assert torch_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ConfigError, match="float16 training needs a CUDA device"):
        training_settings("cpu", "float16")


def test_grpo_and_rl_switcher_take_the_switcher_dtype(tiny_family, tmp_path, loads):
    from switchrl.run_config import ResolvedRun
    from switchrl.trainers.grpo import grpo_config
    from switchrl.trainers.rl_setup import RLSetup, build_switcher

    config = _config(tiny_family, tmp_path, dtype="bfloat16", device="cpu")
    rl = RLSection(base=str(tiny_family[0]), out_dir=str(tmp_path / "rl"), num_generations=2)
    pool = SimpleNamespace(names=["c0", "c1", "c2"])
    setup = RLSetup(ResolvedRun(config), rl, pool, [], None)  # type: ignore[arg-type]
    switcher = build_switcher(setup)
    assert loads == [(str(tiny_family[0]), "bfloat16", "cpu")]
    args = grpo_config(setup, switcher)
    assert args.bf16 and not args.fp16 and args.use_cpu
    setup.resolved.config.switcher.dtype = "float32"
    args = grpo_config(setup, switcher)
    assert not args.bf16 and not args.fp16


def test_generate_loads_a_saved_switcher_in_the_config_dtype(tiny_family, tmp_path, loads):
    from switchrl.generate import build_policy
    from switchrl.policies.lm_switcher import LMSwitcher

    saved = LMSwitcher.from_base(str(tiny_family[0]), ["c0", "c1"]).save_pretrained(tmp_path / "sw")
    loads.clear()
    switcher = build_policy(
        SwitcherConfig(type="lm", path=str(saved), dtype="bfloat16", device="cpu"), ["c0", "c1"]
    )
    assert loads == [(str(saved), "bfloat16", "cpu")]
    assert switcher.model.get_input_embeddings().weight.dtype == torch.bfloat16
