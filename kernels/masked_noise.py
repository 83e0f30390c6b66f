"""Masked Gaussian noise, in place: ``g[j] += std * N(0, 1)`` only where the mask is set (or only on selected rows).

The Triton kernel draws counter-based Philox normals ``tl.randn(seed, j)`` keyed by the element's flat index:
the noise at coordinate ``j`` depends on ``(seed, j)`` only, no noise tensor of full size is allocated, and
coordinates outside the mask are never written (bit-identical after the call). The reference has the same
signature and distribution, drawing from a ``torch.Generator`` seeded with ``seed`` (different values).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import HAS_TRITON, backend_for_op
from ._common import LAUNCH_OPTIONS, on_input_device

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _masked_noise_kernel(g_ptr, mask_ptr, d, std, seed, BLOCK: tl.constexpr):
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit: > 2^31 coordinates
        inb = j < d
        keep = tl.load(mask_ptr + j, mask=inb, other=0) != 0
        sel = inb & keep
        g = tl.load(g_ptr + j, mask=sel, other=0.0)
        tl.store(g_ptr + j, g + std * tl.randn(seed, j), mask=sel)

    @triton.jit
    def _row_noise_kernel(g_ptr, rows_ptr, k, cols, std, seed, BLOCK: tl.constexpr):
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # over the k * cols selected elements
        inb = e < k * cols
        r = tl.load(rows_ptr + e // cols, mask=inb, other=0)
        j = r * cols + e % cols
        g = tl.load(g_ptr + j, mask=inb, other=0.0)
        tl.store(g_ptr + j, g + std * tl.randn(seed, j), mask=inb)

_BLOCK = 1024


def masked_noise_ref(g: torch.Tensor, std: float, seed: int, mask: Optional[torch.Tensor] = None,
                     rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Add ``std * N(0, 1)`` in place to fp32 ``g`` where ``mask`` (bool, g's shape) is set, or on ``rows``
    (int64 indices along dim 0 of ``g``); exactly one of ``mask`` / ``rows``. Returns ``g``."""
    if (mask is None) == (rows is None):
        raise ValueError("give exactly one of mask or rows")
    gen = torch.Generator(device=g.device).manual_seed(int(seed))
    if rows is not None:
        sel = g.index_select(0, rows)
        g.index_copy_(0, rows, sel + std * torch.randn(sel.shape, generator=gen, device=g.device, dtype=g.dtype))
        return g
    idx = mask.reshape(-1).nonzero().flatten()
    flat = g.view(-1)
    flat[idx] += std * torch.randn(idx.numel(), generator=gen, device=g.device, dtype=g.dtype)
    return g


@on_input_device
def masked_noise(g: torch.Tensor, std: float, seed: int, mask: Optional[torch.Tensor] = None,
                 rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatching ``masked_noise_ref`` / the Philox Triton kernel (``g`` contiguous fp32)."""
    if backend_for_op("masked_noise", g) == "reference":
        return masked_noise_ref(g, std, seed, mask, rows)
    if (mask is None) == (rows is None):
        raise ValueError("give exactly one of mask or rows")
    if not g.is_contiguous() or g.dtype != torch.float32:
        raise ValueError("masked_noise needs a contiguous fp32 tensor")
    seed = int(seed) % (2 ** 31 - 1)
    if rows is not None:
        cols = g[0].numel() if g.dim() > 1 else 1
        n = rows.numel() * cols
        if n:
            _row_noise_kernel[(triton.cdiv(n, _BLOCK),)](g, rows.contiguous(), rows.numel(), cols, float(std), seed,
                                                         BLOCK=_BLOCK, **LAUNCH_OPTIONS)
        return g
    d = g.numel()
    if d:
        m = mask.reshape(-1)
        m = m.view(torch.uint8) if m.dtype == torch.bool else m.to(torch.uint8)  # bool: no copy
        _masked_noise_kernel[(triton.cdiv(d, _BLOCK),)](g, m, d, float(std), seed, BLOCK=_BLOCK, **LAUNCH_OPTIONS)
    return g
