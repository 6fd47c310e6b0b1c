"""Issue 16, the shard store's part: a failed start, a missing manifest, a corrupted shard and an
unwritable out_dir never lose data, never block a fixed rerun, and stop with one clear message."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import switchrl
from switchrl.cli import main
from switchrl.errors import CheckpointError, ConfigError
from switchrl.executors import ShardStore, WorkerSpec, run
from tests.test_shards import ITEMS, make_fake

SWITCHRL_ROOT = Path(switchrl.__file__).resolve().parents[1]  # the code under test, in the subprocess too


def _run(out, log=None, **kwargs):
    spec = WorkerSpec(make_fake, {"seed": 5, "log": log if log is not None else []})
    return run(ITEMS, spec, out, chunk_size=4, progress=False, **kwargs)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("reference")).records()


# -- 1. a failed start leaves nothing that blocks the fixed rerun --------------------------------
def broken_factory(config, context):
    raise CheckpointError("checkpoint path does not exist: /nope")


def test_a_failed_start_does_not_block_the_fixed_rerun(tmp_path, reference):
    with pytest.raises(CheckpointError, match="/nope"):
        run(ITEMS, WorkerSpec(broken_factory, {}), tmp_path, fingerprint={"candidates": ["/nope"]})
    log: list[str] = []
    store = _run(tmp_path, log, fingerprint={"candidates": ["/fixed"]})
    assert store.records() == reference and log == [it.id for it in ITEMS]
    assert json.loads((tmp_path / "manifest.json").read_text())["fingerprint"] == {"candidates": ["/fixed"]}
    # once a record is committed, the fingerprint protects it
    with pytest.raises(CheckpointError, match="differs in: candidates.*rerun with --overwrite to start over"):
        _run(tmp_path, fingerprint={"candidates": ["/other"]})


# -- 2. a missing manifest never deletes shard files ---------------------------------------------
def test_a_missing_manifest_stops_and_deletes_nothing(tmp_path, reference):
    _run(tmp_path)
    before = _files(tmp_path)
    (tmp_path / "manifest.json").unlink()
    log: list[str] = []
    with pytest.raises(CheckpointError, match=r"6 shard file\(s\).*no manifest.json.*--overwrite"):
        _run(tmp_path, log)
    assert _files(tmp_path) == before and log == []  # nothing deleted, nothing computed
    store = _run(tmp_path, log, overwrite=True)
    assert store.records() == reference and log == [it.id for it in ITEMS]


def test_orphans_of_a_crashed_writer_are_still_cleaned_up(tmp_path, reference):
    crashing = WorkerSpec(make_fake, {"seed": 5, "crash_after": 6})
    with pytest.raises(RuntimeError, match="injected crash"):
        run(ITEMS, crashing, tmp_path, chunk_size=4, progress=False)
    (tmp_path / "shards" / "shard-000001.jsonl").write_text('{"id": "q4/s0"}\n')  # written, not listed
    (tmp_path / "shards" / ".shard-000002.jsonl.tmp").write_text('{"id"')
    assert _run(tmp_path).records() == reference
    assert sorted(_files(tmp_path)) == [f"shard-{i:06d}.jsonl" for i in range(6)]


# -- 3. committed shards are verified on open, before any new work; --repair ----------------------
def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[5] ^= 1
    path.write_bytes(bytes(data))


DAMAGE = {
    "byte-flipped": _flip,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:10]),
    "deleted": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_shard_stops_the_resume_before_any_work(tmp_path, damage):
    spec = WorkerSpec(make_fake, {"seed": 5})
    run(ITEMS[:12], spec, tmp_path, chunk_size=4, progress=False)  # an interrupted run: 3 shards
    DAMAGE[damage](tmp_path / "shards" / "shard-000001.jsonl")
    log: list[str] = []
    with pytest.raises(CheckpointError, match=r"shards/shard-000001.jsonl \(.*--repair"):
        _run(tmp_path, log)
    assert log == []  # found before the resume computed the other items
    with pytest.raises(CheckpointError, match="shard-000001.jsonl"):  # and again: still recoverable
        _run(tmp_path, log)


@pytest.mark.parametrize("damage", DAMAGE)
def test_repair_recomputes_the_damaged_shards_items_only(tmp_path, reference, damage):
    _run(tmp_path)
    for name in ("shard-000001.jsonl", "shard-000004.jsonl"):
        DAMAGE[damage](tmp_path / "shards" / name)
    log: list[str] = []
    store = _run(tmp_path, log, repair=True)
    assert log == [it.id for it in ITEMS[4:8] + ITEMS[16:20]]
    assert [s.name for s in store.repaired] == ["shard-000001.jsonl", "shard-000004.jsonl"]
    assert store.records() == reference
    assert ShardStore(tmp_path, readonly=True, order=[it.id for it in ITEMS]).records() == reference
    assert sorted(_files(tmp_path)) == sorted(s.name for s in store.shards)  # the bad files are gone
    log.clear()
    assert _run(tmp_path, log).records() == reference and log == []  # a clean store after repair


# -- 4. --overwrite ------------------------------------------------------------------------------
def test_overwrite_starts_over(tmp_path, reference):
    spec = WorkerSpec(make_fake, {"seed": 9})
    run(ITEMS, spec, tmp_path, chunk_size=3, fingerprint={"seed": 9}, progress=False)
    old = _files(tmp_path)
    log: list[str] = []
    store = _run(tmp_path, log, fingerprint={"seed": 5}, overwrite=True)
    assert store.records() == reference and log == [it.id for it in ITEMS]
    assert sorted(_files(tmp_path)) == [s.name for s in store.shards] and _files(tmp_path) != old
    assert json.loads((tmp_path / "manifest.json").read_text())["fingerprint"] == {"seed": 5}
    (tmp_path / "manifest.json").write_text("{not json")  # even an unreadable manifest
    with pytest.raises(CheckpointError, match="not a valid switchrl manifest.*--overwrite"):
        _run(tmp_path)
    assert _run(tmp_path, overwrite=True).records() == reference
    with pytest.raises(ConfigError, match="--overwrite and --repair"):
        _run(tmp_path, overwrite=True, repair=True)


class Kill(BaseException):
    """kill -9 at one file operation (not an Exception: nothing may catch it)."""


@pytest.mark.parametrize("flag", ["repair", "overwrite"])
def test_a_kill_at_any_file_operation_of_repair_or_overwrite_loses_nothing(
    tmp_path, reference, monkeypatch, flag
):
    base = tmp_path / "base"
    if flag == "overwrite":
        run(ITEMS, WorkerSpec(make_fake, {"seed": 9}), base, chunk_size=4, progress=False)
    else:
        _run(base)
        _flip(base / "shards" / "shard-000002.jsonl")
    real_replace, real_unlink = os.replace, Path.unlink
    for n in range(50):
        out = tmp_path / f"run{n}"
        shutil.copytree(base, out)
        calls = [0]

        def counted(real, calls=calls, n=n):
            def op(*args, **kwargs):
                calls[0] += 1
                if calls[0] == n + 1:
                    raise Kill
                return real(*args, **kwargs)

            return op

        with monkeypatch.context() as m:
            m.setattr(os, "replace", counted(real_replace))
            m.setattr(Path, "unlink", counted(real_unlink))
            try:
                ShardStore(out, **{flag: True}).close()
                killed = False
            except Kill:
                killed = True
        if flag == "repair":  # kept shards are intact, whether or not the rerun repeats --repair
            kept = {k: v for k, v in _files(base).items() if k != "shard-000002.jsonl"}
            assert {k: v for k, v in _files(out).items() if k in kept} == kept
        assert _run(out, **{flag: True}).records() == reference
        if not killed:
            break
    else:
        pytest.fail("the open kept doing file operations")
    assert n >= 2  # a manifest replace and at least one unlink were each interrupted once


# -- 5. out_dir that cannot be written: one clear message ----------------------------------------
def test_out_dir_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match=r"file/out cannot be a directory: .*/file is a regular file"):
        _run(tmp_path / "file" / "out")
    with pytest.raises(CheckpointError, match=r"out_dir .*/file cannot be a directory"):
        _run(tmp_path / "file")
    from switchrl.executors import writable_dir  # new with this fix

    with pytest.raises(CheckpointError, match=r"sft.out_dir .*/file/sft cannot be a directory"):
        writable_dir(tmp_path / "file" / "sft", "sft.out_dir")


def _read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", "/ro/out/shards")


def test_out_dir_on_a_read_only_filesystem(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(Path, "mkdir", _read_only)
        with pytest.raises(CheckpointError, match="out_dir .*/ro is on a read-only filesystem"):
            _run(tmp_path / "ro")
        with pytest.raises(CheckpointError, match="sft.out_dir .* read-only filesystem"):
            from switchrl.executors import writable_dir  # new with this fix

            writable_dir(tmp_path / "sft", "sft.out_dir")
    # the filesystem turns read-only mid-run: the commit says so, and nothing committed is lost
    import switchrl.executors.shards as shards

    spec = WorkerSpec(make_fake, {"seed": 5})
    run(ITEMS[:8], spec, tmp_path / "mid", chunk_size=4, progress=False)
    with monkeypatch.context() as m:
        m.setattr(shards, "atomic_write", _read_only)
        with pytest.raises(CheckpointError, match="read-only filesystem"):
            _run(tmp_path / "mid")
    assert len(ShardStore(tmp_path / "mid", readonly=True).completed_ids) == 8


def test_sft_checks_its_out_dir_before_training(tmp_path, tiny_family):
    from switchrl.run_config import RunConfig
    from switchrl.trainers.sft import train_sft

    (tmp_path / "file").write_text("x")
    config = RunConfig(
        candidates=[{"name": f"c{i}", "path": str(p)} for i, p in enumerate(tiny_family)],
        sft={"base": str(tiny_family[0]), "out_dir": str(tmp_path / "file" / "sft"), "max_steps": 1},
    )
    with pytest.raises(CheckpointError, match=r"sft.out_dir .*file/sft cannot be a directory"):
        train_sft(config, records=[])


# -- the CLI: a failed start then the fix, --overwrite / --repair, a real read-only mount ---------
@pytest.fixture()
def config(tmp_path, tiny_family):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "query": q, "reference": "river town"}) + "\n"
            for i, q in enumerate(["the town", "a red bridge", "one two"])
        )
    )

    def write(name: str, paths, **sections) -> str:
        cfg = {
            "candidates": [{"name": f"c{i}", "path": str(p)} for i, p in enumerate(paths)],
            "generation": {"patch_tokens": 2, "max_new_tokens": 4, "seed": 3},
            "tasks": [{"source": "jsonl", "path": str(tasks), "allow_overlap": True}],  # simulate and eval
            "reward": {"scorers": [{"scorer": "rouge_l"}]},
            "simulate": {"k": 2, "states_per_query": 2, "chunk_size": 2, "out_dir": str(tmp_path / "sim")},
            **sections,
        }
        (tmp_path / name).write_text(yaml.safe_dump(cfg))
        return str(tmp_path / name)

    write.family = tiny_family
    write.dir = tmp_path
    return write


def test_cli_simulate_after_a_failed_start_and_with_repair_or_overwrite(config, capsys):
    family = config.family
    assert main(["simulate", "--config", config("bad.yaml", [family[0], "/nope/ckpt", family[2]])]) == 2
    assert "/nope/ckpt" in capsys.readouterr().err
    good = config("good.yaml", family)
    assert main(["simulate", "--config", good]) == 0
    out = config.dir / "sim"
    reference = ShardStore(out, readonly=True).records()
    _flip(out / "shards" / "shard-000001.jsonl")
    capsys.readouterr()
    assert main(["simulate", "--config", good]) == 2
    assert "shard-000001.jsonl" in capsys.readouterr().err
    assert main(["simulate", "--config", good, "--repair"]) == 0
    assert ShardStore(out, readonly=True).records() == reference
    (out / "manifest.json").unlink()
    assert main(["simulate", "--config", good]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["simulate", "--config", good, "--overwrite"]) == 0
    assert ShardStore(out, readonly=True).records() == reference
    with pytest.raises(SystemExit):
        main(["simulate", "--config", good, "--overwrite", "--repair"])


def test_cli_eval_passes_overwrite_and_repair(monkeypatch, config):
    import switchrl.eval as ev

    seen = {}

    def fake_evaluate(config, executor=None, overwrite=False, repair=False, **kwargs):
        seen.update(overwrite=overwrite, repair=repair)
        raise CheckpointError("stop here")

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    good = config("good.yaml", config.family, eval={"systems": ["random"]})  # passes the config checks
    assert main(["eval", "--config", good, "--overwrite"]) == 2 and seen == {
        "overwrite": True,
        "repair": False,
    }
    assert main(["eval", "--config", good, "--repair"]) == 2 and seen == {"overwrite": False, "repair": True}


def test_cli_names_the_config_key_of_an_out_dir_under_a_file(config, capsys):
    (config.dir / "file").write_text("x")
    cfg = config(
        "under.yaml",
        config.family,
        simulate={"k": 2, "out_dir": str(config.dir / "file" / "sim")},
        eval={"systems": ["random"], "seeds": [0], "out_dir": str(config.dir / "file" / "eval")},
    )
    assert main(["simulate", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert (
        f"error: simulate.out_dir {config.dir}/file/sim cannot be a directory: {config.dir}/file is a" in err
    )
    assert main(["eval", "--config", cfg]) == 2
    assert f"error: eval.out_dir {config.dir}/file/eval cannot be a directory" in capsys.readouterr().err


def _ro_mount_works(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {where} && ! touch {where}/x"],
        capture_output=True,
    )
    return probe.returncode == 0


def test_cli_on_a_real_read_only_filesystem(config):
    ro = config.dir / "ro"
    ro.mkdir()
    if not _ro_mount_works(ro):
        pytest.skip("cannot mount a read-only tmpfs here (needs unshare -m)")
    cfg = config("ro.yaml", config.family, sft={"out_dir": str(ro / "sft"), "base": str(config.family[0])})
    cfg_text = yaml.safe_load(Path(cfg).read_text())
    cfg_text["simulate"]["out_dir"] = str(ro / "sim")
    Path(cfg).write_text(yaml.safe_dump(cfg_text))
    script = (
        "import sys; from switchrl.cli import main; "
        f"sys.exit(10 * main(['simulate', '--config', '{cfg}']) + main(['sft', '--config', '{cfg}']))"
    )
    env = {**os.environ, "PYTHONPATH": str(SWITCHRL_ROOT)}
    done = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f'mount -t tmpfs -o ro tmpfs {ro} && exec "$0" -c "$1"',
            sys.executable,
            script,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 22, done.stderr[-2000:]  # both exit 2, with a message, no traceback
    assert "Traceback" not in done.stderr
    assert f"switchrl simulate: error: simulate.out_dir {ro}/sim is on a read-only filesystem" in done.stderr
    assert f"switchrl sft: error: sft.out_dir {ro}/sft is on a read-only filesystem" in done.stderr


# -- kill -9 at random moments: every reopen verifies, refuses nothing, and resumes to the same records
KILL_CHILD = """
import sys
from tests.test_shards import Item, make_fake
from switchrl.executors import WorkerSpec, run
items = [Item(f"q{i}/s{i % 4}", i) for i in range(int(sys.argv[2]))]
print("ready", flush=True)
run(items, WorkerSpec(make_fake, {"seed": 5}), sys.argv[1], chunk_size=1, progress=False)
print("done", flush=True)
"""


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume(tmp_path):
    import random
    import signal
    import time

    from tests.test_shards import Item

    n_items, out = 150, tmp_path / "run"
    items = [Item(f"q{i}/s{i % 4}", i) for i in range(n_items)]
    reference = run(items, WorkerSpec(make_fake, {"seed": 5}), tmp_path / "ref", progress=False).records()
    rng = random.Random(16)
    env = {**os.environ, "PYTHONPATH": str(SWITCHRL_ROOT)}
    kills = 0
    for _ in range(8):
        child = subprocess.Popen(
            [sys.executable, "-c", KILL_CHILD, str(out), str(n_items)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=SWITCHRL_ROOT,
        )
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        kills += child.wait() == -signal.SIGKILL
        if (out / "manifest.json").exists():  # what a reader sees after the kill: committed and intact
            store = ShardStore(out, readonly=True)
            assert len(store.records()) == sum(s.num_records for s in store.shards)
    assert kills >= 4  # most of the kills landed mid-run
    assert run(items, WorkerSpec(make_fake, {"seed": 5}), out, progress=False).records() == reference
