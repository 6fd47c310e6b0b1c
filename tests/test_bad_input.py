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
