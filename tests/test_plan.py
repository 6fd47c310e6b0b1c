"""``switchrl plan``: memory per device from config.json alone, on the real Llama-3.1-8B / Tulu-3-8B shapes.

The fixtures are the public config.json values of the trio (no weights): Llama-3.1-8B (vocab 128256) and
Tulu-3-8B SFT / aligned (vocab 128264), in local directories and in a hub-cache layout.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from switchrl import cli
from switchrl.errors import ConfigError
from switchrl.plan import PlanError, build_workload, check_fits, make_report
from switchrl.plan.devices import parse_devices
from switchrl.plan.estimate import activation_bytes_per_token
from switchrl.plan.models import model_shape
from switchrl.run_config import RunConfig, load_config

GIB = 2**30
SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "tulu3_llama31_8b.yaml"
HUB_IDS = {
    "meta-llama/Llama-3.1-8B": 128256,
    "allenai/Llama-3.1-Tulu-3-8B-SFT": 128264,
    "allenai/Llama-3.1-Tulu-3-8B": 128264,
}
FOUR_80 = "cuda:0=80GiB,cuda:1=80GiB,cuda:2=80GiB,cuda:3=80GiB"


def llama31_8b_config(vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": vocab,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "hidden_act": "silu",
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    }


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> str:
    """A Hugging Face cache holding only the trio's config.json files (refs/main -> one snapshot)."""
    root = tmp_path_factory.mktemp("hub")
    commit = "0" * 40
    for repo, vocab in HUB_IDS.items():
        entry = root / f"models--{repo.replace('/', '--')}"
        (entry / "refs").mkdir(parents=True)
        (entry / "refs" / "main").write_text(commit)
        snapshot = entry / "snapshots" / commit
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text(json.dumps(llama31_8b_config(vocab)))
    return str(root)


@pytest.fixture(scope="module")
def trio_dirs(tmp_path_factory) -> dict[str, str]:
    """The trio as local directories: config.json only."""
    root = tmp_path_factory.mktemp("trio")
    out = {}
    for repo, vocab in HUB_IDS.items():
        d = root / repo.split("/")[1]
        d.mkdir()
        (d / "config.json").write_text(json.dumps(llama31_8b_config(vocab)))
        out[repo] = str(d)
    return out


def shipped(tmp_path: Path, **sections) -> Path:
    """configs/tulu3_llama31_8b.yaml with ``sections`` merged in (e.g. every candidate on cuda:0)."""
    data = yaml.safe_load(SHIPPED.read_text())
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def one_gpu(tmp_path: Path) -> Path:
    data = yaml.safe_load(SHIPPED.read_text())
    return shipped(tmp_path, candidates=[{**c, "device": "cuda:0"} for c in data["candidates"]])


