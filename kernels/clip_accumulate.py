"""Clip-and-accumulate: ``sum_i C_i dY_i^T X_i`` as one GEMM.

This is the weight-gradient GEMM of non-private training with each sample's output gradient
scaled by its clip factor: the same FLOPs, done once, after the clip factors are known.
"""
from __future__ import annotations

import torch

from ._common import as_btd, upcast


def clip_accumulate_ref(x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(scale * dY)^T X`` summed over batch and sequence.

    Args:
        x: [B, *, d] layer input. dy: [B, *, p] output gradient (same dtype as x).
        scale: [B] per-sample factors (fp32), e.g. clip factors.

    Returns:
        [p, d] in the dtype of ``dy`` (fp32 accumulation inside the GEMM).

    Examples:
        >>> x, dy, c = torch.randn(3, 4, 5), torch.randn(3, 4, 2), torch.rand(3)
        >>> ref = torch.einsum("b,btp,btd->pd", c, dy, x)
        >>> torch.allclose(clip_accumulate_ref(x, dy, c), ref, atol=1e-5)
        True
    """
    x, dy = as_btd(x), as_btd(dy)
    p, d = dy.shape[-1], x.shape[-1]
    scaled = (upcast(dy) * upcast(scale).view(-1, 1, 1)).to(dy.dtype)
    return scaled.reshape(-1, p).t().mm(x.reshape(-1, d).to(dy.dtype))
