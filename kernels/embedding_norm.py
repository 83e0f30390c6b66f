"""Embedding per-sample norms and sums, without a [B, V, d] per-sample gradient.

Sample i's embedding gradient has row ``v`` equal to ``sum_{t: idx_t = v} dY_t``, so

    ||G_i||^2 = sum_{t,s} [idx_t == idx_s] <dY_t, dY_s>.

For a weight tied to a Linear layer (LM head ``logits = H W^T``, W [V, d]) the cross term with the
head's per-sample gradient ``dL_i^T H_i`` [V, d] is

    <G_emb,i, G_head,i> = sum_{s,t} dL_i[s, idx_t] * (H_i dE_i^T)[s, t]

built from two T x T matrices: the head's output gradient gathered at the input tokens, and the
product of the head input with the embedding-output gradient.

Triton kernels (``embedding_dot`` / ``embedding_norm``, ``embedding_accumulate``): the index-equality ghost norm
tiles (t, s) like the ghost norm, with the [T, T] ``dY dY^T`` tile in registers masked by ``idx_t == idx_s``;
the clipped sum adds ``c_i dY[i, t]`` into row ``idx[i, t]`` with fp32 atomics (the summation order, hence the
last bits, may differ from run to run). The tied cross term (``embedding_linear_dot``) tiles (s, t) the same way:
the [Tl, Te] tile of ``H dE^T`` in registers times the head's output gradient gathered at the tile's tokens.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import HAS_TRITON, backend_for_op, interpreting
from ._common import LAUNCH_OPTIONS, acc_dtype, batch_chunks, bmm_acc, on_input_device, upcast
from ._tuning import Tiles, gram_tiles

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .ghost_norm import _gram_tile

    @triton.jit
    def _embedding_dot_kernel(ia, dya, ib, dyb, out, sia_b, sia_t, sya_b, sya_t, sya_k, sib_b, sib_t,
                              syb_b, syb_t, syb_k, Ta, Tb, D, SYMMETRIC: tl.constexpr, BT: tl.constexpr,
                              BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """out[b] += sum over one (t, s) tile of [idx_a[t] == idx_b[s]] * (dY_a dY_b^T)[t, s]."""
        bidx = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tensors past 2^31 elements
        ti = tl.program_id(1)
        si = tl.program_id(2)
        if SYMMETRIC and si < ti:  # self-norm: upper triangle, off-diagonal tiles counted twice
            return
        t = ti * BT + tl.arange(0, BT)
        s = si * BT + tl.arange(0, BT)
        gy = _gram_tile(dya, dyb, sya_b, sya_t, sya_k, syb_b, syb_t, syb_k, bidx, t, s, Ta, Tb, D, BT, BK, UPCAST,
                        IEEE)
        va = tl.load(ia + bidx * sia_b + t * sia_t, mask=t < Ta, other=-1)
        vb = tl.load(ib + bidx * sib_b + s * sib_t, mask=s < Tb, other=-2)
        part = tl.sum(tl.where(va[:, None] == vb[None, :], gy, 0.0))
        if SYMMETRIC and si > ti:
            part = part * 2.0
        tl.atomic_add(out + bidx, part)

    @triton.jit
    def _embedding_linear_dot_kernel(idx, dye, xl, dyl, out, si_b, si_t, se_b, se_t, se_k, sx_b, sx_t, sx_k,
                                     sl_b, sl_t, sl_v, Te, Tl, D, BT: tl.constexpr, BK: tl.constexpr,
                                     UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """out[b] += sum over one (s, t) tile of dL[s, idx[t]] * (H dE^T)[s, t] (s: head positions, t: tokens)."""
        bidx = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1) * BT + tl.arange(0, BT)
        t = tl.program_id(2) * BT + tl.arange(0, BT)
        hd = _gram_tile(xl, dye, sx_b, sx_t, sx_k, se_b, se_t, se_k, bidx, s, t, Tl, Te, D, BT, BK, UPCAST, IEEE)
        v = tl.load(idx + bidx * si_b + t * si_t, mask=t < Te, other=0)
        inside = (s[:, None] < Tl) & (t[None, :] < Te)
        g = tl.load(dyl + bidx * sl_b + s[:, None] * sl_t + v[None, :].to(tl.int64) * sl_v, mask=inside, other=0.0)
        tl.atomic_add(out + bidx, tl.sum(g.to(tl.float32) * hd))

    EMBEDDING_DOT_TILES = Tiles("embedding_dot", _embedding_dot_kernel, key=("Ta", "Tb", "D", "SYMMETRIC"),
                                default=gram_tiles("BT", "BK")[0], candidates=gram_tiles("BT", "BK"))
    EMBEDDING_LINEAR_TILES = Tiles("embedding_linear_dot", _embedding_linear_dot_kernel, key=("Te", "Tl", "D"),
                                   default=gram_tiles("BT", "BK")[0], candidates=gram_tiles("BT", "BK"))

    @triton.jit
    def _embedding_accumulate_kernel(idx, dy, scale, out, T, D, si_b, si_t, sy_b, sy_t, sy_k, so_v, so_k,
                                     BD: tl.constexpr):
        """out[idx[b, t], :] += scale[b] * dy[b, t, :] for one (b, t) and a block of BD columns."""
        r = tl.program_id(0).to(tl.int64)
        b = r // T
        t = r % T
        k = tl.program_id(1) * BD + tl.arange(0, BD)
        v = tl.load(idx + b * si_b + t * si_t)
        c = tl.load(scale + b)
        g = tl.load(dy + b * sy_b + t * sy_t + k * sy_k, mask=k < D, other=0.0).to(tl.float32)
        tl.atomic_add(out + v * so_v + k * so_k, c * g, mask=k < D)


@on_input_device
def embedding_dot(idx_a: torch.Tensor, dy_a: torch.Tensor, idx_b: torch.Tensor, dy_b: torch.Tensor) -> torch.Tensor:
    """Dispatching ``embedding_dot_ref`` / the Triton kernel (same arguments and result)."""
    if backend_for_op("embedding_norm", dy_a) == "reference" or dy_a.dtype == torch.float64:
        return embedding_dot_ref(idx_a, dy_a, idx_b, dy_b)
    B, Ta, Tb, D = idx_a.shape[0], idx_a.shape[1], idx_b.shape[1], dy_a.shape[-1]
    dy_b = dy_b.to(dy_a.dtype)
    out = torch.zeros(B, dtype=torch.float32, device=dy_a.device)
    if B == 0 or Ta == 0 or Tb == 0:
        return out
    symmetric = idx_a is idx_b and dy_a is dy_b
    grid = lambda meta: (B, triton.cdiv(Ta, meta["BT"]), triton.cdiv(Tb, meta["BT"]))  # noqa: E731
    EMBEDDING_DOT_TILES[grid](idx_a, dy_a, idx_b, dy_b, out, *idx_a.stride(), *dy_a.stride(), *idx_b.stride(),
                              *dy_b.stride(), Ta, Tb, D, SYMMETRIC=symmetric, UPCAST=interpreting(),
                              IEEE=dy_a.dtype == torch.float32)
    return out


@on_input_device
def embedding_linear_dot(idx: torch.Tensor, dy_emb: torch.Tensor, x_lin: torch.Tensor,
                         dy_lin: torch.Tensor) -> torch.Tensor:
    """Dispatching ``embedding_linear_dot_ref`` / the Triton kernel (same arguments and result)."""
    if backend_for_op("embedding_norm", x_lin) == "reference" or x_lin.dtype == torch.float64:
        return embedding_linear_dot_ref(idx, dy_emb, x_lin, dy_lin)
    B, Te, Tl, D = idx.shape[0], idx.shape[1], x_lin.shape[1], x_lin.shape[-1]
    dy_emb = dy_emb.to(x_lin.dtype)
    out = torch.zeros(B, dtype=torch.float32, device=x_lin.device)
    if B == 0 or Te == 0 or Tl == 0:
        return out
    grid = lambda meta: (B, triton.cdiv(Tl, meta["BT"]), triton.cdiv(Te, meta["BT"]))  # noqa: E731
    EMBEDDING_LINEAR_TILES[grid](idx, dy_emb, x_lin, dy_lin, out, *idx.stride(), *dy_emb.stride(),
                                 *x_lin.stride(), *dy_lin.stride(), Te, Tl, D, UPCAST=interpreting(),
                                 IEEE=x_lin.dtype == torch.float32)
    return out


def embedding_norm(idx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Dispatching ``embedding_norm_ref`` / the Triton kernel."""
    return embedding_dot(idx, dy, idx, dy)


