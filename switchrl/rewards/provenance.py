"""What a scorer *is*, for resume fingerprints and failure messages: its name and a hash of its source.

A run's records depend on the scorer's code, not only on its name: fixing a scorer's bug must not
let a resumed run keep the scores of the old code. :func:`scorer_source_hash` hashes the file of the
module that defines the scorer (so a change to a helper it calls counts too), falling back to
``inspect.getsource`` and then to the qualified name; weighted scorers and ``functools.partial``
hash their parts, weights and bound arguments. :class:`FailureTally` counts scorer failures per
scorer and enforces a run's ``max_scorer_failure_rate``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from switchrl.errors import ScorerFailureError
from switchrl.utils.files import file_sha256

__all__ = ["FailureTally", "scorer_label", "scorer_source_hash"]


def scorer_label(scorer: Any) -> str:
    """A readable name: ``module:qualname`` of a function or class; a weighted reward lists its terms."""
    terms = getattr(scorer, "terms", None)
    if isinstance(terms, tuple) and terms and all(hasattr(t, "scorer") for t in terms):
        return " + ".join(f"{t.weight:g}*{t.name}" for t in terms)
    while isinstance(scorer, functools.partial):
        scorer = scorer.func
    target = scorer if inspect.isfunction(scorer) or inspect.isclass(scorer) else type(scorer)
    if inspect.ismethod(scorer):
        target = scorer.__func__
    module = getattr(target, "__module__", None) or "?"
    return f"{module}:{getattr(target, '__qualname__', type(scorer).__name__)}"


def _code_hash(obj: Any) -> str:
    """sha256 of the file of ``obj``'s module, else of its source, else of its qualified name."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    if path and (digest := file_sha256(path)) is not None:
        return digest
    try:
        return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
    except (OSError, TypeError):
        name = f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', repr(obj))}"
        return hashlib.sha256(name.encode()).hexdigest()


def _describe(scorer: Any) -> Any:
    terms = getattr(scorer, "terms", None)
    if isinstance(terms, tuple) and terms and all(hasattr(t, "scorer") for t in terms):
        return [{"name": t.name, "weight": t.weight, "scorer": _describe(t.scorer)} for t in terms]
    if isinstance(scorer, functools.partial):
        bound = {k: repr(v) for k, v in sorted(scorer.keywords.items())}
        return {"partial": _describe(scorer.func), "args": [repr(a) for a in scorer.args], "kwargs": bound}
    if inspect.ismethod(scorer):
        return {"method": _describe(scorer.__func__), "self": _describe(scorer.__self__)}
    target = scorer if inspect.isfunction(scorer) or inspect.isclass(scorer) else type(scorer)
    described: dict[str, Any] = {"name": scorer_label(target), "code": _code_hash(target)}
    if not (inspect.isfunction(scorer) or inspect.isclass(scorer)):
        state = getattr(scorer, "__dict__", None)
        if state:  # an instance: its attributes are part of what it computes
            try:
                text = json.dumps(state, sort_keys=True, default=lambda o: type(o).__qualname__)
            except (TypeError, ValueError):
                text = json.dumps(sorted(map(str, state)))
            described["state"] = hashlib.sha256(text.encode()).hexdigest()
    return described


def scorer_source_hash(scorer: Any) -> str:
    """A short hash that changes when the scorer's code (its module file), terms, weights or bound
    arguments change."""
    return hashlib.sha256(json.dumps(_describe(scorer), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FailureTally:
    """Samples scored and failed per scorer (by label), with the first error of each."""

    scored: Counter = field(default_factory=Counter)
    failed: Counter = field(default_factory=Counter)
    first_error: dict[str, str] = field(default_factory=dict)

    def add(self, scorer: str, scored: int, errors: list[str], failed: int | None = None) -> None:
        """``scored`` samples of ``scorer``, of which ``failed`` (default: ``len(errors)``) failed."""
        self.scored[scorer] += scored
        self.failed[scorer] += len(errors) if failed is None else failed
        if errors and scorer not in self.first_error:
            self.first_error[scorer] = errors[0]

    def check(self, max_rate: float, where: str) -> None:
        """Raise :class:`ScorerFailureError` naming the scorer and its first error if a scorer failed on
        more than ``max_rate`` of its samples (``max_rate`` 1.0: never)."""
        for name in sorted(self.scored):
            n, bad = self.scored[name], self.failed[name]
            if n and bad / n > max_rate:
                raise ScorerFailureError(
                    f"{where}: scorer {name} failed on {bad} of {n} samples ({bad / n:.0%}), above "
                    f"max_scorer_failure_rate={max_rate:g}; first error: "
                    f"{self.first_error.get(name, '?')}. Fix the scorer (and rerun with --overwrite), "
                    "or raise max_scorer_failure_rate (1.0 disables the check)"
                )
