"""The look-alike trio (``switchrl testbed lookalike``): the Llama-3.1 -> Tulu-3 interfaces on tiny
checkpoints, and the real trio's chain ``simulate -> sft -> eval -> rl --algo grpo`` run on them through
the CLI with ``configs/lookalike.yaml``."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from switchrl.backends import CandidatePool
from switchrl.cli import main
from switchrl.config import SwitcherConfig
from switchrl.generate import build_policy
from switchrl.policies.lm_switcher import LMSwitcher
from switchrl.policies.sequence import SwitchSequence
from switchrl.rewards.builtin import numeric
from switchrl.rollout import run_switch_generation
from switchrl.run_config import ResolvedRun, load_config
from switchrl.testbed.lookalike import (
    EXTRA_ROWS,
    GENERATION_EOS,
    LLAMA3_SPECIALS,
    MARKER,
    LookalikeSettings,
    build_lookalike,
)
from switchrl.testbed.lookalike_text import BASE_PROMPT, DONE

REPO = Path(__file__).resolve().parents[1]
CHAT = ("finetuned", "aligned")
SYSTEMS = ("pretrained", "finetuned", "aligned", "random", "untuned", "sft")
TASKS = ("recall", "arithmetic", "compositional")
STOP = "\nQuestion:"


def _tokenizers(paths):
    return {name: AutoTokenizer.from_pretrained(paths[name]) for name in ("pretrained", *CHAT)}


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_vocabularies_pad_and_special_tokens(lookalike):
    tok = _tokenizers(lookalike)
    n = len(tok["pretrained"])
    assert _config(lookalike["pretrained"])["vocab_size"] == n
    assert tok["pretrained"].pad_token is None and tok["pretrained"].chat_template is None
    for name in CHAT:
        assert len(tok[name]) == n + 1 and _config(lookalike[name])["vocab_size"] == n + EXTRA_ROWS
        assert tok[name].pad_token == "<pad>" and tok[name].pad_token_id == n
        assert _config(lookalike[name])["pad_token_id"] == n
    # Llama-3's specials, in its order, end the shared vocabulary; every tokenizer agrees on ids < N
    assert tok["pretrained"].convert_tokens_to_ids(list(LLAMA3_SPECIALS)) == list(
        range(n - len(LLAMA3_SPECIALS), n)
    )
    assert tok["finetuned"].get_vocab() == {**tok["pretrained"].get_vocab(), "<pad>": n}
    for name in ("pretrained", *CHAT):
        eos = json.loads((lookalike[name] / "generation_config.json").read_text())["eos_token_id"]
        assert eos == tok[name].convert_tokens_to_ids(list(GENERATION_EOS)) and len(set(eos)) == 3


def test_byte_level_bpe_with_a_bos_post_processor(lookalike):
    tok = AutoTokenizer.from_pretrained(lookalike["pretrained"])
    state = json.loads(tok.backend_tokenizer.to_str())
    assert state["model"]["type"] == "BPE" and state["pre_tokenizer"]["type"] == "ByteLevel"
    assert state["decoder"]["type"] == "ByteLevel"
    assert [p["type"] for p in state["post_processor"]["processors"]] == ["ByteLevel", "TemplateProcessing"]
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    with_bos = tok("Question: 2 €")["input_ids"]
    assert with_bos[0] == bos and with_bos.count(bos) == 1
    assert with_bos[1:] == tok("Question: 2 €", add_special_tokens=False)["input_ids"]
    # a rare multi-byte character is several byte tokens: a patch boundary can fall inside it
    for text in ("€", "日本語", DONE.strip()):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > len(text) and tok.decode(ids) == text
        assert "\ufffd" in tok.decode(ids[:1])


def test_tulu_chat_template_renders_exactly_bos_and_eos(lookalike):
    for tok in _tokenizers(lookalike).values():
        if tok.chat_template is None:
            continue
        specials = set(tok.all_special_ids)
        turn = [{"role": "user", "content": "How many is 2 plus 3 ?"}]
        prompt = tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        assert prompt == "<|begin_of_text|><|user|>\nHow many is 2 plus 3 ?\n<|assistant|>\n"
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        assert [i for i in ids if i in specials] == [tok.bos_token_id]
        # the post-processor adds its own BOS: encoding the rendered prompt by default gives two (fix 4)
        assert tok(prompt)["input_ids"][:2] == [tok.bos_token_id, tok.bos_token_id]
        full = tok.apply_chat_template(
            [*turn, {"role": "assistant", "content": "The answer is 5 ."}], tokenize=False
        )
        ids = tok(full, add_special_tokens=False)["input_ids"]
        assert [i for i in ids if i in specials] == [tok.bos_token_id, tok.eos_token_id]


def test_weights_are_bfloat16_on_disk(lookalike):
    for name in ("pretrained", *CHAT):
        assert _config(lookalike[name])["dtype"] == "bfloat16"
        with safe_open(lookalike[name] / "model.safetensors", framework="pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_generations_are_text_like(lookalike):
    """The base answers, then writes the next ``Question:`` (what stop strings are for); the chat models
    answer ``... The answer is N . ✅`` (multi-byte), which the numeric scorer scores."""
    rows = [json.loads(line) for line in lookalike["tasks"].read_text().splitlines()]
    assert {r["split"] for r in rows} == {"train", "test"} and {r["task"] for r in rows} == set(TASKS)
    assert [r["task"] for r in rows[:3]] == list(TASKS)  # interleaved: a limit of 3 takes every task
    train = [r for r in rows if r["split"] == "train"][:12]  # ~40% right here: >= 1 fails at ~0.6^12
    for name in ("pretrained", *CHAT):
        tok = AutoTokenizer.from_pretrained(lookalike[name])
        model = AutoModelForCausalLM.from_pretrained(lookalike[name], dtype=torch.float32)
        texts = []
        for row in train:
            if name == "pretrained":
                ids = tok(BASE_PROMPT.format(query=row["query"]), return_tensors="pt")["input_ids"]
            else:
                turn = [{"role": "user", "content": row["query"]}]
                prompt = tok.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
                ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out = model.generate(ids, max_new_tokens=48, do_sample=False)
            texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        if name == "pretrained":  # weak at the facts, but in the format
            assert sum("\nQuestion:" in t for t in texts) >= len(texts) // 2, texts
            texts = [t.split("\nQuestion:")[0] for t in texts]
        else:
            assert sum(t.endswith(DONE) for t in texts) >= len(texts) // 2, texts
            assert sum(numeric(r["query"], t, r["reference"]) for r, t in zip(train, texts)) >= 1, texts
        assert all(re.search(r"answer is \d+", t) for t in texts), texts


TINY = LookalikeSettings(tokenizer_documents=100, bpe_vocab=400, base_steps=2, sft_steps=1, aligned_steps=2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_deterministic_and_cached(tmp_path):
    a, b = build_lookalike(tmp_path / "a", settings=TINY), build_lookalike(tmp_path / "b", settings=TINY)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    marker_a, marker_b = (json.loads(f.pop(MARKER)) for f in (files_a, files_b))
    assert files_a == files_b and {"config.json", "model.safetensors"} <= {Path(k).name for k in files_a}
    assert {**marker_a, "build_seconds": None} == {**marker_b, "build_seconds": None}
    assert a["tasks"].parent == tmp_path / "a" and b["finetuned"] == tmp_path / "b" / "finetuned"
    stamp = (tmp_path / "a" / MARKER).stat().st_mtime_ns
    build_lookalike(tmp_path / "a", settings=TINY)  # complete: reused
    assert (tmp_path / "a" / MARKER).stat().st_mtime_ns == stamp
    build_lookalike(tmp_path / "a", settings=LookalikeSettings(**{**TINY.__dict__, "sft_steps": 3}))
    assert json.loads((tmp_path / "a" / MARKER).read_text())["settings"]["sft_steps"] == 3


def test_a_build_never_replaces_a_directory_it_did_not_make(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["testbed", "lookalike", "--out", str(tmp_path)]) == 2
    assert "holds no look-alike build" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert main(["testbed", "lookalike", "--out", str(tmp_path / "notes.txt")]) == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_reuses_a_build(lookalike, capsys):
    root = lookalike["tasks"].parent
    assert main(["testbed", "lookalike", "--out", str(root)]) == 0
    printed = capsys.readouterr().out
    assert all(str(lookalike[name]) in printed for name in ("pretrained", *CHAT, "tasks"))


def _run(*argv: str) -> None:
    """Run ``switchrl *argv`` in this process; a non-zero exit fails with what it printed to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(list(argv))
    assert code == 0, f"switchrl {argv[0]} exited {code}: {err.getvalue()[-2000:]}"