@on_input_device
def embedding_accumulate(idx: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor, num_embeddings: int,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatching ``embedding_accumulate_ref`` / the Triton kernel (fp32 ``out``; fp64 takes the reference)."""
    d = dy.shape[-1]
    if out is None:
        out = torch.zeros(num_embeddings, d, dtype=acc_dtype(dy), device=dy.device)
    if backend_for_op("embedding_accumulate", dy) == "reference" or out.dtype != torch.float32:
        return embedding_accumulate_ref(idx, dy, scale, num_embeddings, out)
    B, T = idx.shape[0], idx.shape[1]
    if B * T == 0:
        return out
    BD = 128
    _embedding_accumulate_kernel[(B * T, triton.cdiv(d, BD))](idx, dy, scale.float().contiguous(), out, T, d,
                                                              *idx.stride(), *dy.stride(), *out.stride(), BD=BD,
                                                              **LAUNCH_OPTIONS)
    return out


def embedding_dot_ref(idx_a: torch.Tensor, dy_a: torch.Tensor, idx_b: torch.Tensor, dy_b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product of two embedding gradients of the same table.

    Args:
        idx_a: [B, Ta] int indices. dy_a: [B, Ta, d] output gradients (rows at padding_idx zeroed).
        idx_b, dy_b: the second use.

    Returns:
        [B] fp32.
    """
    B, Ta, Tb = idx_a.shape[0], idx_a.shape[1], idx_b.shape[1]
    out = torch.empty(B, dtype=acc_dtype(dy_a), device=dy_a.device)
    for sl in batch_chunks(B, 2 * Ta * Tb):
        eq = idx_a[sl].unsqueeze(2) == idx_b[sl].unsqueeze(1)
        gy = bmm_acc(dy_a[sl], dy_b[sl].transpose(1, 2))
        out[sl] = (gy * eq).sum(dim=(1, 2))
    return out


def embedding_norm_ref(idx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norm of an embedding gradient through index equality.

    Args:
        idx: [B, T] indices. dy: [B, T, d] output gradient.

    Returns:
        [B] fp32.

    Examples:
        >>> idx, dy = torch.tensor([[1, 2, 1]]), torch.ones(1, 3, 2)
        >>> embedding_norm_ref(idx, dy)  # row 1 gets 2*dy, row 2 gets dy: 4*2 + 1*2
        tensor([10.])
    """
    return embedding_dot_ref(idx, dy, idx, dy)


def embedding_linear_dot_ref(idx: torch.Tensor, dy_emb: torch.Tensor, x_lin: torch.Tensor, dy_lin: torch.Tensor) -> torch.Tensor:
    """Per-sample ``<G_emb,i, G_lin,i>`` for a table W [V, d] used as embedding and as ``F.linear`` weight.

    Args:
        idx: [B, Te] embedding indices. dy_emb: [B, Te, d] embedding output gradient.
        x_lin: [B, Tl, d] linear input. dy_lin: [B, Tl, V] linear output gradient.

    Returns:
        [B] fp32.
    """
    B, Te, Tl = idx.shape[0], idx.shape[1], x_lin.shape[1]
    out = torch.empty(B, dtype=acc_dtype(dy_emb), device=dy_emb.device)
    for sl in batch_chunks(B, 2 * Te * Tl):
        gathered = torch.gather(dy_lin[sl], 2, idx[sl].unsqueeze(1).expand(-1, Tl, -1))  # [b, Tl, Te]
        hd = bmm_acc(x_lin[sl], dy_emb[sl].to(x_lin.dtype).transpose(1, 2))  # [b, Tl, Te]
        out[sl] = (upcast(gathered) * hd).sum(dim=(1, 2))
    return out


def embedding_accumulate_ref(idx: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor, num_embeddings: int,
                             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_i scale_i G_emb,i`` as a dense [V, d] tensor (index-add of scaled rows).

    Args:
        idx: [B, T] indices. dy: [B, T, d]. scale: [B] fp32. num_embeddings: V.
        out: optional [V, d] tensor to accumulate into.

    Returns:
        ``out`` if given, else a new [V, d] fp32 (fp64 for fp64 inputs) tensor.
    """
    d = dy.shape[-1]
    if out is None:
        out = torch.zeros(num_embeddings, d, dtype=acc_dtype(dy), device=dy.device)
    rows = (upcast(dy) * upcast(scale).view(-1, 1, 1)).reshape(-1, d).to(out.dtype)
    return out.index_add_(0, idx.reshape(-1), rows)
