"""Convolutions: ``F.conv1d`` / ``F.conv2d`` / ``F.conv3d`` (nn.Conv1d/2d/3d and subclasses).

Backward computes the input gradient with the conv backward (weight gradient masked off) and
records a ``ConvGrad``: per-sample norms over the patches (direct or ghost; implicit im2col in the Triton
kernels), clipped sum by one weight-gradient pass with the clip factors applied (the non-private
weight-gradient cost, paid once). 3-D convolutions record a ``ConvNdGrad`` (PyTorch's n-d weight-gradient
convolution: direct norms by chunks of the batch, no Triton kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdp.grad_sample import ConvGrad, ConvNdGrad, DenseGrad
from fastdp.kernels._common import cast, upcast
from fastdp.tap import register_op

from ._common import anchor_of, check_batch, compute_operands, open_uses, plain_input, taps_of, values

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def weight_grad_type(spatial_dims: int) -> type:
    """The ``PerSampleGrad`` of a convolution weight: the Triton-backed ``ConvGrad`` for 1-D/2-D, else ``ConvNdGrad``."""
    return ConvGrad if spatial_dims in (1, 2) else ConvNdGrad


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _explicit_padding(x, w, padding, stride, dilation):
    """Resolve 'valid'/'same' to symmetric ints, padding x explicitly when 'same' is asymmetric."""
    n = w.dim() - 2
    if padding == "valid":
        return x, (0,) * n
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' needs stride 1 (as in PyTorch)")
        totals = [d * (k - 1) for d, k in zip(dilation, w.shape[2:])]
        if all(t % 2 == 0 for t in totals):
            return x, tuple(t // 2 for t in totals)
        pads = []
        for t in reversed(totals):  # F.pad takes the last dim first
            pads += [t // 2, t - t // 2]
        return F.pad(x, pads), (0,) * n
    return x, _tuple(padding, n)


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, anchor, wtap, btap, stride, padding, dilation, groups):
        (xc, wc, bc), _ = compute_operands(x.device.type, x, w, b)
        with torch.autocast(x.device.type, enabled=False):
            y = _CONV[wc.dim() - 2](xc, wc, bc, stride, padding, dilation, groups)
        ctx.save_for_backward(xc, wc)
        ctx.args = (wtap, btap, stride, padding, dilation, groups, x.dtype)
        ctx.uses = open_uses(wtap, btap)
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, wc = ctx.saved_tensors
        wtap, btap, stride, padding, dilation, groups, x_dtype = ctx.args
        dy = cast(dy, wc.dtype)
        n = wc.dim() - 2
        gx = None
        if ctx.needs_input_grad[0]:
            gx = cast(torch.ops.aten.convolution_backward(
                dy, xc, wc, None, list(stride), list(padding), list(dilation), False, [0] * n, groups,
                [True, False, False])[0], x_dtype)
        if wtap is not None:
            g = weight_grad_type(n)(wtap._fdp_param, wtap._fdp_ctx.owner, wc, stride, padding, dilation, groups)
            g.set(xc, dy)
            wtap.finish(g, ctx.uses[0])
        if btap is not None:
            btap.finish(DenseGrad(btap._fdp_param, btap._fdp_ctx.owner, upcast(dy).sum(dim=tuple(range(2, dy.dim())))),
                        ctx.uses[1])
        return (gx,) + (None,) * 9


def _conv(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    wtap, btap = taps_of(weight, bias)
    x = plain_input(input, "conv", (wtap, btap))
    xv, wv, bv = values(x, weight, bias)
    n = wv.dim() - 2
    check_batch(x, (wtap, btap), f"conv{n}d", min_dim=n + 2)  # (an unbatched [C, *spatial] input is refused too)
    stride, dilation = _tuple(stride, n), _tuple(dilation, n)
    xv, padding = _explicit_padding(xv, wv, padding, stride, dilation)
    return _ConvFn.apply(xv, wv, bv, anchor_of(wtap, btap), wtap, btap, stride, padding, dilation, groups)


register_op(F.conv1d, F.conv2d, F.conv3d)(_conv)
