"""The pool contract: the local and the Ray pool both satisfy :class:`Pool` (same members, same
signatures), and a local pool builds its engines once: fused candidates share one, the rest run alone."""

from __future__ import annotations

import inspect
import itertools
from types import SimpleNamespace

from switchrl.backends import CandidateEngine, CandidatePool, EngineMember, Pool, Trace
from switchrl.config import CandidateConfig
from switchrl.executors import remote_pool
from switchrl.executors.remote_pool import RayCandidatePool


def _members(protocol: type) -> tuple[set[str], set[str]]:
    """(attributes, methods and properties) that ``protocol`` declares."""
    methods = {
        name
        for name, value in vars(protocol).items()
        if (inspect.isfunction(value) or isinstance(value, property)) and name not in dir(object)
    }
    return set(protocol.__annotations__), methods


def _parameters(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _check_satisfies(pool: object) -> None:
    assert isinstance(pool, Pool)
    attributes, methods = _members(Pool)
    assert attributes == {"patch_tokens", "seed"} and "names" in methods and "close" in methods
    for name in methods:
        declared, defined = vars(Pool)[name], inspect.getattr_static(type(pool), name)
        if isinstance(declared, property):
            assert isinstance(defined, property), name
        else:
            assert _parameters(defined) == _parameters(declared), name


class _Backend:
    """The least a candidate backend needs to be pooled."""

    def __init__(self, name: str):
        self.name = name


def test_candidate_pool_satisfies_the_protocol():
    pool = CandidatePool([_Backend("a"), _Backend("b")], patch_tokens=3, seed=1, fuse=False)
    _check_satisfies(pool)
    assert [[b.name for b in e.members] for e in pool.engines] == [["a"], ["b"]]
    pool.close()


class _FakeCluster:
    """What RayCandidatePool uses of RayActors, without Ray: actors that report their candidates."""

    lost_actor_errors = ()
    ray = SimpleNamespace(get=lambda ref: ref)

    def __init__(self, config):
        self.closed = False

    def start_actors(self, cls, num_models, args, name, share):
        candidates = args(0, ())[0]
        names = [c["name"] for c in candidates]
        return [SimpleNamespace(names=SimpleNamespace(remote=lambda: names))]

    def close(self) -> None:
        self.closed = True


def test_ray_pool_satisfies_the_protocol(monkeypatch):
    monkeypatch.setattr(remote_pool, "RayActors", _FakeCluster)
    monkeypatch.setattr(remote_pool, "_pools", itertools.count())  # leave the real pools' actor names alone
    candidates = [CandidateConfig(name=n, path=f"/nowhere/{n}") for n in ("a", "b")]
    with RayCandidatePool(candidates, patch_tokens=3, seed=1, rank=0, world_size=1) as pool:
        _check_satisfies(pool)
        assert (pool.names, pool.patch_tokens, pool.seed, len(pool), pool.index("b")) == (
            ["a", "b"],
            3,
            1,
            2,
            1,
        )
    assert pool._cluster.closed


def test_fused_candidates_share_one_engine(tiny_family):
    """Tiny family: Llama, GPT-2, Llama; the two Llamas are fused, GPT-2 runs alone."""
    from tests.conftest import make_pool

    pool = make_pool(tiny_family)
    assert all(isinstance(e, CandidateEngine) for e in pool.engines)
    assert all(isinstance(b, EngineMember) for b in pool.backends)
    assert [[b.name for b in e.members] for e in pool.engines] == [["c0", "c2"], ["c1"]]
    assert pool.backends[0].fused is pool.engines[0] is pool.backends[2].fused
    again = CandidatePool([pool.backends[2], pool.backends[1]], patch_tokens=2)  # already fused: kept
    assert again.engines[0] is pool.engines[0]
    assert [[b.name for b in e.members] for e in again.engines] == [["c0", "c2"], ["c1"]]
    traces = [Trace("a", "one two", max_new_tokens=4), Trace("b", "the red", max_new_tokens=4)]
    assert [p.author for p in again.step(traces, [0, 1])] == [0, 1]


def test_pool_protocol_rejects_what_is_not_a_pool():
    assert not isinstance(_Backend("a"), Pool)
