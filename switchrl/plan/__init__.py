"""``switchrl plan``: will a run config fit its devices? Known before a weight is loaded.

:func:`build_workload` reads each candidate's and the switcher's ``config.json`` (a local directory or
the hub cache, never the network), :func:`make_report` sizes ``simulate``, ``eval`` and ``rl`` per
device (rules in :mod:`switchrl.plan.estimate`), and :func:`check_fits` is the same check at the start
of those commands: it raises :class:`PlanError` naming the fix, or warns in one line and steps aside
when a ``config.json`` or a device's size cannot be known here.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from switchrl.config import SwitchGenerationConfig
from switchrl.errors import ConfigError
from switchrl.executors.base import ExecutorConfig
from switchrl.plan.devices import detect_capacity, normalize, placement
from switchrl.plan.estimate import COMMANDS, CommandPlan, Model, Workload, fix_for, plan_command
from switchrl.plan.models import ConfigUnavailable, model_shape
from switchrl.run_config import RunConfig

__all__ = ["PlanError", "Report", "build_workload", "check_fits", "make_report", "prompt_tokens"]

logger = logging.getLogger(__name__)
DEFAULT_PROMPT_TOKENS = 256
PROMPT_OVERHEAD = 64  # template, chat markup and special tokens around a query
BYTES_PER_TOKEN = 3  # a conservative guess for BPE tokenizers on English text (~4 on average)
TESTBED_TASKS = ("recall", "arithmetic", "compositional")
NOT_LM = ("singles", "random", "round_robin", "oracle")  # eval systems without an LM switcher


class PlanError(ConfigError):
    """A command's peak memory exceeds a device; the message names the device and the fix."""


def _dtype(dtype: str, device: str) -> str:
    """The dtype a model loads in: ``auto`` is bfloat16 on CUDA, float32 elsewhere (the loaders' rule)."""
    return dtype if dtype != "auto" else "bfloat16" if device.startswith("cuda") else "float32"


def _queries(config: RunConfig) -> list[str]:
    """The queries of the readable task files (jsonl sources; the testbed family's tasks)."""
    family = _family(config)
    if family is not None:
        return [i.query for t in TESTBED_TASKS for split in ("train", "test") for i in family.tasks(t, split)]
    out = []
    for src in config.tasks:
        path = Path(src.path or "")
        if src.source != "jsonl" or not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                out.append(str(json.loads(line).get("query", "")) if line.strip() else "")
            except (json.JSONDecodeError, AttributeError):
                continue
    return out


def prompt_tokens(config: RunConfig) -> tuple[int, str]:
    """An upper estimate of the prompt length from the longest query of the readable task files."""
    queries = _queries(config)
    if not queries:
        return DEFAULT_PROMPT_TOKENS, "a default: no task file readable here"
    longest = max(len(q.encode()) for q in queries)
    return math.ceil(longest / BYTES_PER_TOKEN) + PROMPT_OVERHEAD, f"longest query: {longest} bytes"


def _family(config: RunConfig):
    """The testbed family of a ``testbed:`` config (``None`` without one), if it is built."""
    if config.testbed is None:
        return None
    from switchrl.testbed.family import TestbedFamily, existing_root

    root = existing_root(config.testbed.seed, config.testbed.root)
    if root is None:
        raise ConfigUnavailable(f"the testbed family of seed {config.testbed.seed} is not built yet")
    return TestbedFamily.load(root)


def _adapter_base(directory: str | None) -> str | None:
    """The base model a saved LoRA switcher names (``adapter_config.json``), if it exists."""
    path = Path(directory or "") / "adapter_config.json"
    return json.loads(path.read_text()).get("base_model_name_or_path") if path.is_file() else None


def _switcher(base: str | None, device: str | None, dtype: str, hub_cache: str | None) -> Model | None:
    if base is None or device is None:
        return None
    return Model("switcher", model_shape(base, hub_cache), _dtype(dtype, device), device)


