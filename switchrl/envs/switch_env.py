"""``SwitchEnv``: Switch Generation as a Gymnasium environment, one patch per step.

The action picks the candidate that writes the next patch of the response; the episode ends when a
candidate stops (``terminated``) or the token budget is spent (``truncated``). The reward is the
task scorer on the final response, minus a cost per switch of author, plus optional shaping.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from pydantic import Field, model_validator

from switchrl.backends.base import Patch, Pool, Trace
from switchrl.backends.pool import CandidatePool
from switchrl.config import CandidateConfig, StrictModel, SwitchGenerationConfig, load_yaml, parse
from switchrl.errors import ConfigError
from switchrl.rewards.base import Scorer, safe_score
from switchrl.tasks.base import TaskInstance

REPLACEMENT_CHAR = "\ufffd"


def _chars(*ranges: tuple[int, int]) -> str:
    return "".join(chr(c) for lo, hi in ranges for c in range(lo, hi + 1))


#: Printable ASCII and whitespace, Latin-1, Latin Extended-A, Greek, general punctuation, currency
#: signs, arrows, mathematical operators, and the replacement character used for anything else.
DEFAULT_CHARSET = "".join(
    dict.fromkeys(
        "\t\n\r"
        + _chars(
            (0x20, 0x7E),
            (0xA0, 0x17F),
            (0x370, 0x3FF),
            (0x2000, 0x206F),
            (0x20A0, 0x20BF),
            (0x2190, 0x21FF),
            (0x2200, 0x22FF),
        )
        + REPLACEMENT_CHAR
    )
)

ShapingFn = Callable[[Trace, Patch], float]


class SwitchEnvConfig(StrictModel):
    """Everything a :class:`SwitchEnv` needs; loadable from YAML (callables only from Python)."""

    candidates: list[CandidateConfig] = Field(
        default_factory=list, description="the checkpoints; may be empty when a prebuilt pool is passed"
    )
    generation: SwitchGenerationConfig = Field(default_factory=SwitchGenerationConfig)
    reward: Any = Field(
        description="scorer: a callable, a registered name, 'module:function', or a weighted list"
    )
    switch_cost: float = Field(0.0, ge=0, allow_inf_nan=False, description="subtracted per change of author")
    shaping: Callable[[Trace, Patch], float] | None = Field(
        None, description="per-step bonus shaping(trace, new_patch) added to the reward"
    )
    tasks: list[TaskInstance] = Field(
        default_factory=list, description="task source; reset(options={'instance': ...}) overrides it"
    )
    max_query_length: int = Field(4096, gt=0, description="characters of the query in the observation")
    max_text_length: int | None = Field(
        None, gt=0, description="characters of the trace in the observation (default: 16 per budget token)"
    )
    charset: str | None = Field(
        None, min_length=1, description="observation alphabet (default: DEFAULT_CHARSET)"
    )
    replacement_char: str = Field(REPLACEMENT_CHAR, min_length=1, max_length=1)
    info_timings: bool = Field(
        False,
        description="put wall-clock timings in info (off by default: they differ between otherwise "
        "identical runs, which gymnasium's determinism check rejects)",
    )

    @model_validator(mode="after")
    def _replacement_in_charset(self) -> SwitchEnvConfig:
        if self.replacement_char not in (self.charset or DEFAULT_CHARSET):
            raise ValueError(f"replacement_char {self.replacement_char!r} must be in the charset")
        return self

    @property
    def text_length(self) -> int:
        return self.max_text_length or 16 * self.generation.max_new_tokens


def coerce_config(config: SwitchEnvConfig | Mapping[str, Any] | str | Path) -> SwitchEnvConfig:
    """A :class:`SwitchEnvConfig` from itself, a mapping, or a YAML file path."""
    if isinstance(config, SwitchEnvConfig):
        return config
    if isinstance(config, (str, Path)):
        return load_yaml(config, SwitchEnvConfig)
    if isinstance(config, Mapping):
        return parse(SwitchEnvConfig, dict(config), "SwitchEnvConfig")
    raise ConfigError(
        f"config: expected a SwitchEnvConfig, a mapping or a YAML path, got {type(config).__name__}"
    )


def resolve_reward_spec(spec: Any) -> Scorer:
    """The scorer of ``config.reward``; names and ``module:function`` strings need the reward registry."""
    try:
        from switchrl.rewards.registry import resolve_reward
    except ImportError:
        if callable(spec) and not isinstance(spec, str):
            return spec
        raise ConfigError(
            f"reward: {spec!r} needs switchrl.rewards.registry; pass a callable instead"
        ) from None
    return resolve_reward(spec)


def as_instance(value: TaskInstance | Mapping[str, Any], default_id: str) -> TaskInstance:
    """A :class:`TaskInstance` from itself or a ``{"query", "reference", ...}`` mapping."""
    if isinstance(value, TaskInstance):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"id", "query", "reference", "task", "meta"}
        if unknown or "query" not in value:
            raise ValueError(
                f"options['instance']: expected keys query, reference (optional: id, task, meta); "
                f"got {sorted(value)}"
            )
        data = {"id": default_id, "reference": "", **value}
        return TaskInstance(**data)
    raise TypeError(f"options['instance']: expected a TaskInstance or a mapping, got {type(value).__name__}")


class ObservationLayout:
    """The observation space of a switch env and the function that fills it from a trace.

    ``query`` and ``trace`` are :class:`~gymnasium.spaces.Text` (characters outside the charset become
    the replacement character; longer text keeps its tail), ``authors`` the author of each patch
    (the last ``max_patches``, padded with -1), ``num_patches`` and ``budget_used`` (fraction of the
    token budget spent).
    """

    def __init__(
        self,
        n_candidates: int,
        max_patches: int,
        max_query_length: int,
        max_text_length: int,
        charset: str,
        replacement_char: str,
    ):
        self.max_patches = max_patches
        self.charset = frozenset(charset)
        self.replacement_char = replacement_char
        self.space = spaces.Dict(
            {
                "query": spaces.Text(max_length=max_query_length, min_length=1, charset=charset),
                "trace": spaces.Text(max_length=max_text_length, min_length=0, charset=charset),
                "authors": spaces.Box(-1, n_candidates - 1, (max_patches,), np.int64),
                "num_patches": spaces.Discrete(max_patches + 1),
                "budget_used": spaces.Box(0.0, 1.0, (1,), np.float32),
            }
        )

    @classmethod
    def from_config(cls, config: SwitchEnvConfig, n_candidates: int) -> ObservationLayout:
        gen = config.generation
        return cls(
            n_candidates,
            math.ceil(gen.max_new_tokens / gen.patch_tokens),
            config.max_query_length,
            config.text_length,
            config.charset or DEFAULT_CHARSET,
            config.replacement_char,
        )

    def clean(self, text: str, max_length: int) -> str:
        """``text`` in the charset, cut to its last ``max_length`` characters."""
        text = text[-max_length:] if len(text) > max_length else text
        return "".join(c if c in self.charset else self.replacement_char for c in text)

    def observe(self, trace: Trace) -> dict[str, Any]:
        authors = np.full(self.max_patches, -1, dtype=np.int64)
        tail = trace.authors[-self.max_patches :]
        authors[: len(tail)] = tail
        return {
            "query": self.clean(trace.query, self.space["query"].max_length) or self.replacement_char,
            "trace": self.clean(trace.text, self.space["trace"].max_length),
            "authors": authors,
            "num_patches": np.int64(min(len(trace.patches), self.max_patches)),
            "budget_used": np.array([min(1.0, trace.num_tokens / trace.max_new_tokens)], dtype=np.float32),
        }


_LIVE_KEYS: weakref.WeakKeyDictionary[Any, weakref.WeakValueDictionary[str, Any]] = (
    weakref.WeakKeyDictionary()
)
_LIVE_BY_ID: dict[int, weakref.WeakValueDictionary[str, Any]] = {}


def _live_keys(pool: Pool) -> weakref.WeakValueDictionary[str, Any]:
    """Trace key -> the env on ``pool`` that holds it (reset, not yet released, not garbage)."""
    try:
        return _LIVE_KEYS.setdefault(pool, weakref.WeakValueDictionary())
    except TypeError:  # a pool that cannot be weakly referenced or hashed: key it by identity
        return _LIVE_BY_ID.setdefault(id(pool), weakref.WeakValueDictionary())


def _claim_key(pool: Pool, key: str, env: Any) -> str:
    """``key``, or ``key/1``, ``key/2``, ... if another live env on ``pool`` holds it (two envs reset with
    the same seed): keys stay unique among the pool's live traces, and the same resets give the same keys."""
    live = _live_keys(pool)
    claimed, n = key, 0
    while live.get(claimed) is not None:
        n += 1
        claimed = f"{key}/{n}"
    live[claimed] = env
    return claimed


