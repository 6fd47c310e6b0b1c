"""GRPO through TRL's GRPOTrainer on tiny models: rollouts, masks, two training steps, custom rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from switchrl.config import CandidateConfig, SwitchGenerationConfig, TaskSourceConfig
from switchrl.run_config import RLSection, RunConfig
from switchrl.trainers.episodes import sample_episodes
from switchrl.trainers.grpo import restricted_head, train_grpo
from switchrl.trainers.rl import train
from switchrl.trainers.rl_setup import build_switcher, prepare
from switchrl.utils.sampling import nucleus_logprob

QUERIES = [
    ("one two three", "four"),
    ("red blue green", "town"),
    ("the river bridge", "park"),
    ("five six seven", "eight"),
]


def make_config(tiny_family: list[Path], tmp_path: Path) -> RunConfig:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"id": f"t{i}", "query": q, "reference": r}) + "\n" for i, (q, r) in enumerate(QUERIES)
        )
    )
    return RunConfig(
        candidates=[CandidateConfig(name=f"m{i}", path=str(p)) for i, p in enumerate(tiny_family)],
        generation=SwitchGenerationConfig(patch_tokens=3, max_new_tokens=9, seed=0),
        tasks=[TaskSourceConfig(source="jsonl", path=str(tasks), task="toy", split="train")],
        reward="token_f1",
    )


def rl_section(tiny_family: list[Path], tmp_path: Path, **kw) -> RLSection:
    defaults = dict(
        base=str(tiny_family[0]),
        out_dir=str(tmp_path / "rl"),
        steps=2,
        queries_per_step=2,
        num_generations=2,
        save_steps=1,
        learning_rate=5e-2,
    )
    return RLSection(**{**defaults, **kw})


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("credit", ["episode", "fork"])
def test_episodes_mask_patches_and_carry_behaviour_logprobs(tiny_family, tmp_path, credit):
    setup = prepare(make_config(tiny_family, tmp_path), rl_section(tiny_family, tmp_path, credit=credit))
    switcher = build_switcher(setup)
    label_ids = set(switcher.sequence.label_ids)
    episodes = sample_episodes(
        switcher, setup.pool, ["one two three", "red blue green"], 3, "t", 9, credit=credit, seed=0
    )
    assert len(episodes) == 6 and [e.query for e in episodes[::3]] == ["one two three", "red blue green"]
    for e in episodes:
        ids, mask, lps = e.completion_ids, e.completion_mask, e.completion_logprobs
        assert len(ids) == len(mask) == len(lps) and e.prompt_ids + ids == e.encoded.input_ids
        assert ids[0] in label_ids and mask[0] == 1  # the completion starts with the episode's own decision
        assert sum(mask) == len(e.trace.patches) - e.branch >= 1
        for tok, m, lp in zip(ids, mask, lps):
            assert (m == 1) == (tok in label_ids)  # patches (environment tokens) are masked
            assert (lp < 0) if m else lp == 0.0
        own = e.trace.patches[e.branch :]
        assert [lp for lp, m in zip(lps, mask) if m] == pytest.approx(
            [nucleus_logprob(p.probs, p.author, 1.0) for p in own]
        )
    if credit == "fork":  # a group shares its prefix up to the branch point
        for g in range(2):
            group = episodes[3 * g : 3 * g + 3]
            assert len({tuple(e.prompt_ids) for e in group}) == 1
            assert len({e.branch for e in group}) == 1


def test_restricted_head_makes_trls_fused_logprobs_the_label_softmax(tiny_family, tmp_path):
    from trl.trainer.utils import add_fused_lm_head

    setup = prepare(make_config(tiny_family, tmp_path), rl_section(tiny_family, tmp_path))
    switcher = build_switcher(setup)
    add_fused_lm_head(
        switcher.model.get_base_model(), outputs=("log_probs", "entropy")
    )  # as GRPOTrainer does
    enc = switcher.sequence.encode("one two three", [], next_action=1)
    ids = torch.tensor([enc.input_ids])
    labels = torch.full_like(ids, -100)
    labels[0, -1] = ids[0, -1]  # score the label token only, as the env mask does
    with torch.no_grad():
        with restricted_head(switcher.model, switcher.sequence.label_ids):
            restricted = switcher.model(input_ids=ids, labels=labels, fused_lm_head=True)
        expected = switcher.label_logprobs(
            ids, torch.ones_like(ids), torch.tensor([[len(enc.input_ids) - 1]])
        )[0, 0]
    head = switcher.model.get_output_embeddings()
    assert getattr(head, "_parameters", {}).get("bias") is None  # the bias is gone after the block
    lp, ent = restricted.log_probs[0, -1], restricted.entropy[0, -1]
    torch.testing.assert_close(lp, expected[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, -(expected.exp() * expected).sum(), atol=1e-5, rtol=1e-5)


def test_grpo_trains_two_steps_and_resumes(tiny_family, tmp_path):
    config = make_config(tiny_family, tmp_path)
    rl = rl_section(tiny_family, tmp_path, beta=0.1)
    setup = prepare(config, rl)
    switcher = build_switcher(setup)
    before = lora_weights(switcher.model)
    result = train_grpo(setup, switcher)
    after = lora_weights(switcher.model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert len(result.history) == 2
    step = result.history[-1]
    for key in ("reward", "kl", "entropy", "switch/rate", "switch/share/m0", "rewards/score/mean"):
        assert key in step and step[key] == step[key]  # logged, not NaN
    # the entropy TRL logs is that of the switch distribution (3 labels): at most log 3
    assert 0 <= step["entropy"] <= torch.log(torch.tensor(3.0)).item() + 1e-4
    saved = json.loads((result.policy_dir / "switchrl_switcher.json").read_text())
    assert saved["adapter"] and saved["top_p"] == 0.7
    assert not (result.policy_dir / "ref").exists()
    assert (Path(rl.out_dir) / "trainer" / "checkpoint-2").is_dir()
    # a rerun with more steps resumes from checkpoint-2 (its log restored) and runs only the missing step
    again = train(config, "grpo", rl=rl.model_copy(update={"steps": 3}))
    assert [h["step"] for h in again.history] == [1, 2, 3] and again.history[:2] == result.history


def test_custom_reward_module_function_is_used(tiny_family, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    calls = []
    import examples.custom_reward as custom

    original = custom.length_penalised_f1

    def spy(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(custom, "length_penalised_f1", spy)
    rl = rl_section(tiny_family, tmp_path, steps=1)
    result = train(
        make_config(tiny_family, tmp_path),
        "grpo",
        rl=rl,
        reward=["examples.custom_reward:length_penalised_f1"],
    )
    assert len(calls) == rl.queries_per_step * rl.num_generations
    assert result.history and "rewards/score/mean" in result.history[0]


def test_bad_rl_settings_are_named(tiny_family, tmp_path):
    from switchrl.errors import CheckpointError, ConfigError

    config = make_config(tiny_family, tmp_path)
    with pytest.raises(ConfigError, match="rl.tasks: unknown task"):
        prepare(config, rl_section(tiny_family, tmp_path, tasks=["nope"]))
    with pytest.raises(ConfigError, match="algo must be one of"):
        train(config, "dqn", rl=rl_section(tiny_family, tmp_path))
    with pytest.raises(CheckpointError, match="is not a saved switcher"):
        build_switcher(prepare(config, rl_section(tiny_family, tmp_path, init=str(tiny_family[1]))))


def distinct_words(query: str, response: str, reference: str, **meta) -> float:
    """A reward that varies between episodes of the tiny random models (so the adapter does train)."""
    return len(set(response.split())) / 10


def test_same_seed_gives_the_same_grpo_run_from_a_fresh_lora(tiny_family, tmp_path):
    """``switchrl rl --algo grpo`` twice, 2 steps from a fresh LoRA (``rl.base``), one seed: the same
    metrics log and the same adapter weights (every random initialisation derives from ``rl.seed``)."""
    import yaml
    from safetensors.torch import load_file

    from switchrl.cli import main

    runs = []
    for name in ("first", "second"):
        config = make_config(tiny_family, tmp_path)
        config.rl = rl_section(tiny_family, tmp_path / name, seed=7)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
        assert (
            main(["rl", "--config", str(path), "--algo", "grpo", "--reward", "test_grpo:distinct_words"]) == 0
        )
        out = Path(config.rl.out_dir)
        logged = json.loads((out / "rl_log.json").read_text())["history"]
        history = [{k: v for k, v in h.items() if k != "step_time"} for h in logged]  # wall time
        runs.append((history, load_file(out / "switcher" / "adapter_model.safetensors")))
    (history_a, weights_a), (history_b, weights_b) = runs
    assert [h["step"] for h in history_a] == [1, 2] and history_a[0]["grad_norm"] > 0  # it trained
    assert history_a == history_b
    assert weights_a.keys() == weights_b.keys() and all(
        torch.equal(weights_a[k], weights_b[k]) for k in weights_a
    )
