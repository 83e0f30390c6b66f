"""Ghost norm: per-sample squared Frobenius norms of ``dY_i^T X_i`` without forming it.

For a Linear-like layer with input ``X_i`` [T, d] and output gradient ``dY_i`` [T, p] of sample i,
the per-sample weight gradient is ``G_i = dY_i^T X_i`` [p, d] and

    ||G_i||_F^2 = sum_{t,s} (X_i X_i^T)[t, s] * (dY_i dY_i^T)[t, s]

which costs O(T^2 (d + p)) instead of O(T p d). The inner product of two such gradients (a weight
used twice, e.g. tied layers) is the same sum with the cross Gram matrices.

The Triton kernel (issue: fused kernels) tiles (t, s) so the T x T Grams never reach memory; this
file holds the reference it is tested against and which the engine runs elsewhere.
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, backend_for_op, interpreting
from ._common import CHUNK_ELEMENTS, acc_dtype, as_btd, batch_chunks, bmm_acc, cast, check_linear, check_linear_pair, on_input_device, upcast
from ._tuning import Tiles, gram_tiles

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .direct_norm import _grad_step

    @triton.jit
    def _gram_step(acc, a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """``acc + a b^T`` for [BT, BK] operands: ``_grad_step`` (``acc + a^T b``) of the transposed operands."""
        return _grad_step(acc, tl.trans(a), tl.trans(b), UPCAST, IEEE)

    @triton.jit
    def _gram_tile(a_ptr, b_ptr, sa_b, sa_t, sa_k, sb_b, sb_t, sb_k, bidx, t, s, Ta, Tb, K,
                   BT: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """[BT, BT] fp32 tile of A_b[t] B_b[s]^T, reducing over K in chunks of BK.

        Offsets in 64 bits, inside a sample too (a sample of T * K > 2^31 elements, or a feature stride that large)."""
        acc = tl.zeros([BT, BT], dtype=tl.float32)
        a_rows = a_ptr + bidx * sa_b + t[:, None].to(tl.int64) * sa_t
        b_rows = b_ptr + bidx * sb_b + s[:, None].to(tl.int64) * sb_t
        for k0 in range(0, K, BK):
            k = k0 + tl.arange(0, BK)
            k64 = k.to(tl.int64)
            a = tl.load(a_rows + k64[None, :] * sa_k, mask=(t[:, None] < Ta) & (k[None, :] < K), other=0.0)
            b = tl.load(b_rows + k64[None, :] * sb_k, mask=(s[:, None] < Tb) & (k[None, :] < K), other=0.0)
            acc = _gram_step(acc, a, b, UPCAST, IEEE)
        return acc

    @triton.jit
    def _ghost_dot_kernel(xa, dya, xb, dyb, out,
                          sxa_b, sxa_t, sxa_k, sya_b, sya_t, sya_k, sxb_b, sxb_t, sxb_k, syb_b, syb_t, syb_k,
                          Ta, Tb, D, P, SYMMETRIC: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """out[b] += sum over one (t, s) tile of (X_a X_b^T) * (dY_a dY_b^T); the Grams stay in registers."""
        bidx = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tensors past 2^31 elements
        ti = tl.program_id(1)
        si = tl.program_id(2)
        if SYMMETRIC and si < ti:  # self-norm: upper triangle, off-diagonal tiles counted twice
            return
        t = ti * BT + tl.arange(0, BT)
        s = si * BT + tl.arange(0, BT)
        gx = _gram_tile(xa, xb, sxa_b, sxa_t, sxa_k, sxb_b, sxb_t, sxb_k, bidx, t, s, Ta, Tb, D, BT, BK, UPCAST, IEEE)
        gy = _gram_tile(dya, dyb, sya_b, sya_t, sya_k, syb_b, syb_t, syb_k, bidx, t, s, Ta, Tb, P, BT, BK, UPCAST,
                        IEEE)
        part = tl.sum(gx * gy)
        if SYMMETRIC and si > ti:
            part = part * 2.0
        tl.atomic_add(out + bidx, part)

    GHOST_TILES = Tiles("ghost_dot", _ghost_dot_kernel, key=("Ta", "Tb", "D", "P", "SYMMETRIC"),
                        default=gram_tiles("BT", "BK")[0], candidates=gram_tiles("BT", "BK"))


@on_input_device
def ghost_dot(x_a, dy_a, x_b, dy_b) -> torch.Tensor:
    """Dispatching ``ghost_dot_ref`` / the fused Triton kernel (same signature, checks and result: ``dy_a``, ``x_b``
    and ``dy_b`` are cast to ``x_a``'s dtype, as the reference does)."""
    if backend_for_op("ghost_norm", x_a) == "reference" or x_a.dtype == torch.float64:  # kernel: fp32/bf16/fp16
        return ghost_dot_ref(x_a, dy_a, x_b, dy_b)
    symmetric = x_a is x_b and dy_a is dy_b
    x_a, dy_a, x_b, dy_b = as_btd(x_a), as_btd(dy_a), as_btd(x_b), as_btd(dy_b)
    check_linear_pair(x_a, dy_a, x_b, dy_b)
    dy_a = cast(dy_a, x_a.dtype)  # tl.dot takes one dtype
    if symmetric:
        x_b, dy_b = x_a, dy_a
    else:
        x_b, dy_b = cast(x_b, x_a.dtype), cast(dy_b, x_a.dtype)
    B, Ta, Tb, D, P = x_a.shape[0], x_a.shape[1], x_b.shape[1], x_a.shape[2], dy_a.shape[2]
    out = torch.zeros(B, dtype=torch.float32, device=x_a.device)
    if B == 0 or Ta == 0 or Tb == 0:
        return out
    grid = lambda meta: (B, triton.cdiv(Ta, meta["BT"]), triton.cdiv(Tb, meta["BT"]))  # noqa: E731
    GHOST_TILES[grid](x_a, dy_a, x_b, dy_b, out, *x_a.stride(), *dy_a.stride(), *x_b.stride(), *dy_b.stride(),
                      Ta, Tb, D, P, SYMMETRIC=symmetric, UPCAST=interpreting(), IEEE=x_a.dtype == torch.float32)
    return out


@on_input_device
def ghost_norm(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Dispatching ``ghost_norm_ref`` / the fused Triton kernel."""
    if backend_for_op("ghost_norm", x) == "reference" or x.dtype == torch.float64:
        return ghost_norm_ref(x, dy)
    x, dy = as_btd(x), as_btd(dy)
    check_linear(x, dy)
    dy = cast(dy, x.dtype)
    return ghost_dot(x, dy, x, dy)


def ghost_dot_ref(x_a: torch.Tensor, dy_a: torch.Tensor, x_b: torch.Tensor, dy_b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``<dY_a,i^T X_a,i, dY_b,i^T X_b,i>_F``.

    Args:
        x_a: [B, *, d] inputs of use a. dy_a: [B, *, p] output gradients of use a (same B and positions).
        x_b, dy_b: the same for use b (its own sequence length; same B, d and p). ``ValueError`` on a mismatch.
        ``dy_a``, ``x_b`` and ``dy_b`` are cast to ``x_a``'s dtype.

    Returns:
        [B] fp32 (fp64 for fp64 x_a).
    """
    x_a, dy_a, x_b, dy_b = as_btd(x_a), as_btd(dy_a), as_btd(x_b), as_btd(dy_b)
    check_linear_pair(x_a, dy_a, x_b, dy_b)
    dy_a, x_b, dy_b = cast(dy_a, x_a.dtype), cast(x_b, x_a.dtype), cast(dy_b, x_a.dtype)
    B, Ta, Tb = x_a.shape[0], x_a.shape[1], x_b.shape[1]
    if 2 * B * Ta * Tb <= CHUNK_ELEMENTS:  # one chunk: no slicing
        gx = bmm_acc(x_a, x_b.transpose(1, 2))
        return (gx * bmm_acc(dy_a, dy_b.transpose(1, 2))).sum(dim=(1, 2))
    out = torch.empty(B, dtype=acc_dtype(x_a), device=x_a.device)
    for sl in batch_chunks(B, 2 * Ta * Tb):
        gx = bmm_acc(x_a[sl], x_b[sl].transpose(1, 2))
        gy = bmm_acc(dy_a[sl], dy_b[sl].transpose(1, 2))
        out[sl] = (gx * gy).sum(dim=(1, 2))
    return out


def ghost_norm_ref(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||dY_i^T X_i||_F^2`` from the two T x T Gram matrices.

    Args:
        x: [B, *, d] layer input. dy: [B, *, p] gradient of the layer output (same B and positions, else
        ``ValueError``; cast to x's dtype).

    Returns:
        [B] squared norms, fp32 (fp64 for fp64 x).

    Examples:
        >>> x, dy = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
        >>> ref = torch.einsum("btp,btd->bpd", dy, x).pow(2).sum((1, 2))
        >>> torch.allclose(ghost_norm_ref(x, dy), ref, rtol=1e-5)
        True
    """
    x, dy = as_btd(x), as_btd(dy)
    check_linear(x, dy)
    dy = cast(dy, x.dtype)
    if x.shape[1] == 1:  # T = 1: ||dy||^2 ||x||^2, no Gram needed
        return upcast(x).pow(2).sum((1, 2)) * upcast(dy).pow(2).sum((1, 2))
    return ghost_dot_ref(x, dy, x, dy)