class SwitchEnv(gym.Env[dict, np.int64]):
    """One switched response per episode; each step one candidate writes one patch.

    Args:
        config: a :class:`SwitchEnvConfig`, a mapping, or a YAML path.
        pool: a prebuilt :class:`~switchrl.backends.base.Pool` (e.g. shared by several envs); built from
            ``config.candidates`` otherwise.

    ``reset(seed=..., options={"instance": TaskInstance | {"query": ..., "reference": ...}})`` starts an
    episode; without an instance one is drawn from ``config.tasks`` with ``np_random``. The trace key
    (which seeds the candidates' sampling) is drawn from ``np_random`` too, so the same seed gives the
    same episode. Envs sharing a pool never share a live key: if another env on the pool holds the
    drawn key (same seed), this one takes ``<key>/1`` (``/2``, ...), in the order the envs reset.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: SwitchEnvConfig | Mapping[str, Any] | str | Path, pool: Pool | None = None):
        self.config = coerce_config(config)
        gen = self.config.generation
        if pool is None:
            if not self.config.candidates:
                raise ConfigError("candidates: give at least one candidate, or pass a prebuilt pool=")
            pool = CandidatePool.from_configs(
                self.config.candidates, patch_tokens=gen.patch_tokens, seed=gen.seed, truncate=gen.truncate
            )
        else:
            names = [c.name for c in self.config.candidates]
            if names and names != pool.names:
                raise ConfigError(f"candidates: names {names} do not match the given pool's {pool.names}")
            if pool.patch_tokens != gen.patch_tokens:
                raise ConfigError(
                    f"generation.patch_tokens={gen.patch_tokens} differs from the pool's "
                    f"patch_tokens={pool.patch_tokens}"
                )
        self.pool = pool
        self.scorer = resolve_reward_spec(self.config.reward)
        self.layout = ObservationLayout.from_config(self.config, len(pool))
        self.observation_space = self.layout.space
        self.action_space = spaces.Discrete(len(pool))
        self.instance: TaskInstance | None = None
        self.trace: Trace | None = None
        self._over = False
        self._episode = 0
        self._key: str | None = None  # the trace key this env holds in the pool (until released)

    # ------------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        super().reset(seed=seed)
        self._release()
        options = options or {}
        unknown = set(options) - {"instance"}
        if unknown:
            raise ValueError(f"reset options: unknown key(s) {sorted(unknown)}; expected 'instance'")
        if options.get("instance") is not None:
            instance = as_instance(options["instance"], default_id=f"ep{self._episode}")
        elif self.config.tasks:
            instance = self.config.tasks[int(self.np_random.integers(len(self.config.tasks)))]
        else:
            raise ValueError("no task source: set config.tasks or pass reset(options={'instance': ...})")
        key = _claim_key(self.pool, f"{instance.id}/{int(self.np_random.integers(2**63)):016x}", self)
        self._key = key
        self.instance = instance
        self.trace = Trace(
            key=key,
            query=instance.query,
            max_new_tokens=self.config.generation.max_new_tokens,
            meta={"instance_id": instance.id, "task": instance.task},
        )
        self._over = False
        self._episode += 1
        return self.layout.observe(self.trace), self._base_info()

    def step(self, action: Any) -> tuple[dict, float, bool, bool, dict]:
        a = self.check_action(action)
        start = time.perf_counter()
        (patch,) = self.pool.step([self.trace], [a])
        return self.complete_step(a, patch, time.perf_counter() - start)

    def close(self) -> None:
        self._release()
        super().close()

    # ------------------------------------------------------------------ shared with SwitchVectorEnv
    def check_action(self, action: Any) -> int:
        """The action as an int; a clear error if it is outside the space or the episode is over."""
        if self.trace is None:
            raise RuntimeError("call reset() before step()")
        if self._over:
            raise RuntimeError("the episode is over; call reset()")
        try:
            a = int(action)
            valid = a == action and self.action_space.contains(np.int64(a))
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise ValueError(
                f"action {action!r} is outside the action space Discrete({self.action_space.n}): "
                f"expected an int in 0..{self.action_space.n - 1} ({self.pool.names})"
            )
        return a

    def complete_step(
        self, action: int, patch: Patch, seconds: float
    ) -> tuple[dict, float, bool, bool, dict]:
        """Observation, reward, flags and info after ``patch`` (by ``action``) was appended to the trace."""
        trace, instance = self.trace, self.instance
        prev = trace.patches[-2].author if len(trace.patches) > 1 else None
        switched = prev is not None and prev != action
        reward = -self.config.switch_cost if switched else 0.0
        if self.config.shaping is not None:
            reward += float(self.config.shaping(trace, patch))
        terminated = trace.stop_reason in ("eos", "stop")
        truncated = not terminated and (trace.done or len(trace.patches) >= self.layout.max_patches)
        info = self._base_info()
        info.update(
            patch_text=patch.text,
            author=action,
            author_name=self.pool.names[action],
            patch_tokens=len(patch.token_ids),
            switched=switched,
            stop_reason=trace.stop_reason,
        )
        if self.config.info_timings:
            info.update(seconds=seconds, patch_seconds=patch.seconds)
        if terminated or truncated:
            self._over = True
            result = safe_score(self.scorer, instance.query, trace.text, instance.reference, **instance.meta)
            reward += result.value
            info.update(score=result.value, response=trace.text)
            if result.failed:
                info["score_error"] = result.error
            self._release()
        return self.layout.observe(trace), float(reward), terminated, truncated, info

    # ------------------------------------------------------------------ helpers
    def _base_info(self) -> dict[str, Any]:
        t = self.trace
        return {
            "instance_id": self.instance.id,
            "trace_key": t.key,
            "query": t.query,
            "text": t.text,
            "num_tokens": t.num_tokens,
            "num_patches": len(t.patches),
            "num_switches": t.num_switches,
        }

    def _release(self) -> None:
        """Free the pool's per-trace state of the current episode (its KV caches), once."""
        key, self._key = self._key, None
        if key is not None:
            self.pool.release([key])
            live = _live_keys(self.pool)
            if live.get(key) is self:
                del live[key]
