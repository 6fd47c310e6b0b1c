"""Every config error of every command is reported (exit 2, one message naming the key and the fix)
before a single weight loads, and the shipped 8B config passes the config-only checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from switchrl.cli import main
from switchrl.errors import CheckpointError
from switchrl.run_config import load_config

SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "tulu3_llama31_8b.yaml"


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("must not load a model before the config checks")

    for module in ("switchrl.backends.transformers_backend", "switchrl.policies.lm_switcher"):
        monkeypatch.setattr(f"{module}.load_causal_lm", refuse)


def _saved_switcher(path: Path, names: list[str], base: str, adapter: bool = True) -> str:
    """A saved switcher's metadata only (what the checks read)."""
    path.mkdir(parents=True)
    meta = {"candidate_names": names, "label_tokens": [f"<c{i}>" for i in range(len(names))]}
    meta.update(patch_tokens=50, instruction="Who writes next?", base_model_path=base, adapter=adapter)
    (path / "switchrl_switcher.json").write_text(json.dumps(meta))
    return str(path)


@pytest.fixture
def write_config(tmp_path, tiny_family):
    """``write_config(**sections) -> path``: a run over the tiny family (candidates a, b) with a train
    and a test task file; sections override or add top-level keys."""
    tasks = tmp_path / "tasks.jsonl"
    rows = [
        {"id": str(i), "query": "the town", "reference": "river", "split": s}
        for i, s in enumerate(["train", "test"])
    ]
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(**sections) -> str:
        config = {
            "candidates": [
                {"name": "a", "path": str(tiny_family[0])},
                {"name": "b", "path": str(tiny_family[1])},
            ],
            "tasks": [{"source": "jsonl", "path": str(tasks)}],
            "simulate": {"out_dir": str(tmp_path / "sim")},
            "sft": {"out_dir": str(tmp_path / "sft")},
            "eval": {"out_dir": str(tmp_path / "eval"), "systems": ["singles"]},
            "rl": {"out_dir": str(tmp_path / "rl")},
            **sections,
        }
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    return write


