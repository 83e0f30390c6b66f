"""Linear-like layers: ``F.linear`` (nn.Linear), ``x @ W`` / ``torch.addmm`` (HF Conv1D).

Forward computes the layer output as non-private training does (autocast included). Backward
computes only the input gradient ``dY W``; the weight's per-sample gradient is recorded as a
``LinearGrad`` (input, output gradient) and the bias's as explicit per-sample sums of ``dY``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdp.grad_sample import DenseGrad, LinearGrad
from fastdp.kernels._common import as_btd, cast, upcast
from fastdp.tap import ParamTap, UnsupportedLayerError, register_op

from ._common import anchor_of, check_batch, compute_operands, open_uses, plain_input, taps_of, to_front, values


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b (``transposed``: y = x W + b). meta: (weight tap, bias tap, transposed, batch, sd).

    ``batch``: samples in x's leading dim when it holds B*k sample-major rows, else None. ``sd``: x's sample dim
    (1 for a sequence-first [T, B, ..., d] input), moved to the front for the per-sample gradients.
    """

    @staticmethod
    def forward(ctx, x, w, b, anchor, meta):
        wtap, btap, transposed, batch, sd = meta
        (xc, wc, bc), dt = compute_operands(x.device.type, x, w, b)
        if dt is None:
            y = F.linear(xc, wc.t() if transposed else wc, bc)
        else:
            with torch.autocast(x.device.type, enabled=False):
                y = F.linear(xc, wc.t() if transposed else wc, bc)
        ctx.save_for_backward(xc if wtap is not None else None, wc)
        ctx.meta, ctx.x_dtype, ctx.uses = meta, x.dtype, open_uses(wtap, btap)
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, wc = ctx.saved_tensors
        wtap, btap, transposed, batch, sd = ctx.meta
        dy = cast(dy, wc.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = cast(dy @ (wc.t() if transposed else wc), ctx.x_dtype)
        dyb = as_btd(to_front(dy, sd), batch)
        if wtap is not None:
            g = LinearGrad(wtap._fdp_param, wtap._fdp_ctx.owner, transposed=transposed)
            g.set(as_btd(to_front(xc, sd), batch), dyb)
            wtap.finish(g, ctx.uses[0])
        if btap is not None:
            btap.finish(DenseGrad(btap._fdp_param, btap._fdp_ctx.owner, upcast(dyb).sum(1)), ctx.uses[1])
        return gx, None, None, None, None


def _batch_of(x: torch.Tensor, taps, sd=None):
    """(samples in x's leading dim when it holds B*k sample-major rows (a 2-D input from a known flattener, HF
    Conv1D), else None; x's sample dim) after the layers' batch check (``check_batch``: x has the batch size in its
    sample dim, ``sd`` if given)."""
    ctx = next(t for t in taps if t is not None)._fdp_ctx
    B = ctx.batch_size
    if x.dim() == 2 and ctx.rows_sample_major and B and x.shape[0] != B and x.shape[0] % B == 0:
        return B, 0
    return None, check_batch(x, taps, "linear", min_dim=2, feature_dims=1, sd=sd)


def apply_linear(x, w, b, transposed: bool, op: str, sd=None):
    """The linear op on taps ``w`` / ``b`` (either may be a plain tensor); ``sd``: x's sample dim if the caller
    knows it (multi-head attention), else the engine's layout decides (``check_batch``)."""
    wtap, btap = taps_of(w, b)
    if wtap is None and btap is None:
        raise AssertionError("linear handler called without a parameter tap")
    x = plain_input(x, op, (wtap, btap))
    batch, sd = _batch_of(x, (wtap, btap), sd)
    xv, wv, bv = values(x, w, b)
    return _LinearFn.apply(xv, wv, bv, anchor_of(wtap, btap), (wtap, btap, transposed, batch, sd))


@register_op(F.linear)
def linear(input, weight, bias=None):
    return apply_linear(input, weight, bias, transposed=False, op="F.linear")


def _right_operand(op, a, b, bias=None):
    """``a @ b`` must be ``x @ W`` with a 2-D W on the right; W may be frozen when ``bias`` is trainable."""
    w_ok = b.dim() == 2 and (isinstance(b, ParamTap) or isinstance(bias, ParamTap))
    if isinstance(a, ParamTap) or not w_ok:
        tap = next(t for t in (a, b, bias) if isinstance(t, ParamTap))
        raise UnsupportedLayerError(f"{op} is supported for 'x @ W' with a 2-D W on the right "
                                    f"(got shapes {tuple(a.shape)} @ {tuple(b.shape)}, {tap.label})")


@register_op(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm)
def matmul(input, other):
    _right_operand("matmul", input, other)
    return apply_linear(input, other, None, transposed=True, op="matmul")


@register_op(torch.Tensor.__rmatmul__)
def rmatmul(self, other):
    return matmul(other, self)


@register_op(torch.addmm, torch.Tensor.addmm)
def addmm(input, mat1, mat2, *, beta=1, alpha=1):
    if beta != 1 or alpha != 1:
        raise UnsupportedLayerError("torch.addmm with beta/alpha != 1 on a trainable parameter is not supported")
    _right_operand("addmm", mat1, mat2, input)
    return apply_linear(mat1, mat2, input, transposed=True, op="addmm")
