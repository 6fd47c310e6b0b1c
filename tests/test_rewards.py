"""Built-in scorers, the scorer registry, weighted rewards and failure-safe scoring."""

from __future__ import annotations

import math
import string
from importlib import metadata
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from switchrl.config import parse
from switchrl.errors import ConfigError
from switchrl.rewards import (
    ENTRY_POINT_GROUP,
    RewardConfig,
    WeightedScorer,
    exact_match,
    extract_choice,
    extract_number,
    list_scorers,
    multiple_choice,
    normalize_answer,
    numeric,
    register_scorer,
    resolve_reward,
    resolve_scorer,
    rouge_l,
    safe_score,
    safe_score_batch,
    token_f1,
)
from switchrl.rewards import registry as registry_module

REPO = Path(__file__).resolve().parents[1]
CUSTOM = "examples.custom_reward:length_penalised_f1"
texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
words = st.lists(st.sampled_from("cat dog the a sat mat on red 1 2".split()), max_size=12).map(" ".join)


@pytest.fixture
def repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


# ----------------------------------------------------------------------------- built-in scorers


@pytest.mark.parametrize(
    "response, reference, expected",
    [
        ("The Eiffel Tower!", "eiffel tower", 1.0),
        ("  an   Apple. ", "apple", 1.0),
        ("Paris, France", "Paris", 0.0),
        ("", "", 1.0),
        ("theatre", "atre", 0.0),  # articles are removed as words only
    ],
)
def test_exact_match(response, reference, expected):
    assert exact_match("q", response, reference) == expected


@given(texts, texts)
def test_exact_match_is_symmetric_and_normalisation_idempotent(a, b):
    assert exact_match("q", a, b) == exact_match("q", b, a)
    assert normalize_answer(normalize_answer(a)) == normalize_answer(a)


@given(st.text(alphabet=string.ascii_letters + string.digits + " \t.,!?", max_size=40))
def test_exact_match_ignores_case_whitespace_punctuation_and_articles(a):
    variant = "The  " + a.swapcase().replace(" ", " \t ") + " !"
    assert exact_match("q", variant, a) == 1.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", 72.0),
        ("#### 1,234", 1234.0),
        ("The answer is $1,234.50.", 1234.5),
        ("So she has 5 apples and 3 pears. The answer is 8. Check: 8 = 5 + 3", 8.0),
        ("Answer: -3", -3.0),
        ("It costs -$7.", -7.0),
        ("pages 3-4", 4.0),
        ("x=2, y=.5", 0.5),
        ("first \\boxed{42} then 7", 42.0),
        ("we get 10 then 12.", 12.0),
        ("There are 1,000,000 stars", 1_000_000.0),
        ("no number here", None),
        ("Answer: unknown\nwe counted 7 and 9", 9.0),  # a marker without a number: the last number
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_numeric_scorer():
    gsm8k_ref = "She sold 48/2 = 24 clips in May.\n#### 72"
    assert numeric("q", "In total 72 clips.", gsm8k_ref) == 1.0
    assert numeric("q", "The answer is 72.0", "72") == 1.0
    assert numeric("q", "The answer is 71", "72") == 0.0
    assert numeric("q", "I don't know", "72") == 0.0
    assert numeric("q", "0.3333", "1/3 = 0.333333", abs_tol=1e-3) == 1.0
    assert numeric("q", "0.3333", "0.333333") == 0.0
    with pytest.raises(ValueError, match="reference 'seventy' contains no number"):
        numeric("q", "72", "seventy")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is (B).", "B"),
        ("answer: (c) because", "C"),
        ("Answer: D", "D"),
        ("The correct answer is option E, not F", "E"),
        ("I think... The answer is **G**", "G"),
        ("The answer is A. Wait, no: the answer is (C)", "C"),  # the last statement wins
        ("B) because cats", "B"),
        ("(d) since", "D"),
        ("J", "J"),
        ("A cat sat on the mat", None),  # a leading article is not a choice
        ("The answer is Bob", None),
        ("Answer: c", None),  # a bare lower-case letter is too ambiguous
        ("K.", None),
    ],
)
def test_extract_choice(text, expected):
    assert extract_choice(text) == expected


