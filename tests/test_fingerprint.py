"""Issue 16, "stale results": a rerun into the same out_dir after the scorer's code or a task file
changed stops with a message naming what changed (simulate, eval), instead of returning old records."""

from __future__ import annotations

import functools
import json
import sys
import textwrap
from pathlib import Path

import pytest

from switchrl.config import CandidateConfig, SwitchGenerationConfig, TaskSourceConfig
from switchrl.errors import CheckpointError
from switchrl.eval import evaluate
from switchrl.rewards.provenance import FailureTally, scorer_label, scorer_source_hash
from switchrl.rewards.registry import RewardConfig, resolve_reward
from switchrl.run_config import RunConfig
from switchrl.trainers.simulate import simulate
from tests.test_eval import make_config as eval_config

MODULE = "switchrl_fingerprint_test_scorer"
SCORER_V1 = """
def score(query, response, reference, **meta):
    return float(len(set(response.split()) & set(reference.split())))
"""
SCORER_V2 = """
def score(query, response, reference, **meta):
    return float(reference in response)  # the "fixed" scorer
"""


def write_module(root: Path, name: str, code: str) -> str:
    (root / f"{name}.py").write_text(textwrap.dedent(code))
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return f"{name}:score"


def write_tasks(path: Path, reference: str = "river town park") -> Path:
    path.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "query": q, "reference": reference}) + "\n"
            for i, q in enumerate(["the town", "a red bridge"])
        )
    )
    return path


def simulate_config(tiny_family, root: Path, scorer: str) -> RunConfig:
    return RunConfig(
        candidates=[CandidateConfig(name=f"c{i}", path=str(p)) for i, p in enumerate(tiny_family)],
        generation=SwitchGenerationConfig(patch_tokens=2, max_new_tokens=4, seed=3),
        tasks=[TaskSourceConfig(source="jsonl", path=str(root / "tasks.jsonl"), split="train")],
        reward=scorer,
        simulate={"k": 2, "states_per_query": 1, "chunk_size": 2, "out_dir": str(root / "sim")},
    )


# ------------------------------------------------------------------------------------- the helpers
def test_scorer_source_hash_follows_code_weights_and_kwargs(tmp_path):
    spec = write_module(tmp_path, "fp_helper_a", SCORER_V1)
    first = resolve_reward(spec)
    h1 = scorer_source_hash(first)
    assert h1 == scorer_source_hash(resolve_reward(spec))  # stable
    assert scorer_label(first) == "fp_helper_a:score"
    (tmp_path / "fp_helper_a.py").write_text(textwrap.dedent(SCORER_V2) + "\n# a longer file\n")
    assert scorer_source_hash(first) != h1  # the module file changed
    f1 = resolve_reward("token_f1")
    assert scorer_source_hash(resolve_reward([("token_f1", 1.0), ("numeric", 0.5)])) != scorer_source_hash(
        resolve_reward([("token_f1", 1.0), ("numeric", 0.25)])
    )
    assert scorer_source_hash(functools.partial(f1, a=1)) != scorer_source_hash(functools.partial(f1, a=2))


def test_failure_tally_names_the_scorer_and_first_error():
    tally = FailureTally()
    tally.add("m:s", 10, ["ValueError: boom"], failed=1)
    tally.check(0.1, "x")  # 10% is not above 10%
    tally.add("m:s", 10, ["KeyError: k"], failed=10)
    with pytest.raises(Exception, match=r"x: scorer m:s failed on 11 of 20 .*first error: ValueError: boom"):
        tally.check(0.05, "x")
    tally.check(1.0, "x")  # 1.0 disables


# ------------------------------------------------------------------------------------- simulate
def test_simulate_rerun_after_the_scorer_changed_stops_naming_reward(tiny_family, tmp_path):
    write_tasks(tmp_path / "tasks.jsonl")
    name = f"{MODULE}_sim"
    config = simulate_config(tiny_family, tmp_path, write_module(tmp_path, name, SCORER_V1))
    first = simulate(config, progress=False).records()
    assert simulate(config, progress=False).records() == first  # unchanged: resumes (nothing to do)
    write_module(tmp_path, name, SCORER_V2)
    with pytest.raises(CheckpointError, match=r"differs in: reward\b") as err:
        simulate(config, progress=False)
    assert "out_dir" in str(err.value)


def test_simulate_rerun_after_a_task_reference_changed_stops_naming_tasks(tiny_family, tmp_path):
    write_tasks(tmp_path / "tasks.jsonl")
    config = simulate_config(tiny_family, tmp_path, "token_f1")
    simulate(config, progress=False)
    write_tasks(tmp_path / "tasks.jsonl", reference="the red river")
    with pytest.raises(CheckpointError, match=r"differs in: tasks\b"):
        simulate(config, progress=False)


def test_simulate_fingerprint_leaves_out_what_cannot_change_a_record(tiny_family, tmp_path):
    write_tasks(tmp_path / "tasks.jsonl")
    config = simulate_config(tiny_family, tmp_path, "token_f1")
    first = simulate(config, progress=False).records()
    config.simulate = config.simulate.model_copy(update={"chunk_size": 1, "states_per_batch": 1})
    config.max_scorer_failure_rate = 1.0
    assert simulate(config, progress=False).records() == first


# ------------------------------------------------------------------------------------- eval
def test_eval_rerun_after_the_scorer_or_a_reference_changed_stops(tiny_family, tmp_path):
    name = f"{MODULE}_eval"

    def config():
        cfg = eval_config(tiny_family, tmp_path, systems=["singles"], seeds=[0])  # rewrites tasks.jsonl
        return cfg.model_copy(update={"reward": RewardConfig.model_validate(f"{name}:score")})

    write_module(tmp_path, name, SCORER_V1)
    first = evaluate(config(), progress=False)
    assert evaluate(config(), progress=False).records == first.records  # same config: resumed
    write_module(tmp_path, name, SCORER_V2)
    with pytest.raises(CheckpointError, match=r"differs in: reward\b"):
        evaluate(config(), progress=False)

    write_module(tmp_path, name, SCORER_V1)
    cfg = config()
    evaluate(cfg, progress=False)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(tasks.read_text().replace('"reference": "red"', '"reference": "town"'))
    with pytest.raises(CheckpointError, match=r"differs in: tasks\b"):
        evaluate(cfg, progress=False)


def test_cli_names_what_changed_and_the_two_ways_out(tiny_family, tmp_path, capsys):
    import yaml

    from switchrl.cli import main

    write_tasks(tmp_path / "tasks.jsonl")
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(simulate_config(tiny_family, tmp_path, "token_f1").model_dump(mode="json"))
    )
    assert main(["simulate", "--config", str(path)]) == 0
    write_tasks(tmp_path / "tasks.jsonl", reference="the red river")
    assert main(["simulate", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "differs in: tasks" in err and "--overwrite" in err and "new out_dir" in err


def test_simulate_rerun_after_a_checkpoint_was_replaced_stops_naming_checkpoints(tiny_family, tmp_path):
    import os
    import shutil

    write_tasks(tmp_path / "tasks.jsonl")
    own = shutil.copytree(tiny_family[0], tmp_path / "m0")
    config = simulate_config([own, *tiny_family[1:]], tmp_path, "token_f1")
    simulate(config, progress=False)
    weights = next(own.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # "retrained"
    with pytest.raises(CheckpointError, match=r"differs in: checkpoints\b"):
        simulate(config, progress=False)
