"""Bad input gives one clear error naming the problem, never a hang or a traceback from inside torch."""

from __future__ import annotations

import pytest

from switchrl.backends import CandidatePool, Trace
from switchrl.backends.transformers_backend import TransformersBackend
from switchrl.cli import main
from switchrl.config import CandidateConfig, SwitchGenerationConfig
from switchrl.errors import CheckpointError, ConfigError
from switchrl.run_config import load_config
from tests.conftest import make_word_tokenizer, save_tiny_model


def test_missing_checkpoint_path(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        CandidatePool.from_configs([CandidateConfig(name="a", path=str(tmp_path / "nope"))])


def test_tokenizer_without_eos(tmp_path):
    tok = make_word_tokenizer()
    tok.eos_token = None
    path = save_tiny_model(tmp_path / "m", "llama", tok, seed=0)
    # the model config still names an EOS id: drop it too, so nothing could end a response
    import json

    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = None
    (path / "config.json").write_text(json.dumps(cfg))
    gen = path / "generation_config.json"
    if gen.exists():
        gen.unlink()
    with pytest.raises(CheckpointError, match="no EOS"):
        TransformersBackend.from_pretrained("a", str(path))


def test_empty_query_and_bad_action(tiny_family):
    pool = CandidatePool([TransformersBackend.from_pretrained("a", str(tiny_family[0]))], patch_tokens=2)
    with pytest.raises(ValueError, match="outside the candidates"):
        pool.step([Trace(key="t", query="the town", max_new_tokens=4)], [3])
    from switchrl.tasks.base import TaskInstance

    with pytest.raises(ValueError, match="query must be a non-empty string"):
        TaskInstance(id="x", query="  ", reference="y")


@pytest.mark.parametrize("value", [0, -5])
def test_patch_tokens_must_be_positive(value):
    with pytest.raises(Exception, match="patch_tokens"):
        SwitchGenerationConfig(patch_tokens=value)
    with pytest.raises(ConfigError, match="patch_tokens"):
        CandidatePool([object()], patch_tokens=value)  # type: ignore[list-item]


def test_unknown_config_key_names_key_and_file(tmp_path, capsys):
    bad = tmp_path / "run.yaml"
    bad.write_text("testbed: {seed: 0}\nsimulate:\n  kk: 3\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: simulate\.kk: unknown key"):
        load_config(bad)
    assert main(["simulate", "--config", str(bad)]) == 2
    assert "simulate.kk: unknown key" in capsys.readouterr().err


def test_config_needs_candidates(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("generation: {patch_tokens: 3}\n")
    with pytest.raises(ConfigError, match="either 'candidates'"):
        load_config(bad)


def test_hub_id_without_cache_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="not a local directory"):
        CandidatePool.from_configs([CandidateConfig(name="a", path="no-such-org/no-such-model")])


# ----------------------------------------------------------------------------- issue 16: clear messages


def test_missing_task_file_is_a_task_file_error_before_any_model_loads(tmp_path, capsys):
    from switchrl.run_config import ResolvedRun
    from switchrl.tasks import TaskFileError, load_jsonl

    with pytest.raises(TaskFileError, match=r"task file not found: .*nope\.jsonl \(no such file\)"):
        load_jsonl(tmp_path / "nope.jsonl")
    cfg = tmp_path / "run.yaml"
    # the candidate does not exist either: the task file is reported first, before anything loads
    cfg.write_text(
        f"candidates: [{{name: a, path: {tmp_path / 'no-model'}}}]\n"
        f"tasks: [{{path: {tmp_path / 'nope.jsonl'}, split: train}}]\n"
    )
    with pytest.raises(TaskFileError, match=r"tasks\.0\.path: task file not found"):
        ResolvedRun(load_config(cfg))
    assert main(["simulate", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "tasks.0.path: task file not found" in err and "Traceback" not in err


def test_checkpoint_dir_without_config_json(tmp_path, tiny_family):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_family[0], bare)
    (bare / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"bare has no config\.json"):
        CandidatePool.from_configs([CandidateConfig(name="a", path=str(bare))])
    from switchrl.backends.transformers_backend import load_causal_lm

    with pytest.raises(CheckpointError, match="no config.json"):
        load_causal_lm(str(bare))


def test_missing_switcher_path_says_missing(tmp_path, tiny_family):
    from switchrl.eval_systems import resolve_systems
    from switchrl.generate import parse_switcher
    from switchrl.policies.factory import build_switcher
    from switchrl.run_config import ResolvedRun, RunConfig

    missing = str(tmp_path / "x")
    with pytest.raises(ConfigError, match=r"--switcher: '.*x' does not exist"):
        parse_switcher(missing)
    with pytest.raises(ConfigError, match="expected random, round_robin"):
        parse_switcher("randm")  # a typo of a name still lists the names
    with pytest.raises(CheckpointError, match=r"switcher.path: switcher directory .*x does not exist"):
        build_switcher(["a", "b"], saved=missing, where="switcher.path")
    run = ResolvedRun(RunConfig(candidates=[CandidateConfig(name="a", path=str(tiny_family[0]))]))
    with pytest.raises(ConfigError, match=r"eval.systems: switcher directory '.*x' does not exist"):
        resolve_systems(run, [missing], ["a"])
    run.config.eval.sft_path = missing
    with pytest.raises(
        CheckpointError, match=r"eval.sft_path \(or sft.out_dir\): switcher directory .* does not"
    ):
        resolve_systems(run, ["sft"], ["a"])


def test_validation_messages_have_no_pydantic_prefix(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("testbed: {seed: 0}\nreward: nope_scorer\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "reward 'nope_scorer': unknown scorer" in str(err.value)
    assert "Value error" not in str(err.value)


# ----------------------------------------------------------------------------- train/test overlap


def _split_config(tmp_path, rows, **source):
    import json

    from switchrl.run_config import ResolvedRun, RunConfig

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ResolvedRun(
        RunConfig(
            candidates=[CandidateConfig(name="a", path=str(tmp_path))],
            tasks=[{"source": "jsonl", "path": str(tasks), **source}],
        )
    )


def _ids(by_task):
    return sorted(i.id for items in by_task.values() for i in items)


ROWS = [{"id": f"q{i}", "query": f"query {i}", "reference": "r"} for i in range(3)]


def test_unsplit_task_file_cannot_feed_train_and_test(tmp_path):
    from switchrl.run_config import ResolvedRun, RunConfig

    run = _split_config(tmp_path, ROWS)
    assert _ids(run.instances("test")) == ["q0", "q1", "q2"]  # eval: the rows are test rows (the default)
    again = ResolvedRun(RunConfig.model_validate(run.config.model_dump(mode="json")))
    assert _ids(again.instances("test")) == ["q0", "q1", "q2"]
    with pytest.raises(ConfigError, match="no 'split' key"):
        again.instances("train")
    with pytest.raises(ConfigError, match=r"tasks\.0 .*3 row\(s\) have no 'split' key.*allow_overlap: true"):
        run.instances("train")  # simulate / rl would train on eval's queries


def test_allow_overlap_says_it_is_intended(tmp_path):
    from switchrl.run_config import ResolvedRun, RunConfig

    run = _split_config(tmp_path, ROWS, allow_overlap=True)
    assert _ids(run.instances("train")) == _ids(run.instances("test")) == ["q0", "q1", "q2"]
    # workers re-read the config from its JSON dump: the same rows
    again = ResolvedRun(RunConfig.model_validate(run.config.model_dump(mode="json")))
    assert _ids(again.instances("train")) == ["q0", "q1", "q2"]
    with pytest.raises(ValueError, match="either 'split'"):
        _split_config(tmp_path, ROWS, allow_overlap=True, split="train")


def test_source_split_is_honoured(tmp_path):
    run = _split_config(tmp_path, ROWS, split="train")
    assert _ids(run.instances("train")) == ["q0", "q1", "q2"]
    assert _ids(run.instances("test")) == []  # a train source gives eval nothing
    keyed = [{**ROWS[0], "split": "test"}, *ROWS[1:]]
    run = _split_config(tmp_path, keyed, split="train")  # a row's own key wins
    assert _ids(run.instances("train")) == ["q1", "q2"] and _ids(run.instances("test")) == ["q0"]
    split_rows = [{**r, "split": s} for r, s in zip(ROWS, ["train", "test", "train"])]
    run = _split_config(tmp_path, split_rows)  # every row keyed: no source split needed
    assert _ids(run.instances("train")) == ["q0", "q2"] and _ids(run.instances("test")) == ["q1"]


# ----------------------------------------------------------------------------- configs run code


def test_validating_a_config_imports_no_module(tmp_path, monkeypatch):
    import sys

    from switchrl.config import parse
    from switchrl.rewards import RewardConfig

    (tmp_path / "side_effect_mod.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('ran').write_text('x')\n"
        "def s(query, response, reference, **meta):\n    return 1.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("testbed: {seed: 0}\nreward: 'side_effect_mod:s'\n")
    config = load_config(cfg)
    assert "side_effect_mod" not in sys.modules and not (tmp_path / "ran").exists()
    assert config.reward.build()("q", "a", "b") == 1.0  # imported when a run needs the scorer
    assert (tmp_path / "ran").exists()
    sys.modules.pop("side_effect_mod", None)
    with pytest.raises(ConfigError, match=r"reward 'not a module:s': expected 'package.module:function'"):
        parse(RewardConfig, "not a module:s")


# ----------------------------------------------------------------------------- over-long queries

LONG_QUERY = " ".join(["the town river bridge"] * 150)  # 600 words: over the tiny models' 512 positions


@pytest.mark.parametrize("member", [0, 1], ids=["llama", "gpt2"])
def test_over_long_query_is_refused_naming_trace_length_and_limit(tiny_family, member):
    from switchrl.errors import SwitchRLError

    backend = TransformersBackend.from_pretrained("a", str(tiny_family[member]))
    pool = CandidatePool([backend], patch_tokens=2)
    trace = Trace(key="long/q7", query=LONG_QUERY, max_new_tokens=8)
    with pytest.raises(
        SwitchRLError,
        match=r"trace 'long/q7'.*\d+-token prompt plus max_new_tokens=8 = "
        r"\d+ positions, over its limit of 512.*truncate: left",
    ):
        pool.step([trace], [0])
    assert backend.max_positions == 512
    # in range: prompt + budget exactly at the limit still runs
    n = len(backend.prompt_ids("the town"))
    fits = Trace(key="fits", query="the town", max_new_tokens=512 - n)
    assert pool.step([fits], [0])[0].token_ids


@pytest.mark.parametrize("member", [0, 1], ids=["llama", "gpt2"])
def test_over_long_query_truncated_from_the_left(tiny_family, member):
    backend = TransformersBackend.from_pretrained("a", str(tiny_family[member]))
    pool = CandidatePool([backend], patch_tokens=2, truncate="left")
    trace = Trace(key="long", query=LONG_QUERY, max_new_tokens=8)
    (patch,) = pool.step([trace], [0])
    full = backend.prompt_ids(LONG_QUERY)
    assert backend.view(trace)[: 512 - 8] == full[-(512 - 8) :]  # the prompt's last 504 tokens
    assert patch.token_ids
    with pytest.raises(ConfigError, match="generation.truncate"):
        CandidatePool([backend], patch_tokens=2, truncate="right")


def test_over_long_query_through_the_cli_exits_2(tiny_family, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"candidates: [{{name: a, path: {tiny_family[1]}}}]\n"
        "generation: {patch_tokens: 2, max_new_tokens: 4}\n"
    )
    assert main(["generate", "--config", str(cfg), "--query", LONG_QUERY, "--switcher", "fixed:a"]) == 2
    err = capsys.readouterr().err
    assert "trace 'q0'" in err and "over its limit of 512" in err and "Traceback" not in err
    cfg.write_text(cfg.read_text().replace("max_new_tokens: 4}", "max_new_tokens: 4, truncate: left}"))
    assert main(["generate", "--config", str(cfg), "--query", LONG_QUERY, "--switcher", "fixed:a"]) == 0


def test_over_long_query_same_rule_for_vllm_and_openai(tiny_family):
    """vLLM: the engine's max_model_len; OpenAI-compatible: the checkpoint's positions. Refused before
    any request (no engine or server runs here)."""
    from types import SimpleNamespace

    from switchrl.backends.openai_backend import OpenAIBackend
    from switchrl.backends.tokens import load_tokenizer
    from switchrl.backends.vllm_backend import VLLMBackend
    from switchrl.errors import PromptTooLongError

    engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=64))
    fake = SimpleNamespace(generate=lambda *a, **k: pytest.fail("no request expected"), llm_engine=engine)
    vllm = VLLMBackend("v", fake, load_tokenizer(str(tiny_family[0])), params_factory=dict)
    served = OpenAIBackend.from_pretrained("o", str(tiny_family[0]), "http://127.0.0.1:9/v1", "tiny")
    assert (vllm.max_positions, served.max_positions) == (64, 512)
    for backend in (vllm, served):
        trace = Trace(key=f"{backend.name}/long", query=LONG_QUERY, max_new_tokens=8)
        with pytest.raises(PromptTooLongError, match=rf"trace '{backend.name}/long'.*over its limit"):
            CandidatePool([backend], patch_tokens=2).step([trace], [0])