def test_multiple_choice_scorer():
    assert multiple_choice("q", "The answer is (B).", "B") == 1.0
    assert multiple_choice("q", "B. Paris", "(b)") == 1.0
    assert multiple_choice("q", "The answer is (C).", "B") == 0.0
    assert multiple_choice("q", "no idea", "B") == 0.0
    assert multiple_choice("q", "b", "The answer is (B)") == 0.0  # bare lower-case response: no choice
    with pytest.raises(ValueError, match="not a choice letter"):
        multiple_choice("q", "B", "Paris")


def test_token_f1_known_values():
    assert token_f1("q", "the cat sat", "cat sat down") == pytest.approx(0.8)  # p=1, r=2/3
    assert token_f1("q", "The cat!", "a cat") == 1.0
    assert token_f1("q", "dog", "cat") == 0.0
    assert token_f1("q", "", "") == 1.0 and token_f1("q", "the", "cat") == 0.0
    assert token_f1("q", "cat cat cat", "cat") == pytest.approx(0.5)  # counts are clipped: p=1/3, r=1


def test_rouge_l_known_values():
    # LCS("police killed the gunman", "police kill the gunman") = 3 -> p = r = 3/4
    assert rouge_l("q", "police kill the gunman", "police killed the gunman") == pytest.approx(0.75)
    # LCS = "the cat on mat": p = 4/6, r = 4/4 -> f = 0.8
    assert rouge_l("q", "the cat sat on the mat", "the cat on mat") == pytest.approx(0.8)
    assert rouge_l("q", "b a", "a b") == pytest.approx(0.5)  # order matters, unlike token F1
    assert rouge_l("q", "", "x") == 0.0 and rouge_l("q", "...", "...") == 0.0


@given(words, words)
def test_overlap_scores_bounded_and_symmetric(a, b):
    for scorer in (token_f1, rouge_l):
        value = scorer("q", a, b)
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(scorer("q", b, a))
    if a.strip():
        assert rouge_l("q", a, a) == 1.0


@given(texts, texts)
def test_scorers_never_crash_on_arbitrary_text(a, b):
    for scorer in (exact_match, token_f1, rouge_l):
        assert 0.0 <= scorer("q", a, b) <= 1.0
    extract_number(a)
    extract_choice(a)


def test_builtins_ignore_meta():
    assert numeric("q", "#### 5", "5", task_difficulty="hard", choices=["x"]) == 1.0
    assert token_f1("q", "x", "x", anything=1) == 1.0


# ----------------------------------------------------------------------------- registry


def test_resolve_builtin_names_and_callables():
    for name in ("exact_match", "numeric", "multiple_choice", "token_f1", "rouge_l"):
        assert name in list_scorers()
        assert resolve_scorer(name).__name__ == name
    assert resolve_scorer(" numeric ") is numeric

    def mine(query, response, reference, **meta):
        return 0.5

    assert resolve_scorer(mine) is mine


def test_resolve_module_function(repo_on_path):
    scorer = resolve_scorer(CUSTOM)
    assert scorer.__name__ == "length_penalised_f1"
    long_response = " ".join(["cat"] * 10)
    assert scorer("q", "cat", "cat") == 1.0
    base = token_f1("q", long_response, "cat")
    assert scorer("q", long_response, "cat", max_words=4, penalty=0.01) == pytest.approx(base - 0.06)
    assert scorer("q", long_response, "cat", max_words=4, penalty=1.0) == 0.0  # floored at 0
    assert resolve_scorer("switchrl.rewards.builtin:token_f1") is token_f1


def test_resolve_class_is_instantiated(tmp_path, monkeypatch):
    (tmp_path / "cls_reward.py").write_text(
        "class Half:\n    def __call__(self, query, response, reference, **meta):\n        return 0.5\n"
        "NOT_CALLABLE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve_scorer("cls_reward:Half")("q", "r", "ref") == 0.5
    assert resolve_scorer(__import__("cls_reward").Half)("q", "r", "ref") == 0.5
    with pytest.raises(ConfigError, match=r"'cls_reward:NOT_CALLABLE': 3 is not callable \(got int\)"):
        resolve_scorer("cls_reward:NOT_CALLABLE")


def test_resolve_local_module_from_working_directory(tmp_path, monkeypatch):
    """Console scripts lack the working directory on sys.path; a local reward module is still found."""
    (tmp_path / "my_local_reward.py").write_text(
        "def r(query, response, reference, **meta):\n    return 0.25\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert resolve_scorer("my_local_reward:r")("q", "r", "ref") == 0.25


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_scorer", r"unknown scorer; known names: .*exact_match.*'package.module:function'"),
        ("no_such_pkg_xyz.mod:fn", r"cannot import module 'no_such_pkg_xyz.mod'"),
        ("switchrl.rewards.builtin:nope", r"module 'switchrl.rewards.builtin' has no attribute 'nope'"),
        ("switchrl.rewards.builtin:_ARTICLES", r"is not callable \(got Pattern\)"),
        (":fn", r"expected 'package.module:function'"),
        ("switchrl.rewards.builtin:", r"expected 'package.module:function'"),
        ("", r"expected a scorer name"),
        (42, r"expected a scorer name"),
    ],
)
def test_bad_specs_give_clear_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_scorer(spec)


