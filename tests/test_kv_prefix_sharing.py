"""Forked traces store their common prefix once (issue 17, fix 9), with unchanged results and no leaks."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from switchrl.backends import CandidateSampling
from switchrl.backends.cached_lm import CachedLM
from switchrl.backends.transformers_backend import load_causal_lm

PREFIX = [4 + (7 * i) % 40 for i in range(200)]
SAMPLED = CandidateSampling(temperature=1.0)


def _gens(keys, round_):
    return [torch.Generator().manual_seed(1000 * round_ + int(k.rsplit("/", 1)[-1])) for k in keys]


@pytest.fixture
def model(tiny_family):
    return load_causal_lm(str(tiny_family[0]), "float32")


def _alone(model, key, patches):
    """What one child writes when it reads the whole prefix itself (nothing shared)."""
    lm, out, last = CachedLM(model), [], [PREFIX[-1]]
    lm.extend([key], [PREFIX[:-1]])
    for round_ in range(patches):
        gen = lm.generate([key], [last], [10], SAMPLED, _gens([key], round_))[0]
        out.append(gen.token_ids)
        last = gen.token_ids[-1:]
    return out


def test_32_forks_of_a_200_token_trace_store_the_prefix_once(model):
    lm = CachedLM(model)
    lm.extend(["root"], [PREFIX[:-1]])
    children = [f"root/{i}" for i in range(32)]
    lm.fork("root", children)
    lm.release(["root"])
    written = [[] for _ in children]
    last = [[PREFIX[-1]] for _ in children]
    for round_ in range(2):
        gens = lm.generate(children, last, [10] * 32, SAMPLED, _gens(children, round_))
        for w, g in zip(written, gens):
            w.append(g.token_ids)
        last = [g.token_ids[-1:] for g in gens]
        assert all(len(g.token_ids) == 10 for g in gens)
        unique = 199 + 32 * 10 * (round_ + 1)  # the shared prefix once + each child's own tokens
        assert unique <= lm.stored_tokens() <= 1.2 * unique  # copying rows would store 32 * 209 after round 0
        assert [lm.cached_length(c) for c in children] == [209 + 10 * round_] * 32
    assert len({tuple(map(tuple, w)) for w in written}) > 1  # the children wrote different things
    for i in (0, 17, 31):  # and each wrote what it writes with the prefix all to itself
        assert written[i] == _alone(model, children[i], 2)


def test_forks_of_forks_read_their_whole_chain(model):
    lm = CachedLM(model)
    lm.extend(["a"], [PREFIX[:-1]])
    first = lm.generate(["a"], [[PREFIX[-1]]], [10], SAMPLED, _gens(["a/0"], 0))[0].token_ids
    lm.fork("a", ["a/0", "a/1"])
    lm.generate(["a/0", "a/1"], [first[-1:]] * 2, [10, 10], SAMPLED, _gens(["a/0", "a/1"], 1))
    lm.fork("a/1", ["a/1/2", "a/1/3"])
    lm.release(["a", "a/1"])
    grand = ["a/1/2", "a/1/3"]
    got = lm.generate(grand, [[5], [6]], [10, 10], SAMPLED, _gens(grand, 2))
    assert lm.stored_tokens() == 199 + 10 + 10 * 2 + 10 * 2  # prefix+a's patch, a/0, a/1, grandchildren

    alone = CachedLM(model)  # one trace reading the same tokens, nothing shared
    alone.extend(["x"], [PREFIX[:-1]])
    alone.generate(["x"], [[PREFIX[-1]]], [10], SAMPLED, _gens(["a/0"], 0))
    alone.generate(["x"], [first[-1:]], [10], SAMPLED, _gens(["a/1"], 1))
    want = alone.generate(["x"], [[5]], [10], SAMPLED, _gens(["a/1/2"], 2))[0].token_ids
    assert got[0].token_ids == want
    assert lm.cached_length("a/1/2") == alone.cached_length("x") == 229


def test_release_frees_a_shared_prefix_with_its_last_child(model):
    lm = CachedLM(model)
    lm.extend(["root"], [PREFIX[:-1]])
    children = [f"root/{i}" for i in range(4)]
    lm.fork("root", children)
    lm.release(["root"])
    lm.generate(children, [[PREFIX[-1]]] * 4, [10] * 4, SAMPLED, _gens(children, 0))
    prefix = lm._kv.get(children[0]).parent
    keys, values = (weakref.ref(t) for t in prefix.layers[0])
    lm.release(children[:3])
    assert lm.stored_tokens() == 199 + 10 and keys() is not None
    lm.release(children[3:])
    gc.collect()
    assert lm.stored_tokens() == 0 and len(lm) == 0
    assert keys() is None and values() is None and prefix.refs == 0


def test_a_batch_cache_copies_shared_segments_into_every_row_that_holds_them():
    """gather_past copies a segment shared by several rows (adjacent or not) once per padding offset,
    into the room the batch decodes into: the rows hold what a row-by-row copy gives, zeros elsewhere."""
    from switchrl.backends.kv_store import KVStore, gather_past

    def layers(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        return [
            (torch.randn(1, 2, n, 3, generator=g), torch.randn(1, 2, n, 3, generator=g)) for _ in range(2)
        ]

    store = KVStore()
    store.store("root", layers(5, 0), torch.arange(5), None)
    store.fork("root", ["a", "b", "c"])
    grown = [
        (torch.cat([k, x], 2), torch.cat([v, y], 2)) for (k, v), (x, y) in zip(layers(5, 0), layers(2, 1))
    ]
    store.store("b", grown, torch.arange(7), store.get("b"))  # b: the shared 5 + its own 2
    order = ["a", "b", "other", "c"]  # a and c share root but are not adjacent; "other" holds nothing
    tails = [store.get(k) for k in order]
    got = gather_past(tails, 7, room=3)
    for li, (k, v) in enumerate(got):
        assert k.shape == (4, 2, 10, 3)
        for row, key in enumerate(order):
            want = torch.zeros(2, 10, 3)
            if key != "other":
                full = grown[li][0][0] if key == "b" else layers(5, 0)[li][0][0]
                want[:, 7 - full.shape[1] : 7] = full
            assert torch.equal(k[row], want)
        assert torch.equal(v[0, :, 2:7], layers(5, 0)[li][1][0]) and torch.equal(v[1, :, :7], grown[li][1][0])


def test_a_row_is_stored_as_a_copy_of_its_positions_contiguous_or_not():
    """A commit takes a row's positions out of the batch room: a run of consecutive positions (one slice
    copy) and positions with gaps (a gather) store the same values, in tensors of their own."""
    from switchrl.backends.kv_store import KVStore, gather_past

    g = torch.Generator().manual_seed(0)
    room = [(torch.randn(1, 2, 9, 3, generator=g), torch.randn(1, 2, 9, 3, generator=g)) for _ in range(2)]
    store = KVStore()
    for key, at in (("run", torch.arange(2, 8)), ("gaps", torch.tensor([1, 2, 4, 7]))):
        store.store(key, room, at, None)
        for (k, v), (rk, rv) in zip(store.get(key).layers, room):
            assert torch.equal(k, rk.index_select(2, at)) and torch.equal(v, rv.index_select(2, at))
            assert k.is_contiguous() and k.untyped_storage().data_ptr() != rk.untyped_storage().data_ptr()
    rk = room[0][0].clone()
    room[0][0].zero_()  # the batch room is reused or freed after a commit: the stored rows keep their values
    assert torch.equal(gather_past([store.get("run")], 6)[0][0], rk[:, :, 2:8])
