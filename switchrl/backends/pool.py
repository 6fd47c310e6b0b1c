"""The local pool: the candidates that take turns writing a response, and the engines that run them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from switchrl.backends.base import (
    CandidateBackend,
    CandidateEngine,
    CandidateSampling,
    EngineMember,
    Group,
    Patch,
    Trace,
)
from switchrl.config import CandidateConfig
from switchrl.devices import check_per_rank, place, world_size
from switchrl.errors import ConfigError


def build_backend(cfg: CandidateConfig) -> CandidateBackend:
    """Instantiate the backend named by ``cfg.backend`` for one candidate."""
    if cfg.backend != "openai":  # an openai candidate's path may hold only the tokenizer
        from switchrl.backends.tokens import check_model_dir

        check_model_dir(cfg.path)
    sampling = CandidateSampling(cfg.temperature, cfg.top_p, cfg.top_k)
    if cfg.backend == "transformers":
        from switchrl.backends.transformers_backend import TransformersBackend

        return TransformersBackend.from_pretrained(
            cfg.name,
            cfg.path,
            dtype=cfg.dtype,
            device=cfg.device,
            sampling=sampling,
            chat_template=cfg.chat_template,
            prompt_template=cfg.prompt_template,
            stop_strings=cfg.stop_strings,
            eos_after=cfg.eos_after,
        )
    if cfg.eos_after:
        raise ConfigError(
            f"candidate {cfg.name!r}: eos_after is only supported by the transformers backend, "
            f"not {cfg.backend!r}"
        )
    common = dict(
        sampling=sampling,
        chat_template=cfg.chat_template,
        prompt_template=cfg.prompt_template,
        stop_strings=cfg.stop_strings,
    )
    if cfg.backend == "openai":
        if not cfg.base_url:
            raise ConfigError(
                f"candidate {cfg.name!r}: backend 'openai' needs base_url, e.g. http://host:8000/v1"
            )
        from switchrl.backends.openai_backend import OpenAIBackend

        return OpenAIBackend.from_pretrained(
            cfg.name,
            cfg.path,
            cfg.base_url,
            cfg.served_model,
            timeout=cfg.timeout,
            max_concurrency=cfg.max_concurrency,
            max_retries=cfg.max_retries,
            retry_backoff=cfg.retry_backoff,
            api_key=cfg.api_key,
            **common,
        )
    if cfg.backend == "vllm":
        from switchrl.backends.vllm_backend import VLLMBackend

        return VLLMBackend.from_pretrained(
            cfg.name, cfg.path, dtype=cfg.dtype, device=cfg.device, engine_kwargs=cfg.engine_kwargs, **common
        )
    raise ConfigError(f"candidate {cfg.name!r}: backend {cfg.backend!r} is not available in this install")


def rank_candidates(candidates: Sequence[CandidateConfig]) -> list[CandidateConfig]:
    """The local executor's candidates in this process: under a launch of several processes each rank
    loads its own set, ``cuda`` / ``auto`` on its own GPU (``cuda:LOCAL_RANK``); a ``cuda:N`` (the same
    GPU in every rank) is refused in favour of ``executor: ray``, whose one set serves every rank."""
    check_per_rank(
        {f"candidates.{i}.device": c.device for i, c in enumerate(candidates) if c.backend != "openai"},
        "use 'executor: ray' (one set of candidates on their own GPUs serves every rank), or 'device: "
        "cuda' (each rank loads its own candidates onto its own GPU, cuda:LOCAL_RANK)",
    )
    if world_size() <= 1:
        return list(candidates)
    return [
        c if c.backend == "openai" else c.model_copy(update={"device": place(c.device)}) for c in candidates
    ]


def check_pool(candidates: Sequence, patch_tokens: int) -> list[str]:
    """What every pool checks of its patch size and its candidates (anything with a ``name``); their names."""
    if patch_tokens <= 0:
        raise ConfigError(f"patch_tokens must be > 0, got {patch_tokens}")
    if not candidates:
        raise ConfigError("candidates: a pool needs at least one candidate")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ConfigError(f"candidates: names must be unique, got {names}")
    return names


def check_step(traces: Sequence[Trace], actions: Sequence[int], names: Sequence[str]) -> list[int]:
    """``actions`` as ints, after checking that there is one per trace, each names a candidate and no
    trace has ended."""
    if len(traces) != len(actions):
        raise ValueError(f"got {len(traces)} traces but {len(actions)} actions")
    for trace, action in zip(traces, actions):
        if not 0 <= int(action) < len(names):
            raise ValueError(
                f"action {action!r} is outside the candidates 0..{len(names) - 1} ({list(names)})"
            )
        if trace.done:
            raise ValueError(f"trace {trace.key!r} is already finished ({trace.stop_reason})")
    return [int(a) for a in actions]


class CandidateNames:
    """``len`` and :meth:`index` for a pool that has ``names``."""

    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(f"no candidate named {name!r}; candidates are {self.names}") from None


def placement(engine: CandidateEngine) -> frozenset[str]:
    """Where ``engine`` computes: its server's URL, else the devices its member names (``devices``:
    a vLLM engine, several under tensor parallelism), else its model's device."""
    member = engine.members[0]
    url = getattr(member, "base_url", None)
    if url:
        return frozenset({str(url)})
    devices = getattr(member, "devices", None)
    if devices:
        return frozenset(str(d) for d in devices)
    lm = getattr(member, "lm", None)
    return frozenset({str(getattr(lm, "device", None) or getattr(member, "device", "local"))})


