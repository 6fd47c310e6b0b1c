"""``switchrl eval``: every system on every task, CI math, determinism, resume, recorded scorer failures."""

from __future__ import annotations

import json
import math
import statistics
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from switchrl import cli
from switchrl.backends import CandidatePool
from switchrl.config import CandidateConfig, SwitchGenerationConfig, TaskSourceConfig
from switchrl.errors import CheckpointError, ConfigError
from switchrl.eval import evaluate
from switchrl.eval_metrics import mean_ci
from switchrl.eval_systems import build_systems, resolve_systems
from switchrl.policies import LMSwitcher
from switchrl.run_config import EvalSection, ResolvedRun, RunConfig
from switchrl.tasks.base import TaskInstance

NAMES = ["base", "tuned", "aligned"]
SYSTEMS = ["singles", "random", "round_robin", "untuned", "sft", "rl", "oracle"]
SCORER_MODULE = "switchrl_eval_test_scorers"
QUERIES = {
    "colors": [("the red town", "red"), ("a blue river", "blue"), ("the green park", "green")],
    "numbers": [("one two three", "boom"), ("four five six", "six")],  # "boom": the scorer raises
}


def write_scorer(root: Path) -> str:
    (root / f"{SCORER_MODULE}.py").write_text(
        textwrap.dedent("""
        def score(query, response, reference, **meta):
            if reference == "boom":
                raise ValueError("boom")
            return float(reference in response.split())
    """)
    )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return f"{SCORER_MODULE}:score"


def make_config(
    tiny_family: list[Path],
    root: Path,
    systems: list[str] = SYSTEMS,
    seeds: list[int] = (0, 1),
    **eval_kwargs,
) -> RunConfig:
    """Three tiny candidates, two hand-made tasks with a custom scorer, an "SFT" switcher saved to disk."""
    root.mkdir(parents=True, exist_ok=True)
    tasks = root / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "query": q, "reference": r, "task": t}) + "\n"
            for t, rows in QUERIES.items()
            for i, (q, r) in enumerate(rows)
        )
    )
    sft_dir = root / "sft"
    if not sft_dir.exists():
        LMSwitcher.from_base(str(tiny_family[2]), NAMES, patch_tokens=2).save_pretrained(sft_dir)
    return RunConfig(
        candidates=[CandidateConfig(name=n, path=str(p)) for n, p in zip(NAMES, tiny_family)],
        generation=SwitchGenerationConfig(patch_tokens=2, max_new_tokens=6, seed=3),
        tasks=[TaskSourceConfig(source="jsonl", path=str(tasks))],
        reward=write_scorer(root),
        max_scorer_failure_rate=1.0,  # the scorer fails on 1 of the 5 queries (20%) on purpose
        sft={"base": str(tiny_family[2])},
        eval=EvalSection(
            systems=list(systems),
            seeds=list(seeds),
            sft_path=str(sft_dir),
            out_dir=str(root / "eval"),
            batch_size=4,
            **eval_kwargs,
        ),
    )


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def assert_same_responses(a: list[dict], b: list[dict]) -> None:
    """Same responses, authors and scores; switcher probabilities equal up to float noise (threads, devices)."""
    assert len(a) == len(b)
    for x, y in zip(without_timing(a), without_timing(b)):
        px, py = [p["probs"] for p in x["patches"]], [p["probs"] for p in y["patches"]]
        sx, sy = ({**r, "patches": [{**p, "probs": None} for p in r["patches"]]} for r in (x, y))
        assert sx == sy
        for u, v in zip(px, py):
            assert (u is None and v is None) or u == pytest.approx(v, abs=1e-5)


@pytest.fixture(scope="module")
def run(tiny_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return evaluate(make_config(tiny_family, root), progress=False)


def test_mean_ci_known_case():
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)  # sample sd of 1..4 is sqrt(5/3)
    assert mean_ci([0.0, 1.0, 1.0, 1.0]) == pytest.approx((0.75, 1.96 * 0.5 / 2))
    assert mean_ci([0.3]) == (0.3, None)
    with pytest.raises(ValueError):
        mean_ci([])


def test_table_has_every_system_and_task(run):
    out = run.out_dir
    results = json.loads((out / "results.json").read_text())
    expected = [*NAMES, "random", "round_robin", "untuned", "sft"]
    assert results["systems"] == expected and run.systems == expected
    assert set(results["metrics"]) == set(QUERIES)
    assert any("rl" in n for n in run.notes) and any("oracle" in n for n in run.notes)
    table = (out / "table.md").read_text()
    for name in [*expected, *QUERIES]:
        assert f" {name} |" in table
    records = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert without_timing(records) == without_timing(run.records)
    assert len(records) == len(expected) * 2 * sum(len(v) for v in QUERIES.values())
    for task, by_system in results["metrics"].items():
        for system, m in by_system.items():
            recs = [r for r in records if r["task"] == task and r["system"] == system]
            scores = [r["score"] for r in recs]
            assert m["n"] == len(recs) == 2 * len(QUERIES[task])
            assert m["accuracy"] == pytest.approx(sum(scores) / len(scores))
            assert m["ci95"] == pytest.approx(1.96 * statistics.stdev(scores) / math.sqrt(len(scores)))
            assert m["switches"] == pytest.approx(statistics.fmean(r["num_switches"] for r in recs))
            assert sum(m["share"].values()) == pytest.approx(1.0)
            if system in NAMES:  # a single model writes every patch
                assert m["share"][system] == 1.0 and m["switches"] == 0
    for r in records:
        assert r["text"] == "".join(p["text"] for p in r["patches"])
        if r["system"] in ("untuned", "sft", "random"):
            assert all(
                len(p["probs"]) == 3 and sum(p["probs"]) == pytest.approx(1.0, abs=1e-5) for p in r["patches"]
            )
        if r["system"] == "round_robin":
            assert [p["author"] for p in r["patches"]] == [i % 3 for i in range(len(r["patches"]))]