def test_module_failing_on_import_is_reported(tmp_path, monkeypatch):
    (tmp_path / "broken_reward.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        ConfigError, match="importing module 'broken_reward' failed: RuntimeError: boom at import"
    ):
        resolve_scorer("broken_reward:f")


def _fake_entry_points(monkeypatch, *eps: metadata.EntryPoint):
    real = metadata.entry_points

    def entry_points(**kwargs):
        if kwargs.get("group") == ENTRY_POINT_GROUP:
            return metadata.EntryPoints(eps)
        return real(**kwargs)

    monkeypatch.setattr(registry_module.metadata, "entry_points", entry_points)


def test_entry_point(monkeypatch, repo_on_path):
    _fake_entry_points(
        monkeypatch,
        metadata.EntryPoint("lp_f1", CUSTOM, ENTRY_POINT_GROUP),
        metadata.EntryPoint("broken", "no_such_pkg_xyz:f", ENTRY_POINT_GROUP),
    )
    assert {"lp_f1", "broken"} <= set(list_scorers())
    assert resolve_scorer("lp_f1").__name__ == "length_penalised_f1"
    with pytest.raises(
        ConfigError, match=r"entry point 'no_such_pkg_xyz:f' in group 'switchrl.rewards' failed"
    ):
        resolve_scorer("broken")


def test_register_scorer(clean_registry):
    @register_scorer("always_one")
    def always_one(query, response, reference, **meta):
        return 1.0

    assert resolve_scorer("always_one") is always_one
    assert "always_one" in list_scorers()
    with pytest.raises(ValueError, match="'always_one' is already registered"):
        register_scorer("always_one")(always_one)
    with pytest.raises(ValueError, match="'numeric' is already registered"):
        register_scorer("numeric")(always_one)
    register_scorer("numeric", overwrite=True)(always_one)
    assert resolve_scorer("numeric") is always_one
    with pytest.raises(ValueError, match="without ':'"):
        register_scorer("a:b")
    with pytest.raises(TypeError, match="expected a callable"):
        register_scorer("x")(3)


# ----------------------------------------------------------------------------- weighted rewards


def test_weighted_combination_math(repo_on_path):
    reward = resolve_reward(
        [
            ("exact_match", 0.5),
            {"scorer": "token_f1", "weight": 2.0},
            {"scorer": CUSTOM, "weight": -1.0, "kwargs": {"max_words": 1, "penalty": 0.1}},
        ]
    )
    assert isinstance(reward, WeightedScorer)
    response, reference = "the cat sat", "cat sat down"
    f1 = token_f1("q", response, reference)
    penalised = max(0.0, f1 - 0.1 * 2)
    assert reward("q", response, reference) == pytest.approx(0.5 * 0.0 + 2.0 * f1 - penalised)
    assert reward.components("q", response, reference) == pytest.approx(
        {"exact_match": 0.0, "token_f1": f1, CUSTOM: penalised}
    )
    # task meta reaches every term and overrides config kwargs
    assert reward("q", response, reference, max_words=10) == pytest.approx(2.0 * f1 - f1)


def test_resolve_reward_single_specs_return_the_scorer():
    assert resolve_reward("numeric") is numeric
    assert resolve_reward(["numeric"]) is numeric
    assert resolve_reward([{"scorer": "numeric"}]) is numeric
    scaled = resolve_reward(("numeric", 3.0))
    assert isinstance(scaled, WeightedScorer) and scaled("q", "#### 4", "4") == 3.0


def test_duplicate_terms_get_unique_names():
    reward = resolve_reward(["token_f1", ("token_f1", 2.0)])
    assert [t.name for t in reward.terms] == ["token_f1", "token_f1#1"]
    assert reward("q", "a b", "a b") == pytest.approx(3.0)


