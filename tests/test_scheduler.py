"""The per-candidate scheduler: same records as lock-step, one candidate per grouped pass, a cost
model that picks fused passes where they are cheaper, and engines in different places at once."""

from __future__ import annotations

import json
import time

import pytest
import torch

from switchrl.backends import CandidatePool, CandidateSampling, Patch, Trace
from switchrl.backends.fused import RowAssignment, fuse_models
from switchrl.backends.openai_backend import OpenAIBackend
from switchrl.backends.transformers_backend import TransformersBackend, load_causal_lm
from switchrl.policies import FixedSwitcher, LMSwitcher, RandomSwitcher
from switchrl.rollout import run_switch_generation
from switchrl.scheduler import PassCost, Scheduler, measure_pass_cost, pass_clock, plan_pass, spread
from switchrl.utils.threads import torch_threads
from tests.conftest import make_word_tokenizer, save_tiny_model

QUERIES = ["the town", "one two", "a red river", "the answer is", "two", "the red", "one", "a town"]


def _pool(paths, fuse: bool) -> CandidatePool:
    backends = [
        TransformersBackend.from_pretrained(f"c{i}", str(p), sampling=CandidateSampling(temperature=1.0))
        for i, p in enumerate(paths)
    ]
    return CandidatePool(backends, patch_tokens=3, seed=5, fuse=fuse)


def _records(traces: list[Trace]) -> list[list[tuple]]:
    return [[(p.author, p.token_ids, p.text, p.stop_reason) for p in t.patches] for t in traces]


def _probs(traces: list[Trace]) -> list[float]:
    return [x for t in traces for p in t.patches for x in p.probs or ()]


@pytest.fixture(scope="module")
def switcher_path(tmp_path_factory):
    tok = make_word_tokenizer()
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return save_tiny_model(tmp_path_factory.mktemp("switcher") / "lm", "llama", tok, seed=7)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("switcher", ["random", "lm"])
def test_grouped_passes_write_the_records_of_lockstep(tiny_family, switcher_path, fuse, switcher):
    """Every schedule gives the same decisions and tokens (float32), and a grouped pass of a fused
    engine serves one candidate only."""
    pool = _pool(tiny_family, fuse)

    def policy():
        if switcher == "random":
            return RandomSwitcher(3, seed=1)
        return LMSwitcher.from_base(str(switcher_path), pool.names)

    lockstep = run_switch_generation(
        pool, policy(), QUERIES, max_new_tokens=10, batch_size=len(QUERIES), schedule="lockstep"
    )
    traces = [Trace(f"q{i}", q, 10) for i, q in enumerate(QUERIES)]
    grouped = Scheduler(pool, policy(), max_batch=2, max_inflight=6, schedule="grouped")
    grouped.run(traces)
    auto = run_switch_generation(pool, policy(), QUERIES, max_new_tokens=10, batch_size=3)
    assert _records(traces) == _records(lockstep) == _records(auto)
    if switcher == "random":
        assert _probs(traces) == _probs(lockstep) == _probs(auto)
    else:  # an LM switcher's float32 probabilities move by an ulp with its batch (so they do on main)
        assert _probs(traces) == pytest.approx(_probs(lockstep), abs=1e-6)
        assert _probs(auto) == pytest.approx(_probs(lockstep), abs=1e-6)
    assert len({a for t in lockstep for a in t.authors}) == 3  # the switcher really switched
    engines = pool.engine_candidates
    assert engines == ([[0, 2], [1]] if fuse else [[0], [1], [2]])  # Llama, GPT-2, Llama
    for served in grouped.passes:  # per engine one candidate's rows, at most max_batch of them
        assert all(len(set(served) & set(members)) <= 1 for members in engines)
        assert all(served.count(c) <= 2 for c in range(3))
    assert max(len(set(p)) for p in grouped.passes) > 1  # engines are served in the same pass
    assert len(pool.backends[0].lm) == 0  # finished traces were released


def test_max_inflight_bounds_the_traces_in_flight(tiny_family):
    pool = _pool(tiny_family, fuse=True)
    seen: set[str] = set()

    class Watch(RandomSwitcher):
        def decide(self, traces):
            seen.update(t.key for t in traces)
            assert len(pool.backends[0].lm) <= 3 * 3  # at most 3 traces x 3 candidates hold caches
            return super().decide(traces)

    traces = [Trace(f"q{i}", q, 8) for i, q in enumerate(QUERIES)]
    Scheduler(pool, Watch(3, seed=2), max_batch=4, max_inflight=3).run(traces)
    assert all(t.done for t in traces) and seen == {t.key for t in traces}


