"""RL rollouts on Ray actors: RayCandidatePool writes what CandidatePool writes, GRPO rollouts equal the
local ones, actor faults lose nothing, ``switchrl rl --executor ray`` trains, also under accelerate."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

ray = pytest.importorskip("ray")

from test_grpo import QUERIES, make_config, rl_section  # noqa: E402

from switchrl.backends import CandidatePool, Trace  # noqa: E402
from switchrl.cli import main as cli  # noqa: E402
from switchrl.config import CandidateConfig  # noqa: E402
from switchrl.executors import ExecutorConfig, ExecutorError, RayCandidatePool  # noqa: E402
from switchrl.policies import RandomSwitcher  # noqa: E402
from switchrl.rollout import estimate_utilities  # noqa: E402
from switchrl.trainers.episodes import sample_episodes  # noqa: E402
from switchrl.trainers.rl import train  # noqa: E402
from switchrl.trainers.rl_setup import build_switcher, prepare  # noqa: E402

torch.set_num_threads(1)  # as the actors (Ray sets OMP_NUM_THREADS=1): same float results
RAY = {"executor": "ray", "gpus_per_candidate": 0, "max_restarts": 1, "max_task_retries": 1}
QUERY_TEXTS = [q for q, _ in QUERIES]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    if ray.is_initialized():  # left over by another module: this one needs its own resources
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def candidate_configs(paths) -> list[CandidateConfig]:
    return [CandidateConfig(name=f"m{i}", path=str(p)) for i, p in enumerate(paths)]


@pytest.fixture(scope="module")
def ray_pool(tiny_family):
    """Two actors, each holding the three tiny candidates."""
    with RayCandidatePool(
        candidate_configs(tiny_family), patch_tokens=3, seed=0, executor={**RAY, "replicas": 2}
    ) as pool:
        yield pool


def local_pool(paths) -> CandidatePool:
    return CandidatePool.from_configs(candidate_configs(paths), patch_tokens=3, seed=0)


def summary(traces: list[Trace]) -> list[tuple]:
    return [(t.key, t.authors, [p.token_ids for p in t.patches], t.text, t.stop_reason) for t in traces]


def switch(pool, traces: list[Trace], schedule: list[int], kill=None) -> None:
    """Step ``traces`` with actions from ``schedule``; ``kill(step)`` injects faults between steps."""
    for step, a in enumerate(schedule):
        if kill is not None:
            kill(step)
        live = [t for t in traces if not t.done]
        if live:
            pool.step(live, [(a + i) % len(pool) for i in range(len(live))])


def test_pool_matches_local_and_routes_by_key(ray_pool, tiny_family):
    local = local_pool(tiny_family)
    assert ray_pool.names == local.names and len(ray_pool) == 3 and ray_pool.index("m2") == 2
    assert ray_pool.actor_names == ["switchrl-rollout-rank0-r0", "switchrl-rollout-rank0-r1"]
    runs = {}
    for name, pool in {"local": local, "ray": ray_pool}.items():
        traces = [Trace(f"q{i}", q, 12) for i, q in enumerate(QUERY_TEXTS)]
        switch(pool, traces, [0, 1])
        forks = [t.fork(f"{t.key}/f{j}") for t in traces[:2] for j in range(2)]
        for t in traces[:2]:
            pool.fork(t.key, [f"{t.key}/f{j}" for j in range(2)])
        pool.release([t.key for t in traces[:2]])
        switch(pool, forks + traces[2:], [2, 0, 1, 2])
        runs[name] = summary(traces + forks)
        if name == "ray":
            routes = ray_pool._route
            assert {routes[f"q{i}/f0"] for i in range(2)} == {0, 1}  # new keys spread over both actors
            assert all(routes[f"q{i}/f{j}"] == routes[f"q{i}/f0"] for i in range(2) for j in range(2))
            assert "q0" not in routes  # released
        pool.release([t.key for t in traces + forks])
    assert runs["ray"] == runs["local"]
    assert not ray_pool._route and ray_pool._load == [0, 0]
    with pytest.raises(ValueError, match="outside the candidates"):
        ray_pool.step([Trace("x", "one", 3)], [3])


def test_simulated_rollout_utilities_match_local(ray_pool, tiny_family):
    """estimate_utilities drives prefill, fork, step and release on many keys at once."""

    def scorer(query, response, reference, **meta):
        return float(reference in response)

    results = {}
    for name, pool in {"local": local_pool(tiny_family), "ray": ray_pool}.items():
        states = [Trace(f"s{i}", q, 9) for i, q in enumerate(QUERY_TEXTS[:2])]
        switch(pool, states, [1])
        est = estimate_utilities(
            pool, states, ["town", "four"], scorer, k=2, finisher=RandomSwitcher(len(pool), seed=pool.seed)
        )
        pool.release([s.key for s in states])
        results[name] = [(e.scores, e.responses) for e in est]
    assert results["ray"] == results["local"]


@pytest.mark.parametrize("credit", ["episode", "fork"])
def test_grpo_rollouts_through_ray_equal_local(ray_pool, tiny_family, tmp_path, credit):
    config = make_config(tiny_family, tmp_path)
    rl = rl_section(tiny_family, tmp_path, credit=credit)
    local = prepare(config, rl)
    switcher = build_switcher(local)
    rollouts = {}
    for name, pool in {"local": local.pool, "ray": ray_pool}.items():
        episodes = sample_episodes(
            switcher, pool, QUERY_TEXTS[:2], 3, "grpo/train/s0/p0", 9, credit=credit, seed=7
        )
        rewards, _ = local.rewards.score(
            [local.instances[i // 3] for i in range(6)], [e.trace.text for e in episodes]
        )
        rollouts[name] = (
            [e.completion_ids for e in episodes],
            [e.completion_mask for e in episodes],
            rewards,
        )
    assert rollouts["ray"] == rollouts["local"]
    assert len({tuple(ids) for ids in rollouts["ray"][0]}) > 1  # real, varied episodes
    assert not ray_pool._route  # every finished trace was released on its actor


def test_actor_deaths_lose_no_patch(ray_pool, tiny_family):
    """Killed between steps: Ray restarts the first actor, the second stays dead and its traces move;
    either way the traces are re-read from the driver's copy and write what the local pool writes."""
    expected = [Trace(f"k{i}", q, 15) for i, q in enumerate(QUERY_TEXTS)]
    switch(local_pool(tiny_family), expected, [0, 1, 2, 0, 1])

    def kill(step: int) -> None:
        if step in (2, 3):
            ray.kill(ray_pool._actors[step - 2], no_restart=step == 3)

    traces = [Trace(f"k{i}", q, 15) for i, q in enumerate(QUERY_TEXTS)]
    switch(ray_pool, traces, [0, 1, 2, 0, 1], kill=kill)
    assert summary(traces) == summary(expected)
    assert ray_pool._actors[1] is None and set(ray_pool._route.values()) == {0}
    ray.kill(ray_pool._actors[0], no_restart=True)
    with pytest.raises(ExecutorError, match="every Ray rollout actor is dead.*switchrl-rollout-rank0-r0"):
        ray_pool.step([Trace("k9", "one two", 6)], [0])
    ray_pool.close()  # frees the placement groups for the tests below
    assert not ray.util.placement_group_table() or all(
        g["state"] == "REMOVED" for g in ray.util.placement_group_table().values()
    )


