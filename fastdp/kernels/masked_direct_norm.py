"""Masked (and optionally standardised) direct per-sample norm of a Linear-like weight gradient.

Per sample i: ``||M * (G_i - a) / b||_F^2`` with ``G_i = dY_i^T X_i`` [p, d], a 0/1 coordinate mask ``M`` and
an optional affine standardisation (``a`` centre, ``b`` positive scale, all [p, d]). Used by random
sparsification (mask only) and AdaDPIGU (mask + standardisation) so that masked layers need no per-sample
gradients in memory. The reference materialises the tiles in batch chunks; the Triton kernel keeps each
[BM, BN] tile in registers and applies the mask/affine epilogue before squaring.

The clipped sum needs no kernel: it is linear in ``G_i``,
``sum_i c_i M (G_i - a) / b = M (sum_i c_i G_i - (sum_i c_i) a) / b`` (one clip-and-accumulate GEMM).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import HAS_TRITON, backend_for_op, interpreting
from ._common import acc_dtype, as_btd, batch_chunks, bmm_acc, cast, check_linear, on_input_device, upcast
from ._tuning import Tiles, mma_tiles

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .direct_norm import _grad_tile

    @triton.jit
    def _masked_direct_norm_kernel(x, dy, mask, center, scale, out, sx_b, sx_t, sx_k, sy_b, sy_t, sy_k,
                                   sm_p, sm_d, sa_p, sa_d, sb_p, sb_d, T, D, P,
                                   BM: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, AFFINE: tl.constexpr,
                                   UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """out[b] += ||M * (tile of dY_b^T X_b - a) / b||^2 for one [BM, BN] tile."""
        bidx = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tensors past 2^31 elements
        m = tl.program_id(1) * BM + tl.arange(0, BM)
        n = tl.program_id(2) * BN + tl.arange(0, BN)
        acc = _grad_tile(x, dy, sx_b, sx_t, sx_k, sy_b, sy_t, sy_k, bidx, m, n, T, D, P, BM, BN, BT, UPCAST, IEEE)
        inside = (m[:, None] < P) & (n[None, :] < D)
        m64, n64 = m.to(tl.int64), n.to(tl.int64)  # [p, d] operands past 2^31 elements
        keep = tl.load(mask + m64[:, None] * sm_p + n64[None, :] * sm_d, mask=inside, other=0).to(tl.float32)
        if AFFINE:
            ctr = tl.load(center + m64[:, None] * sa_p + n64[None, :] * sa_d, mask=inside, other=0.0)
            scl = tl.load(scale + m64[:, None] * sb_p + n64[None, :] * sb_d, mask=inside, other=1.0)
            acc = (acc - ctr) / scl
        acc = acc * keep
        tl.atomic_add(out + bidx, tl.sum(acc * acc))

    MASKED_TILES = Tiles("masked_direct_norm", _masked_direct_norm_kernel, key=("T", "D", "P", "AFFINE"),
                         default=mma_tiles("BM", "BN", "BT")[0], candidates=mma_tiles("BM", "BN", "BT"))


@on_input_device
def masked_direct_norm(x: torch.Tensor, dy: torch.Tensor, mask: torch.Tensor, center: Optional[torch.Tensor] = None,
                       scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatching ``masked_direct_norm_ref`` / the Triton kernel (same arguments, checks and result; dy is cast to
    x's dtype)."""
    if backend_for_op("masked_direct_norm", x) == "reference" or x.dtype == torch.float64:
        return masked_direct_norm_ref(x, dy, mask, center, scale)
    x, dy = as_btd(x), as_btd(dy)
    _check(x, dy, mask, center, scale)
    dy = cast(dy, x.dtype)  # tl.dot takes one dtype
    B, T, D, P = x.shape[0], x.shape[1], x.shape[2], dy.shape[2]
    out = torch.zeros(B, dtype=torch.float32, device=x.device)
    if B == 0 or (T == 0 and center is None):  # T = 0 with an affine term: G_i = 0, the norm of M (0 - a) / b
        return out
    affine = center is not None
    if affine:
        center, scale = center.float(), scale.float()
    else:
        center = scale = out  # unused (AFFINE=False); any tensor argument
    grid = lambda meta: (B, triton.cdiv(P, meta["BM"]), triton.cdiv(D, meta["BN"]))  # noqa: E731
    mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    MASKED_TILES[grid](
        x, dy, mask_arg, center, scale, out, *x.stride(), *dy.stride(), *mask.stride(),
        *(center.stride() if affine else (0, 0)), *(scale.stride() if affine else (0, 0)), T, D, P,
        AFFINE=affine, UPCAST=interpreting(), IEEE=x.dtype == torch.float32)
    return out


def masked_direct_norm_ref(x: torch.Tensor, dy: torch.Tensor, mask: torch.Tensor,
                           center: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample ``||mask * (dY_i^T X_i - center) / scale||_F^2`` by explicit per-sample gradients.

    Args:
        x: [B, *, d] layer input. dy: [B, *, p] output gradient (same B and positions; cast to x's dtype).
        mask: [p, d] bool (or 0/1). center, scale: [p, d] (both or neither); scale > 0. ``ValueError`` on a
        mismatch.

    Returns:
        [B] fp32 (fp64 for fp64 inputs).

    Examples:
        >>> x, dy = torch.randn(2, 5, 3), torch.randn(2, 5, 4)
        >>> from fastdp.kernels import direct_norm_ref
        >>> torch.allclose(masked_direct_norm_ref(x, dy, torch.ones(4, 3, dtype=torch.bool)), direct_norm_ref(x, dy))
        True
    """
    x, dy = as_btd(x), as_btd(dy)
    _check(x, dy, mask, center, scale)
    dy = cast(dy, x.dtype)
    B, p, d = x.shape[0], dy.shape[-1], x.shape[-1]
    keep = mask.to(acc_dtype(x))
    out = torch.empty(B, dtype=acc_dtype(x), device=x.device)
    for sl in batch_chunks(B, p * d):
        g = bmm_acc(dy[sl].transpose(1, 2), x[sl])
        if center is not None:
            g = (g - upcast(center)) / upcast(scale)
        out[sl] = (g * keep).pow(2).sum(dim=(1, 2))
    return out


def _check(x, dy, mask, center, scale):
    """Shapes of the dispatcher's and the reference's arguments (x, dy as [B, T, features])."""
    check_linear(x, dy)
    p, d = dy.shape[-1], x.shape[-1]
    if tuple(mask.shape) != (p, d):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected ({p}, {d})")
    if (center is None) != (scale is None):
        raise ValueError("give both center and scale, or neither")
    if center is not None and (tuple(center.shape) != (p, d) or tuple(scale.shape) != (p, d)):
        raise ValueError(f"center/scale must have shape ({p}, {d})")