def test_scorer_failures_are_recorded(run):
    failed = [r for r in run.records if r["task"] == "numbers" and r["reference"] == "boom"]
    assert failed and all(r["error"] == "ValueError: boom" and r["score"] == 0.0 for r in failed)
    assert all(r["error"] is None for r in run.records if r["reference"] != "boom")
    for m in run.metrics["numbers"].values():
        assert m["failures"] == 2  # one failing query x two seeds
        assert m["n"] == 4
    assert "(2 failed)" in run.table


def test_deterministic_across_runs_and_resume_is_a_no_op(run, tiny_family, tmp_path):
    again = evaluate(make_config(tiny_family, run.out_dir.parent), out_dir=tmp_path / "again", progress=False)
    assert without_timing(again.records) == without_timing(run.records)
    resumed = evaluate(
        make_config(tiny_family, run.out_dir.parent), out_dir=tmp_path / "again", progress=False
    )
    assert resumed.records == again.records  # nothing re-generated: even the timings are the stored ones


def test_cli_eval_resumes_the_finished_run(run, tiny_family, capsys):
    cfg = make_config(tiny_family, run.out_dir.parent)
    path = run.out_dir.parent / "run.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert cli.main(["eval", "--config", str(path), "--executor", "local"]) == 0
    assert "# Comparison" in capsys.readouterr().out
    assert (run.out_dir / "table.md").read_text() == run.table  # every response was already committed


def test_bad_systems_are_clear_errors(tiny_family, tmp_path):
    cfg = make_config(tiny_family, tmp_path, systems=["singles", "bogus"])
    with pytest.raises(ConfigError, match="eval.systems: unknown system 'bogus'"):
        resolve_systems(ResolvedRun(cfg), cfg.eval.systems, NAMES)
    cfg = make_config(tiny_family, tmp_path, systems=["sft"])
    cfg.eval.sft_path = str(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="eval.sft_path"):
        resolve_systems(ResolvedRun(cfg), cfg.eval.systems, NAMES)
    cfg.eval.seeds = [1, 1]
    with pytest.raises(ConfigError, match="eval.seeds"):
        evaluate(cfg, progress=False)


def test_ray_gives_the_same_table_as_local(tiny_family, tmp_path):
    ray = pytest.importorskip("ray")
    cfg = make_config(tiny_family, tmp_path, systems=["singles", "random", "sft"], seeds=[0])
    local = evaluate(cfg, out_dir=tmp_path / "local", progress=False)
    started = not ray.is_initialized()
    if started:  # actors import the scorer module from tmp_path
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(tmp_path)}},
        )
    try:
        remote = evaluate(
            cfg,
            executor={"executor": "ray", "replicas": 2, "gpus_per_candidate": 0},
            out_dir=tmp_path / "ray",
            progress=False,
        )
    finally:
        if started:
            ray.shutdown()
    assert_same_responses(remote.records, local.records)
    strip = [
        {
            t: {s: {k: v for k, v in m.items() if k != "tokens_per_s"} for s, m in by.items()}
            for t, by in r.metrics.items()
        }
        for r in (local, remote)
    ]
    assert strip[0] == strip[1]


def test_testbed_systems_use_family_label_tokens_and_the_oracle(tiny_family, tmp_path):
    cfg = make_config(tiny_family, tmp_path, systems=["untuned", "oracle"])
    resolved = ResolvedRun(cfg)
    candidates = resolved.candidates
    resolved.family = SimpleNamespace(
        label_tokens=["red", "blue", "green", "town"],
        aligned=tiny_family[2],
        candidate_configs=lambda: candidates,
    )  # a stand-in testbed family
    pool = CandidatePool.from_configs(candidates, patch_tokens=2)
    systems = build_systems(resolved, pool, cfg.eval.systems)
    assert list(systems) == ["untuned", "oracle"]
    assert systems["untuned"](5, {}).sequence.label_tokens == ["red", "blue", "green"]
    inst = TaskInstance("q0", "the town", "red", task="colors", meta={"solution": "the red town"})
    oracle = systems["oracle"](0, {"oracle/0/colors/q0": inst})
    assert oracle.reference_ids == {
        "oracle/0/colors/q0": pool.backends[0].tokenizer("the red town", add_special_tokens=False)[
            "input_ids"
        ]
    }
    with pytest.raises(ConfigError, match="meta\\['solution'\\]"):
        systems["oracle"](0, {"k": TaskInstance("q1", "the town", "red")})