class _CountingPool:
    """A pool of two candidates on one engine that writes each trace's next patch in full and
    records the keys of every step."""

    names, patch_tokens, seed, engine_candidates = ["a", "b"], 4, 0, [[0, 1]]

    def __init__(self):
        self.steps: list[list[str]] = []

    def __len__(self) -> int:
        return 2

    def step(self, traces, actions):
        self.steps.append([t.key for t in traces])
        for t, a in zip(traces, actions):
            t.patches.append(Patch(a, [1] * min(self.patch_tokens, t.remaining_tokens), "x"))

    def release(self, keys):
        pass


def test_a_pass_takes_the_rows_with_the_longest_next_patch_first():
    """Rows in their last, short patch wait and share a short pass instead of idling in a full one;
    among the others the least advanced go first."""
    pool = _CountingPool()
    traces = [
        Trace("short0", "q", 2),
        Trace("full0", "q", 4),
        Trace("short1", "q", 2),
        Trace("full1", "q", 4),
    ]
    Scheduler(pool, FixedSwitcher(2, 0), max_batch=2, schedule="grouped").run(traces)
    assert pool.steps == [["full0", "full1"], ["short0", "short1"]]
    # then the least advanced: the traces of a pass stay at like lengths (little cache padding)
    pool = _CountingPool()
    ahead = Trace("ahead", "q", 16, [Patch(0, [1] * 8, "x")])
    Scheduler(pool, FixedSwitcher(2, 0), max_batch=1).run([ahead, Trace("behind", "q", 16)])
    assert pool.steps[:2] == [["behind"], ["behind"]]


class _TimedPool(_CountingPool):
    """One engine whose pass takes 20 ms (a prefill) + per token 4 ms + 6 ms per model + 1 ms per row slot."""

    names, patch_tokens, engine_candidates = ["a", "b", "c"], 9, [[0, 1, 2]]

    def __len__(self) -> int:
        return 3

    def step(self, traces, actions):
        models, width = len(set(actions)), max(actions.count(a) for a in set(actions))
        tokens = max(min(self.patch_tokens, t.remaining_tokens) for t in traces)
        time.sleep(0.020 + tokens * (0.004 + 0.006 * models + 0.001 * models * width))
        super().step(traces, actions)


def test_the_pass_cost_is_fitted_from_timed_probe_passes():
    cost = measure_pass_cost(_TimedPool(), [0, 1, 2])
    assert cost.alpha == pytest.approx(0.004, abs=0.002)
    assert cost.beta == pytest.approx(0.006, abs=0.002)
    assert cost.gamma == pytest.approx(0.001, abs=0.0005)


@pytest.mark.parametrize("fuse", [True, False])
def test_probes_of_a_local_cpu_engine_on_one_thread_are_timed_in_cpu_seconds(tiny_family, fuse):
    """Other jobs on the machine stretch wall seconds, not this process's work: under load, wall-clock
    probes fitted costs that made ``auto`` pick the slower pass. A GPU's, a server's or another
    process's work is not this process's CPU time, so those keep the wall clock."""
    pool = _pool(tiny_family, fuse)
    assert all(pool.computes_here_on_cpu(members) for members in pool.engine_candidates)
    with torch_threads(1):
        assert pass_clock(pool, [0]) is time.process_time
    with torch_threads(2):
        assert pass_clock(pool, [0]) is time.perf_counter
    served = CandidatePool([_Sleepy("a", "fake:0"), _Sleepy("b", "fake:1")], patch_tokens=2, fuse=False)
    assert not served.computes_here_on_cpu([0])
    with torch_threads(1):
        assert pass_clock(served, [0]) is time.perf_counter
        assert pass_clock(_TimedPool(), [0, 1, 2]) is time.perf_counter  # a pool that does not say


def test_plan_pass_follows_the_cost_model():
    weights_bound = PassCost(alpha=0.1, beta=1.0, gamma=0.01)  # reading a model costs most
    overhead_bound = PassCost(alpha=5.0, beta=0.1, gamma=0.1)  # a pass's fixed cost dominates
    assert spread([5, 1, 3], 6) == [3, 1, 2] and spread([1, 0], 8) == [1, 0]
    # 8 rows per pass, plenty queued: one candidate's 8 rows read one model, a fused 8 read three
    assert plan_pass([9, 8, 7], 8, "auto", weights_bound) == [8, 0, 0]
    assert plan_pass([9, 8, 7], 8, "auto", overhead_bound) == [8, 0, 0]
    # few rows per candidate: a grouped pass would serve 3 rows, a fused one 8 for one fixed cost
    assert plan_pass([3, 3, 2], 8, "auto", weights_bound) == [3, 0, 0]
    assert plan_pass([3, 3, 2], 8, "auto", overhead_bound) == [3, 3, 2]
    # every row fits one pass and the queues are even: one fused pass saves two passes' overhead
    assert plan_pass([4, 4, 4], None, "auto", weights_bound) == [4, 4, 4]
    assert plan_pass([1, 1, 0], 8, "auto", weights_bound) == [1, 1, 0]  # batch 1 per candidate
    assert plan_pass([9, 8, 7], 8, "grouped", overhead_bound) == [8, 0, 0]
    assert plan_pass([9, 8, 7], 8, "lockstep", weights_bound) == [3, 3, 2]
    assert plan_pass([9, 8, 7], 8, "auto", None) == [8, 0, 0]  # a pool without fused engines