def _config_file(lookalike, tmp_path: Path) -> Path:
    """``configs/lookalike.yaml`` with its checkpoints and tasks at the build, its runs in ``tmp_path``."""
    text = (REPO / "configs" / "lookalike.yaml").read_text()
    text = text.replace("runs/lookalike/checkpoints", str(lookalike["tasks"].parent))
    config = tmp_path / "lookalike.yaml"
    config.write_text(text.replace("runs/lookalike/", f"{tmp_path}/"))
    return config


def _is_ids_text(text: str, decoded: str) -> bool:
    """``text`` is the decoded ids' text, up to the bytes of a character still incomplete at the end
    (they decode to U+FFFD and belong to the next patch's text)."""
    return decoded.startswith(text) and set(decoded[len(text) :]) <= {"\ufffd"}


def _pool(lookalike, tmp_path: Path) -> CandidatePool:
    resolved = ResolvedRun(load_config(_config_file(lookalike, tmp_path)))
    gen = resolved.generation
    return CandidatePool.from_configs(resolved.candidates, patch_tokens=gen.patch_tokens, seed=gen.seed)


def test_the_base_fuses_with_the_tulu_checkpoints(lookalike, tmp_path):
    """Their tokenizers agree on every id below N, so the N-row base shares one engine with the two
    N + 8-row checkpoints instead of re-tokenising text at every hand-off (fix 2)."""
    pool = _pool(lookalike, tmp_path)
    assert len(pool.engines) == 1, [[m.name for m in e.members] for e in pool.engines]


