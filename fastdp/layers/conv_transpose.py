"""Transposed convolutions: ``F.conv_transpose1d/2d/3d`` (nn.ConvTranspose1d/2d/3d and subclasses).

A transposed convolution is the adjoint of the convolution ``u -> conv(u, W)`` that maps its output space back to
its input space (same weight ``W`` [C_in, C_out / groups, *kernel], stride, padding, dilation, groups), so
``<dY, conv_transpose(X, W)> = <conv(dY, W), X>``: sample i's weight gradient is the weight gradient of that
convolution with ``dY_i`` as its input and ``X_i`` as its output gradient. The handler records exactly that as a
``ConvGrad`` (``ConvNdGrad`` in 3-D) with the two operands swapped, so the norms (direct or ghost, the Triton kernels
in 1-D/2-D) and the clipped sum are those of an ordinary convolution. ``output_padding`` adds output positions past
the last input position; where they make the adjoint convolution one position longer than X (output_padding not
below the stride, allowed when it is below the dilation), X is padded with zeros there (no input, no gradient).
The input gradient is PyTorch's transposed-convolution backward with the weight gradient masked off.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdp.grad_sample import DenseGrad
from fastdp.kernels._common import cast, upcast
from fastdp.tap import UnsupportedLayerError, register_op

from ._common import anchor_of, check_batch, compute_operands, open_uses, plain_input, taps_of, values
from .conv import _tuple, weight_grad_type

_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _adjoint_operand(x: torch.Tensor, dy: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """X padded with zeros at the end of each spatial dim to the output size of the convolution of dY (the adjoint
    convolution's output gradient)."""
    size = [(s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in zip(dy.shape[2:], kernel, stride, padding,
                                                                              dilation)]
    extra = [n - s for n, s in zip(size, x.shape[2:])]
    if any(e < 0 for e in extra):  # (cannot happen for PyTorch's output sizes: a guard, not a path)
        raise UnsupportedLayerError(f"conv_transpose: output of spatial size {tuple(dy.shape[2:])} is shorter than "
                                    f"its input {tuple(x.shape[2:])} allows; per-sample gradients not supported")
    if not any(extra):
        return x
    pads = []
    for e in reversed(extra):  # F.pad takes the last dim first
        pads += [0, e]
    return F.pad(x, pads)


class _ConvTransposeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, anchor, wtap, btap, stride, padding, output_padding, groups, dilation):
        (xc, wc, bc), _ = compute_operands(x.device.type, x, w, b)
        with torch.autocast(x.device.type, enabled=False):
            y = _CONV_TRANSPOSE[wc.dim() - 2](xc, wc, bc, stride, padding, output_padding, groups, dilation)
        ctx.save_for_backward(xc, wc)
        ctx.args = (wtap, btap, stride, padding, output_padding, groups, dilation, x.dtype)
        ctx.uses = open_uses(wtap, btap)
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, wc = ctx.saved_tensors
        wtap, btap, stride, padding, output_padding, groups, dilation, x_dtype = ctx.args
        dy = cast(dy, wc.dtype)
        n = wc.dim() - 2
        gx = None
        if ctx.needs_input_grad[0]:
            gx = cast(torch.ops.aten.convolution_backward(
                dy, xc, wc, None, list(stride), list(padding), list(dilation), True, list(output_padding), groups,
                [True, False, False])[0], x_dtype)
        if wtap is not None:  # the adjoint convolution: input dY, output gradient X
            g = weight_grad_type(n)(wtap._fdp_param, wtap._fdp_ctx.owner, wc, stride, padding, dilation, groups)
            g.set(dy, _adjoint_operand(xc, dy, wc.shape[2:], stride, padding, dilation))
            wtap.finish(g, ctx.uses[0])
        if btap is not None:
            btap.finish(DenseGrad(btap._fdp_param, btap._fdp_ctx.owner, upcast(dy).sum(dim=tuple(range(2, dy.dim())))),
                        ctx.uses[1])
        return (gx,) + (None,) * 10


def _conv_transpose(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    wtap, btap = taps_of(weight, bias)
    x = plain_input(input, "conv_transpose", (wtap, btap))
    xv, wv, bv = values(x, weight, bias)
    n = wv.dim() - 2
    check_batch(x, (wtap, btap), f"conv_transpose{n}d", min_dim=n + 2)  # (an unbatched input is refused too)
    if isinstance(padding, str):
        raise UnsupportedLayerError(f"conv_transpose{n}d: string padding {padding!r} is not a PyTorch option")
    stride, padding, dilation = _tuple(stride, n), _tuple(padding, n), _tuple(dilation, n)
    output_padding = _tuple(output_padding, n)
    return _ConvTransposeFn.apply(xv, wv, bv, anchor_of(wtap, btap), wtap, btap, stride, padding, output_padding,
                                  groups, dilation)


register_op(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)(_conv_transpose)