def write_config(tiny_family, tmp_path: Path, **executor) -> Path:
    config = make_config(tiny_family, tmp_path)
    config.rl = rl_section(tiny_family, tmp_path, steps=1, save_steps=1)
    config.executor = ExecutorConfig(**{**RAY, **executor})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    return path


def test_rl_cli_with_ray_executor_writes_a_switcher(tiny_family, tmp_path, capsys):
    path = write_config(tiny_family, tmp_path, executor="local", replicas=2)
    assert cli(["rl", "--config", str(path), "--algo", "grpo", "--executor", "ray"]) == 0
    assert (tmp_path / "rl" / "switcher" / "switchrl_switcher.json").is_file()
    assert "grpo: policy saved to" in capsys.readouterr().out
    history = json.loads((tmp_path / "rl" / "rl_log.json").read_text())["history"]
    assert len(history) == 1 and history[0]["reward"] == history[0]["reward"]  # logged, not NaN
    assert not [a for a in ray.util.list_named_actors() if a.startswith("switchrl-rollout")]  # closed


def test_bad_ray_address_is_one_clear_error(tiny_family, tmp_path, capsys):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_config(tiny_family, tmp_path)
    start = time.perf_counter()
    assert (
        cli(
            [
                "rl",
                "--config",
                str(path),
                "--algo",
                "grpo",
                "--executor",
                "ray",
                "--ray-address",
                f"127.0.0.1:{port}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"switchrl rl: error: ray_address '127.0.0.1:{port}': cannot reach" in err
    assert time.perf_counter() - start < 10
    assert cli(["rl", "--config", str(path), "--algo", "grpo", "--ray-address", "nowhere"]) == 2
    assert "ray_address must be empty, 'auto'" in capsys.readouterr().err


def test_unloadable_candidate_is_one_clear_error(tmp_path):
    with pytest.raises(
        ExecutorError,
        match="Ray actor switchrl-rollout-rank0-r0(-[0-9]+)? could not build the "
        "candidate pool: .*checkpoint path does not exist",
    ):
        RayCandidatePool(
            [CandidateConfig(name="m0", path=str(tmp_path / "missing"))], executor={**RAY, "replicas": 1}
        )


def test_grpo_with_candidates_on_completions_servers(serve, tiny_family, tmp_path):  # noqa: F811
    """``backend: openai`` candidates (vLLM / OpenAI-compatible servers) need nothing else for RL."""
    config = make_config(tiny_family, tmp_path)
    config.candidates = [
        CandidateConfig(
            name=f"m{i}", path=str(p), backend="openai", base_url=serve(p)[0], served_model="tiny"
        )
        for i, p in enumerate(tiny_family[:2])
    ]
    result = train(config, "grpo", rl=rl_section(tiny_family, tmp_path, steps=1))
    assert (result.policy_dir / "switchrl_switcher.json").is_file() and len(result.history) == 1
    assert 0 <= result.history[0]["switch/share/m1"] <= 1


@pytest.mark.skipif(
    shutil.which("accelerate") is None, reason="needs accelerate's launcher (pip install accelerate)"
)
def test_grpo_under_accelerate_launch_with_two_processes_and_ray_actors(ray_cluster, tiny_family, tmp_path):
    """Two trainer processes (DDP over gloo on CPU), each with its own rollout actor on the same Ray cluster.

    ``--multi_gpu`` is accelerate's torchrun launcher; on a machine without GPUs each process trains on
    CPU (``--cpu`` would start a single process unless MPI is set up)."""
    path = write_config(tiny_family, tmp_path, replicas="auto")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [
        shutil.which("accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "switchrl.cli",
        "rl",
        "--config",
        str(path),
        "--algo",
        "grpo",
        "--executor",
        "ray",
        "--ray-address",
        ray_cluster,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rl" / "switcher" / "switchrl_switcher.json").is_file()
    assert proc.stdout.count("grpo: policy saved to") == 2  # both ranks trained and finished
    names = {a["Name"] for a in ray._private.state.actors().values()}  # the GCS table (dead actors too)
    assert {"switchrl-rollout-rank0-r0", "switchrl-rollout-rank1-r0"} <= names  # one actor per rank