def test_a_one_candidate_pass_reads_only_that_candidates_weights(tiny_family):
    """A fused pass whose rows all belong to candidate 0 never touches candidate 1's weights."""
    models = [load_causal_lm(str(p), "float32") for p in tiny_family[::2]]  # the two Llamas
    fused = fuse_models(models)
    with torch.no_grad():
        for p in models[1].parameters():
            p.fill_(float("nan"))  # views of the stacks: candidate 1's slice of every fused weight
    ids = torch.tensor([[1, 5, 6], [1, 7, 8]])
    with torch.no_grad():
        out = fused(rows=RowAssignment.of([0, 0], "cpu"), input_ids=ids).logits
        mixed = fused(rows=RowAssignment.of([0, 1], "cpu"), input_ids=ids).logits
    assert torch.isfinite(out).all()
    assert torch.isnan(mixed[1]).all()  # the slice really is candidate 1's


class _Sleepy:
    """A backend whose every call takes 0.3 s, on a (fake) device."""

    def __init__(self, name: str, device: str):
        self.name, self.device = name, device

    def write_patches(self, traces, author, patch_tokens, seed):
        time.sleep(0.3)
        return [Patch(author, [1], "x", "budget") for _ in traces]

    def prefill(self, traces):
        pass

    def fork(self, src_key, dst_keys):
        pass

    def release(self, keys):
        pass


def _step_seconds(pool: CandidatePool) -> float:
    traces = [Trace("a", "q", 4), Trace("b", "q", 4)]
    start = time.perf_counter()
    patches = pool.step(traces, [0, 1])
    assert [p.author for p in patches] == [0, 1] and [len(t.patches) for t in traces] == [1, 1]
    return time.perf_counter() - start


def test_engines_on_two_devices_run_at_the_same_time():
    apart = CandidatePool([_Sleepy("a", "fake:0"), _Sleepy("b", "fake:1")], patch_tokens=2, fuse=False)
    together = CandidatePool([_Sleepy("a", "fake:0"), _Sleepy("b", "fake:0")], patch_tokens=2, fuse=False)
    assert _step_seconds(apart) < 0.45
    assert _step_seconds(together) >= 0.6


def test_two_openai_servers_answer_at_the_same_time(tiny_family, serve):
    backends = []
    for i in range(2):
        url, srv = serve(tiny_family[i])
        generate = srv.model.generate

        def slow(*args, _generate=generate, **kwargs):
            time.sleep(0.3)
            return _generate(*args, **kwargs)

        srv.model.generate = slow
        backends.append(
            OpenAIBackend.from_pretrained(
                f"s{i}", str(tiny_family[i]), url, "tiny", sampling=CandidateSampling(temperature=0)
            )
        )
    pool = CandidatePool(backends, patch_tokens=2)
    _step_seconds(pool)  # connections opened
    assert _step_seconds(pool) < 0.5


def test_dataset_throughput_benchmark(capsys):
    """All four paths in one run; the scheduler and lock-step write the same tokens, and candidate 0
    alone writes what HF ``generate`` does."""
    from switchrl.bench.cli import run

    tiny = ["--arch", "tiny", "--prompt-len", "6", "--max-new-tokens", "8", "--patch-tokens", "3"]
    assert run(["dataset_throughput", "--queries", "6", "--max-batch", "2", "--repeats", "1", *tiny]) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert record["same_tokens"] == 1.0 and record["same_tokens_hf"] == 1.0
    assert record["ratio_grouped"] > 0 and record["ratio_lockstep"] > 0 and record["hf_generate_tok_s"] > 0
    assert 0 < record["ratio_cap_from_reading"] <= 1
    assert 0 < record["rows_per_pass"] <= 2 and set(record["pass_cost_ms"]) == {"alpha", "beta", "gamma"}
