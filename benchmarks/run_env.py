"""Where a benchmark or study ran: the machine and the fastdp commit, recorded with every result."""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> dict:
    """Platform, CPU model and count, torch threads, Python, and the CUDA device if any."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def commit() -> Optional[str]:
    """HEAD, with "+dirty" if fastdp/ or kernels/ differ from it (None outside a git checkout)."""
    with contextlib.suppress(Exception):
        git = ["git", "--no-optional-locks", "-C", ROOT]  # read-only: never takes the index lock
        out = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "fastdp", "kernels"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    return None