def computes_here_on_cpu(engine: CandidateEngine) -> bool:
    """Whether ``engine``'s work is this process's CPU time: a model loaded here, on the CPU (not a
    server's, not a GPU's, not a vLLM engine process's)."""
    lm = getattr(engine.members[0], "lm", None)
    return lm is not None and str(getattr(lm, "device", "")) == "cpu"


def places(engines: Sequence[CandidateEngine]) -> list[list[int]]:
    """``engines`` (by index) in groups that share no device or server: the engines of one group
    compute in one place, so they run in turn; the groups can run at the same time."""
    groups: list[tuple[set[str], list[int]]] = []
    for i, engine in enumerate(engines):
        where, members = set(placement(engine)), [i]
        for group in [g for g in groups if g[0] & where]:  # an engine on two devices joins their groups
            groups.remove(group)
            where |= group[0]
            members = group[1] + members
        groups.append((where, sorted(members)))
    return [members for _, members in groups]


class _OwnEngine:
    """The engine of a candidate that shares none: one call of its own per step."""

    def __init__(self, backend: CandidateBackend):
        self.members = [backend]

    def write_groups(self, groups: Sequence[Group], patch_tokens: int, seed: int) -> list[list[Patch]]:
        return [self.members[g.member].write_patches(g.traces, g.author, patch_tokens, seed) for g in groups]

    def prefill(self, traces: Sequence[Trace]) -> None:
        self.members[0].prefill(traces)