def plan(capsys, config: Path, hub: str, devices: str, *extra: str) -> tuple[int, str, str]:
    rc = cli.main(["plan", "--config", str(config), "--hub-cache", hub, "--devices", devices, *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def test_weights_and_kv_of_llama31_8b_from_config_json_alone(trio_dirs):
    base = model_shape(trio_dirs["meta-llama/Llama-3.1-8B"])
    assert base.params == 8_030_261_248  # the published 8.03 B
    assert base.weight_bytes("bfloat16") == 16_060_522_496  # 16.06 GB
    assert base.weight_bytes("float32") == 2 * base.weight_bytes("bfloat16")
    assert base.kv_bytes_per_token("bfloat16") == 2 * 32 * 8 * 128 * 2  # 128 KiB per token
    tulu = model_shape(trio_dirs["allenai/Llama-3.1-Tulu-3-8B"])
    assert tulu.params - base.params == 2 * 8 * 4096  # 8 more rows in the untied embedding and head


def test_kv_rule_is_what_the_cache_holds(tiny_family):
    """The KV bytes per token of the rule are exactly what :class:`CachedLM` stores (Llama with GQA, GPT-2)."""
    from switchrl.backends.cached_lm import CachedLM
    from switchrl.backends.transformers_backend import load_causal_lm

    for path in tiny_family[:2]:
        lm = CachedLM(load_causal_lm(str(path)))
        lm.extend(["a", "b"], [[5, 6, 7], [8, 9, 10, 11, 12]])
        assert lm.stored_tokens() == 8
        assert lm.stored_bytes() == 8 * model_shape(str(path)).kv_bytes_per_token("float32")


def test_activation_rule_bounds_what_autograd_keeps(word_tokenizer, tmp_path):
    """The RL switcher's training rule against the bytes autograd saves per layer and token for a bf16
    Llama with LoRA all-linear (two widths of the MLP, so both coefficients are pinned)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def saved_per_token(layers: int, hidden: int, inter: int, checkpointing: bool = False) -> float:
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=64,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=2,  # Llama-3.1-8B's 4 query heads per KV head
        )
        model = get_peft_model(
            LlamaForCausalLM(cfg).to(torch.bfloat16), LoraConfig(r=8, target_modules="all-linear")
        )
        if checkpointing:  # as TRL's GRPO does by default
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
            model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.randint(64, (2, 32)))
        return sum(b for ptr, b in seen.items() if ptr not in params) / 64

    for hidden, inter in [(256, 256), (256, 1024)]:
        measured = (saved_per_token(3, hidden, inter) - saved_per_token(1, hidden, inter)) / 2
        cfg_dir = tmp_path / f"m{inter}"
        cfg_dir.mkdir()
        shape_cfg = {**llama31_8b_config(64), "hidden_size": hidden, "intermediate_size": inter}
        shape_cfg.update(num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2)
        (cfg_dir / "config.json").write_text(json.dumps(shape_cfg))
        shape = model_shape(str(cfg_dir))
        logits = 2 * 2 * shape.vocab
        rule = activation_bytes_per_token(shape, "bfloat16", checkpointing=False) - logits  # one layer
        assert measured <= rule <= 1.1 * measured, (hidden, inter, measured, rule)
        kept = (saved_per_token(3, hidden, inter, True) - saved_per_token(1, hidden, inter, True)) / 2
        # checkpointed: each layer keeps its input; one layer's full set lives while it is recomputed
        with_one_layer = activation_bytes_per_token(shape, "bfloat16", checkpointing=True) - logits
        assert kept == with_one_layer - rule == 2 * hidden


def test_four_80gb_gpus_fit_the_shipped_config(capsys, tmp_path, hub_cache):
    """The shipped layout (a GPU per candidate, the switcher with the first) passes simulate, eval and GRPO;
    PPO (no gradient checkpointing) must train on fewer episodes per gradient step."""
    rc, out, err = plan(capsys, SHIPPED, hub_cache, FOUR_80)
    assert rc == 0, err
    assert "simulate: fits" in out and "eval: fits" in out and "rl: fits" in out
    assert re.search(r"cuda:1 +80\.0 GiB +15\.0 GiB +128 KiB", out)  # one candidate's weights and KV/token
    rc, out, err = plan(capsys, SHIPPED, hub_cache, FOUR_80, "--only", "rl", "--algo", "ppo")
    size = re.search(r"lower rl\.ppo\.minibatch_size to (\d+)\b", err)
    assert rc == 2 and size, err
    for value, rc_expected in ((int(size.group(1)), 0), (int(size.group(1)) + 1, 2)):
        config = shipped(tmp_path, rl={"ppo": {"minibatch_size": value}})
        assert plan(capsys, config, hub_cache, FOUR_80, "--algo", "ppo")[0] == rc_expected


def _fix_values(err: str) -> dict[str, int]:
    return {key: int(v) for key, v in re.findall(r"(\w+\.\w+) to (\d+)", err)}


@pytest.mark.parametrize(
    ("size", "states_per_batch", "overflowing"),
    [("80GB", 2, {"simulate", "eval", "rl"}), ("141GB", 8, {"simulate"})],
)
def test_one_gpu_says_what_fits_and_what_to_lower(
    capsys, tmp_path, hub_cache, size, states_per_batch, overflowing
):
    """All three candidates and the switcher on one GPU: each command that overflows names the values to
    lower to; the config with exactly those values fits and with one more does not. On 141 GB the shipped
    states_per_batch (2) fits and the default 8 does not (its KV is ~5x what is left after the weights)."""
    data = yaml.safe_load(SHIPPED.read_text())
    candidates = [{**c, "device": "cuda:0"} for c in data["candidates"]]
    config = shipped(tmp_path, candidates=candidates, simulate={"states_per_batch": states_per_batch})
    rc, out, err = plan(capsys, config, hub_cache, f"cuda:0={size}")
    assert rc == 2
    assert re.search(r"cuda:0 +\S+ GiB +59\.8 GiB +512 KiB", out)  # 4 x 16.06 GB of weights, 4 x 128 KiB
    assert set(re.findall(r"(?:error: |; )(\w+): cuda:0 needs", err)) == overflowing
    assert "or give each model its own device" in err  # four models share the one GPU
    assert {f"{c}: fits" for c in {"simulate", "eval", "rl"} - overflowing} == set(
        re.findall(r"^\w+: fits", out, re.M)
    )
    fixes = {key: int(v) for key, v in re.findall(r"(\w+\.\w+) to (\d+)", err)}
    assert {k.split(".")[0] for k in fixes} == overflowing
    sections: dict[str, dict] = {"simulate": {"states_per_batch": states_per_batch}}
    for key, value in fixes.items():
        section, field = key.split(".")
        sections.setdefault(section, {})[field] = value
    for command in overflowing:
        assert (
            plan(
                capsys,
                shipped(tmp_path, candidates=candidates, **sections),
                hub_cache,
                f"cuda:0={size}",
                "--only",
                command,
            )[0]
            == 0
        )
        key = next(k for k in fixes if k.startswith(command))  # the first knob named for this command
        section, field = key.split(".")
        over = {**sections, section: {**sections[section], field: fixes[key] + 1}}
        assert (
            plan(
                capsys,
                shipped(tmp_path, candidates=candidates, **over),
                hub_cache,
                f"cuda:0={size}",
                "--only",
                command,
            )[0]
            == 2
        )


def test_json_output(capsys, hub_cache):
    rc, out, _ = plan(capsys, SHIPPED, hub_cache, FOUR_80, "--json", "--only", "simulate")
    data = json.loads(out)
    assert rc == 0 and data["fits"] is True
    assert [m["weight_bytes"] for m in data["models"][:1]] == [16_060_522_496]
    assert data["devices"]["cuda:2"]["kv_bytes_per_token"] == 131072
    # 2 states x 3 candidates x 32 finishes of 768 positions, plus one call's copy of a third of them
    kv = 192 * 768 * 131072 + 64 * 768 * 131072
    assert data["devices"]["cuda:2"]["peak"]["simulate"] == 16_060_653_568 + kv + 64 * 128264 * 16


def test_commands_check_before_loading_a_weight(capsys, tmp_path, trio_dirs, monkeypatch):
    """simulate / eval / rl on one 80 GiB GPU stop with the plan's fix before any checkpoint loads."""
    import switchrl.plan as plan_module

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the memory check")

    monkeypatch.setattr("switchrl.backends.pool.build_backend", no_loading)
    monkeypatch.setattr("switchrl.backends.transformers_backend.load_causal_lm", no_loading)
    monkeypatch.setattr(plan_module, "detect_capacity", lambda device: 80 * GIB)
    data = yaml.safe_load(SHIPPED.read_text())
    candidates = [{**c, "path": trio_dirs[c["path"]], "device": "cuda:0"} for c in data["candidates"]]
    aligned = trio_dirs["allenai/Llama-3.1-Tulu-3-8B"]
    tasks = tmp_path / "tasks.jsonl"  # the config checks (task files, switchers) pass; only memory fails
    tasks.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "query": "2 + 2?", "reference": "4", "split": split}) + "\n"
            for i, split in enumerate(["train", "test"])
        )
    )
    config = shipped(
        tmp_path,
        candidates=candidates,
        tasks=[{"source": "jsonl", "path": str(tasks)}],
        sft={"base": aligned},
        eval={"systems": ["singles", "random", "untuned"]},
        rl={"init": None, "base": aligned},
    )
    for command in (["simulate"], ["eval"], ["rl", "--algo", "grpo"]):
        assert cli.main([command[0], "--config", str(config), *command[1:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"switchrl {command[0]}: error: {command[0]}: cuda:0 needs"), err
        assert err.count("\n") == 1


def test_unreadable_config_json_skips_with_one_warning(caplog):
    config = RunConfig.model_validate(
        {"candidates": [{"name": "a", "path": "nobody/not-in-the-cache", "device": "cuda:0"}]}
    )
    with caplog.at_level(logging.WARNING, logger="switchrl.plan"):
        check_fits(config, "simulate")
    assert [r.getMessage().count("\n") for r in caplog.records] == [0]
    assert "memory plan skipped" in caplog.text and "nobody/not-in-the-cache" in caplog.text


def test_devices_parse_and_must_cover_the_run(hub_cache):
    assert parse_devices("cuda:0=80GiB, cuda:1=141GB,cpu=512MiB") == {
        "cuda:0": 80 * GIB,
        "cuda:1": 141 * 10**9,
        "cpu": 512 * 2**20,
    }
    assert parse_devices("cuda=80") == {"cuda:0": 80 * GIB}
    for bad in ("cuda:0", "cuda:0=80 parsecs", ""):
        with pytest.raises(ConfigError, match="--devices"):
            parse_devices(bad)
    workload = build_workload(load_config(SHIPPED), hub_cache=hub_cache)
    with pytest.raises(ConfigError, match="cuda:1, cuda:2"):
        make_report(workload, {"cuda:0": 80 * GIB})


def test_two_vllm_engines_on_one_device_do_not_fit(capsys, tmp_path, hub_cache):
    data = yaml.safe_load(SHIPPED.read_text())
    candidates = [{**c, "backend": "vllm", "device": "cuda:0"} for c in data["candidates"][:2]]
    rc, _, err = plan(
        capsys, shipped(tmp_path, candidates=candidates), hub_cache, "cuda:0=141GB", "--only", "simulate"
    )
    assert rc == 2 and "weights alone" in err


def test_simulate_rule_bounds_the_caches_of_a_real_rollout(tiny_family):
    """Simulated rollouts (every candidate's next patch, k random finishes each) on three tiny checkpoints:
    the KV the candidates hold at any moment stays under the rule's `candidates x finishes x positions`."""
    from switchrl.backends import CandidatePool, CandidateSampling
    from switchrl.backends.base import Trace
    from switchrl.backends.transformers_backend import TransformersBackend
    from switchrl.policies.baselines import RandomSwitcher
    from switchrl.rewards import exact_match
    from switchrl.rollout import estimate_utilities

    backends = [
        TransformersBackend.from_pretrained(f"c{i}", str(p), sampling=CandidateSampling(temperature=1.0))
        for i, p in enumerate(tiny_family)
    ]
    pool = CandidatePool(backends, patch_tokens=3, seed=0, fuse=False)
    queries, new_tokens, k = ["the red town is", "a river and a bridge of the park"], 12, 4
    peak = 0

    def held() -> int:
        return sum(b.lm.stored_bytes() for b in backends)

    step = pool.step

    def measured_step(traces, actions):
        nonlocal peak
        out = step(traces, actions)
        peak = max(peak, held())
        return out

    pool.step = measured_step
    states = [Trace(key=f"s{i}", query=q, max_new_tokens=new_tokens) for i, q in enumerate(queries)]
    estimate_utilities(
        pool, states, ["x", "y"], exact_match, k=k, finisher=RandomSwitcher(3, seed=0), share_identical=False
    )
    positions = max(len(b.prompt_ids(q)) for b in backends for q in queries) + new_tokens
    finishes = len(states) * len(backends) * k
    bound = sum(finishes * positions * model_shape(str(p)).kv_bytes_per_token("float32") for p in tiny_family)
    assert 0 < peak <= bound, (peak, bound)


def test_prompt_length_comes_from_the_task_file(tmp_path, hub_cache):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "1", "query": "x" * 300, "reference": "1"}) + "\n")
    config = load_config(shipped(tmp_path, tasks=[{"source": "jsonl", "path": str(tasks)}]))
    assert build_workload(config, hub_cache=hub_cache).positions == 300 // 3 + 64 + 512


def test_a_testbed_run_is_planned_on_its_family_and_passes_quietly(caplog):
    """The shipped testbed family: its own generation budget and queries, float32 on the CPU."""
    config = RunConfig.model_validate({"testbed": {"seed": 0}})
    workload = build_workload(config)
    assert workload.positions < 200 and {m.device for m in workload.candidates} == {"cpu"}
    with caplog.at_level(logging.WARNING, logger="switchrl.plan"):
        check_fits(config, "simulate")
    assert not caplog.records


def test_simulate_plans_without_the_switcher(trio_dirs, monkeypatch):
    """simulate has no switcher: a switcher base that cannot be read does not switch its check off."""
    import switchrl.plan as plan_module

    monkeypatch.setattr(plan_module, "detect_capacity", lambda device: 80 * GIB)
    data = yaml.safe_load(SHIPPED.read_text())
    candidates = [{**c, "path": trio_dirs[c["path"]], "device": "cuda:0"} for c in data["candidates"]]
    config = RunConfig.model_validate({"candidates": candidates, "sft": {"base": "nobody/not-in-the-cache"}})
    with pytest.raises(PlanError, match="simulate: cuda:0 needs"):
        check_fits(config, "simulate")
