"""Torch intra-op threads for small models."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous setting.

    The testbed's ~1M-parameter models gain little from a second thread, and on a shared CPU
    (another job, Ray actors) two threads per process thrash: measured 10x slower training steps.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
