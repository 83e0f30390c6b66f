"""Clip-and-accumulate: ``sum_i C_i dY_i^T X_i`` as one GEMM.

This is the weight-gradient GEMM of non-private training with each sample's output gradient
scaled by its clip factor: the same FLOPs, done once, after the clip factors are known.

Where the factor is applied decides whether the clip bound holds for the sum actually computed. Scaling a bf16/fp16
``dY_i`` by ``C_i`` and rounding it back to 16 bits before the tensor-core product perturbs every element by up to
2^-8 relative, so a clipped sample's contribution can exceed R (by ~3e-4 relative on random data; unbounded relative
to R in the worst case, through cancellation). The Triton kernel therefore keeps the 16-bit operands as they are,
forms each sample's partial product ``dY_i^T X_i`` in fp32 (bf16 x bf16 products are exact in fp32) and multiplies
the fp32 partial by ``C_i``: the contribution is ``C_i`` times the fp32-accumulated gradient whose norm was measured.
For sequences shorter than 16 (a per-sample partial would waste most of a tensor-core tile) it upcasts both
operands and runs an fp32 (IEEE) product instead; fp32 inputs are scaled in fp32 as they are loaded.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backend import HAS_TRITON, backend_for_op, interpreting
from ._common import _ACC, as_btd, bmm_acc, cast, check_linear, on_input_device, upcast
from ._tuning import Tile, Tiles, mma_tiles

MIN_PER_SAMPLE_T = 16  # shorter sequences take the fp32 product (see the module docstring)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .direct_norm import _grad_step

    @triton.jit
    def _clip_accumulate_kernel(x, dy, scale, out, sx_r, sx_k, sy_r, sy_k, so_m, so_n, B, T, D, P,
                                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PER_SAMPLE: tl.constexpr,
                                UPCAST: tl.constexpr, IEEE: tl.constexpr):
        """out[m, n] += sum_i scale[i] sum_t dY[i*T + t, m] X[i*T + t, n].

        PER_SAMPLE: each sample's partial product from the unscaled operands, scaled in fp32 (16-bit inputs).
        Otherwise one GEMM over the B*T rows with the scale applied to dY in fp32 as it is loaded (fp32 inputs, or
        16-bit inputs with UPCAST and IEEE: an exact fp32 product)."""
        m = tl.program_id(0) * BM + tl.arange(0, BM)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        m64, n64 = m.to(tl.int64), n.to(tl.int64)  # 64-bit offsets: a column or out row past 2^31 elements too
        k = tl.arange(0, BK)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        if PER_SAMPLE:
            for i in range(0, B):
                part = tl.zeros([BM, BN], dtype=tl.float32)
                for t0 in range(0, T, BK):
                    r = (i * T + t0 + k).to(tl.int64)  # 64-bit offsets: tensors past 2^31 elements
                    ok = (t0 + k) < T
                    a = tl.load(dy + r[:, None] * sy_r + m64[None, :] * sy_k, mask=ok[:, None] & (m[None, :] < P),
                                other=0.0)
                    b = tl.load(x + r[:, None] * sx_r + n64[None, :] * sx_k, mask=ok[:, None] & (n[None, :] < D),
                                other=0.0)
                    # (UPCAST: the interpreter's dot takes fp32 operands, the same exact products)
                    part = _grad_step(part, a, b, UPCAST, False)
                acc += tl.load(scale + i) * part
        else:
            R = B * T
            for r0 in range(0, R, BK):
                r = (r0 + k).to(tl.int64)
                a = tl.load(dy + r[:, None] * sy_r + m64[None, :] * sy_k, mask=(r[:, None] < R) & (m[None, :] < P),
                            other=0.0)
                c = tl.load(scale + r // T, mask=r < R, other=0.0)
                b = tl.load(x + r[:, None] * sx_r + n64[None, :] * sx_k, mask=(r[:, None] < R) & (n[None, :] < D),
                            other=0.0)
                a = a.to(tl.float32) * c[:, None]
                acc = _grad_step(acc, a, b, True, IEEE)  # fp32 operands; IEEE off only in the interpreter
        ptrs = out + m64[:, None] * so_m + n64[None, :] * so_n
        mask = (m[:, None] < P) & (n[None, :] < D)
        tl.store(ptrs, (tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) + acc).to(out.dtype.element_ty),
                 mask=mask)

    # K tiles of 16 for per-sample partials of 16-row samples (a 32-row tile would be half padding)
    CLIP_TILES = Tiles("clip_accumulate", _clip_accumulate_kernel, key=("T", "D", "P", "PER_SAMPLE"),
                       default=mma_tiles("BM", "BN", "BK")[0],
                       candidates=mma_tiles("BM", "BN", "BK") + [Tile.of(BM=64, BN=64, BK=16, num_stages=3)])


@on_input_device
def clip_accumulate(x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatching ``clip_accumulate_ref`` / the Triton kernel (same signature, checks and result).

    An fp64 ``out`` (with fp32/16-bit inputs) gets the kernel's fp32 result added on the host, as the reference
    adds its fp32 product: the kernel's read-modify-write is in fp32 and would round the fp64 accumulator.
    """
    if backend_for_op("clip_accumulate", x) == "reference" or x.dtype == torch.float64:
        return clip_accumulate_ref(x, dy, scale, out)
    x, dy = as_btd(x), as_btd(dy)
    _check(x, dy, scale, out)
    if out is not None and out.dtype == torch.float64:
        return out.add_(clip_accumulate(x, dy, scale))
    dy = cast(dy, x.dtype)
    B, T, D, P = x.shape[0], x.shape[1], x.shape[2], dy.shape[2]
    if out is None:
        out = torch.zeros(P, D, dtype=x.dtype if x.dtype == torch.float32 else torch.float32, device=x.device)
    if B * T == 0:
        return out
    x2, dy2 = x.reshape(B * T, D), dy.reshape(B * T, P)
    per_sample = x.dtype != torch.float32 and T >= MIN_PER_SAMPLE_T
    grid = lambda meta: (triton.cdiv(P, meta["BM"]), triton.cdiv(D, meta["BN"]))  # noqa: E731
    CLIP_TILES[grid](x2, dy2, scale.float().contiguous(), out, *x2.stride(), *dy2.stride(), *out.stride(), B, T, D,
                     P, PER_SAMPLE=per_sample, UPCAST=interpreting(), IEEE=not interpreting())
    return out


