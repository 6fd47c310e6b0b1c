"""Who writes a patch: the candidate pool and its backends."""

from switchrl.backends.base import CandidateBackend, CandidateSampling, Patch, Trace
from switchrl.backends.cached_lm import CachedLM
from switchrl.backends.pool import CandidatePool, build_backend

__all__ = [
    "CachedLM",
    "CandidateBackend",
    "CandidatePool",
    "Patch",
    "CandidateSampling",
    "Trace",
    "build_backend",
]
