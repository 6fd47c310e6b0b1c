"""Find scorers by name and combine them with weights.

A scorer *spec* is one of:

* a Python callable with the :class:`~switchrl.rewards.base.Scorer` signature;
* a built-in or registered name: ``"exact_match"``, ``"numeric"``, ``"multiple_choice"``,
  ``"token_f1"``, ``"rouge_l"``, or any name given to :func:`register_scorer`;
* ``"package.module:function"`` (``"module:Class.attr"`` works too); the module must be importable,
  the current directory is tried as well. A class is instantiated with no arguments;
* the name of an entry point in the group ``switchrl.rewards``, which a package declares with::

      [project.entry-points."switchrl.rewards"]
      my_reward = "my_pkg.rewards:my_reward"

A *reward* spec is a scorer spec or a weighted list of them (:func:`resolve_reward`); in YAML
configs it is a :class:`RewardConfig`: ``reward: numeric`` or
``reward: [{scorer: numeric, weight: 1.0}, {scorer: "my_pkg.mod:brevity", weight: 0.2}]``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import os
import re
import reprlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from pydantic import Field, field_validator, model_validator

from switchrl.config import StrictModel
from switchrl.errors import ConfigError
from switchrl.rewards import builtin
from switchrl.rewards.base import Scorer

__all__ = [
    "ENTRY_POINT_GROUP",
    "check_scorer_spec",
    "RewardConfig",
    "RewardTermConfig",
    "WeightedScorer",
    "RewardTerm",
    "list_scorers",
    "register_scorer",
    "resolve_reward",
    "resolve_scorer",
    "scorer_name",
]

ENTRY_POINT_GROUP = "switchrl.rewards"

_BUILTINS: dict[str, Scorer] = {
    f.__name__: f
    for f in (
        builtin.exact_match,
        builtin.numeric,
        builtin.multiple_choice,
        builtin.token_f1,
        builtin.rouge_l,
    )
}
_REGISTRY: dict[str, Scorer] = dict(_BUILTINS)


def register_scorer(name: str, *, overwrite: bool = False) -> Callable[[Scorer], Scorer]:
    """Decorator registering a scorer under ``name`` for this process::

        @register_scorer("brevity")
        def brevity(query, response, reference, **meta): ...

    Re-using a taken name (built-ins included) raises ``ValueError`` unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not name.strip() or ":" in name:
        raise ValueError(f"scorer name must be a non-empty string without ':', got {name!r}")

    def decorator(scorer: Scorer) -> Scorer:
        if not callable(scorer):
            raise TypeError(f"register_scorer({name!r}): expected a callable, got {type(scorer).__name__}")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"scorer name {name!r} is already registered; pass overwrite=True to replace it")
        _REGISTRY[name] = scorer
        return scorer

    return decorator


def _entry_points() -> dict[str, metadata.EntryPoint]:
    eps: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        eps.setdefault(ep.name, ep)
    return eps


