"""Gather the top-k entries of a working gradient into the ring buffer and zero them in place (MicroAdam).

Entries are addressed as in the ring buffer: global indices (``per_block == 0``, per-tensor top-k) or
block-relative indices (int16), entry ``e`` of a row belonging to block ``e // per_block`` of
``block_size`` values (blockwise top-k). Indices at or past ``d`` (the padded tail block) are skipped:
their value reads as 0 and nothing is written.
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, backend_for
from ._common import on_input_device

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_zero_kernel(x_ptr, idx_ptr, val_ptr, n, d, per_block, block_size, BLOCKED: tl.constexpr,
                            BLOCK: tl.constexpr):
        e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = e < n
        g = tl.load(idx_ptr + e, mask=mask, other=0).to(tl.int64)
        if BLOCKED:
            g = (e // per_block).to(tl.int64) * block_size + g
        valid = mask & (g >= 0) & (g < d)
        v = tl.load(x_ptr + g, mask=valid, other=0.0)
        tl.store(val_ptr + e, v.to(val_ptr.dtype.element_ty), mask=mask)
        tl.store(x_ptr + g, tl.zeros_like(v), mask=valid)

_BLOCK = 1024


def global_indices(idx: torch.Tensor, per_block: int, block_size: int) -> torch.Tensor:
    """int64 global indices of a ring row ``idx`` [n] (block-relative when ``per_block > 0``)."""
    g = idx.long()
    if per_block:
        g = g + torch.arange(idx.numel(), device=idx.device).div(per_block, rounding_mode="floor") * block_size
    return g


def gather_zero_ref(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor, per_block: int = 0,
                    block_size: int = 0) -> torch.Tensor:
    """``out[e] = x[g_e]; x[g_e] = 0`` for the row ``idx`` [n] on flat ``x`` [d]; returns ``out`` [n]."""
    g = global_indices(idx, per_block, block_size)
    valid = (g >= 0) & (g < x.numel())
    gv = g[valid]
    out.zero_()
    out[valid] = x[gv].to(out.dtype)
    x[gv] = 0
    return out


@on_input_device
def gather_zero(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor, per_block: int = 0,
                block_size: int = 0) -> torch.Tensor:
    """Dispatching ``gather_zero_ref`` / Triton kernel. The kernel works on flat contiguous arrays: strided operands
    are copied first, and a strided ``x`` or ``out`` (both written) gets the result written back."""
    if backend_for(x) == "reference":
        return gather_zero_ref(x, idx, out, per_block, block_size)
    if not (x.is_contiguous() and out.is_contiguous()):
        xc, oc = x.contiguous(), out.contiguous()
        gather_zero(xc, idx, oc, per_block, block_size)
        if xc is not x:
            x.copy_(xc)
        return out if oc is out else out.copy_(oc)
    idx = idx.contiguous()
    n = idx.numel()
    _gather_zero_kernel[(triton.cdiv(n, _BLOCK),)](x, idx, out, n, x.numel(), max(per_block, 1), block_size,
                                                   BLOCKED=per_block > 0, BLOCK=_BLOCK)
    return out
