"""Stop strings (issue 17, fix 5): checked on the whole batch, at the positions a check after every
token finds, across patch boundaries, the same for the transformers and vLLM candidates; the base
candidate's prompt stops at the next "Question:" and the scorer never reads the invented question."""

from __future__ import annotations

import pytest
import yaml
from llama3_like import llama3_tokenizer, scripted_llama, tiny_llama
from test_vllm_backend import FakeLLM

from switchrl.backends import CandidatePool, CandidateSampling, Trace
from switchrl.backends.openai_backend import OpenAIBackend
from switchrl.backends.stopping import complete
from switchrl.backends.transformers_backend import TransformersBackend
from switchrl.backends.vllm_backend import VLLMBackend
from switchrl.rewards.builtin import numeric

BASE_PROMPT = "Question: {query}\nAnswer:"
QUERY = "what is two plus two?"


@pytest.fixture(scope="module")
def tokenizer():
    return llama3_tokenizer()


def _first_stop(tokenizer, before: list[int], new: list[int], stops) -> int | None:
    """The per-token reference: how many of ``new`` a check after every token keeps (None: no stop)."""
    start = len(complete(tokenizer.decode(before, skip_special_tokens=True)))
    for n in range(1, len(new) + 1):
        text = tokenizer.decode([*before, *new[:n]], skip_special_tokens=True)
        if any(s in text[max(0, start - len(s) + 1) :] for s in stops):
            return n
    return None


def _plain(text: str) -> bool:
    return text.isprintable() and "\ufffd" not in text


def _plain_substring(text: str, start: int, n: int = 3) -> str:
    return next(text[at : at + n] for at in range(start, len(text)) if _plain(text[at : at + n]))


def test_stop_positions_equal_a_check_after_every_token(tokenizer):
    model = tiny_llama(tokenizer, seed=3)
    sampling = CandidateSampling(temperature=1.0)
    queries = [f"query {i} costs 12 €" for i in range(7)]

    def traces():
        return [Trace(f"q{i}", q, max_new_tokens=60) for i, q in enumerate(queries)]

    free = TransformersBackend("c0", model, tokenizer, sampling=sampling)
    first = traces()
    for t, p in zip(first, free.write_patches(first, 0, 6, seed=1)):
        t.patches.append(p)
    new = free.write_patches(first, 0, 25, seed=1)
    # stop strings that some rows write (one begins in the first patch) and some do not
    texts = [t.text + p.text for t, p in zip(first, new)]
    spanning = [
        text[at : at + 3]
        for t, text in zip(first, texts)
        for at in range(len(t.text) - 2, len(t.text))
        if at >= 0 and _plain(text[at : at + 3])
    ]
    stops = (_plain_substring(texts[0], 9), _plain_substring(texts[1], 12), spanning[0])
    stopping = TransformersBackend("c0", model, tokenizer, sampling=sampling, stop_strings=stops)
    second = traces()
    for t, p in zip(second, stopping.write_patches(second, 0, 6, seed=1)):
        t.patches.append(p)
    got = stopping.write_patches(second, 0, 25, seed=1)
    outcomes = []
    for t, free_patch, patch in zip(second, new, got):
        before = [i for p in t.patches for i in p.token_ids]
        n = _first_stop(tokenizer, before, free_patch.token_ids, stops)
        if t.patches[0].stop_reason == "stop":
            continue
        want = free_patch.token_ids if n is None else free_patch.token_ids[:n]
        assert patch.token_ids == want
        assert patch.stop_reason == ("stop" if n is not None else free_patch.stop_reason)
        outcomes.append(n is not None and n < len(free_patch.token_ids))
        t.patches.append(patch)
        # the cache holds what the trace read and wrote, all but its last token unless that was EOS
        assert stopping.lm.cached_length(t.key) == len(stopping.view(t)) - (patch.stop_reason != "eos")
    assert any(outcomes) and not all(outcomes)


SCRIPT = " 4\nQuestion: 4\nQuestion: 4\nQuestion:"