def test_switched_responses_lose_no_character_at_a_patch_boundary(lookalike, tmp_path):
    """Round-robin switching over train questions: every answer ends in a 3-token ``✅`` that a patch
    boundary often splits; the response's text must be its ids' text (fix 3)."""
    pool = _pool(lookalike, tmp_path)
    rows = [json.loads(line) for line in lookalike["tasks"].read_text().splitlines()][:12]
    policy = build_policy(SwitcherConfig(type="round_robin"), pool.names)
    traces = run_switch_generation(pool, policy, [r["query"] for r in rows], max_new_tokens=48)
    tok = AutoTokenizer.from_pretrained(lookalike["finetuned"])  # decodes every candidate's ids < N alike
    for t in traces:
        ids = [i for p in t.patches for i in p.token_ids]
        assert _is_ids_text(t.text, tok.decode(ids, skip_special_tokens=True)), [p.text for p in t.patches]


def _stops_at_the_next_question(text: str, stop_reason: str | None) -> bool:
    """``\nQuestion:`` appears at most once, at the very end, and then the response stopped on it."""
    at = text.find(STOP)
    return at == -1 or (at == len(text) - len(STOP) and stop_reason == "stop")


def test_the_base_stops_at_the_next_question(lookalike, tmp_path):
    """The base alone on train questions (it goes on to write ``\nQuestion: ...``, often across a patch
    boundary): its stop string ends every response where the next question starts (fix 5)."""
    pool = _pool(lookalike, tmp_path)
    rows = [json.loads(line) for line in lookalike["tasks"].read_text().splitlines()][:12]
    policy = build_policy(SwitcherConfig(type="fixed", candidate="pretrained"), pool.names)
    traces = run_switch_generation(pool, policy, [r["query"] for r in rows], max_new_tokens=48)
    for t in traces:
        assert _stops_at_the_next_question(t.text, t.stop_reason), (
            t.stop_reason,
            [p.text for p in t.patches],
        )


