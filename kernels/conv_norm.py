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

The engine picks the cheaper by FLOPs (``T (p + d) < p d`` with T = L). The Triton kernel (issue: fused
kernels) forms the tiles in registers with an implicit im2col.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._common import acc_dtype, batch_chunks, upcast
from .direct_norm import direct_norm_ref
from .ghost_norm import ghost_norm_ref


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

    Args:
        x: [B, C_in, *spatial] input. dy: [B, C_out, *spatial_out] output gradient (same dtype).
        weight_shape: (C_out, C_in / groups, *kernel). stride, padding, dilation: per spatial dim.
    """
    B, c_in, c_out = x.shape[0], x.shape[1], dy.shape[1]
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
    """
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
    if len(weight_shape) == 3:  # conv1d as a conv2d of height 1
        x, dy = x.unsqueeze(2), dy.unsqueeze(2)
        weight_shape = (*weight_shape[:2], 1, weight_shape[2])
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
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
