"""Issue 16, "failure looks like success": a scorer that fails on every sample makes simulate, eval and
rl exit non-zero (exit 2, one line naming the scorer and its first error) after writing what they have;
``max_scorer_failure_rate: 1.0`` disables the check."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from switchrl.cli import main
from tests.test_eval import make_config as eval_config
from tests.test_fingerprint import simulate_config, write_tasks
from tests.test_grpo import make_config as rl_config
from tests.test_grpo import rl_section

BROKEN = "tests.test_failure_budget:broken_scorer"


def broken_scorer(query, response, reference, **meta):
    raise RuntimeError("judge offline")


def write(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def assert_named(err: str, command: str) -> None:
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"switchrl {command}: error: ")
    assert "test_failure_budget:broken_scorer" in line and "RuntimeError: judge offline" in line
    assert "max_scorer_failure_rate" in line


def test_simulate_exits_non_zero_after_writing_when_the_scorer_always_fails(tiny_family, tmp_path, capsys):
    write_tasks(tmp_path / "tasks.jsonl")
    config = simulate_config(tiny_family, tmp_path, BROKEN)
    path = write(config, tmp_path / "run.yaml")
    assert main(["simulate", "--config", str(path)]) == 2
    assert_named(capsys.readouterr().err, "simulate")
    manifest = json.loads((tmp_path / "sim" / "manifest.json").read_text())
    assert sum(len(s["item_ids"]) for s in manifest["shards"]) == 2  # every state written first
    config.max_scorer_failure_rate = 1.0  # not part of the fingerprint: the rerun resumes, nothing to do
    assert main(["simulate", "--config", str(write(config, path))]) == 0
    assert json.loads(capsys.readouterr().out)["scorer_failures"] == 2 * 3 * 2  # states x candidates x k


def test_eval_exits_non_zero_after_writing_when_the_scorer_always_fails(tiny_family, tmp_path, capsys):
    config = eval_config(tiny_family, tmp_path, systems=["singles"], seeds=[0])
    config = config.model_copy(update={"reward": {"scorers": [{"scorer": BROKEN}]}})
    config.max_scorer_failure_rate = 0.05
    path = write(config, tmp_path / "run.yaml")
    assert main(["eval", "--config", str(path)]) == 2
    assert_named(capsys.readouterr().err, "eval")
    out = Path(config.eval.out_dir)
    assert (out / "results.json").is_file() and (out / "table.md").is_file()
    assert len((out / "responses.jsonl").read_text().splitlines()) == 3 * 5  # 3 singles x 5 queries


def test_rl_exits_non_zero_after_saving_when_the_scorer_always_fails(tiny_family, tmp_path, capsys):
    config = rl_config(tiny_family, tmp_path)
    config.rl = rl_section(tiny_family, tmp_path, steps=1)
    path = write(config, tmp_path / "run.yaml")
    assert main(["rl", "--config", str(path), "--algo", "grpo", "--reward", BROKEN]) == 2
    assert_named(capsys.readouterr().err, "rl")
    out = Path(config.rl.out_dir)
    assert (out / "switcher" / "switchrl_switcher.json").is_file() and (out / "rl_log.json").is_file()
