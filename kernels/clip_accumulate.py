"""Clip-and-accumulate: ``sum_i C_i dY_i^T X_i`` as one GEMM.

This is the weight-gradient GEMM of non-private training with each sample's output gradient
scaled by its clip factor: the same FLOPs, done once, after the clip factors are known.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import as_btd, upcast


def clip_accumulate_ref(x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(scale * dY)^T X`` summed over batch and sequence, optionally accumulated into ``out``.

    Args:
        x: [B, *, d] layer input. dy: [B, *, p] output gradient (cast to x's dtype).
        scale: [B] per-sample factors (fp32), e.g. clip factors.
        out: optional [p, d] tensor (any float dtype, e.g. an fp32 buffer view) to add the result to.

    Returns:
        ``out`` if given, else a new [p, d] tensor in x's dtype (fp32 accumulation inside the GEMM).

    Examples:
        >>> x, dy, c = torch.randn(3, 4, 5), torch.randn(3, 4, 2), torch.rand(3)
        >>> ref = torch.einsum("b,btp,btd->pd", c, dy, x)
        >>> torch.allclose(clip_accumulate_ref(x, dy, c), ref, atol=1e-5)
        True
    """
    x, dy = as_btd(x), as_btd(dy)
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    p, d = dy.shape[-1], x.shape[-1]
    s = scale.view(-1, 1, 1)
    if p <= d:  # scale the narrower operand: (c * dY)^T X == dY^T (c * X)
        dy = dy * s.to(dy.dtype) if dy.dtype == s.dtype else (upcast(dy) * s).to(x.dtype)
    else:
        x = x * s.to(x.dtype) if x.dtype == s.dtype else (upcast(x) * s).to(dy.dtype)
    a, b = dy.reshape(-1, p).t(), x.reshape(-1, d)
    if out is None:
        return a.mm(b)
    if out.dtype == a.dtype:
        return out.addmm_(a, b)
    return out.add_(a.mm(b))
