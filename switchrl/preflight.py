"""Config-only checks of each command, run before a single weight loads.

An 8B run loads tens of GiB before it builds its switcher or reads its systems; a missing ``rl.init``,
a switcher directory trained for other candidates or a float16 switcher on a CPU must fail in a
second, not after that. :func:`check_config` reads only the config, task files, ``config.json``
presence and saved switchers' metadata, and raises the :class:`~switchrl.errors.ConfigError` /
:class:`~switchrl.errors.CheckpointError` the command would raise later. The commands' own code keeps
the same checks (they share the functions), so the API without the CLI fails the same way.
"""

from __future__ import annotations

from switchrl.backends.pool import rank_candidates
from switchrl.backends.tokens import check_model_dir
from switchrl.devices import check_available, check_per_rank, training_settings
from switchrl.errors import ConfigError
from switchrl.eval_systems import resolve_systems
from switchrl.plan import check_fits
from switchrl.policies.factory import check_saved_switcher
from switchrl.policies.sb3_switcher import is_sb3_switcher_dir
from switchrl.run_config import ResolvedRun, RunConfig

COMMANDS = ("generate", "simulate", "sft", "eval", "rl")
PLANNED = ("simulate", "eval", "rl")  # the commands `switchrl plan` sizes
RANK_SWITCHER_FIX = "set switcher.device: cuda (each rank's switcher on its own GPU, cuda:LOCAL_RANK)"


def check_config(config: RunConfig, command: str, algo: str | None = None) -> ResolvedRun:
    """Everything ``switchrl <command>`` (``algo``: rl's) can refuse about ``config`` without loading a
    model, then (simulate, eval, rl) whether its memory plan fits this machine's devices
    (:func:`~switchrl.plan.check_fits`); returns the resolved run."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}, got {command!r}")
    resolved = ResolvedRun(config)  # task files exist, the testbed family is built
    names = [c.name for c in resolved.candidates]
    for i, c in enumerate(resolved.candidates):
        if c.backend == "openai":
            if not c.base_url:
                raise ConfigError(f"candidates.{i}.base_url: backend 'openai' needs the server's address")
        else:
            check_model_dir(c.path)
    switcher = config.switcher
    if config.executor.executor == "local":  # Ray places the candidates itself
        local = enumerate(resolved.candidates)
        check_available({f"candidates.{i}.device": c.device for i, c in local if c.backend != "openai"})
    check_available({"switcher.device": switcher.device})
    if command == "generate" and switcher.type == "lm":
        if not switcher.path:
            raise ConfigError("switcher.path: an lm switcher needs a saved switcher directory")
        check_saved_switcher(switcher.path, names, "switcher.path")
    elif command == "generate" and switcher.type == "fixed" and switcher.candidate not in names:
        raise ConfigError(f"switcher.candidate: {switcher.candidate!r} is not one of {names}")
    elif command == "simulate":
        _check_tasks(resolved, config.simulate.split, config.simulate.limit, "simulate.split")
    elif command == "sft":
        if config.sft.init is not None:
            check_saved_switcher(config.sft.init, names, "sft.init", trainable=True)
        else:
            check_model_dir(resolved.switcher_base(config.sft.base, "sft.base"))
        training_settings(switcher.device, switcher.dtype)
    elif command == "eval":
        _check_tasks(resolved, config.eval.split, config.eval.limit, "eval.split")
        for spec in resolve_systems(resolved, config.eval.systems, names):
            if spec.kind == "untuned":
                check_model_dir(str(spec.path))
            elif spec.path is not None and not is_sb3_switcher_dir(spec.path):
                check_saved_switcher(spec.path, names, f"eval.systems: {spec.name}")
    elif command == "rl":
        _check_rl(resolved, names, algo)
    if command in PLANNED:
        check_fits(config, command, algo=algo or "grpo")
    return resolved


def _check_tasks(resolved: ResolvedRun, split: str, limit: int | None, field: str) -> None:
    """The split has instances and every task a scorer."""
    by_task = resolved.instances(split, limit)
    if not by_task:
        raise ConfigError(f"{field}: no {split!r} instances in the configured tasks")
    resolved.scorers(list(by_task))


def _check_rl(resolved: ResolvedRun, names: list[str], algo: str | None) -> None:
    """RL's start (``rl.init`` / ``rl.base``), split and tasks, precision, and per-rank devices."""
    config, rl = resolved.config, resolved.config.rl
    kind, start = resolved.rl_start(rl)
    if kind == "init":
        check_saved_switcher(start, names, "rl.init", trainable=True)
    else:
        check_model_dir(start)
    by_task = resolved.instances(rl.split, rl.limit)
    unknown = sorted(set(rl.tasks or ()) - set(by_task))
    if unknown:
        raise ConfigError(
            f"rl.tasks: unknown task(s) {unknown}; the {rl.split!r} split has {sorted(by_task)}"
        )
    if not by_task:
        raise ConfigError(f"rl.split: no {rl.split!r} instances in the configured tasks")
    if algo != "sb3-ppo":  # sb3 trains its own small policy on the CPU, no LM switcher
        training_settings(config.switcher.device, config.switcher.dtype)
        check_per_rank({"switcher.device": config.switcher.device}, RANK_SWITCHER_FIX)
    if config.executor.executor == "local":
        rank_candidates(resolved.candidates)
