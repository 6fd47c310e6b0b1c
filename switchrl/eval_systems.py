"""The systems that ``switchrl eval`` compares: single checkpoints, baselines and switchers.

:func:`resolve_systems` expands ``eval.systems`` into :class:`SystemSpec` objects (checking paths,
loading nothing); :func:`build_systems` turns them into :data:`SystemFactory` callables that the eval
workers call once per batch of traces, so LM switchers load once per process or Ray actor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from switchrl.backends.pool import CandidatePool
from switchrl.errors import CheckpointError, ConfigError
from switchrl.policies import FixedSwitcher, LMSwitcher, RandomSwitcher, RoundRobinSwitcher, SwitchPolicy
from switchrl.policies.factory import build_switcher, looks_like_path
from switchrl.policies.lm_switcher import METADATA_FILE
from switchrl.policies.sb3_switcher import SB3Switcher, is_sb3_switcher_dir
from switchrl.run_config import ResolvedRun
from switchrl.tasks.base import TaskInstance

SYSTEM_KINDS = ("singles", "random", "round_robin", "untuned", "sft", "rl", "oracle")
LM_KINDS = ("untuned", "sft", "rl", "path")

SystemFactory = Callable[[int, Mapping[str, TaskInstance]], SwitchPolicy]
"""``factory(seed, instances_by_trace_key) -> policy`` for one batch of traces of one seed."""


@dataclass(frozen=True)
class SystemSpec:
    """One compared system: its table name, its kind, and the switcher directory or base model it loads."""

    name: str
    kind: str
    index: int | None = None  # singles: the candidate
    path: str | None = (
        None  # LM systems: a saved switcher dir ("sft", "rl", "path") or a base model ("untuned")
    )


def resolve_systems(
    resolved: ResolvedRun,
    names: Sequence[str],
    candidate_names: Sequence[str],
    notes: list[str] | None = None,
) -> list[SystemSpec]:
    """Expand ``eval.systems`` into :class:`SystemSpec` objects, checking paths without loading models.

    ``singles`` expands to one system per candidate; ``rl`` without ``eval.rl_path`` and ``oracle``
    outside the testbed are skipped with a note appended to ``notes``. The ``oracle`` (the testbed's
    :class:`~switchrl.testbed.check.ReferencePatchOracle`) picks a candidate whose next patch matches
    the reference solution; it is meaningful with greedy candidates (temperature 0).
    """
    if isinstance(names, str) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"eval.systems: expected a non-empty list of names, got {names!r}")
    cfg = resolved.config
    notes = notes if notes is not None else []
    out: list[SystemSpec] = []
    for name in names:
        if name == "singles":
            out.extend(SystemSpec(c, "singles", index=i) for i, c in enumerate(candidate_names))
        elif name in ("random", "round_robin"):
            out.append(SystemSpec(name, name))
        elif name == "untuned":
            base = resolved.switcher_base(cfg.sft.base, "sft.base (for eval.systems: untuned)")
            out.append(SystemSpec(name, name, path=base))
        elif name == "sft":
            path = cfg.eval.sft_path or cfg.sft.out_dir
            out.append(SystemSpec(name, name, path=_switcher_dir(path, "eval.sft_path (or sft.out_dir)")))
        elif name == "rl":
            if cfg.eval.rl_path is None:
                notes.append("rl: skipped (no eval.rl_path)")
                continue
            out.append(SystemSpec(name, name, path=_switcher_dir(cfg.eval.rl_path, "eval.rl_path")))
        elif name == "oracle":
            if resolved.family is None or _oracle_class() is None:
                notes.append("oracle: skipped (the reference-patch oracle needs the testbed)")
                continue
            out.append(SystemSpec(name, name))
        elif Path(name).is_dir():
            path = _switcher_dir(name, "eval.systems")
            out.append(SystemSpec(Path(path).name, "path", path=path))
        elif looks_like_path(name):
            raise ConfigError(
                f"eval.systems: switcher directory {name!r} does not exist (or is not a directory); "
                f"fix the path, or name a system: {', '.join(SYSTEM_KINDS)}"
            )
        else:
            raise ConfigError(
                f"eval.systems: unknown system {name!r}; expected one of {', '.join(SYSTEM_KINDS)} "
                "or a saved switcher directory"
            )
    seen: set[str] = set()
    for spec in out:
        if spec.name in seen:
            raise ConfigError(
                f"eval.systems: system name {spec.name!r} appears twice (a candidate and a "
                "switcher directory may not share a name)"
            )
        seen.add(spec.name)
    return out


def _switcher_dir(path: str, field_name: str) -> str:
    if not Path(path).is_dir():
        raise CheckpointError(
            f"{field_name}: switcher directory {path} does not exist; train one with `switchrl sft` "
            "(or `switchrl rl`) or fix the path"
        )
    if not ((Path(path) / METADATA_FILE).is_file() or is_sb3_switcher_dir(path)):
        raise CheckpointError(
            f"{field_name}: {path} is not a saved switcher (no {METADATA_FILE}); "
            "train one with `switchrl sft` or fix the path"
        )
    return str(path)


def _oracle_class() -> type | None:
    try:
        from switchrl.testbed.check import ReferencePatchOracle
    except ImportError:
        return None
    return ReferencePatchOracle


class LMSystem:
    """Loads its switcher on first use (once per process or Ray actor) and reuses it for every seed."""

    def __init__(self, load: Callable[[], LMSwitcher]):
        self._load = load
        self._switcher: LMSwitcher | None = None

    def __call__(self, seed: int, instances: Mapping[str, TaskInstance]) -> SwitchPolicy:
        if self._switcher is None:
            self._switcher = self._load()
        self._switcher.seed = seed  # decisions draw from (seed, trace key, patch index)
        return self._switcher

    def unload(self) -> None:
        """Free the switcher (the worker keeps one LM switcher in memory at a time)."""
        if self._switcher is not None:
            device = self._switcher.lm.device
            self._switcher = None
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()


def build_systems(
    resolved: ResolvedRun,
    pool: CandidatePool,
    names: Sequence[str],
    *,
    notes: list[str] | None = None,
    device: str | None = None,
) -> dict[str, SystemFactory]:
    """System name -> :data:`SystemFactory`, in table order (see :func:`resolve_systems`).

    LM switchers (``untuned``, ``sft``, ``rl``, saved directories) load lazily on first use, on
    ``device`` (default: ``switcher.device``), with ``switcher.dtype`` / ``top_p`` / ``greedy`` of the config.
    """
    n, cands = len(pool), pool.names
    sw = resolved.config.switcher
    lm_kwargs = {"top_p": sw.top_p, "greedy": sw.greedy, "device": device or sw.device, "dtype": sw.dtype}
    systems: dict[str, SystemFactory] = {}
    for spec in resolve_systems(resolved, names, cands, notes):
        if spec.kind == "singles":
            systems[spec.name] = lambda seed, inst, i=spec.index: FixedSwitcher(n, i)
        elif spec.kind == "random":
            systems[spec.name] = lambda seed, inst: RandomSwitcher(n, seed=seed)
        elif spec.kind == "round_robin":
            systems[spec.name] = lambda seed, inst: RoundRobinSwitcher(n)
        elif spec.kind == "untuned":
            load = partial(
                build_switcher,
                cands,
                base=spec.path,
                label_tokens=resolved.label_tokens,
                patch_tokens=pool.patch_tokens,
                where="untuned",
                **lm_kwargs,
            )
            systems[spec.name] = LMSystem(load)
        elif spec.kind in ("rl", "path") and is_sb3_switcher_dir(spec.path):
            systems[spec.name] = lambda seed, inst, path=spec.path: SB3Switcher.from_pretrained(
                path, seed=seed
            )
        elif spec.kind in ("sft", "rl", "path"):
            where = spec.path or spec.name
            systems[spec.name] = LMSystem(
                partial(build_switcher, cands, saved=spec.path, where=where, **lm_kwargs)
            )
        else:  # oracle
            systems[spec.name] = _oracle_factory(pool)
    return systems


def _oracle_factory(pool: CandidatePool) -> SystemFactory:
    oracle_cls = _oracle_class()
    tokenizer = pool.backends[0].tokenizer

    def make(seed: int, instances: Mapping[str, TaskInstance]) -> SwitchPolicy:
        missing = [i.id for i in instances.values() if "solution" not in i.meta]
        if missing:
            raise ConfigError(
                f"oracle: task instances {missing[:3]} have no meta['solution'] (reference answer text)"
            )
        return oracle_cls(
            pool,
            {
                key: tokenizer(inst.meta["solution"], add_special_tokens=False)["input_ids"]
                for key, inst in instances.items()
            },
        )

    return make
