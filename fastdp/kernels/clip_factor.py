"""Clip factors from squared per-sample norms: ``min(cap, R / (sqrt(sq) + offset))`` in one launch.

Per-layer clipping computes one factor vector per parameter inside backward; as PyTorch ops that is four
launches per parameter (sqrt, add, divide, clamp), as many as ~200 per GPT-2 step, against one here. ``cap`` is
the loss scale for flat and per-layer clipping and absent (``math.inf``) for automatic clipping.
"""
from __future__ import annotations

import functools
import math

import torch

from ._backend import HAS_TRITON, backend_for_op
from ._common import LAUNCH_OPTIONS, on_input_device

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _clip_factor_kernel(sq, out, N, R, offset, cap, HAS_CAP: tl.constexpr, BLOCK: tl.constexpr):
        """out[i] = min(cap, R / (sqrt(sq[i]) + offset)), IEEE-rounded sqrt and division (a NaN stays NaN)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < N
        s = tl.load(sq + i, mask=ok, other=1.0)
        c = tl.div_rn(R + tl.zeros_like(s), tl.sqrt_rn(s) + offset)
        if HAS_CAP:
            c = tl.where(c > cap, cap, c)
        tl.store(out + i, c, mask=ok)


@functools.lru_cache(maxsize=256)
def _scalar(r: float) -> torch.Tensor:
    return torch.tensor(r, dtype=torch.float64)  # 0-dim CPU: takes the other operand's dtype and device


def _check(sq: torch.Tensor, threshold: float, offset: float, cap: float) -> None:
    if not sq.is_floating_point():
        raise TypeError(f"squared norms must be a float tensor, got {sq.dtype}")
    if not (threshold > 0 and math.isfinite(threshold)) or not offset >= 0 or not cap >= 0:
        raise ValueError(f"need threshold > 0 (finite), offset >= 0 and cap >= 0; got {threshold}, {offset}, {cap}")


def clip_factor_ref(sq: torch.Tensor, threshold: float, offset: float, cap: float = math.inf) -> torch.Tensor:
    """``min(cap, threshold / (sqrt(sq) + offset))`` elementwise.

    Args:
        sq: squared per-sample norms, any shape (e.g. [B] or [B, k]), fp32 or fp64.
        threshold: the clipping threshold R (scaled as the caller's norms are). offset: added to the norm (a margin
            that keeps ``c * norm`` strictly below R, or automatic clipping's gamma). cap: the largest factor
            (``math.inf``: none; 0 for an empty batch's loss scale).

    Returns:
        Factors of ``sq``'s shape and dtype.

    Examples:
        >>> clip_factor_ref(torch.tensor([4.0, 0.25]), 1.0, 0.0, cap=1.0)
        tensor([0.5000, 1.0000])
    """
    _check(sq, threshold, offset, cap)
    c = torch.div(_scalar(threshold), sq.sqrt() + offset if offset else sq.sqrt())
    return c.clamp_(max=cap) if cap != math.inf else c


@on_input_device
def clip_factor(sq: torch.Tensor, threshold: float, offset: float, cap: float = math.inf) -> torch.Tensor:
    """Dispatching ``clip_factor_ref`` / the Triton kernel (same arguments and result; fp64 takes the reference)."""
    if backend_for_op("clip_factor", sq) == "reference" or sq.dtype == torch.float64:
        return clip_factor_ref(sq, threshold, offset, cap)
    _check(sq, threshold, offset, cap)
    src = sq.contiguous() if sq.dtype == torch.float32 else sq.float().contiguous()
    out = torch.empty_like(src)
    n = src.numel()
    if n:
        BLOCK = 128 if n <= 128 else 1024
        has_cap = cap != math.inf
        _clip_factor_kernel[(triton.cdiv(n, BLOCK),)](src, out, n, float(threshold), float(offset),
                                                     float(cap) if has_cap else 0.0, HAS_CAP=has_cap, BLOCK=BLOCK,
                                                     **LAUNCH_OPTIONS)
    return out if sq.dtype == torch.float32 else out.to(sq.dtype)