def list_scorers() -> list[str]:
    """Every name :func:`resolve_scorer` accepts: built-ins, registered names and entry points."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def scorer_name(scorer: Any) -> str:
    """A readable name for logs: the function's or class's name (through ``functools.partial``)."""
    while isinstance(scorer, functools.partial):
        scorer = scorer.func
    return getattr(scorer, "__name__", None) or type(scorer).__name__


def _checked(obj: Any, spec: str) -> Scorer:
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as err:  # noqa: BLE001 - report any constructor failure against the spec
            raise ConfigError(f"reward {spec!r}: cannot instantiate class without arguments: {err}") from err
    if not callable(obj):
        raise ConfigError(
            f"reward {spec!r}: {reprlib.repr(obj)} is not callable (got {type(obj).__name__}); a scorer "
            "is a function (query, response, reference, **meta) -> float"
        )
    return obj


def _local_module(top: str) -> bool:
    """Console scripts do not put the working directory on ``sys.path``; add it if ``top`` lives there."""
    cwd = os.getcwd()
    if cwd in sys.path or "" in sys.path:
        return False
    if os.path.isdir(os.path.join(cwd, top)) or os.path.isfile(os.path.join(cwd, top + ".py")):
        sys.path.append(cwd)
        return True
    return False


def _import_module(module: str, spec: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module.split(".")[0] and _local_module(err.name):
            return _import_module(module, spec)
        raise ConfigError(f"reward {spec!r}: cannot import module {module!r}: {err}") from err
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing
        raise ConfigError(
            f"reward {spec!r}: importing module {module!r} failed: {type(err).__name__}: {err}"
        ) from err


def _from_path(spec: str) -> Scorer:
    module, _, attr = spec.partition(":")
    if not module.strip() or not attr.strip():
        raise ConfigError(f"reward {spec!r}: expected 'package.module:function'")
    obj = _import_module(module.strip(), spec)
    for part in attr.strip().split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward {spec!r}: module {module.strip()!r} has no attribute {attr.strip()!r}")
        obj = getattr(obj, part)
    return _checked(obj, spec)


_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def check_scorer_spec(spec: str) -> None:
    """Check ``spec`` without importing anything: a known name (built-in, registered, entry point) or
    a well-formed ``package.module:function``. The module is imported later, when a run needs it."""
    spec = spec.strip()
    if ":" in spec:
        module, _, attr = spec.partition(":")
        if not _DOTTED.match(module.strip()) or not _DOTTED.match(attr.strip()):
            raise ConfigError(
                f"reward {spec!r}: expected 'package.module:function' (dotted Python names), e.g. "
                "'my_pkg.rewards:brevity'"
            )
        return
    if spec not in _REGISTRY and spec not in _entry_points():
        raise ConfigError(
            f"reward {spec!r}: unknown scorer; known names: {', '.join(list_scorers())}. Give a Python "
            f"function as 'package.module:function' or declare an entry point in group {ENTRY_POINT_GROUP!r}"
        )


def resolve_scorer(spec: str | Scorer) -> Scorer:
    """The scorer named by ``spec`` (see the module docstring); raises ``ConfigError`` naming the problem."""
    if callable(spec):
        return _checked(spec, scorer_name(spec)) if inspect.isclass(spec) else spec
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"reward: expected a scorer name, 'module:function' or a callable, got {spec!r}")
    spec = spec.strip()
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        return _from_path(spec)
    ep = _entry_points().get(spec)
    if ep is not None:
        try:
            obj = ep.load()
        except Exception as err:  # noqa: BLE001 - a broken third-party entry point
            raise ConfigError(
                f"reward {spec!r}: entry point {ep.value!r} in group {ENTRY_POINT_GROUP!r} "
                f"failed to load: {type(err).__name__}: {err}"
            ) from err
        return _checked(obj, spec)
    raise ConfigError(
        f"reward {spec!r}: unknown scorer; known names: {', '.join(list_scorers())}. Give a Python "
        f"function as 'package.module:function' or declare an entry point in group {ENTRY_POINT_GROUP!r}"
    )


@dataclass(frozen=True)
class RewardTerm:
    """One scorer of a weighted reward."""

    name: str
    scorer: Scorer
    weight: float


@dataclass(frozen=True)
class WeightedScorer:
    """``sum(weight_i * scorer_i(query, response, reference, **meta))``; itself a :class:`Scorer`.

    If any term raises, the whole call raises, so :func:`~switchrl.rewards.base.safe_score` records
    the sample as one failure.
    """

    terms: tuple[RewardTerm, ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("WeightedScorer needs at least one term")
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names):
            raise ValueError(f"WeightedScorer term names must be unique, got {names}")
        for t in self.terms:
            if not callable(t.scorer):
                raise TypeError(f"term {t.name!r}: scorer is not callable")
            if not math.isfinite(t.weight):
                raise ValueError(f"term {t.name!r}: weight must be finite, got {t.weight}")

    def components(self, query: str, response: str, reference: str, **meta: Any) -> dict[str, float]:
        """The unweighted score of every term, by term name (for logging)."""
        return {t.name: float(t.scorer(query, response, reference, **meta)) for t in self.terms}

    def __call__(self, query: str, response: str, reference: str, **meta: Any) -> float:
        parts = self.components(query, response, reference, **meta)
        return sum(t.weight * parts[t.name] for t in self.terms)


class RewardTermConfig(StrictModel):
    """One weighted scorer in a config; ``kwargs`` are bound to the scorer (task meta overrides them)."""

    scorer: str = Field(min_length=1, description="built-in name, 'module:function' or entry point name")
    weight: float = Field(1.0, allow_inf_nan=False)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("scorer")
    @classmethod
    def _well_formed(cls, v: str) -> str:
        check_scorer_spec(v)
        return v


class RewardConfig(StrictModel):
    """The reward of a run. Accepts a single spec (``"numeric"``), one ``{scorer, weight, kwargs}``
    item, a list of specs or such items, or ``{"scorers": ...}``. ``build()`` gives the :class:`Scorer`.

    Validating checks each spec's form only (a known name, or ``module:function`` syntax) and imports
    nothing; ``build()`` imports the modules named, so a config is trusted like code.
    """

    scorers: list[RewardTermConfig] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, (str, list)) or isinstance(data, Mapping) and "scorer" in data:
            data = {"scorers": data if isinstance(data, (str, list)) else [data]}
        if isinstance(data, Mapping) and "scorers" in data:
            items = data["scorers"]
            items = [items] if isinstance(items, str) else items
            if isinstance(items, list):
                items = [{"scorer": x} if isinstance(x, str) else x for x in items]
            data = {**data, "scorers": items}
        return data

    def build(self) -> Scorer:
        """The reward function (see :func:`resolve_reward`)."""
        return resolve_reward(self)


def _parse_item(item: Any, index: int) -> tuple[str | Scorer, float, dict[str, Any]]:
    where = f"reward[{index}]"
    if isinstance(item, RewardTermConfig):
        return item.scorer, item.weight, item.kwargs
    if isinstance(item, str) or callable(item):
        return item, 1.0, {}
    if isinstance(item, Mapping):
        unknown = set(item) - {"scorer", "weight", "kwargs"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; expected scorer, weight, kwargs")
        if "scorer" not in item:
            raise ConfigError(f"{where}: missing key 'scorer'")
        spec, weight, kwargs = item["scorer"], item.get("weight", 1.0), item.get("kwargs", {})
    elif isinstance(item, Sequence) and len(item) == 2:
        (spec, weight), kwargs = item, {}
    else:
        raise ConfigError(
            f"{where}: expected a spec, (spec, weight) or {{scorer, weight, kwargs}}, got {item!r}"
        )
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise ConfigError(f"{where}.weight: expected a finite number, got {weight!r}")
    if not isinstance(kwargs, Mapping):
        raise ConfigError(f"{where}.kwargs: expected a mapping, got {type(kwargs).__name__}")
    return spec, float(weight), dict(kwargs)


def _is_pair(spec: Any) -> bool:
    return (
        isinstance(spec, tuple)
        and len(spec) == 2
        and isinstance(spec[1], (int, float))
        and not isinstance(spec[1], bool)
    )


def resolve_reward(spec: Any) -> Scorer:
    """The reward function of ``spec``: a scorer spec, a :class:`RewardConfig`, one ``(spec, weight)``
    pair, or a list of specs / ``(spec, weight)`` pairs / ``{"scorer", "weight", "kwargs"}`` dicts.

    A single term with weight 1 and no kwargs returns the scorer itself; anything else a
    :class:`WeightedScorer` whose term names are the spec strings (or function names), made unique.
    """
    if isinstance(spec, RewardConfig):
        items: list[Any] = list(spec.scorers)
    elif isinstance(spec, str) or callable(spec):
        return resolve_scorer(spec)
    elif _is_pair(spec):
        items = [spec]
    elif isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        raise ConfigError(f"reward: expected a scorer spec or a list of weighted scorers, got {spec!r}")
    if not items:
        raise ConfigError("reward: the list of scorers is empty")
    parsed = [_parse_item(item, i) for i, item in enumerate(items)]
    if len(parsed) == 1 and parsed[0][1] == 1.0 and not parsed[0][2]:
        return resolve_scorer(parsed[0][0])
    terms: list[RewardTerm] = []
    for i, (sub, weight, kwargs) in enumerate(parsed):
        scorer = resolve_scorer(sub)
        name = sub.strip() if isinstance(sub, str) else scorer_name(scorer)
        if any(t.name == name for t in terms):
            name = f"{name}#{i}"
        terms.append(RewardTerm(name, functools.partial(scorer, **kwargs) if kwargs else scorer, weight))
    return WeightedScorer(tuple(terms))
