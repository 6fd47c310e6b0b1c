"""The vocabulary shared by every backend, and the contracts between the layers that write patches.

Three contracts, from the bottom up: a :class:`CandidateBackend` is one candidate and writes the
next patch of a batch of traces; a :class:`CandidateEngine` is what a pool calls once per step for
some of its candidates (one backend alone, or several that share a forward pass) and writes all their
groups of the step; a :class:`Pool` is what the rollouts, environments and trainers drive: named
candidates that take turns, local (:class:`~switchrl.backends.pool.CandidatePool`) or on Ray actors
(:class:`~switchrl.executors.remote_pool.RayCandidatePool`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

StopReason = Literal["eos", "stop", "budget"]


@dataclass(frozen=True)
class CandidateSampling:
    """How a candidate samples its tokens. ``temperature == 0`` means greedy decoding."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Patch:
    """One contiguous piece of a response, written by one candidate.

    ``token_ids`` are in the author's tokenizer (fingerprinted by ``vocab``) and exclude a final EOS;
    readers with the same ``vocab`` reuse the ids, others re-tokenize ``text``. ``stop_reason`` is
    set when this patch ended the response.

    ``text`` is what the ids add to the response's text, in whole characters: the texts of a response
    written in one vocabulary join to the decode of all its ids (a character whose bytes continue in
    the next patch is in that patch's text). A patch that ended on a stop string ends its text where
    the stop string starts, as vLLM and OpenAI servers do; its ids keep the stop string's tokens.
    """

    author: int
    token_ids: list[int]
    text: str
    stop_reason: StopReason | None = None
    vocab: str = ""
    seconds: float = 0.0
    probs: tuple[float, ...] | None = None  # the switcher's distribution when it chose this author

    def to_dict(self, keys: Iterable[str] | None = None) -> dict[str, Any]:
        """The JSON form of this patch (how it crosses a file boundary): the fields ``keys`` (all by
        default) in the order given, ``token_ids`` and ``probs`` as lists. :meth:`from_dict` reads it."""
        out = {k: getattr(self, k) for k in _patch_fields(PATCH_FIELDS if keys is None else keys)}
        for k in ("token_ids", "probs"):
            if out.get(k) is not None:
                out[k] = list(out[k])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Patch:
        """The patch of a :meth:`to_dict` form; the fields it leaves out take their defaults."""
        kwargs = {k: data[k] for k in _patch_fields(data)}
        if "token_ids" in kwargs:
            kwargs["token_ids"] = list(kwargs["token_ids"])
        if kwargs.get("probs") is not None:
            kwargs["probs"] = tuple(kwargs["probs"])
        return cls(**kwargs)


PATCH_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Patch))


def _patch_fields(keys: Iterable[str]) -> tuple[str, ...]:
    keys = tuple(keys)
    if unknown := [k for k in keys if k not in PATCH_FIELDS]:
        raise ValueError(f"Patch has no field(s) {unknown}; its fields are {list(PATCH_FIELDS)}")
    return keys


def count_switches(authors: Sequence[int]) -> int:
    """Changes of author along a response (its patches' authors in order)."""
    return sum(1 for x, y in zip(authors, authors[1:]) if x != y)


@dataclass
class Trace:
    """A response being written by several candidates: the query and the patches so far.

    ``key`` names the trace uniquely (e.g. ``"q17/s3/c1/f5"``); backends key their KV caches and
    sampling seeds on it, so the same key always gives the same tokens.
    """

    key: str
    query: str
    max_new_tokens: int
    patches: list[Patch] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def stop_reason(self) -> StopReason | None:
        if self.patches and self.patches[-1].stop_reason is not None:
            return self.patches[-1].stop_reason
        if self.num_tokens >= self.max_new_tokens:
            return "budget"
        return None

    @property
    def num_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.patches)

    @property
    def remaining_tokens(self) -> int:
        return max(0, self.max_new_tokens - self.num_tokens)

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.patches)

    @property
    def authors(self) -> list[int]:
        return [p.author for p in self.patches]

    @property
    def num_switches(self) -> int:
        return count_switches(self.authors)

    def fork(self, key: str) -> Trace:
        """A copy under a new key that shares this trace's patches so far (patches are not mutated)."""
        return Trace(
            key=key,
            query=self.query,
            max_new_tokens=self.max_new_tokens,
            patches=list(self.patches),
            meta=dict(self.meta),
        )


