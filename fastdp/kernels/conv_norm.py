"""Per-sample norms of convolution weight gradients (1-D and 2-D, any stride/padding/dilation/groups).

A convolution is a Linear over unfolded patches: with ``X_i`` [L, C_in/g * k] (L output positions)
and ``dY_i`` [L, C_out/g] per group, sample i's weight gradient is ``dY_i^T X_i``. Two ways to its norm:

* direct: per-sample weight gradients, reduced to norms. On the CPU from one grouped weight-gradient
  convolution with the batch folded into the groups (``[1, B*C_in, ...]`` input, ``B*g`` groups; no
  im2col buffer). On CUDA cuDNN runs that grouped convolution 10-20x slower than the plain weight
  gradient at WRN shapes in fp32 (benchmarks/NOTES.md), so there the patches are gathered by one
  strided copy and multiplied by a batched GEMM. Both chunk over the batch;
* ghost: ``sum_{l,l'} (X X^T)[l,l'] (dY dY^T)[l,l']`` from patches gathered by one strided copy
  (``as_strided``; ``F.unfold`` on CUDA launches one kernel per sample).

The engine picks the cheaper by FLOPs (``T (p + d) < p d`` with T = L). ``conv_norm`` dispatches both to
Triton kernels with an implicit im2col (patch addresses computed in the kernel: no patch buffer): the direct
norm forms each per-sample tile ``dY_i^T X_i`` in registers, the ghost norm tiles of the two L x L Grams
(neither a per-sample gradient nor a Gram reaches memory).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._backend import HAS_TRITON, backend_for_op, interpreting
from ._common import acc_dtype, batch_chunks, cast, on_input_device, upcast
from ._tuning import Tiles, gram_tiles, mma_tiles
from .direct_norm import direct_norm_ref
from .ghost_norm import ghost_norm_ref

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .direct_norm import _grad_step
    from .ghost_norm import _gram_step

    @triton.jit
    def _conv_dy_tile(y_base, sy_c, sy_h, sy_w, m, lpos, Wo, L, COG, O64: tl.constexpr):
        """One sample's output gradient [BL, BM] at output positions ``lpos`` and channels ``m`` (zero past
        ``L`` or ``COG``). O64: 64-bit offsets inside the sample (one spans 2^31 elements or more)."""
        oh = lpos // Wo
        ow = lpos % Wo
        if O64:
            m, oh, ow = m.to(tl.int64), oh.to(tl.int64), ow.to(tl.int64)
        return tl.load(y_base + m[None, :] * sy_c + oh[:, None] * sy_h + ow[:, None] * sy_w,
                       mask=(lpos[:, None] < L) & (m[None, :] < COG), other=0.0)

    @triton.jit
    def _conv_patch_tile(x_base, sx_c, sx_h, sx_w, n, lpos, KH, KW, H, W, Wo, L, CG, SH, SW, PH, PW, DH, DW,
                         O64: tl.constexpr):
        """One sample's patches [BL, BN] at output positions ``lpos`` and columns ``n = (c, i, j)`` over
        CG * KH * KW (the weight's layout), each loaded from x at its input coordinate: the implicit im2col
        (zero outside the image, i.e. the padding, and past ``L`` or the last column)."""
        c = n // (KH * KW)
        i = (n % (KH * KW)) // KW
        j = n % KW
        oh = lpos // Wo
        ow = lpos % Wo
        ih = oh[:, None] * SH - PH + i[None, :] * DH
        iw = ow[:, None] * SW - PW + j[None, :] * DW
        inside = (lpos[:, None] < L) & (c[None, :] < CG) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if O64:
            c, ih, iw = c.to(tl.int64), ih.to(tl.int64), iw.to(tl.int64)
        return tl.load(x_base + c[None, :] * sx_c + ih * sx_h + iw * sx_w, mask=inside, other=0.0)

    @triton.jit
    def _conv_tiles(x_base, y_base, sx_c, sx_h, sx_w, sy_c, sy_h, sy_w, m, n, KH, KW, l0, H, W, Wo, L, COG, CG,
                    SH, SW, PH, PW, DH, DW, BL: tl.constexpr, O64: tl.constexpr):
        """One sample's operands over output positions ``l0 .. l0 + BL``: dY [BL, BM] at the channels ``m`` and the
        patches [BL, BN] at the columns ``n``. Positions ``>= L`` load zeros (``L = 0``: a sample past the batch)."""
        lpos = l0 + tl.arange(0, BL)
        a = _conv_dy_tile(y_base, sy_c, sy_h, sy_w, m, lpos, Wo, L, COG, O64)
        p = _conv_patch_tile(x_base, sx_c, sx_h, sx_w, n, lpos, KH, KW, H, W, Wo, L, CG, SH, SW, PH, PW, DH, DW, O64)
        return a, p

    @triton.jit
    def _conv_direct_norm_kernel(x, dy, out, sx_b, sx_c, sx_h, sx_w, sy_b, sy_c, sy_h, sy_w,
                                 H, W, Wo, L, COG, CG, KH, KW, SH, SW, PH, PW, DH, DW, GROUPS,
                                 BM: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr, UPCAST: tl.constexpr,
                                 IEEE: tl.constexpr, O64: tl.constexpr):
        """out[b] += ||tile of dY_{b,g}^T X_{b,g}||^2 for one [BM, BN] tile of group g's weight gradient.

        Rows m: output channels of the group (COG); columns n = (c, i, j) over CG * KH * KW; the reduction runs
        over the L = Ho * Wo output positions (``_conv_tiles``: the implicit im2col).
        """
        pid = tl.program_id(0)
        b = (pid // GROUPS).to(tl.int64)  # 64-bit offsets: tensors past 2^31 elements
        g = pid % GROUPS
        if O64:
            g = g.to(tl.int64)
        m = tl.program_id(1) * BM + tl.arange(0, BM)
        n = tl.program_id(2) * BN + tl.arange(0, BN)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        x_base = x + b * sx_b + (g * CG) * sx_c
        y_base = dy + b * sy_b + (g * COG) * sy_c
        for l0 in range(0, L, BL):
            a, p = _conv_tiles(x_base, y_base, sx_c, sx_h, sx_w, sy_c, sy_h, sy_w, m, n, KH, KW, l0, H, W, Wo, L,
                               COG, CG, SH, SW, PH, PW, DH, DW, BL, O64)
            acc = _grad_step(acc, a, p, UPCAST, IEEE)
        tl.atomic_add(out + b, tl.sum(acc * acc))

    @triton.jit
    def _conv_ghost_norm_kernel(x, dy, out, sx_b, sx_c, sx_h, sx_w, sy_b, sy_c, sy_h, sy_w,
                                H, W, Wo, L, COG, CG, KH, KW, SH, SW, PH, PW, DH, DW, GROUPS,
                                BL: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                                O64: tl.constexpr):
        """out[b] += sum over one (t, s) tile of (P P^T) * (dY dY^T) for group g of sample b.

        P: the sample's patches [L, CG * KH * KW] (implicit im2col, never stored); dY: [L, COG]. Both [BL, BL]
        Grams stay in registers; only the upper triangle of tiles runs, off-diagonal tiles counted twice.
        """
        pid = tl.program_id(0)
        b = (pid // GROUPS).to(tl.int64)
        g = pid % GROUPS
        if O64:
            g = g.to(tl.int64)
        ti = tl.program_id(1)
        si = tl.program_id(2)
        if si < ti:
            return
        t = ti * BL + tl.arange(0, BL)
        s = si * BL + tl.arange(0, BL)
        x_base = x + b * sx_b + (g * CG) * sx_c
        y_base = dy + b * sy_b + (g * COG) * sy_c
        gx = tl.zeros([BL, BL], dtype=tl.float32)
        for k0 in range(0, CG * KH * KW, BK):
            n = k0 + tl.arange(0, BK)
            pt = _conv_patch_tile(x_base, sx_c, sx_h, sx_w, n, t, KH, KW, H, W, Wo, L, CG, SH, SW, PH, PW, DH, DW,
                                  O64)
            ps = _conv_patch_tile(x_base, sx_c, sx_h, sx_w, n, s, KH, KW, H, W, Wo, L, CG, SH, SW, PH, PW, DH, DW,
                                  O64)
            gx = _gram_step(gx, pt, ps, UPCAST, IEEE)
        gy = tl.zeros([BL, BL], dtype=tl.float32)
        for m0 in range(0, COG, BK):
            m = m0 + tl.arange(0, BK)
            at = _conv_dy_tile(y_base, sy_c, sy_h, sy_w, m, t, Wo, L, COG, O64)
            as_ = _conv_dy_tile(y_base, sy_c, sy_h, sy_w, m, s, Wo, L, COG, O64)
            gy = _gram_step(gy, at, as_, UPCAST, IEEE)
        part = tl.sum(gx * gy)
        if si > ti:
            part = part * 2.0
        tl.atomic_add(out + b, part)

    _CONV_KEY = ("L", "COG", "CG", "KH", "KW")
    CONV_DIRECT_TILES = Tiles("conv_direct_norm", _conv_direct_norm_kernel, key=_CONV_KEY,
                              default=mma_tiles("BM", "BN", "BL")[0], candidates=mma_tiles("BM", "BN", "BL"))
    CONV_GHOST_TILES = Tiles("conv_ghost_norm", _conv_ghost_norm_kernel, key=_CONV_KEY,
                             default=gram_tiles("BL", "BK")[0], candidates=gram_tiles("BL", "BK"))

@on_input_device
def conv_norm(x: torch.Tensor, dy: torch.Tensor, weight_shape: Sequence[int], stride, padding, dilation,
              groups: int, ghost: bool) -> torch.Tensor:
    """Dispatching ``conv_norm_ref`` / the implicit-im2col Triton kernels (same arguments, checks and result): the
    direct norm (per-sample tiles ``dY_i^T P_i``) or, with ``ghost``, the ghost norm (tiles of the two L x L Grams).

    fp64 inputs always take the reference. ``dy`` is cast to ``x``'s dtype (as the reference does).
    """
    if x.dtype == torch.float64 or backend_for_op("conv_norm", x) == "reference":
        return conv_norm_ref(x, dy, weight_shape, stride, padding, dilation, groups, ghost)
    check_conv(x, dy, weight_shape, stride, padding, dilation, groups)
    dy = cast(dy, x.dtype)  # tl.dot takes one dtype
    x, dy, weight_shape, stride, padding, dilation = as_conv2d(x, dy, weight_shape, stride, padding, dilation)
    c_out, cg, kh, kw = weight_shape
    B, _, H, W = x.shape
    Ho, Wo = dy.shape[2], dy.shape[3]
    out = torch.zeros(B, dtype=torch.float32, device=x.device)
    L = Ho * Wo
    if B == 0 or L == 0:
        return out
    cog, K = c_out // groups, cg * kh * kw
    geometry = (H, W, Wo, L, cog, cg, kh, kw, *stride, *padding, *dilation, groups)
    flags = dict(UPCAST=interpreting(), IEEE=x.dtype == torch.float32, O64=needs_64bit_offsets(x, dy))
    if ghost:
        grid = lambda meta: (B * groups, triton.cdiv(L, meta["BL"]), triton.cdiv(L, meta["BL"]))  # noqa: E731
        CONV_GHOST_TILES[grid](x, dy, out, *x.stride(), *dy.stride(), *geometry, **flags)
        return out
    grid = lambda meta: (B * groups, triton.cdiv(cog, meta["BM"]), triton.cdiv(K, meta["BN"]))  # noqa: E731
    CONV_DIRECT_TILES[grid](x, dy, out, *x.stride(), *dy.stride(), *geometry, **flags)
    return out


def needs_64bit_offsets(*tensors: torch.Tensor) -> bool:
    """Whether an offset inside one sample (over dims 1.., from its start) can reach 2^31 in any of ``tensors``: the
    conv kernels then index inside a sample in 64 bits (the O64 flag), else in 32 (fewer registers)."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) >= 2 ** 31 - 1 for t in tensors)


def check_conv(x: torch.Tensor, dy: torch.Tensor, weight_shape: Sequence[int], stride, padding, dilation,
               groups: int) -> None:
    """Raise ``ValueError`` unless x [B, C_in, *spatial] and dy [B, C_out, *spatial_out] fit a convolution of weight
    ``weight_shape`` [C_out, C_in / groups, *kernel] with this geometry (1-D or 2-D): the same batch, the channels of
    the weight and ``groups``, and dy's spatial size the convolution's output size. The conv dispatchers' and
    references' check, before any launch."""
    n = len(weight_shape) - 2
    if n not in (1, 2) or x.dim() != n + 2 or dy.dim() != n + 2:
        raise ValueError(f"need x and dy of 3 or 4 dims matching a weight of {len(weight_shape)} dims, got "
                         f"{tuple(x.shape)}, {tuple(dy.shape)}")
    if not (len(stride) == len(padding) == len(dilation) == n):
        raise ValueError(f"stride {tuple(stride)}, padding {tuple(padding)} and dilation {tuple(dilation)} need one "
                         f"value per spatial dim ({n})")
    if x.shape[0] != dy.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and dy {tuple(dy.shape)} disagree on the batch")
    if groups < 1 or weight_shape[0] % groups or dy.shape[1] != weight_shape[0] or \
            x.shape[1] != weight_shape[1] * groups:
        raise ValueError(f"channels of x {x.shape[1]} / dy {dy.shape[1]} do not fit the weight {tuple(weight_shape)} "
                         f"with {groups} groups")
    out = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1
                for size, k, s, p, d in zip(x.shape[2:], weight_shape[2:], stride, padding, dilation))
    if tuple(dy.shape[2:]) != out:
        raise ValueError(f"dy has spatial size {tuple(dy.shape[2:])}, but the convolution of x {tuple(x.shape)} "
                         f"(kernel {tuple(weight_shape[2:])}, stride {tuple(stride)}, padding {tuple(padding)}, "
                         f"dilation {tuple(dilation)}) outputs {out}")