def _base(model, tokenizer, name="pretrained", **kwargs):
    return TransformersBackend(
        name,
        model,
        tokenizer,
        sampling=CandidateSampling(temperature=0),
        prompt_template=BASE_PROMPT,
        stop_strings=("\nQuestion:",),
        **kwargs,
    )


@pytest.fixture(scope="module")
def scripted(tokenizer):
    prompt = tokenizer(BASE_PROMPT.format(query=QUERY))["input_ids"]
    return scripted_llama(tokenizer, [prompt[-1], *tokenizer(SCRIPT, add_special_tokens=False)["input_ids"]])


@pytest.mark.parametrize("patch_tokens", [50, 8, 3], ids=["in-patch", "at-boundary", "spanning"])
def test_the_base_candidate_stops_before_the_next_question(tokenizer, scripted, patch_tokens):
    pool = CandidatePool([_base(scripted, tokenizer)], patch_tokens=patch_tokens, seed=0)
    trace = Trace("q", QUERY, max_new_tokens=64)
    while not trace.done:
        pool.step([trace], [0])
    ids = [i for p in trace.patches for i in p.token_ids]
    assert tokenizer.decode(ids) == " 4\nQuestion:"  # stopped at the token completing the first stop string
    assert trace.stop_reason == "stop"
    # the scorer reads the answer, never the invented question: the start of a stop string at the end
    # of a patch waits for the next patch's text, which ends before the stop string
    assert trace.text == " 4"
    assert numeric(QUERY, trace.text, "4") == 1.0


def test_a_stop_string_start_that_does_not_stop_comes_back_in_the_next_patch(tokenizer):
    """ "\nQ" at a patch's end waits; when the next patch does not complete "\nQuestion:" the text
    comes back there, so the response's text is the decode of all its ids."""
    text = " 4\nQuick"
    prompt = tokenizer(BASE_PROMPT.format(query=QUERY))["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    model = scripted_llama(tokenizer, [prompt[-1], *ids])
    pool = CandidatePool([_base(model, tokenizer)], patch_tokens=1, seed=0)
    trace = Trace("q", QUERY, max_new_tokens=len(ids))
    while not trace.done:
        pool.step([trace], [0])
    assert [i for p in trace.patches for i in p.token_ids] == ids
    assert trace.text == text
    assert all(not p.text.endswith("\n") for p in trace.patches)  # "\n" always waited for the next patch


@pytest.mark.parametrize("engine", ["vllm", "openai"])
@pytest.mark.parametrize("patch_tokens", [50, 3])
def test_engines_stop_where_the_transformers_candidate_stops(
    tokenizer, scripted, tmp_path, serve, engine, patch_tokens
):
    """The fake vLLM engine checks stop strings in each patch's own text (as vLLM does), the fake
    completions server not at all: both candidates still stop where the in-process one does."""
    scripted.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    options = dict(
        sampling=CandidateSampling(temperature=0), prompt_template=BASE_PROMPT, stop_strings=("\nQuestion:",)
    )
    if engine == "vllm":
        served = VLLMBackend("pretrained", FakeLLM(tmp_path), tokenizer, params_factory=dict, **options)
    else:
        url, _ = serve(tmp_path)
        served = OpenAIBackend.from_pretrained("pretrained", str(tmp_path), url, "tiny", **options)
    written = []
    for backend in (_base(scripted, tokenizer), served):
        pool = CandidatePool([backend], patch_tokens=patch_tokens, seed=0)
        trace = Trace("q", QUERY, max_new_tokens=64)
        while not trace.done:
            pool.step([trace], [0])
        written.append([(p.token_ids, p.text, p.stop_reason) for p in trace.patches])
    assert written[0] == written[1]
    assert written[0][-1][2] == "stop"


def test_the_shipped_base_candidate_has_the_stop_string():
    with open("configs/tulu3_llama31_8b.yaml") as f:
        config = yaml.safe_load(f)
    base = next(c for c in config["candidates"] if c.get("prompt_template", "").startswith("Question:"))
    assert "\nQuestion:" in base["stop_strings"]
