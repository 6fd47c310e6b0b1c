"""Every run records its seeds in its run metadata (issue 18, item 7): simulate, sft, eval and rl."""

from __future__ import annotations

import json

from switchrl.eval import evaluate
from switchrl.run_config import load_config
from switchrl.trainers.rl_setup import FINGERPRINT_FILE, claim_out_dir, prepare
from switchrl.trainers.sft import train_sft
from switchrl.trainers.simulate import simulate
from tests.test_eval import make_config as eval_config
from tests.test_grpo import make_config as rl_config
from tests.test_grpo import rl_section
from tests.test_simulate_run import config_file  # noqa: F401 (the tiny simulate run, generation seed 3)


def test_simulate_and_sft_record_their_seeds(config_file, tiny_family, tmp_path):  # noqa: F811
    config = load_config(config_file)
    store = simulate(config, progress=False)
    manifest = json.loads((store.out_dir / "manifest.json").read_text())
    assert manifest["fingerprint"]["generation"]["seed"] == 3  # the seed of every state, cut and finish

    config.sft = config.sft.model_copy(
        update={"base": str(tiny_family[0]), "out_dir": str(tmp_path / "sft"), "max_steps": 1, "seed": 11}
    )
    out = train_sft(config, store.records())
    assert json.loads((out / "sft_log.json").read_text())["seed"] == 11  # adapter init and data order


def test_eval_records_its_seeds(tiny_family, tmp_path):
    config = eval_config(tiny_family, tmp_path, systems=["random"], seeds=[4, 5])
    config.generation = config.generation.model_copy(update={"seed": 9})
    results = json.loads((evaluate(config, progress=False).out_dir / "results.json").read_text())
    assert results["seeds"] == [4, 5] and results["generation_seed"] == 9


def test_rl_records_its_seeds(tiny_family, tmp_path):
    config = rl_config(tiny_family, tmp_path)
    config.generation = config.generation.model_copy(update={"seed": 6})
    setup = prepare(config, rl_section(tiny_family, tmp_path, seed=8))
    claim_out_dir(setup, "grpo")  # what every RL trainer (grpo, ppo, sb3-ppo) writes first
    recorded = json.loads((setup.out_dir / FINGERPRINT_FILE).read_text())
    assert recorded["rl"]["seed"] == 8 and recorded["generation"]["seed"] == 6
