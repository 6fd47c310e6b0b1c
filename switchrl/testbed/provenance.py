"""What a testbed build (or check) depends on: library versions, the CPU and its vector ISA, threads.

The family is deterministic per machine but not across CPUs: float kernels differ between ISAs
(AVX2 vs AVX-512), so the same seed and recipe give different weights on an AMD EPYC and on an
Intel Xeon. ``testbed.json`` records this block so that a table can say where its numbers came from.
"""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path

import torch

LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")
ISA_FLAGS = (
    "sse4_2",
    "fma",
    "avx",
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, list[str]]:
    """(model name, the ISA flags of :data:`ISA_FLAGS` it has) from /proc/cpuinfo; platform's as fallback."""
    model, flags = "", set()
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), [f for f in ISA_FLAGS if f in flags]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def provenance() -> dict:
    """This process's machine and software: versions, CPU model and ISA flags, torch threads, load."""
    cpu_model, flags = _cpuinfo()
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    return {
        "versions": {name: _version(name) for name in LIBRARIES} | {"python": platform.python_version()},
        "cpu": {
            "model": cpu_model,
            "machine": platform.machine(),
            "logical_cpus": os.cpu_count(),
            "isa_flags": flags,
            "torch_cpu_capability": capability,
        },
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def format_provenance(prov: dict, label: str = "built") -> list[str]:
    """A few lines describing ``prov`` (an empty list for families built before provenance was kept)."""
    if not prov:
        return [f"{label}: no provenance recorded (family built before switchrl recorded it)"]
    v, cpu = prov.get("versions", {}), prov.get("cpu", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "trl", "peft") if v.get(k))
    lines = [
        f"{label}: {prov.get('date', '?')}, {cpu.get('model', '?')} ({cpu.get('logical_cpus', '?')} CPUs, "
        f"torch kernels {cpu.get('torch_cpu_capability', '?')}, {prov.get('torch_threads', '?')} torch"
        f" thread(s), load {prov.get('load_average_1min', '?')})",
        f"  ISA: {' '.join(cpu.get('isa_flags', [])) or '?'}",
        f"  {libs}, python {v.get('python', '?')}",
    ]
    return lines


def format_pretraining(info: dict) -> list[str]:
    """One line on the pretraining stopping rule: steps taken and fact-patch recall at each check."""
    if not info:
        return []
    recall = " -> ".join(f"{r:.1f}" for r in info.get("fact_patch_recall", []))
    return [f"  pretraining: {info.get('steps')} steps, fact-patch recall {recall}"]
