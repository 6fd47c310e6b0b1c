"""Devices per rank under ``accelerate launch`` (``cuda`` / ``auto`` is ``cuda:LOCAL_RANK``; pinned GPUs
are refused with the fix named) and vLLM's engine settings and GPU, through a fake ``vllm`` module."""

from __future__ import annotations

import os
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch

from switchrl.backends.pool import build_backend
from switchrl.backends.transformers_backend import load_causal_lm
from switchrl.config import CandidateConfig, SwitcherConfig, SwitchGenerationConfig, parse
from switchrl.errors import ConfigError
from switchrl.run_config import ResolvedRun, RLSection, RunConfig


@pytest.fixture
def rank1(monkeypatch):
    """Rank 1 of 2 on a machine with (pretend) CUDA and bf16."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_rank_switcher_goes_to_its_own_gpu(tiny_family, tmp_path, rank1, monkeypatch):
    from switchrl.trainers.rl_setup import RLSetup, build_switcher

    calls = []

    def record(path, dtype="auto", device="cpu"):
        calls.append((dtype, device))
        return load_causal_lm(path, "float32", "cpu")

    monkeypatch.setattr("switchrl.policies.lm_switcher.load_causal_lm", record)
    for device in ("auto", "cuda"):
        config = RunConfig(
            candidates=[CandidateConfig(name=f"c{i}", path=str(p)) for i, p in enumerate(tiny_family)],
            generation=SwitchGenerationConfig(patch_tokens=2, max_new_tokens=6),
            switcher=SwitcherConfig(device=device),
        )
        rl = RLSection(base=str(tiny_family[0]), out_dir=str(tmp_path / "rl"))
        build_switcher(RLSetup(ResolvedRun(config), rl, SimpleNamespace(names=["c0", "c1", "c2"]), [], None))
    assert calls == [("bfloat16", "cuda:1"), ("bfloat16", "cuda:1")]


def test_place_outside_and_inside_a_launch(monkeypatch):
    from switchrl.devices import place

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert [place(d) for d in ("auto", "cuda", "cuda:2", "cpu")] == ["cuda", "cuda", "cuda:2", "cpu"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert [place(d) for d in ("auto", "cuda", "cpu")] == ["cuda:3", "cuda:3", "cpu"]


def test_local_candidates_per_rank(rank1):
    from switchrl.backends.pool import rank_candidates

    cands = [
        CandidateConfig(name="a", path="org/a", device="cuda"),
        CandidateConfig(name="b", path="org/b", device="auto"),
        CandidateConfig(name="c", path="org/c", device="cpu"),
        CandidateConfig(name="d", path="org/d", backend="openai", base_url="http://x/v1", device="cuda:0"),
    ]
    assert [c.device for c in rank_candidates(cands)] == ["cuda:1", "cuda:1", "cpu", "cuda:0"]
    pinned = [*cands, CandidateConfig(name="e", path="org/e", device="cuda:2")]
    with pytest.raises(
        ConfigError, match=r"candidates\.4\.device: cuda:2: under a launch of 2 processes.*executor: ray"
    ):
        rank_candidates(pinned)


def test_pinned_gpus_are_fine_in_one_process_but_training_needs_cuda0(monkeypatch):
    from switchrl.backends.pool import rank_candidates
    from switchrl.devices import check_per_rank, training_settings

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cands = [CandidateConfig(name="a", path="org/a", device="cuda:2")]
    assert rank_candidates(cands)[0].device == "cuda:2"
    check_per_rank({"switcher.device": "cuda:3"}, "fix")
    with pytest.raises(ConfigError, match="switcher.device: cuda:3: in a single process"):
        training_settings("cuda:3", "auto")
    assert training_settings("cuda:0", "auto")["bf16"]


@pytest.fixture
def fake_vllm(monkeypatch):
    """A ``vllm`` module whose ``LLM`` records its arguments and the GPUs visible while it starts."""
    engines = []

    class LLM:
        def __init__(self, **kwargs):
            self.kwargs, self.visible = kwargs, os.environ.get("CUDA_VISIBLE_DEVICES")
            self.llm_engine = SimpleNamespace(
                model_config=SimpleNamespace(max_model_len=kwargs.get("max_model_len"))
            )
            engines.append(self)

        def generate(self, prompts, sampling_params, use_tqdm=False):
            raise AssertionError("not called here")

    module = ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, dict
    monkeypatch.setitem(sys.modules, "vllm", module)
    return engines


def test_vllm_gets_engine_kwargs_and_its_gpu(tiny_family, fake_vllm, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    engine = {"gpu_memory_utilization": 0.45, "max_model_len": 256, "enforce_eager": True}
    cfg = CandidateConfig(
        name="a",
        path=str(tiny_family[0]),
        backend="vllm",
        dtype="bfloat16",
        device="cuda:1",
        engine_kwargs=engine,
    )
    backend = build_backend(cfg)
    (llm,) = fake_vllm
    assert llm.kwargs == dict(
        model=str(tiny_family[0]),
        tokenizer=str(tiny_family[0]),
        dtype="bfloat16",
        enable_prefix_caching=True,
        seed=0,
        **engine,
    )
    assert llm.visible == "1" and "CUDA_VISIBLE_DEVICES" not in os.environ
    assert backend.max_positions == 256
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    build_backend(cfg)
    assert fake_vllm[1].visible == "5" and os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"
    build_backend(cfg.model_copy(update={"device": "auto"}))
    assert fake_vllm[2].visible == "4,5"


def test_vllm_settings_that_cannot_work_are_refused(tiny_family, fake_vllm):
    with pytest.raises(ConfigError, match="tensor_parallel_size is 2"):
        build_backend(
            CandidateConfig(
                name="a",
                path=str(tiny_family[0]),
                backend="vllm",
                device="cuda:0",
                engine_kwargs={"tensor_parallel_size": 2},
            )
        )
    with pytest.raises(ConfigError, match=r"candidates\.0: engine_kwargs go to vllm\.LLM"):
        parse(
            RunConfig, {"candidates": [{"name": "a", "path": "org/a", "engine_kwargs": {"max_model_len": 8}}]}
        )
    bad = {"name": "a", "path": "org/a", "backend": "vllm", "engine_kwargs": {"dtype": "half"}}
    with pytest.raises(ConfigError, match="come from the candidate's path and dtype"):
        parse(RunConfig, {"candidates": [bad]})
    assert not fake_vllm
