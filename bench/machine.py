"""What a benchmark ran on: written into every benchmark's JSON."""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    versions = {}
    for package in ("torch", "onnxruntime", "faiss-cpu", "confluent-kafka", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cores": os.cpu_count(),
        # 1, 5 and 15 minutes, when the JSON was written: on a shared machine, how busy it was
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu": cpu_model(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
    }


def machine_line(machine: dict[str, Any]) -> str:
    """The machine a figure was measured on (`machine_info()`'s record), for plot titles."""
    return (f"{machine['cpu']}, {machine['cores']} cores, {machine['gpu'] or 'no GPU'}, "
            f"{machine['date_utc'][:16].replace('T', ' ')} UTC")
