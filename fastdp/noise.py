"""Gaussian noise for the privatised gradient sum.

Default: ``torch.normal`` from an explicit ``torch.Generator`` (reproducible from its seed).
``secure=True``: uniforms from the operating system's CSPRNG (``os.urandom``) turned into normals by
Box-Muller in float64 on the CPU, then moved to the device. It resists seed recovery and the
low-precision sampling attacks, and costs ~12x ``torch.normal`` (about 73 ns of host time per
coordinate on a 2-core Xeon: ~9 s per step for 124M parameters; benchmarks/NOTES.md).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from fastdp.kernels._common import acc_dtype


def secure_standard_normal(numel: int) -> torch.Tensor:
    """``numel`` float64 standard normals from ``os.urandom`` (Box-Muller)."""
    n = (numel + 1) // 2
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint64).reshape(2, n)
    # 53-bit uniforms in (0, 1]: never exactly 0, so the log is finite
    u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) * (1.0 / 9007199254740992.0)
    r = np.sqrt(-2.0 * np.log(u[0]))
    theta = 2.0 * np.pi * u[1]
    z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])[:numel]
    return torch.from_numpy(z)


def gaussian_noise(like: torch.Tensor, std: float, *, generator: Optional[torch.Generator] = None,
                   secure: bool = False) -> torch.Tensor:
    """N(0, std^2) noise with the shape and device of ``like``, in fp32 (fp64 if ``like`` is fp64).

    Args:
        like: tensor whose shape and device the noise takes.
        std: standard deviation (>= 0); 0 gives zeros.
        generator: torch.Generator on ``like``'s device (ignored when ``secure``).
        secure: draw from the OS CSPRNG instead of a seeded generator.
    """
    if std == 0:
        return torch.zeros(like.shape, dtype=acc_dtype(like), device=like.device)
    if secure:
        z = secure_standard_normal(like.numel()).reshape(like.shape)
        return (z * std).to(device=like.device, dtype=acc_dtype(like))
    return torch.normal(0.0, float(std), like.shape, generator=generator, device=like.device, dtype=acc_dtype(like))


_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


def mix62(base: int, k: int) -> int:
    """Step ``k``'s 62-bit seed from a 62-bit ``base``: SplitMix64's output function of ``base + k * golden``
    (a bijection of its 64-bit input, so distinct k give distinct 64-bit outputs), top 62 bits."""
    z = (base + k * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 2


def draw_seed_base(gen: torch.Generator) -> int:
    """62 bits from ``gen`` on its device (one sync)."""
    return int(torch.randint(0, 2 ** 62, (1,), device=gen.device, generator=gen))


class NoiseSeeds:
    """The stream of 62-bit per-launch seeds of the counter-based (Philox) noise kernels, from ``generator``, else
    from torch's default generator.

    A CUDA generator is drawn from once (one device sync, the first masked or fused step), for a 62-bit base kept in
    ``state_dict``; launch k then uses ``mix62(base, k)`` on the host (no sync per step). Drawing the base advances
    the generator, so two optimizers given one generator object get different streams, and the base keeps the CUDA
    seed's 64 bits (a CPU ``torch.Generator`` seeded from it would keep 32). A CPU generator is drawn from directly.
    """

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator
        self.base: Optional[int] = None
        self.count = 0

    def next(self) -> int:
        gen = self.generator
        if gen is not None and gen.device.type != "cpu":
            if self.base is None:
                self.base = draw_seed_base(gen)
            self.count += 1
            return mix62(self.base, self.count)
        return int(torch.randint(0, 2 ** 62, (1,), generator=gen))
