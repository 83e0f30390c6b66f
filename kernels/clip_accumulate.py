"""Clip-and-accumulate: ``sum_i C_i dY_i^T X_i`` as one GEMM.

This is the weight-gradient GEMM of non-private training with each sample's output gradient
scaled by its clip factor: the same FLOPs, done once, after the clip factors are known.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import HAS_TRITON, backend_for_op, interpreting
from ._common import as_btd, upcast

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _clip_accumulate_kernel(x, dy, scale, out, sx_r, sx_k, sy_r, sy_k, so_m, so_n, R, T, D, P,
                                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                                IEEE: tl.constexpr):
        """out[m, n] += sum_r scale[r // T] dY[r, m] X[r, n] over the R = B*T rows: one GEMM, the per-sample
        scale applied as dY is loaded."""
        m = tl.program_id(0) * BM + tl.arange(0, BM)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for r0 in range(0, R, BK):
            r = r0 + tl.arange(0, BK)
            a = tl.load(dy + r[:, None] * sy_r + m[None, :] * sy_k, mask=(r[:, None] < R) & (m[None, :] < P),
                        other=0.0)
            c = tl.load(scale + r // T, mask=r < R, other=0.0)
            b = tl.load(x + r[:, None] * sx_r + n[None, :] * sx_k, mask=(r[:, None] < R) & (n[None, :] < D),
                        other=0.0)
            a = (a.to(tl.float32) * c[:, None])
            if not UPCAST:
                a = a.to(b.dtype)
            else:
                b = b.to(tl.float32)
            if IEEE:
                acc += tl.dot(tl.trans(a), b, input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(a), b)
        ptrs = out + m[:, None] * so_m + n[None, :] * so_n
        mask = (m[:, None] < P) & (n[None, :] < D)
        tl.store(ptrs, (tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) + acc).to(out.dtype.element_ty),
                 mask=mask)


def clip_accumulate(x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatching ``clip_accumulate_ref`` / the Triton kernel (same signature and result)."""
    if backend_for_op("clip_accumulate", x) == "reference" or x.dtype == torch.float64:
        return clip_accumulate_ref(x, dy, scale, out)
    x, dy = as_btd(x), as_btd(dy)
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    B, T, D, P = x.shape[0], x.shape[1], x.shape[2], dy.shape[2]
    if out is None:
        out = torch.zeros(P, D, dtype=x.dtype if x.dtype == torch.float32 else torch.float32, device=x.device)
    if B * T == 0:
        return out
    x2, dy2 = x.reshape(B * T, D), dy.reshape(B * T, P)
    BM = BN = BK = 32
    grid = (triton.cdiv(P, BM), triton.cdiv(D, BN))
    _clip_accumulate_kernel[grid](x2, dy2, scale.float().contiguous(), out, *x2.stride(), *dy2.stride(),
                                  *out.stride(), B * T, T, D, P, BM=BM, BN=BN, BK=BK, UPCAST=interpreting(),
                                  IEEE=x.dtype == torch.float32)
    return out


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
