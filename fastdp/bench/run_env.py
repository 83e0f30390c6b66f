"""Where a benchmark or study ran (the machine and the fastdp commit, recorded with every result), and how its
result files are written: whole or not at all (``fastdp.atomic.atomic_write``)."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from typing import Iterator, Optional

import torch

from fastdp.atomic import atomic_write

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a checkout's root


def results_dir(*parts: str) -> str:
    """Default output folder: ``benchmarks/results/<parts>`` of the checkout this fastdp runs from, else
    ``./fastdp-results/<parts>`` (fastdp installed from a wheel: the benchmark code ships, the results folder not)."""
    checkout = os.path.isfile(os.path.join(ROOT, "pyproject.toml")) and os.path.isdir(os.path.join(ROOT, "benchmarks"))
    base = os.path.join(ROOT, "benchmarks", "results") if checkout else os.path.join(os.getcwd(), "fastdp-results")
    return os.path.join(base, *parts)


def machine() -> dict:
    """Platform, CPU model and count, torch threads, Python, and the CUDA device if any."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def git(*args: str) -> Optional[subprocess.CompletedProcess]:
    """``git <args>`` in the repo, read-only (never takes the index lock); None if git cannot run."""
    try:
        return subprocess.run(["git", "--no-optional-locks", "-C", ROOT, *args], capture_output=True, text=True,
                              timeout=10)
    except Exception:
        return None


def commit() -> Optional[str]:
    """HEAD, with "+dirty" if fastdp/ or kernels/ differ from it (None outside a git checkout)."""
    out = git("rev-parse", "--short", "HEAD")
    if out is None or out.returncode != 0:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no", "fastdp", "kernels")
    return out.stdout.strip() + ("+dirty" if dirty is not None and dirty.stdout.strip() else "")


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (unchanged if ``n`` is falsy), restoring the previous count afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def kernel_backend(name: Optional[str]) -> Iterator[None]:
    """Run with ``FASTDP_BACKEND=name`` (unchanged if ``name`` is None), restoring the previous value afterwards."""
    before = os.environ.get("FASTDP_BACKEND")
    if name is not None:
        os.environ["FASTDP_BACKEND"] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FASTDP_BACKEND", None)
        else:
            os.environ["FASTDP_BACKEND"] = before


def write_json(obj, path: str) -> None:
    """``obj`` as indented JSON (what JSON cannot hold as ``str``), atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1, default=str)


def write_text(text: str, path: str) -> None:
    """``text`` to ``path``, atomically."""
    with atomic_write(path) as f:
        f.write(text)


def save_figure(fig, path: str, **savefig_kwargs) -> None:
    """A matplotlib figure as PNG, atomically."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", **savefig_kwargs)


def write_result(result: dict, path: Optional[str]) -> dict:
    """Write ``result`` as JSON to ``path`` (nothing if None), adding the machine and commit where it lacks them."""
    if path:
        result.setdefault("machine", machine())
        result.setdefault("commit", commit())
        write_json(result, path)
    return result
