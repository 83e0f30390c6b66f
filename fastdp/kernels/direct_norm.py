"""Direct per-sample norm: form each sample's gradient ``dY_i^T X_i`` and reduce it.

Costs O(T p d) per sample, cheaper than the ghost norm when ``T (p + d) > p d`` (long sequences,
convolutions with many positions). The reference materialises the per-sample tiles in batch chunks
(bounded memory); the Triton kernel keeps them in registers.
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, backend_for_op, interpreting
from ._common import CHUNK_ELEMENTS, acc_dtype, as_btd, batch_chunks, bmm_acc, cast, check_linear, check_linear_pair, on_input_device
from ._tuning import Tiles, mma_tiles

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _grad_step(acc, a, b, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """``acc + a^T b`` for [BK, BM] x [BK, BN] operands (UPCAST: fp32 operands; IEEE: exact fp32 dots)."""
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            return acc + tl.dot(tl.trans(a), b, input_precision="ieee")
        return acc + tl.dot(tl.trans(a), b)

    @triton.jit
    def _grad_tile(x, dy, sx_b, sx_t, sx_k, sy_b, sy_t, sy_k, bidx, m, n, T, D, P, BM: tl.constexpr,
                   BN: tl.constexpr, BT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """[BM, BN] fp32 tile (rows m, columns n) of sample ``bidx``'s gradient ``dY_b^T X_b``, reduced over T.

        Offsets in 64 bits, inside a sample too (a sample of T * d > 2^31 elements, or a feature stride that large)."""
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        y_cols = dy + bidx * sy_b + m[None, :].to(tl.int64) * sy_k
        x_cols = x + bidx * sx_b + n[None, :].to(tl.int64) * sx_k
        for t0 in range(0, T, BT):
            t = t0 + tl.arange(0, BT)
            t64 = t.to(tl.int64)
            a = tl.load(y_cols + t64[:, None] * sy_t, mask=(t[:, None] < T) & (m[None, :] < P), other=0.0)
            b = tl.load(x_cols + t64[:, None] * sx_t, mask=(t[:, None] < T) & (n[None, :] < D), other=0.0)
            acc = _grad_step(acc, a, b, UPCAST, IEEE)
        return acc

    @triton.jit
    def _direct_norm_kernel(x, dy, out, sx_b, sx_t, sx_k, sy_b, sy_t, sy_k, T, D, P,
                            BM: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, UPCAST: tl.constexpr,
                            IEEE: tl.constexpr):
        """out[b] += ||tile of dY_b^T X_b||^2 for one [BM, BN] tile; the tile lives in registers only."""
        bidx = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tensors past 2^31 elements
        m = tl.program_id(1) * BM + tl.arange(0, BM)
        n = tl.program_id(2) * BN + tl.arange(0, BN)
        acc = _grad_tile(x, dy, sx_b, sx_t, sx_k, sy_b, sy_t, sy_k, bidx, m, n, T, D, P, BM, BN, BT, UPCAST, IEEE)
        tl.atomic_add(out + bidx, tl.sum(acc * acc))

    DIRECT_TILES = Tiles("direct_norm", _direct_norm_kernel, key=("T", "D", "P"), default=mma_tiles("BM", "BN", "BT")[0],
                         candidates=mma_tiles("BM", "BN", "BT"))


@on_input_device
def direct_norm(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Dispatching ``direct_norm_ref`` / the Triton kernel (per-sample tiles never stored).

    Same arguments, checks and result as the reference: ``dy`` is cast to ``x``'s dtype (as ``clip_accumulate`` and
    the engine do), so a mixed 16/32-bit pair gives the norm of the gradient that ``clip_accumulate`` sums.
    """
    if backend_for_op("direct_norm", x) == "reference" or x.dtype == torch.float64:  # kernel: fp32/bf16/fp16
        return direct_norm_ref(x, dy)
    x, dy = as_btd(x), as_btd(dy)
    check_linear(x, dy)
    dy = cast(dy, x.dtype)  # tl.dot takes one dtype
    B, T, D, P = x.shape[0], x.shape[1], x.shape[2], dy.shape[2]
    out = torch.zeros(B, dtype=torch.float32, device=x.device)
    if B == 0 or T == 0:
        return out
    grid = lambda meta: (B, triton.cdiv(P, meta["BM"]), triton.cdiv(D, meta["BN"]))  # noqa: E731
    DIRECT_TILES[grid](x, dy, out, *x.stride(), *dy.stride(), T, D, P, UPCAST=interpreting(),
                       IEEE=x.dtype == torch.float32)
    return out


def direct_norm_ref(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||dY_i^T X_i||_F^2`` by explicit per-sample gradients.

    Args:
        x: [B, *, d] layer input. dy: [B, *, p] output gradient (cast to x's dtype), the same B and positions
        (``ValueError`` otherwise).

    Returns:
        [B] fp32 (fp64 for fp64 x).

    Examples:
        >>> x, dy = torch.randn(2, 7, 3), torch.randn(2, 7, 5)
        >>> from fastdp.kernels import ghost_norm_ref
        >>> torch.allclose(direct_norm_ref(x, dy), ghost_norm_ref(x, dy), rtol=1e-4)
        True
    """
    x, dy = as_btd(x), as_btd(dy)
    check_linear(x, dy)
    dy = cast(dy, x.dtype)
    B, p, d = x.shape[0], dy.shape[-1], x.shape[-1]
    if B * p * d <= CHUNK_ELEMENTS:
        return bmm_acc(dy.transpose(1, 2), x).pow(2).sum(dim=(1, 2))
    out = torch.empty(B, dtype=acc_dtype(x), device=x.device)
    for sl in batch_chunks(B, p * d):
        g = bmm_acc(dy[sl].transpose(1, 2), x[sl])
        out[sl] = g.pow(2).sum(dim=(1, 2))
    return out


def direct_dot_ref(x_a: torch.Tensor, dy_a: torch.Tensor, x_b: torch.Tensor, dy_b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``<dY_a,i^T X_a,i, dY_b,i^T X_b,i>_F`` by explicit per-sample gradients.

    Arguments as ``ghost_dot_ref`` (the same checks; ``dy_a``, ``x_b``, ``dy_b`` cast to ``x_a``'s dtype). Returns
    [B] fp32 (fp64 for fp64 x_a).
    """
    x_a, dy_a, x_b, dy_b = as_btd(x_a), as_btd(dy_a), as_btd(x_b), as_btd(dy_b)
    check_linear_pair(x_a, dy_a, x_b, dy_b)
    dy_a, x_b, dy_b = cast(dy_a, x_a.dtype), cast(x_b, x_a.dtype), cast(dy_b, x_a.dtype)
    B, p, d = x_a.shape[0], dy_a.shape[-1], x_a.shape[-1]
    out = torch.empty(B, dtype=acc_dtype(x_a), device=x_a.device)
    for sl in batch_chunks(B, 2 * p * d):
        ga = bmm_acc(dy_a[sl].transpose(1, 2), x_a[sl])
        gb = bmm_acc(dy_b[sl].transpose(1, 2), x_b[sl])
        out[sl] = (ga * gb).sum(dim=(1, 2))
    return out
