"""The testbed: world, tokenizer, tasks, scorers, the build pipeline and (marked ``testbed``) the phenomenon."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from switchrl.backends.base import Trace
from switchrl.errors import CheckpointError
from switchrl.testbed import LABEL_TOKENS, StageConfig, TestbedFamily, World, build_family
from switchrl.testbed.check import ScheduleSwitcher, check_family, format_check
from switchrl.testbed.corpus import PROMPT_TEMPLATE, dpo_pairs, pretraining_documents, sft_examples
from switchrl.testbed.provenance import _cpuinfo, format_provenance, provenance
from switchrl.testbed.recall import fact_patch_positions
from switchrl.testbed.stages import _batches
from switchrl.testbed.tasks import SPLITS, TASKS, ExactAnswerScorer, StepScorer, make_scorer, make_tasks
from switchrl.testbed.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def world() -> World:
    return World(0)


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer(world)


# ------------------------------------------------------------------------------------------- world
def test_world_is_a_function_of_its_seed(world):
    again = World(0)
    assert again.towns == world.towns and again.facts == world.facts
    assert again.finetune_towns == world.finetune_towns and again.seen_pairs == world.seen_pairs
    other = World(1)
    assert other.facts != world.facts and other.towns != world.towns


def test_world_partitions_towns(world):
    assert len(set(world.towns)) == len(world.towns)
    assert set(world.finetune_towns).isdisjoint(world.outside_towns)
    assert set(world.finetune_towns) | set(world.outside_towns) == set(world.towns)
    assert all(1 <= v <= 10 for v in world.facts.values())
    assert 0 < len(world.seen_pairs) < 100


# --------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_every_text_without_unknown_words(world, tokenizer):
    texts = list(itertools.islice(pretraining_documents(world), 50))
    texts += [e["prompt"] + e["completion"] for e in sft_examples(world, 50)]
    texts += [e["prompt"] + e["rejected"] for e in dpo_pairs(world, 50)]
    texts += [i.query + " " + i.meta["solution"] for t in TASKS for i in make_tasks(world, t, "test")[:20]]
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert len(ids) == len(text.split())  # one token per word, numbers included
        assert tokenizer.decode(ids) == text


def test_tokenizer_saves_specials_and_label_tokens(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("Q:")["input_ids"][0] == loaded.bos_token_id
    assert loaded.eos_token == "<eos>" and loaded.pad_token == "<pad>"
    for label in LABEL_TOKENS:
        assert len(loaded(label, add_special_tokens=False)["input_ids"]) == 1
    assert loaded("7 .<eos>", add_special_tokens=False)["input_ids"][-1] == loaded.eos_token_id


# ------------------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("task", TASKS)
def test_splits_share_no_question(world, task):
    splits = {s: make_tasks(world, task, s) for s in SPLITS}
    ids = {s: {i.id for i in insts} for s, insts in splits.items()}
    for a, b in itertools.combinations(SPLITS, 2):
        assert ids[a].isdisjoint(ids[b]), (task, a, b)
    for insts in splits.values():
        assert len({i.id for i in insts}) == len(insts) > 0
    if task != "arithmetic":  # knowledge questions ask about towns outside the finetuning subset
        inside = set(world.finetune_towns)
        assert all(not inside & set(i.query.split()) for insts in splits.values() for i in insts)
    assert make_tasks(world, task, "test") == splits["test"]  # deterministic


def test_compositional_and_recall_references_are_true_facts(world):
    inst = make_tasks(world, "compositional", "test")[0]
    _, x, y, attribute = inst.id.split("/")
    assert int(inst.reference) == world.value(x, attribute) + world.value(y, attribute)
    rec = make_tasks(world, "recall", "test")[0]
    _, town, attribute = rec.id.split("/")
    assert rec.reference == str(world.value(town, attribute))


def test_sft_data_never_contains_held_out_arithmetic(world):
    held_out = {i.query for s in ("validation", "test") for i in make_tasks(world, "arithmetic", s)}
    prompts = {e["prompt"] for e in sft_examples(world, 2000)} | {e["prompt"] for e in dpo_pairs(world, 1000)}
    assert not any(q in p for p in prompts for q in held_out)
    outside = set(world.outside_towns)
    true_fact_prompts = [p for p in prompts if "Suppose" not in p]
    assert true_fact_prompts and all(not outside & set(p.split()) for p in true_fact_prompts)


def test_bad_task_or_split_is_named(world):
    with pytest.raises(ValueError, match="task"):
        make_tasks(world, "poetry", "test")
    with pytest.raises(ValueError, match="split"):
        make_tasks(world, "recall", "dev")
    with pytest.raises(ValueError, match="task"):
        make_scorer("poetry")


# ----------------------------------------------------------------------------------------- scorers
def test_exact_scorer_reads_the_first_final_answer(world):
    inst = make_tasks(world, "compositional", "test")[0]
    score = ExactAnswerScorer()
    assert score(inst.query, inst.meta["solution"], inst.reference) == 1.0
    wrong = str(int(inst.reference) + 1)
    assert (
        score(inst.query, f"The answer is {wrong} . The answer is {inst.reference} .", inst.reference) == 0.0
    )
    assert score(inst.query, "no answer here", inst.reference) == 0.0


def test_partial_scorer_counts_correct_steps(world):
    inst = make_tasks(world, "compositional", "test")[0]
    score = make_scorer("compositional", partial=True)
    assert isinstance(score, StepScorer)
    fact_a, fact_b, total, final = inst.meta["steps"]
    assert score(inst.query, inst.meta["solution"], inst.reference, **inst.meta) == 1.0
    assert score(inst.query, f"{fact_a} {fact_b}", inst.reference, **inst.meta) == 0.5
    assert score(inst.query, f"{fact_a}  7 + 1 = 8 . {final}", inst.reference, **inst.meta) == 0.5
    assert score(inst.query, f"{fact_b} {total} {final}", inst.reference, **inst.meta) == 0.75
    assert score(inst.query, "", inst.reference, **inst.meta) == 0.0
    with pytest.raises(ValueError, match="steps"):
        score(inst.query, "x", inst.reference)


# ------------------------------------------------------------------------------------------ family
def test_build_family_validates_and_load_names_missing_family(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        build_family(-1, out=tmp_path)
    with pytest.raises(CheckpointError, match="testbed"):
        TestbedFamily.load(tmp_path)


TINY = StageConfig(
    hidden_size=16,
    layers=1,
    heads=2,
    intermediate_size=32,
    pretrain_steps=2,
    pretrain_batch=2,
    pretrain_chunk=1,
    pretrain_max_extra_steps=2,
    sft_steps=1,
    sft_batch=4,
    dpo_steps=1,
    dpo_batch=4,
)


@pytest.fixture(scope="module")
def tiny_testbed(tmp_path_factory) -> TestbedFamily:
    """The whole pipeline with a handful of steps: the mechanics, not the phenomenon."""
    return build_family(
        3, out=tmp_path_factory.mktemp("tiny") / "fam", progress=False, settings=TINY, workers=1
    )


def test_tiny_build_writes_loadable_checkpoints_and_is_reused(tiny_testbed):
    family = tiny_testbed
    for path in (family.pretrained, family.finetuned, family.aligned):
        assert isinstance(AutoModelForCausalLM.from_pretrained(path), object)
        assert AutoTokenizer.from_pretrained(path).get_vocab() == build_tokenizer(World(3)).get_vocab()
    marker = json.loads((family.root / "testbed.json").read_text())
    assert marker["seed"] == 3 and set(marker["build_seconds"]) == {"pretrained", "finetuned", "aligned"}
    stamp = (family.aligned / "model.safetensors").stat().st_mtime_ns
    again = build_family(3, out=family.root, progress=False, settings=TINY)
    assert (again.aligned / "model.safetensors").stat().st_mtime_ns == stamp
    assert [c.name for c in again.candidate_configs()] == ["pretrained", "finetuned", "aligned"]
    assert len({c.prompt_template for c in again.candidate_configs()}) == 1
    assert again.generation_config().patch_tokens == 3
    assert again.label_tokens == list(LABEL_TOKENS)
    with pytest.raises(CheckpointError, match="seed"):
        build_family(4, out=family.root, progress=False)
    with pytest.warns(UserWarning, match="other settings"):  # a family of another recipe is named
        assert build_family(3, out=family.root, progress=False).seed == 3


def test_build_records_provenance_and_the_pretraining_stopping_rule(tiny_testbed):
    marker = json.loads((tiny_testbed.root / "testbed.json").read_text())
    prov = marker["provenance"]
    assert {"torch", "transformers", "trl", "peft", "python"} <= set(prov["versions"])
    assert all(prov["versions"][k] for k in ("torch", "transformers", "trl", "peft"))
    assert {"model", "isa_flags", "torch_cpu_capability", "logical_cpus"} <= set(prov["cpu"])
    assert prov["torch_threads"] == 1  # the build's own setting, not the process default
    assert {"date", "load_average_1min", "load_average_1min_end", "platform"} <= set(prov)
    assert marker["settings"]["pretrain_recall_target"] == TINY.pretrain_recall_target
    pre = marker["stages"]["pretrained"]  # the tiny model never reaches the target: the cap stops it
    assert pre["steps"] == TINY.pretrain_steps + TINY.pretrain_max_extra_steps == 4
    assert len(pre["fact_patch_recall"]) == 1 + TINY.pretrain_max_extra_steps // TINY.pretrain_chunk
    assert set(marker["stages"]) == {"pretrained", "finetuned", "aligned"}
    sft = marker["stages"]["finetuned"]  # below the recall ceiling at once: the first, gentlest rate
    assert sft["lr"] == TINY.sft_lrs[0] and [t["lr"] for t in sft["tried"]] == [TINY.sft_lrs[0]]
    loaded = TestbedFamily.load(tiny_testbed.root)
    assert loaded.provenance == prov and loaded.stage_info == marker["stages"]


@pytest.mark.parametrize("stage", ["finetuned", "aligned"])
def test_tuned_stages_skip_gradient_checkpointing_with_the_same_weights(
    tiny_testbed, tmp_path, monkeypatch, stage
):
    """TRL checkpoints activations by default, recomputing the forward in the backward (~18% of a stage's
    CPU); the stages turn it off, and the weights are the same bytes as with it on."""
    import hashlib

    from transformers import PreTrainedModel

    from switchrl.testbed import finetune, stages

    enabled: list[bool] = []
    name = next(
        n
        for n in ("activation_checkpointing_enable", "gradient_checkpointing_enable")
        if hasattr(PreTrainedModel, n)
    )
    enable = getattr(PreTrainedModel, name)
    monkeypatch.setattr(
        PreTrainedModel, name, lambda self, *a, **kw: (enabled.append(True), enable(self, *a, **kw))[1]
    )
    world, tok = tiny_testbed.world, build_tokenizer(tiny_testbed.world)
    run = {"finetuned": finetune.finetune, "aligned": stages.align}[stage]
    base = tiny_testbed.pretrained if stage == "finetuned" else tiny_testbed.finetuned
    settings = dataclasses.replace(TINY, sft_steps=3, dpo_steps=3)  # the first step's warm-up rate is 0

    def weights(out):
        run(world, tok, base, out, settings, progress=False)
        return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    plain = weights(tmp_path / "plain")
    assert enabled == []
    kwargs = stages._trainer_kwargs
    monkeypatch.setattr(stages, "_trainer_kwargs", lambda *a: kwargs(*a) | {"gradient_checkpointing": True})
    assert weights(tmp_path / "checkpointed") == plain and enabled == [True]


def test_families_without_provenance_still_load(tiny_testbed, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_testbed.root, old)
    marker = json.loads((old / "testbed.json").read_text())
    for key in ("provenance", "stages"):
        del marker[key]
    (old / "testbed.json").write_text(json.dumps(marker))
    family = TestbedFamily.load(old)
    assert family.provenance == {} and family.stage_info == {}
    assert "no provenance recorded" in format_provenance({})[0]


def test_cpuinfo_reads_model_and_isa_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse4_2 avx2 avx512f amx_tile\n")
    assert _cpuinfo(str(info)) == ("Some CPU", ["sse4_2", "avx2", "avx512f", "amx_tile"])
    lines = format_provenance(provenance())
    assert lines[0].startswith("built: ") and "torch" in lines[2]


def test_fact_patch_positions_are_the_two_fact_patches(world, tokenizer):
    inst = make_tasks(world, "compositional", "test")[0]
    prompt = PROMPT_TEMPLATE.format(query=inst.query)
    ids = tokenizer(prompt + " " + inst.meta["solution"])["input_ids"]
    pos = fact_patch_positions(len(tokenizer(prompt)["input_ids"]))
    _, x, y, attribute = inst.id.split("/")
    a, b = world.value(x, attribute), world.value(y, attribute)
    assert tokenizer.decode([ids[p] for p in pos]) == f"is {a} . is {b} ."
    assert pos[0] % 3 == len(tokenizer(prompt)["input_ids"]) % 3  # patches start at the answer


def test_pretraining_blocks_are_the_packed_stream_in_order(world, tokenizer):
    settings = StageConfig(pretrain_batch=2, pretrain_seq_len=8)
    blocks = _batches(world, tokenizer, settings)
    first = [next(blocks) for _ in range(3)]
    stream: list[int] = []
    for ids in tokenizer(list(itertools.islice(pretraining_documents(world), 512)))["input_ids"]:
        stream += [*ids, tokenizer.eos_token_id]
    assert torch.equal(torch.stack(first).flatten(), torch.tensor(stream[: 3 * 2 * 8]))


def test_schedule_switcher_follows_its_table():
    switcher = ScheduleSwitcher(3, [0, 2, 1], default=2)
    traces = [Trace(key=f"t{i}", query="q", max_new_tokens=32, patches=[None] * i) for i in range(5)]
    assert [d.action for d in switcher.decide(traces)] == [0, 2, 1, 2, 2]


def test_check_wires_the_label_schedule_and_provenance(tiny_testbed):
    metrics = check_family(tiny_testbed, n=3, n_label=1, k=2, k_label=2, n_schedule=2, progress=False)
    ls = metrics["label_schedule"]
    assert ls["k"] == 2 and ls["queries"] == 2 and ls["states"] >= 2
    names = {"pretrained", "finetuned", "aligned"}
    assert set(ls["schedule"]) <= names and ls["default"] in names
    assert "label schedule >= best single + 15" in metrics["targets"]
    assert set(metrics["margins"]) == set(metrics["targets"])
    assert all((metrics["margins"][t] >= 0) == ok for t, ok in metrics["targets"].items())
    assert not any("decisive" in name for name in metrics["targets"])
    assert metrics["built"] == tiny_testbed.provenance and metrics["checked"]["torch_threads"] == 1
    text = format_check(metrics)
    assert text.startswith("built: ") and "label schedule" in text and "pretraining: 4 steps" in text
    with pytest.raises(ValueError, match="n_schedule"):
        check_family(tiny_testbed, n_schedule=0, progress=False)


# ------------------------------------------------------------------------- the phenomenon (slow)
@pytest.fixture(scope="session", params=[0, 1], ids=lambda s: f"seed{s}")
def testbed_family(request) -> TestbedFamily:
    """The real family for world seeds 0 and 1, built once (or reused from the cache)."""
    return build_family(request.param, progress=False)


@pytest.mark.testbed
def test_the_phenomenon_holds(testbed_family):
    metrics = check_family(testbed_family, n=200, n_label=60, k=8, k_label=16, progress=False)
    print(format_check(metrics))
    failed = [name for name, ok in metrics["targets"].items() if not ok]
    assert not failed, f"targets missed: {failed}\n{format_check(metrics)}"


# ------------------------------------------------------------------------- the shipped families
def test_the_shipped_families_are_used_when_nothing_is_built(tmp_path, monkeypatch):
    """Issue 15: with an empty cache, seeds 0 and 1 are the canonical families that ship in the package."""
    from switchrl.testbed.shipped import shipped_check, shipped_root, shipped_seeds

    monkeypatch.setenv("SWITCHRL_CACHE", str(tmp_path / "empty-cache"))
    assert shipped_seeds() == [0, 1]
    for seed in (0, 1):
        family = build_family(seed, progress=False)
        assert family.root == shipped_root(seed) and family.seed == seed
        assert family.provenance["cpu"]["model"] and family.provenance["versions"]["torch"]
        check = shipped_check(seed)
        assert check["seed"] == seed and check["ok"] is True, check["targets"]
    assert shipped_root(7) is None
    with pytest.raises(CheckpointError, match="seed"):  # a local family of another seed is never taken
        build_family(1, out=shipped_root(0), progress=False)


def test_testbed_build_of_a_shipped_seed_reports_the_weight_difference(tmp_path, capsys):
    """``switchrl testbed build --seed 0`` on a family identical to the shipped one says so; another differs."""
    import shutil

    from switchrl.cli import main
    from switchrl.testbed.family import STAGES
    from switchrl.testbed.shipped import max_weight_difference, shipped_root

    copy = tmp_path / "fam0"
    shutil.copytree(shipped_root(0), copy)  # a complete family: the build reuses it
    assert main(["testbed", "build", "--seed", "0", "--out", str(copy)]) == 0
    printed = capsys.readouterr().out
    assert "against the shipped family" in printed and "bit-identical" in printed
    diff = max_weight_difference(shipped_root(0), shipped_root(1), STAGES)
    assert set(diff) == set(STAGES) and all(v > 0 for v in diff.values())


def test_sft_tries_keep_the_first_passing_rate_in_order():
    """A wave's tries are read in rate order: the first within the ceiling is kept and later ones are
    dropped as if never run; with none passing, the last is kept (what one loop over the rates does)."""
    from switchrl.testbed.finetune import keep

    wave = [{"lr": 1e-3, "fact_patch_recall": 52.2}, {"lr": 1.5e-3, "fact_patch_recall": 39.1}]
    tried: list[dict] = []
    assert keep(wave + [{"lr": 2e-3, "fact_patch_recall": 20.0}], 40.0, tried) == (wave[1], True)
    assert tried == wave
    tried = []
    assert keep(wave, 10.0, tried) == (wave[1], False) and tried == wave


def test_sft_tries_side_by_side_on_ray_give_the_same_bytes(tiny_testbed, tmp_path):
    """Two tries at once on Ray actors, in two waves (3 rates, none passing: the last is kept), write
    the same checkpoint files and the same record as the tries one after another in this process."""
    import hashlib

    from switchrl.testbed.finetune import finetune

    settings = dataclasses.replace(TINY, sft_steps=2, sft_lrs=(1e-3, 2e-3, 3e-3), sft_recall_ceiling=-1.0)
    world, tok = tiny_testbed.world, build_tokenizer(tiny_testbed.world)

    def files(workers):
        out = tmp_path / f"w{workers}" / "finetuned"
        info = finetune(world, tok, tiny_testbed.pretrained, out, settings, progress=False, workers=workers)
        assert [p.name for p in out.parent.iterdir()] == ["finetuned"]  # no scratch left behind
        return info, {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}

    one_by_one, side_by_side = files(1), files(2)
    assert side_by_side == one_by_one
    info, names = side_by_side
    assert [t["lr"] for t in info["tried"]] == [1e-3, 2e-3, 3e-3] and info["lr"] == 3e-3
    assert {"model.safetensors", "tokenizer.json", "switchrl_stage.json"} <= set(names)


def test_testbed_build_refuses_a_bad_workers_count_before_training(tmp_path, monkeypatch):
    import importlib.util

    from switchrl.errors import ConfigError

    with pytest.raises(ConfigError, match="workers must be an integer >= 1"):
        build_family(3, out=tmp_path / "fam", settings=TINY, workers=0)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r"Ray, which is not installed.*--workers 1"):
        build_family(3, out=tmp_path / "fam", settings=TINY, workers=2)
    assert not (tmp_path / "fam" / "pretrained").exists()


def test_sft_tries_at_once_default_to_the_usable_cores(monkeypatch):
    """One try per core this process may use (all cores where the OS has no affinity, e.g. macOS),
    at most one per rate."""
    import os

    from switchrl.testbed import finetune

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert finetune.default_workers(StageConfig()) == 2
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert finetune.default_workers(StageConfig()) == len(StageConfig().sft_lrs)
