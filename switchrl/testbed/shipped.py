"""The canonical testbed families that ship inside the package (world seeds 0 and 1).

Float kernels differ between CPUs (AVX2, AVX-512, ...), so ~1,400 optimiser steps of the same
recipe end in different places on different machines, and a family built locally would not give
the README's tables. The families of the README's and the tests' seeds therefore ship as package
data (safetensors, tokenizer, ``testbed.json`` with the build's provenance and ``check.json`` with
its ``testbed check`` numbers); :func:`~switchrl.testbed.family.build_family` uses them when
nothing is built locally, and a rebuild of a shipped seed is compared against them.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

SHIPPED_DIR = Path(__file__).parent / "families"
CHECK_FILE = "check.json"


def shipped_root(seed: int) -> Path | None:
    """The shipped family of world ``seed``, or ``None`` when the package has none for it."""
    root = SHIPPED_DIR / str(seed)
    return root if (root / "testbed.json").is_file() else None


def shipped_seeds() -> list[int]:
    """The world seeds that have a shipped family."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(
        int(p.name) for p in SHIPPED_DIR.iterdir() if p.name.isdigit() and shipped_root(int(p.name))
    )


def shipped_check(seed: int) -> dict | None:
    """The ``testbed check`` metrics recorded for the shipped family of ``seed`` (if any)."""
    root = shipped_root(seed)
    if root is None or not (root / CHECK_FILE).is_file():
        return None
    return json.loads((root / CHECK_FILE).read_text())


def max_weight_difference(a: Path, b: Path, stages: tuple[str, ...]) -> dict[str, float]:
    """Per stage, the largest absolute difference between two families' weights (``inf`` when the
    tensors do not even have the same names or shapes)."""
    out: dict[str, float] = {}
    for stage in stages:
        wa = load_file(str(a / stage / "model.safetensors"))
        wb = load_file(str(b / stage / "model.safetensors"))
        if wa.keys() != wb.keys() or any(wa[k].shape != wb[k].shape for k in wa):
            out[stage] = float("inf")
            continue
        out[stage] = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa) if wa else 0.0
    return out