def as_conv2d(x, dy, weight_shape, stride, padding, dilation):
    """A conv1d's tensors and geometry as a conv2d of height 1 (a conv2d's unchanged): what the kernels take."""
    if len(weight_shape) == 3:
        x, dy = x.unsqueeze(2), dy.unsqueeze(2)
        weight_shape = (*weight_shape[:2], 1, weight_shape[2])
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
    return x, dy, tuple(weight_shape), tuple(stride), tuple(padding), tuple(dilation)


def unfold_patches(x: torch.Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int]) -> torch.Tensor:
    """``F.unfold`` for 2-D input [B, C, H, W] as one strided copy: returns [B, C * kh * kw, L].

    Examples:
        >>> x = torch.randn(2, 3, 7, 6)
        >>> ref = F.unfold(x, (3, 2), dilation=(2, 1), padding=(1, 0), stride=(2, 1))
        >>> torch.equal(unfold_patches(x, (3, 2), (2, 1), (1, 0), (2, 1)), ref)
        True
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    B, C, H, W = x.shape
    Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    sB, sC, sH, sW = x.stride()
    patches = x.as_strided((B, C, kh, kw, Ho, Wo), (sB, sC, dh * sH, dw * sW, sh * sH, sw * sW), x.storage_offset())
    return patches.reshape(B, C * kh * kw, Ho * Wo)


def conv_per_sample_grad_ref(x: torch.Tensor, dy: torch.Tensor, weight_shape: Sequence[int], stride, padding,
                             dilation, groups: int) -> torch.Tensor:
    """All per-sample weight gradients [B, *weight_shape] by one grouped weight-gradient convolution.

    16-bit operands are upcast first: each gradient is the fp32 product of the given values (what
    ``conv_clip_accumulate`` scales and adds, so a norm measured from it bounds the clipped contribution), not a
    16-bit rounding of it.

    Args:
        x: [B, C_in, *spatial] input. dy: [B, C_out, *spatial_out] output gradient (cast to x's dtype).
        weight_shape: (C_out, C_in / groups, *kernel). stride, padding, dilation: per spatial dim.

    Returns:
        [B, *weight_shape] fp32 (fp64 for fp64 x); empty for B = 0.
    """
    check_conv(x, dy, weight_shape, stride, padding, dilation, groups)
    x, dy = upcast(x), upcast(cast(dy, x.dtype))
    B, c_in, c_out = x.shape[0], x.shape[1], dy.shape[1]
    if B == 0:  # (a convolution of B * groups = 0 groups raises)
        return torch.zeros((0, *weight_shape), dtype=x.dtype, device=x.device)
    n = len(weight_shape) - 2
    w = torch.empty((B * c_out, *weight_shape[1:]), dtype=x.dtype, device=x.device)
    g = torch.ops.aten.convolution_backward(
        dy.reshape(1, B * c_out, *dy.shape[2:]), x.reshape(1, B * c_in, *x.shape[2:]), w, None, list(stride),
        list(padding), list(dilation), False, [0] * n, B * groups, [False, True, False])[1]
    return g.view(B, *weight_shape)


def conv_norm_ref(x: torch.Tensor, dy: torch.Tensor, weight_shape: Sequence[int], stride, padding, dilation,
                  groups: int, ghost: bool, direct_impl: Optional[str] = None) -> torch.Tensor:
    """Per-sample squared Frobenius norms [B] (fp32; fp64 for fp64) of a conv's weight gradient.

    ``ghost``: use the ghost norm over unfolded patches instead of explicit per-sample gradients.
    ``direct_impl``: "grouped" or "unfold" for the direct norm (default: "unfold" on CUDA, else "grouped").
    Every implementation measures the fp32 (fp64) product of the given values. ``dy`` is cast to ``x``'s dtype;
    ``ValueError`` where the shapes do not fit the geometry (``check_conv``).
    """
    check_conv(x, dy, weight_shape, stride, padding, dilation, groups)
    dy = cast(dy, x.dtype)
    B = x.shape[0]
    out = torch.empty(B, dtype=acc_dtype(x), device=x.device)
    if direct_impl is None:
        direct_impl = "unfold" if x.is_cuda else "grouped"
    if direct_impl not in ("unfold", "grouped"):
        raise ValueError(f"direct_impl must be 'unfold' or 'grouped', got {direct_impl!r}")
    if not ghost and direct_impl == "grouped":
        numel = math.prod(weight_shape)
        for sl in batch_chunks(B, numel):
            g = conv_per_sample_grad_ref(x[sl], dy[sl], weight_shape, stride, padding, dilation, groups)
            out[sl] = upcast(g).flatten(1).pow(2).sum(1)
        return out
    x, dy, weight_shape, stride, padding, dilation = as_conv2d(x, dy, weight_shape, stride, padding, dilation)
    c_out, cg, kh, kw = weight_shape
    L = dy.shape[2] * dy.shape[3]
    per_sample = (cg * groups * kh * kw + c_out) * L + (2 * groups * L * L if ghost else c_out * cg * kh * kw)
    for sl in batch_chunks(B, per_sample):
        b = sl.stop - sl.start
        xu = unfold_patches(x[sl], (kh, kw), stride, padding, dilation).view(b * groups, cg * kh * kw, L)
        du = dy[sl].reshape(b * groups, c_out // groups, L)
        norm = ghost_norm_ref if ghost else direct_norm_ref
        out[sl] = norm(xu.transpose(1, 2), du.transpose(1, 2)).view(b, groups).sum(1)
    return out
