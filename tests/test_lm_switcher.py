"""LMSwitcher and the single sequence format: incremental decisions, training log-probs, save/load, reference prompt."""

from __future__ import annotations

import json

import pytest
import torch

from switchrl.backends import CandidatePool, CandidateSampling, Patch, Trace
from switchrl.backends.transformers_backend import TransformersBackend
from switchrl.errors import CheckpointError, ConfigError
from switchrl.policies import LMSwitcher, SwitchSequence
from switchrl.policies.lm_switcher import METADATA_FILE
from switchrl.rollout import run_switch_generation
from tests.conftest import WORDS, make_word_tokenizer, save_tiny_model

NAMES = ["base", "sft", "aligned"]
REFERENCE_WORDS = tuple(
    w
    for w in (
        "<model begins> ends> Which model should generate next segment? Please respond with "
        "number 0 1 2 2. The <|user|> <|assistant|>"
    ).split()
    if w not in WORDS
)
CHAT = (
    "{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def switcher_path(tmp_path_factory):
    """A tiny Llama whose tokenizer lacks the label tokens (the switcher adds them)."""
    tok = make_word_tokenizer(extra=REFERENCE_WORDS)
    tok.chat_template = CHAT
    return save_tiny_model(tmp_path_factory.mktemp("switcher") / "lm", "llama", tok, seed=7)


@pytest.fixture(scope="module")
def pool(tiny_family):
    backends = [
        TransformersBackend.from_pretrained(n, str(p), sampling=CandidateSampling(temperature=1.0))
        for n, p in zip(NAMES, tiny_family)
    ]
    return CandidatePool(backends, patch_tokens=2, seed=1)


def full_forward_label_logits(switcher: LMSwitcher, trace: Trace) -> torch.Tensor:
    ids = torch.tensor([switcher.sequence.context_ids(trace.query, trace.patches)])
    with torch.no_grad():
        logits = switcher.model(input_ids=ids).logits[0, -1]
    return logits[switcher.sequence.label_ids]


def test_sequence_encodes_labels_and_patches(switcher_path):
    sw = LMSwitcher.from_base(str(switcher_path), NAMES)
    seq = sw.sequence
    assert sw.tokenizer.convert_ids_to_tokens(seq.label_ids) == ["<c0>", "<c1>", "<c2>"]
    mine = Patch(author=2, token_ids=sw.tokenizer("one two")["input_ids"], text=" one two", vocab=seq.vocab)
    other = Patch(author=0, token_ids=[999, 998], text=" red river", vocab="another-vocab")
    enc = seq.encode("the town", [mine, other], next_action=1)
    prompt = seq.prompt_ids("the town")
    assert enc.input_ids[: enc.prompt_length] == prompt
    assert enc.input_ids[enc.prompt_length :] == [
        seq.label_ids[2],
        *mine.token_ids,
        seq.label_ids[0],
        *sw.tokenizer(" red river", add_special_tokens=False)["input_ids"],
        seq.label_ids[1],
    ]
    assert enc.actions == [2, 0, 1]
    assert [enc.input_ids[p] for p in enc.label_positions] == [seq.label_ids[a] for a in enc.actions]
    assert [i for i, m in enumerate(enc.action_mask) if m] == enc.label_positions
    assert seq.context_ids("the town", [mine, other]) == enc.input_ids[:-1]


def test_added_label_rows_are_deterministic(switcher_path):
    a = LMSwitcher.from_base(str(switcher_path), NAMES)
    b = LMSwitcher.from_base(str(switcher_path), NAMES)
    emb_a, emb_b = a.model.get_input_embeddings().weight, b.model.get_input_embeddings().weight
    assert emb_a.shape[0] == len(a.tokenizer) > len(make_word_tokenizer(extra=REFERENCE_WORDS))
    assert torch.equal(emb_a, emb_b)
    rows = emb_a[a.sequence.label_ids]
    assert not torch.allclose(rows[0], rows[1])  # distinct labels, so a LoRA switcher can tell them apart


def test_cached_decisions_equal_full_forward_and_training_logprobs(switcher_path, pool):
    sw = LMSwitcher.from_base(str(switcher_path), NAMES, seed=3)
    traces = [
        Trace(key=f"k{i}", query=q, max_new_tokens=8)
        for i, q in enumerate(["the town", "one two three four"])
    ]
    pool.step(traces[:1], [1])  # traces of different lengths share one batched decision
    for _ in range(3):
        live = [t for t in traces if not t.done]
        if not live:
            break
        decisions = sw.decide(live)
        for t, d in zip(live, decisions):
            ref = torch.softmax(full_forward_label_logits(sw, t), -1)
            assert torch.allclose(torch.tensor(d.probs), ref, atol=1e-5)
        pool.step(live, [d.action for d in decisions])
    # training path: restricted log-probs at every label position equal the decisions' distributions
    t = traces[1]
    enc = sw.sequence.encode(t.query, t.patches)
    logp = sw.label_logprobs(
        torch.tensor([enc.input_ids]),
        torch.ones(1, len(enc.input_ids), dtype=torch.long),
        torch.tensor([enc.label_positions]),
    )
    assert logp.shape == (1, len(t.patches), 3) and logp.requires_grad
    for j in range(len(t.patches)):
        prefix = Trace(key="x", query=t.query, max_new_tokens=8, patches=t.patches[:j])
        expected = torch.log_softmax(full_forward_label_logits(sw, prefix), -1)
        assert torch.allclose(logp[0, j].detach(), expected, atol=1e-5)


def test_label_logprobs_with_left_padding_and_masked_positions(switcher_path):
    sw = LMSwitcher.from_base(str(switcher_path), NAMES)
    p = Patch(author=1, token_ids=sw.tokenizer("red")["input_ids"], text=" red", vocab=sw.sequence.vocab)
    long, short = sw.sequence.encode("the town is red", [p, p]), sw.sequence.encode("a", [p])
    pad = len(long.input_ids) - len(short.input_ids)
    ids = torch.tensor([long.input_ids, [0] * pad + short.input_ids])
    mask = torch.tensor([[1] * len(long.input_ids), [0] * pad + [1] * len(short.input_ids)])
    positions = torch.tensor([long.label_positions, [short.label_positions[0] + pad, -1]])
    logp = sw.label_logprobs(ids, mask, positions)
    alone = sw.label_logprobs(
        torch.tensor([short.input_ids]),
        torch.ones(1, len(short.input_ids), dtype=torch.long),
        torch.tensor([short.label_positions]),
    )
    assert torch.allclose(logp[1, 0], alone[0, 0], atol=1e-5)
    assert torch.equal(logp[1, 1], torch.zeros(3))
    with pytest.raises(ValueError, match="label_positions"):
        sw.label_logprobs(ids, mask, torch.tensor([[0], [1]]))


def test_decisions_are_seeded_greedy_and_top_p(switcher_path):
    sw = LMSwitcher.from_base(str(switcher_path), NAMES, seed=5)
    traces = [Trace(key=f"q{i}", query="the town", max_new_tokens=8) for i in range(12)]
    first = [d.action for d in sw.decide(traces)]
    sw.release([t.key for t in traces])
    assert [d.action for d in sw.decide(traces[::-1])] == first[::-1]  # independent of batch order
    probs = torch.tensor(sw.decide(traces[:1])[0].probs)
    assert len(set(first)) > 1  # sampling
    greedy = LMSwitcher.from_base(str(switcher_path), NAMES, greedy=True)
    narrow = LMSwitcher.from_base(str(switcher_path), NAMES, top_p=1e-6)
    assert {d.action for d in greedy.decide(traces)} == {int(probs.argmax())}
    assert {d.action for d in narrow.decide(traces)} == {int(probs.argmax())}


def test_switched_generation_with_lm_switcher(switcher_path, pool):
    sw = LMSwitcher.from_base(str(switcher_path), NAMES, aligned_first_last=True)
    out = run_switch_generation(pool, sw, ["the town", "a red river"], max_new_tokens=6)
    for t in out:
        assert t.done and t.authors[0] == 2
        assert all(p.probs is not None and abs(sum(p.probs) - 1) < 1e-5 for p in t.patches)
    assert len(sw.lm) == 0  # finished traces released their caches


def test_lora_round_trip(switcher_path, tmp_path):
    sw = LMSwitcher.from_base(
        str(switcher_path),
        NAMES,
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        top_p=0.9,
        seed=11,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in sw.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    trace = Trace(
        key="t",
        query="the town",
        max_new_tokens=8,
        patches=[
            Patch(
                author=2,
                token_ids=sw.tokenizer("one two")["input_ids"],
                text=" one two",
                vocab=sw.sequence.vocab,
            )
        ],
    )
    before = sw.label_logits([trace])
    base = LMSwitcher.from_base(str(switcher_path), NAMES).label_logits([trace])
    assert not torch.allclose(before, base)  # the adapter matters
    sw.save_pretrained(tmp_path / "sw")
    meta = json.loads((tmp_path / "sw" / METADATA_FILE).read_text())
    assert meta["candidate_names"] == NAMES and meta["label_tokens"] == ["<c0>", "<c1>", "<c2>"]
    assert (
        meta["adapter"] is True
        and meta["base_model_path"] == str(switcher_path)
        and meta["patch_tokens"] == 50
    )
    assert (tmp_path / "sw" / "adapter_config.json").is_file()
    back = LMSwitcher.from_pretrained(tmp_path / "sw")
    assert (back.top_p, back.seed, back.candidate_names) == (0.9, 11, NAMES)
    assert torch.allclose(back.label_logits([trace]), before, atol=1e-6)
    assert [d.action for d in back.decide([trace])] == [d.action for d in sw.decide([trace])]


def test_full_model_round_trip(switcher_path, tmp_path):
    sw = LMSwitcher.from_base(str(switcher_path), NAMES, greedy=True)
    trace = Trace(key="t", query="one two", max_new_tokens=8)
    sw.save_pretrained(tmp_path / "full")
    back = LMSwitcher.from_pretrained(tmp_path / "full")
    assert back.greedy and torch.allclose(back.label_logits([trace]), sw.label_logits([trace]), atol=1e-6)


def test_reference_prompt_token_for_token(switcher_path, pool):
    tok = make_word_tokenizer(extra=REFERENCE_WORDS)
    tok.chat_template = CHAT
    seq = SwitchSequence(tok, NAMES, prompt_format="reference")
    patches = [
        Patch(author=2, token_ids=[5], text="one two", vocab="x"),
        Patch(author=0, token_ids=[6], text="three", vocab="x"),
    ]
    text = (
        "the town <model 2 begins> one two <model 2 ends> <model 0 begins> three <model 0 ends> Which model should "
        "generate the next segment? Please respond with a number from 0 to 2. The answer is model "
    )
    assert seq.reference_prompt("the town", patches) == text
    expected = tok(f"<bos><|user|> {text} <|assistant|> ")["input_ids"]
    assert seq.context_ids("the town", patches) == expected
    assert tok.unk_token_id not in expected[1:]  # every word of the prompt is a real token here
    assert tok.convert_ids_to_tokens(seq.label_ids) == ["0", "1", "2"]
    # the decision reads the digit logits after exactly that prompt, and records no cache
    sw = LMSwitcher.from_base(str(switcher_path), NAMES, prompt_format="reference", greedy=True)
    trace = Trace(key="r", query="the town", max_new_tokens=8, patches=patches)
    with torch.no_grad():
        logits = sw.model(input_ids=torch.tensor([expected])).logits[0, -1, sw.sequence.label_ids]
    assert torch.allclose(sw.label_logits([trace])[0], logits, atol=1e-5)
    assert len(sw.lm) == 0
    out = run_switch_generation(pool, sw, ["the town"], max_new_tokens=4)
    assert out[0].done


def test_bad_switcher_input(switcher_path, tmp_path, word_tokenizer):
    with pytest.raises(ConfigError, match="top_p"):
        LMSwitcher.from_base(str(switcher_path), NAMES, top_p=0)
    with pytest.raises(ConfigError, match="label_tokens: expected 3 distinct"):
        LMSwitcher.from_base(str(switcher_path), NAMES, label_tokens=["<a>", "<a>", "<b>"])
    with pytest.raises(ConfigError, match="candidate_names"):
        SwitchSequence(word_tokenizer, ["a", "a"])
    with pytest.raises(ConfigError, match="chat template"):
        SwitchSequence(word_tokenizer, NAMES, prompt_format="reference")
    with pytest.raises(CheckpointError, match=METADATA_FILE):
        LMSwitcher.from_pretrained(tmp_path)
    sw = LMSwitcher.from_base(str(switcher_path), NAMES)
    with pytest.raises(ValueError, match="query must be a non-empty string"):
        sw.decide([Trace(key="e", query=" ", max_new_tokens=4)])
