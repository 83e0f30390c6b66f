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

Precision: fp64 inputs take the references under every backend (``FASTDP_BACKEND=triton`` included: the kernels
accumulate in fp32); their results are fp64. Everything else returns fp32. Products of two uses of one table (or of the
table as embedding and as LM head) are taken on both operands in their common dtype (``torch.promote_types``: fp32
for bf16 x fp32), never on a rounded copy: the value measured is that of the operands the clipped sums add.

Checks (free shape checks on the host, ``ValueError``): idx [B, T], dy [B, T, d], the uses agree on B and d,
``scale`` is [B], ``out`` is [V, d]. Index range: on CPU tensors an index outside ``[0, V)`` raises ``IndexError``
before anything runs; on CUDA the range is not read on the host (no sync): the indices are those the forward
embedding lookup already checked, and the kernels mask any index outside ``[0, V)`` (no read or write outside the
tensors; the row's contribution is then dropped).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch

from ._backend import HAS_TRITON, backend_for_op, interpreting
from ._common import LAUNCH_OPTIONS, acc_dtype, batch_chunks, bmm_acc, cast, on_input_device, promote, upcast
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
        va = tl.load(ia + bidx * sia_b + t.to(tl.int64) * sia_t, mask=t < Ta, other=-1)
        vb = tl.load(ib + bidx * sib_b + s.to(tl.int64) * sib_t, mask=s < Tb, other=-2)
        part = tl.sum(tl.where(va[:, None] == vb[None, :], gy, 0.0))
        if SYMMETRIC and si > ti:
            part = part * 2.0
        tl.atomic_add(out + bidx, part)

    @triton.jit
    def _embedding_linear_dot_kernel(idx, dye, xl, dyl, out, si_b, si_t, se_b, se_t, se_k, sx_b, sx_t, sx_k,
                                     sl_b, sl_t, sl_v, Te, Tl, D, V, BT: tl.constexpr, BK: tl.constexpr,
                                     UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """out[b] += sum over one (s, t) tile of dL[s, idx[t]] * (H dE^T)[s, t] (s: head positions, t: tokens).
        Tokens outside [0, V) read nothing (their term is 0). Offsets in 64 bits, inside a sample too."""
        bidx = tl.program_id(0).to(tl.int64)
        s = tl.program_id(1) * BT + tl.arange(0, BT)
        t = tl.program_id(2) * BT + tl.arange(0, BT)
        hd = _gram_tile(xl, dye, sx_b, sx_t, sx_k, se_b, se_t, se_k, bidx, s, t, Tl, Te, D, BT, BK, UPCAST, IEEE)
        v = tl.load(idx + bidx * si_b + t.to(tl.int64) * si_t, mask=t < Te, other=-1).to(tl.int64)
        inside = (s[:, None] < Tl) & ((t < Te) & (v >= 0) & (v < V))[None, :]
        g = tl.load(dyl + bidx * sl_b + s[:, None].to(tl.int64) * sl_t + v[None, :] * sl_v, mask=inside, other=0.0)
        tl.atomic_add(out + bidx, tl.sum(g.to(tl.float32) * hd))

    EMBEDDING_DOT_TILES = Tiles("embedding_dot", _embedding_dot_kernel, key=("Ta", "Tb", "D", "SYMMETRIC"),
                                default=gram_tiles("BT", "BK")[0], candidates=gram_tiles("BT", "BK"))
    EMBEDDING_LINEAR_TILES = Tiles("embedding_linear_dot", _embedding_linear_dot_kernel, key=("Te", "Tl", "D"),
                                   default=gram_tiles("BT", "BK")[0], candidates=gram_tiles("BT", "BK"))

    @triton.jit
    def _embedding_accumulate_kernel(idx, dy, scale, out, T, D, V, si_b, si_t, sy_b, sy_t, sy_k, so_v, so_k,
                                     BD: tl.constexpr):
        """out[idx[b, t], :] += scale[b] * dy[b, t, :] for one (b, t) and a block of BD columns (an index outside
        [0, V) writes nothing: never outside ``out``)."""
        r = tl.program_id(0).to(tl.int64)
        b = r // T
        t = r % T
        k = (tl.program_id(1) * BD + tl.arange(0, BD)).to(tl.int64)
        v = tl.load(idx + b * si_b + t * si_t).to(tl.int64) + tl.zeros([BD], dtype=tl.int64)  # (a block: the
        ok = (k < D) & (v >= 0) & (v < V)  # interpreter rejects a mask built from a scalar condition)
        c = tl.load(scale + b)
        g = tl.load(dy + b * sy_b + t * sy_t + k * sy_k, mask=ok, other=0.0).to(tl.float32)
        tl.atomic_add(out + v * so_v + k * so_k, c * g, mask=ok)


def _check_use(idx: torch.Tensor, dy: torch.Tensor, name: str = "") -> None:
    """``ValueError`` unless ``idx`` is an integer [B, T] tensor and ``dy`` a [B, T, d] float tensor."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype.is_complex \
            or idx.dtype == torch.bool:
        raise ValueError(f"idx{name} must be an integer [B, T] tensor, got {getattr(idx, 'dtype', type(idx))} "
                         f"{tuple(getattr(idx, 'shape', ()))}")
    if not isinstance(dy, torch.Tensor) or dy.dim() != 3 or dy.shape[:2] != idx.shape:
        raise ValueError(f"dy{name} must be [B, T, d] with idx{name}'s [B, T] {tuple(idx.shape)}, got "
                         f"{tuple(getattr(dy, 'shape', ()))}")


def _check_index_range(idx: torch.Tensor, V: int, op: str) -> None:
    """``IndexError`` for an index outside ``[0, V)`` of a CPU ``idx``. CUDA: not read on the host (no sync; the
    forward lookup checked these indices and the kernels mask any index outside the table)."""
    if idx.device.type == "cpu" and idx.numel():
        lo, hi = (int(v) for v in torch.aminmax(idx))
        if lo < 0 or hi >= V:
            raise IndexError(f"{op}: index {lo if lo < 0 else hi} is out of range for a table of {V} rows")


def _check_dot(idx_a, dy_a, idx_b, dy_b) -> None:
    _check_use(idx_a, dy_a, "_a")
    _check_use(idx_b, dy_b, "_b")
    if idx_a.shape[0] != idx_b.shape[0] or dy_a.shape[2] != dy_b.shape[2]:
        raise ValueError(f"embedding_dot: dy_a {tuple(dy_a.shape)} and dy_b {tuple(dy_b.shape)} disagree on the batch "
                         f"or d")


def _check_linear(idx, dy_emb, x_lin, dy_lin) -> None:
    _check_use(idx, dy_emb, "")
    if not isinstance(x_lin, torch.Tensor) or not isinstance(dy_lin, torch.Tensor) or x_lin.dim() != 3 \
            or dy_lin.dim() != 3 or x_lin.shape[0] != idx.shape[0] or x_lin.shape[2] != dy_emb.shape[2] \
            or dy_lin.shape[:2] != x_lin.shape[:2]:
        raise ValueError(f"embedding_linear_dot: expected x_lin [B, Tl, d] and dy_lin [B, Tl, V] with idx [B, Te] "
                         f"{tuple(idx.shape)} and dy_emb [B, Te, d] {tuple(dy_emb.shape)}, got x_lin "
                         f"{tuple(getattr(x_lin, 'shape', ()))}, dy_lin {tuple(getattr(dy_lin, 'shape', ()))}")
    _check_index_range(idx, dy_lin.shape[2], "embedding_linear_dot")


def _check_accumulate(idx, dy, scale, num_embeddings, out) -> None:
    _check_use(idx, dy, "")
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (idx.shape[0],):
        raise ValueError(f"embedding_accumulate: scale must be [B] = ({idx.shape[0]},) (one factor per sample), got "
                         f"{tuple(getattr(scale, 'shape', ()))}")
    V = operator.index(num_embeddings)
    if out is not None and tuple(out.shape) != (V, dy.shape[2]):
        raise ValueError(f"embedding_accumulate: out must be [num_embeddings, d] = ({V}, {dy.shape[2]}), got "
                         f"{tuple(out.shape)}")
    _check_index_range(idx, V, "embedding_accumulate")


def _common(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    """The dtype both operands of a cross product are taken in: their promotion (bf16 x fp32 -> fp32), never a
    rounded copy of either."""
    return promote(a.dtype, b.dtype)


@on_input_device
def embedding_dot(idx_a: torch.Tensor, dy_a: torch.Tensor, idx_b: torch.Tensor, dy_b: torch.Tensor) -> torch.Tensor:
    """Dispatching ``embedding_dot_ref`` / the Triton kernel (same arguments and result; fp64 takes the reference)."""
    dt = _common(dy_a, dy_b)
    if backend_for_op("embedding_norm", dy_a) == "reference" or dt == torch.float64:
        return embedding_dot_ref(idx_a, dy_a, idx_b, dy_b)
    _check_dot(idx_a, dy_a, idx_b, dy_b)
    symmetric = idx_a is idx_b and dy_a is dy_b
    dy_a, dy_b = cast(dy_a, dt), cast(dy_b, dt)
    B, Ta, Tb, D = idx_a.shape[0], idx_a.shape[1], idx_b.shape[1], dy_a.shape[-1]
    out = torch.zeros(B, dtype=torch.float32, device=dy_a.device)
    if B == 0 or Ta == 0 or Tb == 0:
        return out
    grid = lambda meta: (B, triton.cdiv(Ta, meta["BT"]), triton.cdiv(Tb, meta["BT"]))  # noqa: E731
    EMBEDDING_DOT_TILES[grid](idx_a, dy_a, idx_b, dy_b, out, *idx_a.stride(), *dy_a.stride(), *idx_b.stride(),
                              *dy_b.stride(), Ta, Tb, D, SYMMETRIC=symmetric, UPCAST=interpreting(),
                              IEEE=dt == torch.float32)
    return out


@on_input_device
def embedding_linear_dot(idx: torch.Tensor, dy_emb: torch.Tensor, x_lin: torch.Tensor,
                         dy_lin: torch.Tensor) -> torch.Tensor:
    """Dispatching ``embedding_linear_dot_ref`` / the Triton kernel (same arguments and result; fp64 takes the
    reference). ``H dE^T`` is taken on ``x_lin`` and ``dy_emb`` in their common dtype (fp32 for a bf16 head input and
    an fp32 embedding gradient), as the clipped sums add them: not on ``dy_emb`` rounded to the head's dtype."""
    dt = _common(x_lin, dy_emb)
    if backend_for_op("embedding_norm", x_lin) == "reference" or dt == torch.float64 or dy_lin.dtype == torch.float64:
        return embedding_linear_dot_ref(idx, dy_emb, x_lin, dy_lin)
    _check_linear(idx, dy_emb, x_lin, dy_lin)
    x_lin, dy_emb = cast(x_lin, dt), cast(dy_emb, dt)
    B, Te, Tl, D, V = idx.shape[0], idx.shape[1], x_lin.shape[1], x_lin.shape[-1], dy_lin.shape[-1]
    out = torch.zeros(B, dtype=torch.float32, device=x_lin.device)
    if B == 0 or Te == 0 or Tl == 0:
        return out
    grid = lambda meta: (B, triton.cdiv(Tl, meta["BT"]), triton.cdiv(Te, meta["BT"]))  # noqa: E731
    EMBEDDING_LINEAR_TILES[grid](idx, dy_emb, x_lin, dy_lin, out, *idx.stride(), *dy_emb.stride(),
                                 *x_lin.stride(), *dy_lin.stride(), Te, Tl, D, V, UPCAST=interpreting(),
                                 IEEE=dt == torch.float32)
    return out


def embedding_norm(idx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Dispatching ``embedding_norm_ref`` / the Triton kernel."""
    return embedding_dot(idx, dy, idx, dy)


@on_input_device
def embedding_accumulate(idx: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor, num_embeddings: int,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatching ``embedding_accumulate_ref`` / the Triton kernel (same arguments and result).

    The kernel accumulates in fp32: into ``out`` directly when it is fp32 (any strides), else (bf16 / fp16 ``out``)
    into a new fp32 [V, d] tensor then added to ``out``. fp64 (``dy`` or ``out``) takes the reference, under every
    backend. Indices: ``IndexError`` on the CPU outside ``[0, V)``; on CUDA not read on the host (they are the ones
    the forward embedding lookup checked) and masked in the kernel (never an add outside ``out``)."""
    if backend_for_op("embedding_accumulate", dy) == "reference" or dy.dtype == torch.float64 \
            or (out is not None and out.dtype == torch.float64):
        return embedding_accumulate_ref(idx, dy, scale, num_embeddings, out)
    _check_accumulate(idx, dy, scale, num_embeddings, out)
    V, d = operator.index(num_embeddings), dy.shape[-1]
    if out is None:
        out = torch.zeros(V, d, dtype=torch.float32, device=dy.device)
    B, T = idx.shape[0], idx.shape[1]
    if B * T == 0 or d == 0:
        return out
    target = out if out.dtype == torch.float32 else torch.zeros(V, d, dtype=torch.float32, device=dy.device)
    BD = 128
    _embedding_accumulate_kernel[(B * T, triton.cdiv(d, BD))](idx, dy, scale.float().contiguous(), target, T, d, V,
                                                              *idx.stride(), *dy.stride(), *target.stride(), BD=BD,
                                                              **LAUNCH_OPTIONS)
    return out if target is out else out.add_(target)


def embedding_dot_ref(idx_a: torch.Tensor, dy_a: torch.Tensor, idx_b: torch.Tensor, dy_b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product of two embedding gradients of the same table.

    Args:
        idx_a: [B, Ta] int indices. dy_a: [B, Ta, d] output gradients (rows at padding_idx zeroed).
        idx_b, dy_b: the second use ([B, Tb], [B, Tb, d]; ``ValueError`` on a mismatch).

    Returns:
        [B] fp32 (fp64 if either ``dy`` is fp64). The products take both ``dy`` in their common dtype.
    """
    _check_dot(idx_a, dy_a, idx_b, dy_b)
    dt = _common(dy_a, dy_b)
    dy_a, dy_b = cast(dy_a, dt), cast(dy_b, dt)
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
        [B] fp32 (fp64 for fp64 ``dy``).

    Examples:
        >>> idx, dy = torch.tensor([[1, 2, 1]]), torch.ones(1, 3, 2)
        >>> embedding_norm_ref(idx, dy)  # row 1 gets 2*dy, row 2 gets dy: 4*2 + 1*2
        tensor([10.])
    """
    return embedding_dot_ref(idx, dy, idx, dy)


def embedding_linear_dot_ref(idx: torch.Tensor, dy_emb: torch.Tensor, x_lin: torch.Tensor, dy_lin: torch.Tensor) -> torch.Tensor:
    """Per-sample ``<G_emb,i, G_lin,i>`` for a table W [V, d] used as embedding and as ``F.linear`` weight.

    Args:
        idx: [B, Te] embedding indices in ``[0, V)`` (``IndexError`` otherwise). dy_emb: [B, Te, d] embedding output
            gradient. x_lin: [B, Tl, d] linear input. dy_lin: [B, Tl, V] linear output gradient.

    Returns:
        [B] fp32 (fp64 if an input is fp64). ``H dE^T`` is taken on ``x_lin`` and ``dy_emb`` in their common dtype
        (a bf16 ``x_lin`` is upcast, never the fp32 ``dy_emb`` rounded to bf16): the cross term of exactly the values
        the clipped sums add, so the measured norm bounds the clipped contribution.
    """
    _check_linear(idx, dy_emb, x_lin, dy_lin)
    dt = _common(x_lin, dy_emb)
    x_lin, dy_emb = cast(x_lin, dt), cast(dy_emb, dt)
    B, Te, Tl = idx.shape[0], idx.shape[1], x_lin.shape[1]
    out = torch.empty(B, dtype=promote(acc_dtype(dy_emb), acc_dtype(dy_lin)), device=dy_emb.device)
    for sl in batch_chunks(B, 2 * Te * Tl):
        gathered = torch.gather(dy_lin[sl], 2, idx[sl].long().unsqueeze(1).expand(-1, Tl, -1))  # [b, Tl, Te]
        hd = bmm_acc(x_lin[sl], dy_emb[sl].transpose(1, 2))  # [b, Tl, Te]
        out[sl] = (upcast(gathered) * hd).sum(dim=(1, 2))
    return out


def embedding_accumulate_ref(idx: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor, num_embeddings: int,
                             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_i scale_i G_emb,i`` as a dense [V, d] tensor (index-add of scaled rows).

    Args:
        idx: [B, T] indices in ``[0, V)`` (``IndexError`` otherwise). dy: [B, T, d]. scale: [B] (exactly: no
            broadcast of a length-1 scale; ``ValueError`` otherwise). num_embeddings: V.
        out: optional [V, d] tensor to accumulate into.

    Returns:
        ``out`` if given, else a new [V, d] fp32 (fp64 for fp64 inputs) tensor.
    """
    _check_accumulate(idx, dy, scale, num_embeddings, out)
    d = dy.shape[-1]
    if out is None:
        out = torch.zeros(num_embeddings, d, dtype=acc_dtype(dy), device=dy.device)
    rows = (upcast(dy) * upcast(scale).view(-1, 1, 1)).reshape(-1, d).to(out.dtype)
    return out.index_add_(0, idx.reshape(-1), rows)