def clip_accumulate_ref(x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(scale * dY)^T X`` summed over batch and sequence, optionally accumulated into ``out``.

    fp32/fp64 inputs, and 16-bit inputs on the CPU or with T < 16: the scaled operand stays in the accumulation dtype
    (an fp32 product of the upcast 16-bit operands), so each sample adds ``C_i`` times the gradient whose norm was
    measured. 16-bit inputs on CUDA with T >= 16: the scaled operand is rounded to 16 bits for the fast tensor-core
    GEMM (fp32 output); a sample clipped to R then adds up to a few 1e-4 more than R (see the module docstring;
    the Triton kernel has no such rounding).

    Args:
        x: [B, *, d] layer input. dy: [B, *, p] output gradient (same B and positions; cast to x's dtype).
        scale: [B] per-sample factors (fp32), e.g. clip factors (one per sample: no broadcasting).
        out: optional [p, d] tensor (any float dtype, e.g. an fp32 buffer view) to add the result to.
        ``ValueError`` where the shapes disagree.

    Returns:
        ``out`` if given, else a new [p, d] tensor in x's accumulation dtype (fp32 for 16-bit inputs).

    Examples:
        >>> x, dy, c = torch.randn(3, 4, 5), torch.randn(3, 4, 2), torch.rand(3)
        >>> ref = torch.einsum("b,btp,btd->pd", c, dy, x)
        >>> torch.allclose(clip_accumulate_ref(x, dy, c), ref, atol=1e-5)
        True
    """
    x, dy = as_btd(x), as_btd(dy)
    _check(x, dy, scale, out)
    dy = cast(dy, x.dtype)
    p, d = dy.shape[-1], x.shape[-1]
    s = scale.view(-1, 1, 1)
    rounded = x.dtype not in _ACC and x.is_cuda and x.shape[1] >= MIN_PER_SAMPLE_T
    if not rounded:
        x, dy = upcast(x), upcast(dy)
    if p <= d:  # scale the narrower operand: (c * dY)^T X == dY^T (c * X)
        dy = (upcast(dy) * s).to(dy.dtype)
    else:
        x = (upcast(x) * s).to(x.dtype)
    a, b = dy.reshape(-1, p).t(), x.reshape(-1, d)
    if rounded:
        g = bmm_acc(a.unsqueeze(0), b.unsqueeze(0))[0]
        return g if out is None else out.add_(g)
    if out is None:
        return a.mm(b)
    return out.addmm_(a, b) if out.dtype == a.dtype else out.add_(a.mm(b))


def _check(x, dy, scale, out):
    """Shapes of the dispatcher's and the reference's arguments (x, dy as [B, T, features])."""
    check_linear(x, dy, scale)
    if out is not None and tuple(out.shape) != (dy.shape[-1], x.shape[-1]):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected [p, d] = ({dy.shape[-1]}, {x.shape[-1]})")
