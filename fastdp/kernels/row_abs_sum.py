"""Row-group absolute sums of clipped per-sample gradients (SPARTA's selection release, before its noise).

For a Linear-like layer, ``v_j = sum_i sum_k |c_i (dY_i^T X_i)[j, k]|`` for every output row j: the per-sample
tiles are formed in registers and reduced, never stored (Triton), or materialised in batch chunks (reference).
The privatised release adds ``N(0, n_j sigma^2 C^2)`` per row (``n_j`` = row length), which the method does.
"""
from __future__ import annotations

import torch

from ._backend import HAS_TRITON, backend_for_op, interpreting
from ._common import as_btd, batch_chunks, bmm_acc, cast, check_linear, on_input_device
from ._tuning import Tiles, mma_tiles

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .direct_norm import _grad_tile

    @triton.jit
    def _row_abs_sum_kernel(x, dy, scale, out, sx_b, sx_t, sx_k, sy_b, sy_t, sy_k, T, D, P,
                            BM: tl.constexpr, BN: tl.constexpr, BT: tl.constexpr, UPCAST: tl.constexpr,
                            IEEE: tl.constexpr):
        bidx = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tensors past 2^31 elements
        m = tl.program_id(1) * BM + tl.arange(0, BM)
        n = tl.program_id(2) * BN + tl.arange(0, BN)
        acc = _grad_tile(x, dy, sx_b, sx_t, sx_k, sy_b, sy_t, sy_k, bidx, m, n, T, D, P, BM, BN, BT, UPCAST, IEEE)
        c = tl.load(scale + bidx)
        tl.atomic_add(out + m, c * tl.sum(tl.abs(acc), axis=1), mask=m < P)

    ROW_ABS_TILES = Tiles("row_abs_sum", _row_abs_sum_kernel, key=("T", "D", "P"),
                          default=mma_tiles("BM", "BN", "BT")[0], candidates=mma_tiles("BM", "BN", "BT"))



def row_abs_sum_ref(x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[p] fp32 ``sum_i scale_i sum_k |(dY_i^T X_i)[j, k]|`` for x [B, *, d], dy [B, *, p], scale [B] (>= 0).

    ``ValueError`` where dy's B or positions differ from x's or scale is not [B]; dy is cast to x's dtype.
    """
    x, dy = as_btd(x), as_btd(dy)
    check_linear(x, dy, scale)
    dy = cast(dy, x.dtype)
    B, p, d = x.shape[0], dy.shape[-1], x.shape[-1]
    out = torch.zeros(p, dtype=torch.float32, device=x.device)
    for sl in batch_chunks(B, p * d):
        g = bmm_acc(dy[sl].transpose(1, 2), x[sl]).float()  # [b, p, d]
        out += torch.einsum("b,bp->p", scale[sl].float(), g.abs().sum(2))
    return out


@on_input_device
def row_abs_sum(x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dispatching ``row_abs_sum_ref`` / the Triton kernel (same arguments, checks and result)."""
    if backend_for_op("row_abs_sum", x) == "reference" or x.dtype == torch.float64:
        return row_abs_sum_ref(x, dy, scale)
    x, dy = as_btd(x), as_btd(dy)
    check_linear(x, dy, scale)
    dy = cast(dy, x.dtype)  # tl.dot takes one dtype
    B, T, D, P = x.shape[0], x.shape[1], x.shape[2], dy.shape[2]
    out = torch.zeros(P, dtype=torch.float32, device=x.device)
    if B == 0 or T == 0:
        return out
    grid = lambda meta: (B, triton.cdiv(P, meta["BM"]), triton.cdiv(D, meta["BN"]))  # noqa: E731
    ROW_ABS_TILES[grid](x, dy, scale.float().contiguous(), out, *x.stride(), *dy.stride(), T, D, P,
                        UPCAST=interpreting(), IEEE=x.dtype == torch.float32)
    return out
