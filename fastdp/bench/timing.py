"""The timing method of every benchmark script in ``fastdp.bench`` (the pytest-benchmark microbenchmarks in
``benchmarks/micro`` keep pytest-benchmark's own).

``time_calls(fn, device, steps, warmup)``: ``warmup`` untimed calls (the first one's wall time is kept: compilation,
autotuning and lazy allocation are paid there once), then ``steps`` calls timed one by one. On CUDA each timed
call sits between two CUDA events recorded back to back on the current stream, and the device is synchronised
before the first timed call and before the events are read: each time is what the call costs in a stream of such
calls (device time, plus host time where the host cannot keep the device busy). On the CPU each call is timed with
``time.perf_counter``. The result keeps every time, and reports the median, the minimum and the spread (p20, p80).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

Device = Union[torch.device, str]


def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q``-quantile of ``xs`` (0 <= q <= 1), interpolating linearly between the sorted values."""
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Timing:
    """The timed calls' milliseconds; the first warm-up call's wall time; what the first and last calls returned."""

    times_ms: List[float]
    first_ms: Optional[float] = None
    first: Any = None
    last: Any = None

    @property
    def median_ms(self) -> float:
        return percentile(self.times_ms, 0.5)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    def summary(self) -> dict:
        """{median_ms, min_ms, p20_ms, p80_ms, steps}."""
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "p20_ms": percentile(self.times_ms, 0.2),
                "p80_ms": percentile(self.times_ms, 0.8), "steps": len(self.times_ms)}


def synchronize(device: Device) -> None:
    """Wait for the device's queued work (nothing to wait for off CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(fn: Callable[[], Any], device: Device, calls: int) -> Timing:
    """``calls`` untimed calls; returns the first one's wall time (device synchronised) and result."""
    first = first_ms = None
    for i in range(calls):
        t0 = time.perf_counter()
        out = fn()
        if i == 0:
            synchronize(device)
            first, first_ms = out, 1e3 * (time.perf_counter() - t0)
    return Timing([], first_ms, first)


def measure(fn: Callable[[], Any], device: Device, calls: int) -> Timing:
    """``calls`` calls, each timed (see the module docstring); returns the times and the last result."""
    out = None
    synchronize(device)
    if torch.device(device).type != "cuda":
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            out = fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return Timing(times, last=out)
    with torch.cuda.device(device):  # the events go on this device's current stream
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
        for start, end in events:
            start.record()
            out = fn()
            end.record()
    synchronize(device)
    return Timing([start.elapsed_time(end) for start, end in events], last=out)


def time_calls(fn: Callable[[], Any], device: Device, steps: int, warmup: int) -> Timing:
    """:func:`warm_up` then :func:`measure`: the one timing method of the benchmark scripts."""
    warm = warm_up(fn, device, warmup)
    timed = measure(fn, device, steps)
    return Timing(timed.times_ms, warm.first_ms, warm.first, timed.last)


def add_cpu_step_args(ap) -> None:
    """The CPU step benchmarks' common options on argparse parser ``ap``: --steps (timed), --warmup, --threads
    (torch CPU threads), --batch."""
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