class CandidatePool(CandidateNames):
    """Named candidates plus the patch size; :meth:`step` writes one patch per trace.

    With ``fuse`` (the default), transformers candidates that share an architecture (the
    checkpoints of one training pipeline) are fused into one engine
    (:class:`~switchrl.backends.transformers_backend.FusedCandidates`): a step then costs one
    forward pass per token for all of them, however the switcher splits the batch. Every other
    candidate is an engine of its own: one batched call each. Backends that joined an engine
    before (e.g. in another pool over the same backends) keep it.
    """

    def __init__(
        self,
        backends: Sequence[CandidateBackend],
        patch_tokens: int = 50,
        seed: int = 0,
        fuse: bool = True,
        truncate: str | None = None,
    ):
        check_pool(backends, patch_tokens)
        self.backends = list(backends)
        if truncate is not None:  # generation.truncate: what a prompt too long for a candidate does
            if truncate not in ("error", "left"):
                raise ConfigError(f"generation.truncate: expected 'error' or 'left', got {truncate!r}")
            for b in self.backends:
                if hasattr(b, "truncate"):
                    b.truncate = truncate
        self.patch_tokens = patch_tokens
        self.seed = seed
        from switchrl.backends.tokens import link_vocabularies

        link_vocabularies(self.backends)  # ids pass between vocabularies that agree on their shared ids
        if fuse:
            from switchrl.backends.transformers_backend import fuse_backends

            fuse_backends(self.backends)
        self.engines: list[CandidateEngine] = []  # each once, in the order of their first candidate
        self._engine_of: list[tuple[int, int]] = []  # candidate -> (its engine, its member index there)
        numbers: dict[CandidateEngine, int] = {}
        for b in self.backends:
            shared = b.fused if isinstance(b, EngineMember) else None
            engine = _OwnEngine(b) if shared is None else shared
            if engine not in numbers:
                numbers[engine] = len(self.engines)
                self.engines.append(engine)
            self._engine_of.append((numbers[engine], engine.members.index(b)))

    @classmethod
    def from_configs(
        cls,
        configs: Sequence[CandidateConfig],
        patch_tokens: int = 50,
        seed: int = 0,
        fuse: bool = True,
        truncate: str | None = None,
    ) -> CandidatePool:
        backends = [build_backend(c) for c in configs]
        return cls(backends, patch_tokens=patch_tokens, seed=seed, fuse=fuse, truncate=truncate)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def step(self, traces: Sequence[Trace], actions: Sequence[int]) -> list[Patch]:
        """Let candidate ``actions[i]`` write the next patch of ``traces[i]`` and append it.

        Traces are grouped per candidate, and each engine writes the groups of its candidates in one
        call; engines on different devices or servers (:func:`places`) run at the same time.
        Returns the new patches in the order of ``traces``.
        """
        rows: dict[int, list[int]] = defaultdict(list)  # candidate -> the traces it writes
        for i, a in enumerate(check_step(traces, actions, self.names)):
            rows[a].append(i)
        calls: dict[int, list[Group]] = defaultdict(list)  # engine -> its groups of this step
        for a, rows_of_a in rows.items():
            engine, member = self._engine_of[a]
            calls[engine].append(Group(member, a, [traces[i] for i in rows_of_a]))
        out: list[Patch | None] = [None] * len(traces)

        def run(engines: list[int]) -> list[tuple[Sequence[Group], list[list[Patch]]]]:
            return [
                (calls[e], self.engines[e].write_groups(calls[e], self.patch_tokens, self.seed))
                for e in engines
            ]

        called = list(calls)
        turns = [[called[i] for i in group] for group in places([self.engines[e] for e in called])]
        if len(turns) <= 1:
            results = [r for engines in turns for r in run(engines)]
        else:  # one thread per place: kernels, vLLM engine processes and HTTP waits release the GIL
            with ThreadPoolExecutor(max_workers=len(turns)) as workers:
                results = [r for done in workers.map(run, turns) for r in done]
        for groups, written in results:
            for group, patches in zip(groups, written):
                for i, patch in zip(rows[group.author], patches):
                    out[i] = patch
                    traces[i].patches.append(patch)
        return out  # type: ignore[return-value]

    @property
    def engine_candidates(self) -> list[list[int]]:
        """The candidates of each engine: one fused pass can serve several of them at once."""
        out: list[list[int]] = [[] for _ in self.engines]
        for candidate, (engine, _) in enumerate(self._engine_of):
            out[engine].append(candidate)
        return out

    def computes_here_on_cpu(self, members: Sequence[int]) -> bool:
        """Whether the engine of candidates ``members`` computes in this process on the CPU."""
        return computes_here_on_cpu(self.engines[self._engine_of[members[0]][0]])

    def prefill(self, traces: Sequence[Trace]) -> None:
        """Let every candidate read ``traces`` as they stand (one call per engine), e.g. before forking
        them: the forks then share that work instead of each reading the prefix again."""
        for engine in self.engines:
            engine.prefill(traces)

    def fork(self, src_key: str, dst_keys: Sequence[str]) -> None:
        for b in self.backends:
            b.fork(src_key, dst_keys)

    def release(self, keys: Sequence[str]) -> None:
        for b in self.backends:
            b.release(keys)

    def close(self) -> None:
        """Nothing to free: the backends belong to whoever built them (several pools may share them)."""