def _run(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_rl_without_a_start_names_rl_init_and_rl_base(write_config, no_loading, capsys):
    err = _run(["rl", "--config", write_config(), "--algo", "grpo"], capsys)
    assert "rl: give rl.init" in err and "rl.base" in err and "sft.base" not in err


def test_rl_init_checked_from_metadata(write_config, no_loading, capsys, tmp_path, tiny_family):
    missing = write_config(rl={"init": str(tmp_path / "nope"), "out_dir": str(tmp_path / "rl")})
    assert "rl.init: switcher directory" in _run(["rl", "--config", missing, "--algo", "ppo"], capsys)
    other = _saved_switcher(tmp_path / "other", ["x", "y"], str(tiny_family[2]))
    config = write_config(rl={"init": other, "out_dir": str(tmp_path / "rl")})
    err = _run(["rl", "--config", config, "--algo", "grpo"], capsys)
    assert "rl.init" in err and "trained for candidates ['x', 'y']" in err
    full = _saved_switcher(tmp_path / "full", ["a", "b"], str(tiny_family[2]), adapter=False)
    config = write_config(rl={"init": full, "out_dir": str(tmp_path / "rl")})
    assert "only adapters train" in _run(["rl", "--config", config, "--algo", "grpo"], capsys)


def test_rl_base_that_is_no_checkpoint(write_config, no_loading, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    config = write_config(rl={"base": str(tmp_path / "empty"), "out_dir": str(tmp_path / "rl")})
    assert "has no config.json" in _run(["rl", "--config", config, "--algo", "grpo"], capsys)


def test_rl_under_a_launch_refuses_pinned_candidate_gpus(
    write_config, no_loading, capsys, monkeypatch, tmp_path
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    config = yaml.safe_load(Path(write_config(rl={"base": str(tmp_path), "out_dir": "x"})).read_text())
    config["rl"]["base"] = config["candidates"][1]["path"]
    config["candidates"][0]["device"] = "cuda:0"
    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump(config))
    err = _run(["rl", "--config", str(path), "--algo", "grpo"], capsys)
    assert "candidates.0.device: cuda:0" in err and "executor: ray" in err


def test_sft_without_a_base(write_config, no_loading, capsys):
    assert "sft.base: name the switcher's base model" in _run(["sft", "--config", write_config()], capsys)


def test_sft_init_checked_from_metadata_and_needs_no_base(
    write_config, no_loading, capsys, tmp_path, tiny_family
):
    missing = write_config(sft={"init": str(tmp_path / "nope"), "out_dir": str(tmp_path / "sft")})
    err = _run(["sft", "--config", missing], capsys)
    assert "sft.init: switcher directory" in err and "sft.base" not in err
    full = _saved_switcher(tmp_path / "full", ["a", "b"], str(tiny_family[2]), adapter=False)
    config = write_config(sft={"init": full, "out_dir": str(tmp_path / "sft")})
    assert "only adapters train" in _run(["sft", "--config", config], capsys)


def test_float16_training_on_a_cpu(write_config, no_loading, capsys, tiny_family, tmp_path):
    config = write_config(
        sft={"base": str(tiny_family[2]), "out_dir": str(tmp_path / "sft")},
        switcher={"dtype": "float16", "device": "cpu"},
    )
    assert "float16 training needs a CUDA device" in _run(["sft", "--config", config], capsys)


def test_eval_systems_checked_before_the_pool(write_config, no_loading, capsys, tmp_path, tiny_family):
    config = write_config(eval={"systems": ["singles", "sft"], "out_dir": str(tmp_path / "eval")})
    assert "eval.sft_path (or sft.out_dir)" in _run(["eval", "--config", config], capsys)
    other = _saved_switcher(tmp_path / "sw", ["a", "c"], str(tiny_family[2]))
    config = write_config(eval={"systems": [other], "out_dir": str(tmp_path / "eval")})
    assert "trained for candidates ['a', 'c']" in _run(["eval", "--config", config], capsys)
    gone = _saved_switcher(tmp_path / "sw2", ["a", "b"], str(tmp_path / "deleted-base"))
    config = write_config(eval={"systems": [gone], "out_dir": str(tmp_path / "eval")})
    assert "checkpoint path does not exist" in _run(["eval", "--config", config], capsys)


def test_generate_lm_switcher_checked(write_config, no_loading, capsys, tmp_path):
    config = write_config(switcher={"type": "lm", "path": str(tmp_path / "nope")})
    assert "switcher.path" in _run(["generate", "--config", config, "--query", "the town"], capsys)


def test_simulate_bad_candidate_checkpoint_and_device(write_config, no_loading, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    config = yaml.safe_load(Path(write_config()).read_text())
    config["candidates"][1]["path"] = str(tmp_path / "empty")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert "has no config.json" in _run(["simulate", "--config", str(path)], capsys)
    config["candidates"][1]["device"] = "gpu1"
    path.write_text(yaml.safe_dump(config))
    assert "candidates.1.device: device must be" in _run(["simulate", "--config", str(path)], capsys)


def test_a_gpu_this_machine_lacks(write_config, no_loading, capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = yaml.safe_load(Path(write_config()).read_text())
    config["candidates"][1]["device"] = "cuda:3"
    path = tmp_path / "gpus.yaml"
    path.write_text(yaml.safe_dump(config))
    err = _run(["simulate", "--config", str(path)], capsys)
    assert "candidates.1.device: cuda:3, but this process sees 2 GPU(s)" in err


def test_the_shipped_config_passes_every_command_s_checks(tmp_path, monkeypatch):
    """With its task file and the SFT output in place, every command's config-only checks pass on
    ``configs/tulu3_llama31_8b.yaml`` (the weights are hub ids: nothing is fetched)."""
    from switchrl.preflight import check_config

    monkeypatch.chdir(tmp_path)
    config = load_config(SHIPPED)
    (tmp_path / "data").mkdir()
    rows = [
        {"id": str(i), "query": "1+1?", "reference": "2", "split": s} for i, s in enumerate(["train", "test"])
    ]
    (tmp_path / "data" / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = [c.name for c in config.candidates]
    with pytest.raises(CheckpointError, match="rl.init: switcher directory runs/tulu3/sft does not exist"):
        check_config(config, "rl", algo="grpo")
    _saved_switcher(tmp_path / "runs" / "tulu3" / "sft", names, config.sft.base)
    for command in ("generate", "simulate", "sft", "eval", "rl"):
        check_config(config, command, algo="grpo")
    assert config.rl.init == config.sft.out_dir and config.switcher.dtype == "bfloat16"