def build_workload(
    config: RunConfig,
    hub_cache: str | None = None,
    prompt: int | None = None,
    algo: str = "grpo",
    commands: tuple[str, ...] = COMMANDS,
) -> Workload:
    """The models of ``config`` with their shapes, devices and dtypes, and the knobs of each command
    (a switcher only where one of ``commands`` uses it).

    Raises :class:`~switchrl.plan.models.ConfigUnavailable` when a ``config.json`` cannot be read here.
    """
    family = _family(config)
    cands = family.candidate_configs() if family is not None else list(config.candidates)
    default_base = str(family.aligned) if family is not None else None
    generation = config.generation or (family.generation_config() if family else SwitchGenerationConfig())
    systems = config.eval.systems
    eval_lm = any(s not in NOT_LM for s in systems if s != "rl" or config.eval.rl_path)
    where = config.switcher.device
    devices, eval_device = placement([c.device for c in cands], config.executor, eval_lm, where)
    _, rl_device = placement([c.device for c in cands], config.executor, True, where)
    models = [
        Model(
            c.name,
            None if c.backend == "openai" else model_shape(c.path, hub_cache),
            _dtype(c.dtype, d),
            d,
            (getattr(c, "engine_kwargs", None) or {}).get("gpu_memory_utilization", 0.9)
            if c.backend == "vllm"
            else None,
        )
        for c, d in zip(cands, devices)
    ]
    sft_base = config.sft.base or _adapter_base(config.eval.sft_path or config.sft.out_dir) or default_base
    rl_base = config.rl.base or _adapter_base(config.rl.init) or sft_base
    return Workload(
        candidates=models,
        eval_switcher=_switcher(sft_base, eval_device, config.switcher.dtype, hub_cache)
        if "eval" in commands
        else None,
        rl_switcher=_switcher(rl_base, rl_device, config.switcher.dtype, hub_cache)
        if "rl" in commands
        else None,
        positions=(prompt or prompt_tokens(config)[0]) + generation.max_new_tokens,
        states_per_batch=config.simulate.states_per_batch,
        k=config.simulate.k,
        eval_batch=config.eval.batch_size,
        queries_per_step=config.rl.queries_per_step,
        num_generations=config.rl.num_generations,
        lora_r=config.rl.lora_r,
        algo=algo,
        ppo_minibatch=config.rl.ppo.minibatch_size,
    )


def _used(workload: Workload) -> list[str]:
    found = [m.device for m in workload.candidates if m.shape is not None]
    found += [s.device for s in (workload.eval_switcher, workload.rl_switcher) if s is not None]
    return sorted(set(found))


@dataclass
class Report:
    """The plan of each command against each device's capacity (``None``: unknown here)."""

    workload: Workload
    capacity: dict[str, int | None]
    plans: dict[str, CommandPlan] = field(default_factory=dict)
    fixes: dict[str, str] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return not self.fixes


def capacities(devices: list[str], given: dict[str, int] | None) -> dict[str, int | None]:
    """Each device's size: from ``given`` (``--devices``; a device it lacks is an error), else detected."""
    if given is None:
        return {d: detect_capacity(d) for d in devices}
    missing = [d for d in devices if d not in given]
    if missing:
        raise ConfigError(
            f"--devices: the run puts models on {', '.join(missing)}, which --devices does not list; "
            f"add it (e.g. {missing[0]}=80GiB) or change the config's devices"
        )
    return {d: given[d] for d in devices}


def make_report(
    workload: Workload, given: dict[str, int] | None = None, commands: tuple[str, ...] = COMMANDS
) -> Report:
    """Size ``commands`` on ``workload``; ``given`` devices (bytes) or the ones detected here."""
    capacity = capacities(_used(workload), {normalize(d): b for d, b in given.items()} if given else None)
    report = Report(workload, capacity)
    known = {d: b for d, b in capacity.items() if b is not None}
    for command in commands:
        plan = plan_command(command, workload, {d: known.get(d, 0) for d in capacity})
        report.plans[command] = plan
        if all(d in known for d in plan.items) and plan.over(known):
            report.fixes[command] = fix_for(plan, workload, known)
    return report


def check_fits(
    config: RunConfig, command: str, executor: ExecutorConfig | None = None, algo: str = "grpo"
) -> None:
    """The plan of ``command`` on this machine's devices, before anything loads: raises
    :class:`PlanError` naming the fix; warns in one line and returns when it cannot be known here.
    ``executor`` overrides the config's (e.g. the command line's ``--executor``); ``algo``: rl's."""
    if executor is not None:
        config = config.model_copy(update={"executor": executor})
    try:
        workload = build_workload(config, algo=algo, commands=(command,))
    except ConfigUnavailable as err:
        logger.warning("switchrl %s: memory plan skipped: %s", command, err)
        return
    if config.executor.executor == "ray" and config.executor.ray_address is not None:
        return  # the devices are the cluster's, not this machine's
    report = make_report(workload, commands=(command,))
    unknown = [d for d, b in report.capacity.items() if b is None]
    if unknown:
        logger.warning(
            "switchrl %s: memory plan skipped: %s not on this machine", command, ", ".join(unknown)
        )
    elif not report.fits:
        raise PlanError(f"{report.fixes[command]} (see `switchrl plan --config ...`)")
