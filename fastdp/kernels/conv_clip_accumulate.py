"""Clip-and-accumulate for convolutions: ``grad_W += sum_i C_i dY_i^T X_i`` with ``X_i`` sample i's patches.

The weight-gradient convolution of non-private training with each sample's output gradient scaled by its clip
factor. The reference scales dY and calls PyTorch's weight-gradient convolution. The Triton kernel forms each
sample's partial product over its output positions from implicit-im2col patch tiles (``conv_norm._conv_tiles``;
no patch buffer, no scaled copy of dY) in fp32 and multiplies it by ``C_i``, so 16-bit operands are never rounded
after scaling: a sample clipped to R adds at most R up to fp32 rounding (the same design as
``clip_accumulate``; see its docstring). Programs split the batch into chunks for parallelism and add their
tiles into the fp32 output with atomics (the summation order across chunks is not fixed).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._backend import HAS_TRITON, backend_for_op, interpreting
from ._common import cast, on_input_device, upcast
from ._tuning import Tiles, mma_tiles
from .conv_norm import as_conv2d, check_conv, needs_64bit_offsets

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .conv_norm import _conv_tiles
    from .direct_norm import _grad_step

    @triton.jit
    def _conv_clip_accumulate_kernel(x, dy, scale, out, sx_b, sx_c, sx_h, sx_w, sy_b, sy_c, sy_h, sy_w, so_m,
                                     B, H, W, Wo, L, COG, CG, KH, KW, SH, SW, PH, PW, DH, DW, GROUPS,
                                     BM: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr, FP32_DOT: tl.constexpr,
                                     IEEE: tl.constexpr, O64: tl.constexpr):
        """out[g*COG + m, n] += sum over this program's samples b of scale[b] * (dY_b^T X_b)[m, n].

        Program (chunk * GROUPS + g, m tile, n tile); n = (c, i, j) over CG * KH * KW, the weight's own layout.
        The batch is split into as many chunks of consecutive samples as the grid's first dim has per group.
        FP32_DOT: fp32 operands (fp32 inputs, short L, the interpreter); else the 16-bit tensor-core product.
        """
        pid = tl.program_id(0)
        chunk = pid // GROUPS
        g = pid % GROUPS
        if O64:  # 64-bit offsets inside a sample and into out (one spans 2^31 elements or more)
            g = g.to(tl.int64)
        m = tl.program_id(1) * BM + tl.arange(0, BM)
        n = tl.program_id(2) * BN + tl.arange(0, BN)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        SPB = tl.cdiv(B, tl.num_programs(0) // GROUPS)  # samples per chunk
        for s in range(0, SPB):
            b = (chunk * SPB + s).to(tl.int64)  # 64-bit offsets: tensors past 2^31 elements
            L_b = tl.where(b < B, L, 0)  # a chunk's tail past the batch loads nothing
            x_base = x + b * sx_b + (g * CG) * sx_c
            y_base = dy + b * sy_b + (g * COG) * sy_c
            part = tl.zeros([BM, BN], dtype=tl.float32)
            for l0 in range(0, L, BL):
                a, p = _conv_tiles(x_base, y_base, sx_c, sx_h, sx_w, sy_c, sy_h, sy_w, m, n, KH, KW, l0, H, W,
                                   Wo, L_b, COG, CG, SH, SW, PH, PW, DH, DW, BL, O64)
                part = _grad_step(part, a, p, FP32_DOT, IEEE)
            cb = tl.load(scale + tl.minimum(b, B - 1))  # (past the batch: times a zero partial)
            acc += cb * part
        mask = (m[:, None] < COG) & (n[None, :] < CG * KH * KW)
        if O64:
            m, n = m.to(tl.int64), n.to(tl.int64)
        tl.atomic_add(out + (g * COG + m)[:, None] * so_m + n[None, :], acc, mask=mask)

    CONV_CLIP_TILES = Tiles("conv_clip_accumulate", _conv_clip_accumulate_kernel,
                            key=("L", "COG", "CG", "KH", "KW", "FP32_DOT"), default=mma_tiles("BM", "BN", "BL")[0],
                            candidates=mma_tiles("BM", "BN", "BL"))


def _check(x, dy, scale, weight_shape, stride, padding, dilation, groups, out):
    """Shapes of the dispatcher's and the reference's arguments: ``conv_norm.check_conv`` (batch, channels, dy's
    spatial size from the geometry), scale [B] and out of the weight's shape."""
    check_conv(x, dy, weight_shape, stride, padding, dilation, groups)
    if tuple(scale.shape) != (x.shape[0],):
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected one factor per sample of the batch "
                         f"({x.shape[0]},)")
    if out is not None and tuple(out.shape) != tuple(weight_shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected the weight's {tuple(weight_shape)}")


def conv_clip_accumulate_ref(x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor, weight_shape: Sequence[int],
                             stride, padding, dilation, groups: int,
                             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_i scale_i dW_i`` of a convolution, optionally added into ``out``.

    fp32/fp64 inputs, and 16-bit inputs on the CPU: dY is scaled in the accumulation dtype and the weight-gradient
    convolution runs on upcast operands (exact scaling). 16-bit inputs on CUDA: the scaled dY is rounded to 16 bits
    for cuDNN's fast weight gradient (a sample clipped to R may add a few 1e-4 more than R; the Triton kernel does
    not round).

    Args:
        x: [B, C_in, *spatial] input. dy: [B, C_out, *spatial_out] output gradient (cast to x's dtype).
        scale: [B] fp32 factors. ``ValueError`` where the shapes do not fit the geometry.
        weight_shape: [C_out, C_in / groups, *kernel]. stride, padding (symmetric), dilation: per spatial dim.
        out: optional tensor of the weight's shape (any float dtype, e.g. an fp32 buffer view) to add into.

    Returns:
        ``out`` if given, else a new tensor of the weight's shape in the accumulation dtype (fp32 for 16-bit x).

    Examples:
        >>> x, dy, c = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5), torch.rand(2)
        >>> g = conv_clip_accumulate_ref(x, dy, c, (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1)
        >>> w = torch.zeros(4, 3, 3, 3, requires_grad=True)
        >>> torch.nn.functional.conv2d(x, w, padding=1).mul(dy * c.view(-1, 1, 1, 1)).sum().backward()
        >>> torch.allclose(g, w.grad, atol=1e-5)
        True
    """
    _check(x, dy, scale, weight_shape, stride, padding, dilation, groups, out)
    dy = cast(dy, x.dtype)
    s = scale.view(-1, *([1] * (dy.dim() - 1)))
    if x.dtype not in (torch.float32, torch.float64) and x.is_cuda:
        scaled, xx = (upcast(dy) * s).to(x.dtype), x
    else:
        xx = upcast(x)
        scaled = (upcast(dy) * s).to(xx.dtype)
    weight = torch.empty(tuple(weight_shape), dtype=xx.dtype, device=x.device)  # shape only: not read
    g = torch.ops.aten.convolution_backward(scaled, xx, weight, None, list(stride), list(padding), list(dilation),
                                            False, [0] * len(stride), groups, [False, True, False])[1]
    g = upcast(g)
    return g if out is None else out.add_(g.to(out.dtype))


@on_input_device
def conv_clip_accumulate(x: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor, weight_shape: Sequence[int],
                         stride, padding, dilation, groups: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatching ``conv_clip_accumulate_ref`` / the implicit-im2col Triton kernel (same arguments and result).

    fp64 inputs take the reference; an ``out`` that is not a contiguous fp32 tensor gets the kernel's result added.
    """
    if x.dtype == torch.float64 or backend_for_op("conv_clip_accumulate", x) == "reference":
        return conv_clip_accumulate_ref(x, dy, scale, weight_shape, stride, padding, dilation, groups, out)
    _check(x, dy, scale, weight_shape, stride, padding, dilation, groups, out)
    dy = cast(dy, x.dtype)  # tl.dot takes one dtype (as the reference: dY in x's dtype, then scaled in fp32)
    if out is not None and not (out.dtype == torch.float32 and out.is_contiguous()):
        return out.add_(conv_clip_accumulate(x, dy, scale, weight_shape, stride, padding, dilation, groups)
                        .to(out.dtype))
    target = torch.zeros(tuple(weight_shape), dtype=torch.float32, device=x.device) if out is None else out
    x2, dy2, ws, st, pad, dil = as_conv2d(x, dy, weight_shape, stride, padding, dilation)
    c_out, cg, kh, kw = ws
    B, _, H, W = x2.shape
    Ho, Wo = dy2.shape[2], dy2.shape[3]
    L = Ho * Wo
    if B == 0 or L == 0:
        return target
    cog, K = c_out // groups, cg * kh * kw
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 0

    def grid(meta):
        # enough programs to fill the device (4 per SM) by splitting the batch into chunks; two chunks at least
        # in the interpreter, so the tests cover the atomics
        tiles = groups * triton.cdiv(cog, meta["BM"]) * triton.cdiv(K, meta["BN"])
        chunks = max(1, min(B, triton.cdiv(4 * sms if sms else 2 * tiles, tiles)))
        chunks = triton.cdiv(B, triton.cdiv(B, chunks))  # no empty chunk
        return chunks * groups, triton.cdiv(cog, meta["BM"]), triton.cdiv(K, meta["BN"])

    fp32_dot = x.dtype == torch.float32 or L < 16 or interpreting()
    CONV_CLIP_TILES[grid](x2, dy2, scale.float().contiguous(), target, *x2.stride(), *dy2.stride(), K, B, H, W, Wo, L,
                          cog, cg, kh, kw, *st, *pad, *dil, groups, FP32_DOT=fp32_dot,
                          IEEE=fp32_dot and not interpreting(),
                          O64=needs_64bit_offsets(x2, dy2) or target.numel() >= 2 ** 31 - 1)
    return target
