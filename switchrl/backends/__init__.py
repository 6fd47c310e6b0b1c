"""Who writes a patch: the pool contract, the local candidate pool and its backends."""

from switchrl.backends.base import (
    CandidateBackend,
    CandidateEngine,
    CandidateSampling,
    EngineMember,
    Group,
    Patch,
    Pool,
    Trace,
)
from switchrl.backends.cached_lm import CachedLM
from switchrl.backends.pool import CandidatePool, build_backend

__all__ = [
    "CachedLM",
    "CandidateBackend",
    "CandidateEngine",
    "CandidatePool",
    "CandidateSampling",
    "EngineMember",
    "Group",
    "Patch",
    "Pool",
    "Trace",
    "build_backend",
]
