"""``switchrl generate``: write switched responses and show who wrote each patch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from switchrl.backends.base import Trace
from switchrl.backends.pool import CandidatePool
from switchrl.config import SwitcherConfig
from switchrl.errors import ConfigError
from switchrl.policies import FixedSwitcher, RandomSwitcher, RoundRobinSwitcher, SwitchPolicy
from switchrl.policies.factory import build_switcher, looks_like_path
from switchrl.preflight import check_config
from switchrl.rollout import run_switch_generation
from switchrl.run_config import load_config


def build_policy(cfg: SwitcherConfig, candidate_names: list[str]) -> SwitchPolicy:
    """The switcher a :class:`SwitcherConfig` names."""
    n = len(candidate_names)
    if cfg.type == "random":
        return RandomSwitcher(n, seed=cfg.seed)
    if cfg.type == "round_robin":
        return RoundRobinSwitcher(n)
    if cfg.type == "fixed":
        if cfg.candidate not in candidate_names:
            raise ConfigError(f"switcher.candidate: {cfg.candidate!r} is not one of {candidate_names}")
        return FixedSwitcher(n, candidate_names.index(cfg.candidate))
    if not cfg.path:
        raise ConfigError("switcher.path: an lm switcher needs a saved switcher directory")
    return build_switcher(
        candidate_names,
        saved=cfg.path,
        top_p=cfg.top_p,
        greedy=cfg.greedy,
        seed=cfg.seed,
        device=cfg.device,
        dtype=cfg.dtype,
        where="switcher.path",
    )


def parse_switcher(spec: str) -> SwitcherConfig:
    """``random`` | ``round_robin`` | ``fixed:NAME`` | a saved switcher directory."""
    if spec in ("random", "round_robin"):
        return SwitcherConfig(type=spec)
    if spec.startswith("fixed:"):
        return SwitcherConfig(type="fixed", candidate=spec.split(":", 1)[1])
    if Path(spec).is_dir():
        return SwitcherConfig(type="lm", path=spec)
    if looks_like_path(spec):
        raise ConfigError(
            f"--switcher: {spec!r} does not exist (or is not a directory); give a switcher directory "
            "written by `switchrl sft` / `switchrl rl`, or random, round_robin, fixed:NAME"
        )
    raise ConfigError(
        f"--switcher: expected random, round_robin, fixed:NAME or a switcher directory, got {spec!r}"
    )


def render(trace: Trace, names: list[str]) -> str:
    """The response with each patch marked ``[author]``."""
    return "".join(f"[{names[p.author]}]{p.text}" for p in trace.patches)


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.switcher:  # the override names the policy; the config still places it
        placement = {"dtype": config.switcher.dtype, "device": config.switcher.device}
        config.switcher = parse_switcher(args.switcher).model_copy(update=placement)
    resolved = check_config(config, "generate")
    if args.jsonl:
        from switchrl.tasks import load_jsonl

        instances = load_jsonl(args.jsonl)
        queries, keys = [i.query for i in instances], [f"{i.task}/{i.id}" for i in instances]
    elif args.query:
        queries, keys = list(args.query), [f"q{i}" for i in range(len(args.query))]
    else:
        raise ConfigError("give --query TEXT (repeatable) or --jsonl FILE")
    gen = resolved.generation
    pool = CandidatePool.from_configs(
        resolved.candidates, patch_tokens=gen.patch_tokens, seed=gen.seed, truncate=gen.truncate
    )
    policy = build_policy(config.switcher, pool.names)
    traces = run_switch_generation(
        pool, policy, queries, gen.max_new_tokens, keys=keys, progress=len(queries) > 8, **gen.scheduling()
    )
    rows = [
        {
            "id": key,
            "query": t.query,
            "response": t.text,
            "stop_reason": t.stop_reason,
            "patches": [{"author": pool.names[p.author], "text": p.text} for p in t.patches],
        }
        for key, t in zip(keys, traces)
    ]
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for key, t in zip(keys, traces):
        print(f"{key}: {t.query}\n  {render(t, pool.names)}\n")
    return 0