def test_switcher_prompts_have_one_bos(lookalike):
    """The Tulu template writes ``{{ bos_token }}`` and the tokenizer's post-processor adds one too: every
    switcher prompt format must start with exactly one ``<|begin_of_text|>`` (fix 4)."""
    tok = AutoTokenizer.from_pretrained(lookalike["aligned"])
    names = ["pretrained", "finetuned", "aligned"]
    labels = [f"<|reserved_special_token_{i}|>" for i in (3, 4, 5)]
    for kwargs in (
        {"label_tokens": labels},
        {"label_tokens": labels, "chat_template": True},
        {"prompt_format": "reference"},  # its digits are the labels
    ):
        sequence = SwitchSequence(tok, names, **kwargs)
        ids = sequence.prompt_ids("How many is 2 plus 3 ?")
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, (kwargs, ids[:4])


def test_the_trio_chain_through_the_cli(lookalike, tmp_path):
    """``configs/lookalike.yaml`` with its paths moved to the build and ``tmp_path``:
    simulate -> sft -> eval -> rl --algo grpo (2 steps), each step's outputs checked."""
    config = _config_file(lookalike, tmp_path)

    _run("simulate", "--config", str(config))
    records = [json.loads(line) for p in (tmp_path / "simulate").rglob("shard-*.jsonl") for line in p.open()]
    assert len(records) == 3 * 2  # limit 3 queries (one per task) x states_per_query 2
    assert {r["task"] for r in records} == set(TASKS)
    tok = AutoTokenizer.from_pretrained(lookalike["finetuned"])  # decodes every candidate's ids < N alike
    for r in records:
        assert len(r["utilities"]) == 3 and all(0 <= u <= 1 for u in r["utilities"])
        # the prefix's text is its ids' text: no character lost at a patch boundary (fix 3)
        assert _is_ids_text(r["prefix_text"], tok.decode([i for p in r["prefix"] for i in p["token_ids"]]))

    _run("sft", "--config", str(config))
    switcher = LMSwitcher.from_pretrained(tmp_path / "sft")
    assert switcher.candidate_names == ["pretrained", "finetuned", "aligned"]
    prompt = switcher.sequence.prompt_ids("How many is 2 plus 3 ?")
    assert prompt.count(switcher.sequence.tokenizer.bos_token_id) == 1  # one BOS (fix 4)

    _run("eval", "--config", str(config))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["systems"]) == set(SYSTEMS) and set(results["tasks"]) == set(TASKS)
    for task in TASKS:
        for system in SYSTEMS:
            cell = results["metrics"][task][system]
            assert 0 <= cell["accuracy"] <= 1 and cell["n"] == 1 and cell["failures"] == 0
    responses = [json.loads(line) for line in (tmp_path / "eval" / "responses.jsonl").open()]
    assert len(responses) == len(TASKS) * len(SYSTEMS)
    # the base stops where it would start the next question (its stop string, fix 5)
    assert all(
        _stops_at_the_next_question(r["text"], r["stop_reason"])
        for r in responses
        if r["system"] == "pretrained"
    )
    assert (tmp_path / "eval" / "table.md").is_file()

    _run("rl", "--algo", "grpo", "--config", str(config))
    log = json.loads((tmp_path / "rl" / "rl_log.json").read_text())
    assert len([h for h in log["history"] if "reward" in h]) == 2
    assert {p.name for p in (tmp_path / "rl" / "trainer").glob("checkpoint-*")} == {
        "checkpoint-1",
        "checkpoint-2",
    }
    rl_switcher = LMSwitcher.from_pretrained(tmp_path / "rl" / "switcher")
    assert rl_switcher.candidate_names == switcher.candidate_names
