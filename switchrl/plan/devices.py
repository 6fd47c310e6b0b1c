"""Where each model of a run sits, and how much memory each device has.

Placement follows what the commands do: locally, candidates go to their configured ``device`` and an
LM switcher to ``auto`` (``cuda`` = ``cuda:0`` when the run uses CUDA, else ``cpu``); on Ray each
replica gets its own devices, ``spread``: candidate i on ``cuda:i`` and the switcher after them,
``pack``: all on ``cuda:0``. Capacity comes from ``--devices`` (``cuda:0=80GiB,cuda:1=80GiB``), else
from ``torch.cuda.mem_get_info`` (free memory) or, for ``cpu``, the machine's available RAM.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from switchrl.errors import ConfigError
from switchrl.executors.base import ExecutorConfig

UNITS = {"": 2**30, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def normalize(device: str) -> str:
    """``cuda`` -> ``cuda:0``; ``auto`` -> ``cuda:0`` where CUDA is available, else ``cpu``."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return "cuda:0" if device == "cuda" else device


def parse_size(text: str, where: str) -> int:
    """Bytes from ``80GiB``, ``141GB``, ``512MiB`` or a bare number of GiB."""
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in UNITS:
        raise ConfigError(f"{where}: cannot read size {text!r}; write e.g. 80GiB, 141GB or 512MiB")
    return int(float(match.group(1)) * UNITS[unit])


def parse_devices(spec: str) -> dict[str, int]:
    """``"cuda:0=80GiB,cuda:1=80GiB"`` -> {device: bytes}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, size = part.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--devices: expected DEVICE=SIZE (e.g. cuda:0=80GiB), got {part!r}")
        out[normalize(name.strip())] = parse_size(size, f"--devices {name.strip()}")
    if not out:
        raise ConfigError("--devices: name at least one device, e.g. cuda:0=80GiB")
    return out


def available_ram() -> int | None:
    """``MemAvailable`` of /proc/meminfo, else the physical RAM; ``None`` when neither can be read."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def detect_capacity(device: str) -> int | None:
    """Free bytes on ``device`` here; ``None`` when this machine does not have it."""
    if device == "cpu":
        return available_ram()
    if device.startswith("cuda:") and torch.cuda.is_available():
        index = int(device.split(":")[1])
        if index < torch.cuda.device_count():
            return torch.cuda.mem_get_info(index)[0]
    return None


def placement(
    candidate_devices: Sequence[str],
    executor: ExecutorConfig,
    with_switcher: bool,
    switcher_device: str = "auto",
) -> tuple[list[str], str | None]:
    """The device of each candidate and of the switcher (``None`` without one) in one replica; locally the
    switcher is on ``switcher_device`` (``switcher.device``; ``auto`` / ``cuda``: the first GPU when the
    candidates use GPUs or this machine has one)."""
    devices = [normalize(d) for d in candidate_devices]
    uses_cuda = any(d.startswith("cuda") for d in devices)
    if executor.executor == "ray" and uses_cuda and executor.gpus_per_candidate > 0:
        if executor.placement == "pack":
            devices = ["cuda:0"] * len(devices)
            return devices, "cuda:0" if with_switcher else None
        step = max(1, int(executor.gpus_per_candidate))
        devices = [f"cuda:{i * step}" for i in range(len(devices))]
        return devices, f"cuda:{len(devices) * step}" if with_switcher else None
    if not with_switcher:
        return devices, None
    if switcher_device not in ("auto", "cuda"):
        return devices, normalize(switcher_device)
    return devices, "cuda:0" if uses_cuda or torch.cuda.is_available() or switcher_device == "cuda" else "cpu"
