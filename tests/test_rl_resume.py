"""Issue 16: ``rl.out_dir`` resumes only the run that wrote it (another lr or base model is refused,
``switchrl rl --overwrite`` starts over), and a checkpoint a kill left half-written is skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from switchrl.cli import main
from switchrl.errors import ConfigError
from switchrl.trainers.rl import train
from switchrl.trainers.rl_setup import FINGERPRINT_FILE
from tests.test_grpo import make_config, rl_section


def test_rl_rerun_with_another_lr_or_base_is_refused_and_overwrite_starts_over(tiny_family, tmp_path):
    config = make_config(tiny_family, tmp_path)
    rl = rl_section(tiny_family, tmp_path, steps=1)
    first = train(config, "grpo", rl=rl)
    assert [h["step"] for h in first.history] == [1]
    assert (Path(rl.out_dir) / FINGERPRINT_FILE).is_file()
    with pytest.raises(ConfigError, match=r"differs in: rl.learning_rate\).*--overwrite.*new rl.out_dir"):
        train(config, "grpo", rl=rl.model_copy(update={"learning_rate": 1e-3, "steps": 2}))
    with pytest.raises(ConfigError, match=r"differs in: start.base\b"):
        train(config, "grpo", rl=rl.model_copy(update={"base": str(tiny_family[2])}))
    with pytest.raises(ConfigError, match=r"differs in: algo, rl.ppo\)|differs in: algo"):
        train(config, "ppo", rl=rl)

    config.rl = rl.model_copy(update={"learning_rate": 1e-3, "steps": 2})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    assert main(["rl", "--config", str(path), "--algo", "grpo"]) == 2  # refused, one line, exit 2
    assert main(["rl", "--config", str(path), "--algo", "grpo", "--overwrite"]) == 0
    log = json.loads((Path(rl.out_dir) / "rl_log.json").read_text())["history"]
    assert [h["step"] for h in log] == [1, 2]  # started over: two fresh steps, not a resume of step 1
    saved = json.loads((Path(rl.out_dir) / FINGERPRINT_FILE).read_text())
    assert saved["rl"]["learning_rate"] == 1e-3


def test_a_failed_start_does_not_block_the_corrected_rerun(tiny_family, tmp_path):
    config = make_config(tiny_family, tmp_path)
    rl = rl_section(tiny_family, tmp_path, steps=1, base=str(tmp_path / "no-such-model"))
    with pytest.raises(Exception):  # noqa: B017 - whatever the bad path raises
        train(config, "grpo", rl=rl)
    result = train(config, "grpo", rl=rl.model_copy(update={"base": str(tiny_family[0])}))
    assert [h["step"] for h in result.history] == [1]


def test_partial_trl_checkpoint_is_skipped_with_a_warning(tiny_family, tmp_path, caplog):
    config = make_config(tiny_family, tmp_path)
    rl = rl_section(tiny_family, tmp_path, steps=1)
    first = train(config, "grpo", rl=rl)
    trainer = Path(rl.out_dir) / "trainer"
    partial = trainer / "checkpoint-2"  # what a kill during the save of step 2 leaves
    shutil.copytree(trainer / "checkpoint-1", partial)
    (partial / "trainer_state.json").unlink()
    with caplog.at_level("WARNING"):
        again = train(config, "grpo", rl=rl.model_copy(update={"steps": 2}))
    assert any("checkpoint-2 is incomplete" in r.getMessage() for r in caplog.records)
    assert [h["step"] for h in again.history] == [1, 2] and again.history[:1] == first.history
    assert (trainer / "checkpoint-2" / "trainer_state.json").is_file()  # step 2 saved again, complete


def test_half_written_checkpoints_are_skipped_by_every_trainer(tmp_path, caplog):
    """The checkpoint finders of GRPO (TRL) and SB3 pass over what a kill during a save leaves."""
    import zipfile

    from switchrl.trainers.rl_setup import last_complete_checkpoint
    from switchrl.trainers.sb3 import last_checkpoint as sb3_last

    trl = tmp_path / "trainer"
    for n in (1, 2, 10):
        (trl / f"checkpoint-{n}").mkdir(parents=True)
    for n in (1, 2):
        (trl / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    with caplog.at_level("WARNING"):
        assert last_complete_checkpoint(trl) == trl / "checkpoint-2"
        assert last_complete_checkpoint(tmp_path / "none") is None
        sb3 = tmp_path / "checkpoints"
        sb3.mkdir()
        with zipfile.ZipFile(sb3 / "sb3_ppo_64_steps.zip", "w") as z:
            z.writestr("data", "{}")
        (sb3 / "sb3_ppo_128_steps.zip").write_bytes(b"PK\x03\x04 cut short")
        assert sb3_last(sb3) == sb3 / "sb3_ppo_64_steps.zip"
    assert any("checkpoint-10 is incomplete" in r.getMessage() for r in caplog.records)
    assert any("sb3_ppo_128_steps.zip is incomplete" in r.getMessage() for r in caplog.records)
