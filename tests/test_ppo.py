"""The LM-switcher PPO: one update end to end, its batch layout, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from test_grpo import lora_weights, make_config, rl_section

from switchrl.trainers.episodes import sample_episodes
from switchrl.trainers.ppo import EpisodeBatch, last_checkpoint, train_ppo
from switchrl.trainers.rl import train
from switchrl.trainers.rl_setup import build_switcher, prepare


def test_episode_batch_holds_trained_labels_only(tiny_family, tmp_path):
    setup = prepare(make_config(tiny_family, tmp_path), rl_section(tiny_family, tmp_path))
    switcher = build_switcher(setup)
    episodes = sample_episodes(switcher, setup.pool, ["one two three"], 3, "b", 9)
    batch = EpisodeBatch(episodes, [0.5, 1.0, 0.0], switcher.lm.pad_token_id)
    for i, e in enumerate(episodes):
        k = int(batch.valid[i].sum())
        assert k == sum(e.trained) == len(e.trace.patches)
        label_tokens = batch.input_ids[i, batch.positions[i, :k]]
        expected = torch.tensor([switcher.sequence.label_ids[a] for a in e.trace.authors])
        assert torch.equal(label_tokens, expected) and torch.equal(
            batch.actions[i, :k], torch.tensor(e.trace.authors)
        )
        assert torch.all(batch.returns[i, :k] == [0.5, 1.0, 0.0][i])
    # the recorded behaviour log-probs are the switcher's own label log-probs (top_p = 1)
    logp = switcher.label_logprobs(batch.input_ids, batch.attention_mask, batch.positions)
    chosen = logp.gather(-1, batch.actions.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(chosen[batch.valid], batch.old_logprobs[batch.valid], atol=1e-4, rtol=1e-4)


def test_ppo_one_update_then_resume(tiny_family, tmp_path):
    config = make_config(tiny_family, tmp_path)
    rl = rl_section(tiny_family, tmp_path, steps=1, switch_cost=0.01)
    setup = prepare(config, rl)
    switcher = build_switcher(setup)
    before = lora_weights(switcher.model)
    result = train_ppo(setup, switcher)
    after = lora_weights(switcher.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    (step,) = result.history
    for key in (
        "reward",
        "score",
        "kl",
        "entropy",
        "clip_fraction",
        "value_loss",
        "switch/rate",
        "switch/share/m1",
    ):
        assert key in step and step[key] == step[key]
    assert 0 <= step["entropy"] <= torch.log(torch.tensor(3.0)).item() + 1e-5
    assert json.loads((result.policy_dir / "switchrl_switcher.json").read_text())["adapter"]
    assert last_checkpoint(Path(rl.out_dir)).parent.name == "checkpoint-1"
    again = train(config, "ppo", rl=rl.model_copy(update={"steps": 2}))
    assert [h["step"] for h in again.history] == [1, 2] and again.history[0] == step