@pytest.mark.parametrize(
    "spec, message",
    [
        ([], "the list of scorers is empty"),
        ([{"scorer": "numeric", "wieght": 2}], r"reward\[0\]: unknown key\(s\) \['wieght'\]"),
        ([{"weight": 2}], r"reward\[0\]: missing key 'scorer'"),
        ([("numeric", "heavy")], r"reward\[0\].weight: expected a finite number"),
        ([("numeric", math.inf)], r"reward\[0\].weight: expected a finite number"),
        ([{"scorer": "numeric", "kwargs": [1]}], r"reward\[0\].kwargs: expected a mapping"),
        ([3], r"reward\[0\]: expected a spec"),
        (3.5, "expected a scorer spec or a list"),
        (["numeric", "nope_scorer"], "'nope_scorer': unknown scorer"),
    ],
)
def test_bad_reward_specs(spec, message):
    with pytest.raises(ConfigError, match=message):
        resolve_reward(spec)


def test_reward_config_forms(repo_on_path):
    assert parse(RewardConfig, "numeric").build() is numeric
    assert parse(RewardConfig, ["numeric", "token_f1"]).build()("q", "#### 2", "2") == pytest.approx(2.0)
    one = parse(RewardConfig, {"scorer": CUSTOM, "weight": 2.0, "kwargs": {"max_words": 1}})
    assert one.build()("q", "cat cat", "cat") == pytest.approx(2 * (token_f1("q", "cat cat", "cat") - 0.01))
    full = parse(RewardConfig, {"scorers": [{"scorer": "exact_match", "weight": 0.3}, "rouge_l"]})
    assert [t.scorer for t in full.scorers] == ["exact_match", "rouge_l"]
    assert full.build()("q", "a cat", "cat") == pytest.approx(0.3 + rouge_l("q", "a cat", "cat"))


@pytest.mark.parametrize(
    "data, message",
    [
        ({"scorers": [{"scorer": "numeric", "wieght": 1}]}, r"reward: scorers.0.wieght: unknown key"),
        (
            {"scorers": ["nope_scorer"]},
            r"reward: scorers.0.scorer: reward 'nope_scorer': unknown scorer",
        ),
        ({"scorers": []}, r"reward: scorers: List should have at least 1 item"),
        ({"scorers": [{"scorer": "numeric", "weight": "nan"}]}, r"scorers.0.weight"),
    ],
)
def test_reward_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse(RewardConfig, data, source="reward")


# ----------------------------------------------------------------------------- failures are recorded


def _fails_on_bad(query, response, reference, **meta):
    if response == "bad":
        raise RuntimeError("cannot score this one")
    return 1.0


def test_safe_score_records_failures():
    assert safe_score(_fails_on_bad, "q", "ok", "r").value == 1.0
    result = safe_score(_fails_on_bad, "q", "bad", "r")
    assert result.failed and result.value == 0.0 and result.error == "RuntimeError: cannot score this one"
    nan = safe_score(lambda q, r, ref, **m: math.nan, "q", "r", "ref")
    assert nan.failed and "non-finite" in nan.error
    ref_error = safe_score(numeric, "q", "5", "no number")
    assert ref_error.failed and "contains no number" in ref_error.error


def test_safe_score_batch_isolates_the_failing_sample():
    results = safe_score_batch(_fails_on_bad, ["q"] * 3, ["ok", "bad", "ok"], ["r"] * 3)
    assert [r.value for r in results] == [1.0, 0.0, 1.0]
    assert [r.failed for r in results] == [False, True, False]


def test_safe_score_batch_falls_back_when_batch_raises():
    class Batched:
        def __call__(self, query, response, reference, **meta):
            return _fails_on_bad(query, response, reference, **meta)

        def batch(self, queries, responses, references, metas):
            return [self(q, r, ref, **m) for q, r, ref, m in zip(queries, responses, references, metas)]

    results = safe_score_batch(Batched(), ["q"] * 3, ["bad", "ok", "ok"], ["r"] * 3, [{}, {}, {}])
    assert [(r.value, r.failed) for r in results] == [(0.0, True), (1.0, False), (1.0, False)]


def test_weighted_reward_with_failing_term_is_one_recorded_failure():
    reward = resolve_reward([(_fails_on_bad, 1.0), ("exact_match", 1.0)])
    results = safe_score_batch(reward, ["q", "q"], ["bad", "r"], ["r", "r"])
    assert results[0].failed and "cannot score this one" in results[0].error
    assert results[1].value == 2.0 and not results[1].failed