@runtime_checkable
class CandidateBackend(Protocol):
    """One candidate, which can continue a batch of traces by one patch each.

    ``author`` is the candidate's index in its pool, stored in each patch. Implementations keep
    whatever per-trace state makes that cheap (a KV cache, a server-side prefix cache) and must
    return exactly one :class:`Patch` per trace, in order.
    """

    name: str

    def write_patches(
        self, traces: Sequence[Trace], author: int, patch_tokens: int, seed: int
    ) -> list[Patch]: ...

    def prefill(self, traces: Sequence[Trace]) -> None:
        """Read ``traces`` as they stand now, so that forks of them share that work (may do nothing)."""

    def fork(self, src_key: str, dst_keys: Sequence[str]) -> None:
        """Let traces ``dst_keys`` start from what ``src_key`` has read (no copy where possible)."""

    def release(self, keys: Sequence[str]) -> None:
        """Forget the per-trace state of these traces."""


class Group(NamedTuple):
    """One candidate's share of a step: ``member`` of an engine writes the next patch of each of
    ``traces``, as candidate ``author`` of the pool."""

    member: int
    author: int
    traces: Sequence[Trace]


@runtime_checkable
class CandidateEngine(Protocol):
    """Candidates (``members``) that write all their groups of one step in one call.

    A pool calls each of its engines at most once per step, with one :class:`Group` per member that
    was chosen. An unfused candidate is an engine of one member; the transformers candidates of one
    architecture share one (:class:`~switchrl.backends.transformers_backend.FusedCandidates`: one
    forward pass per token for all of them).
    """

    members: Sequence[CandidateBackend]

    def write_groups(self, groups: Sequence[Group], patch_tokens: int, seed: int) -> list[list[Patch]]:
        """Per group, in order, one patch per trace; at most one group per member."""

    def prefill(self, traces: Sequence[Trace]) -> None:
        """Let every member read ``traces`` as they stand (see :meth:`CandidateBackend.prefill`)."""


@runtime_checkable
class EngineMember(Protocol):
    """A backend that may share an engine with other candidates: ``fused`` (None while it has its own)."""

    fused: CandidateEngine | None


@runtime_checkable
class Pool(Protocol):
    """The candidates that take turns writing a response, as rollouts, environments and trainers see them.

    Candidate ``i`` is ``names[i]``; :meth:`step` lets the chosen candidates write one patch (of at
    most ``patch_tokens`` tokens) per trace, seeded by (``seed``, trace key, patch index, candidate),
    so the tokens do not depend on which pool writes them or how its traces are batched.
    """

    patch_tokens: int
    seed: int

    @property
    def names(self) -> list[str]: ...

    def __len__(self) -> int: ...

    def index(self, name: str) -> int:
        """The index of the candidate called ``name`` (a clear error when there is none)."""

    def step(self, traces: Sequence[Trace], actions: Sequence[int]) -> list[Patch]:
        """Let candidate ``actions[i]`` write the next patch of ``traces[i]``, append it and return it."""

    def prefill(self, traces: Sequence[Trace]) -> None:
        """Let every candidate read ``traces`` as they stand, e.g. before forking them."""

    def fork(self, src_key: str, dst_keys: Sequence[str]) -> None:
        """Let traces ``dst_keys`` start from what ``src_key`` has read."""

    def release(self, keys: Sequence[str]) -> None:
        """Forget the per-trace state of these traces."""

    def close(self) -> None:
        """Free what the pool holds beyond per-trace state (e.g. its Ray actors); do not use it after."""
