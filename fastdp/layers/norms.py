"""Normalisation layers: ``F.layer_norm``, ``F.group_norm``, ``F.rms_norm``.

Their affine parameters act elementwise, so per-sample gradients are cheap to form explicitly
([B, C]): ``sum dY * x_hat`` for the weight and ``sum dY`` for the bias. Backward computes the input
gradient in fp32 from ``x_hat`` and never forms the batch-summed parameter gradients. BatchNorm
mixes samples through batch statistics and is refused with a pointer to GroupNorm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdp.grad_sample import DenseGrad
from fastdp.kernels._common import upcast
from fastdp.tap import UnsupportedLayerError, register_op

from ._autocast import anchor_of, plain_input, taps_of, values


def _normalized(kind, x, arg, eps):
    """(x_hat [B, ...] fp32, rstd broadcastable, reduce dims) for the layer's own statistics."""
    xf = upcast(x)
    if kind == "group":
        xg = xf.reshape(x.shape[0], arg, -1)
        mu = xg.mean(-1, keepdim=True)
        rstd = torch.rsqrt(xg.var(-1, unbiased=False, keepdim=True) + eps)
        return ((xg - mu) * rstd).reshape_as(xf), rstd
    dims = tuple(range(x.dim() - len(arg), x.dim()))
    if kind == "layer":
        mu = xf.mean(dims, keepdim=True)
        rstd = torch.rsqrt(xf.var(dims, unbiased=False, keepdim=True) + eps)
        return (xf - mu) * rstd, rstd
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    rstd = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)
    return xf * rstd, rstd


def _input_grad(kind, x_hat, rstd, g, arg):
    """d loss / d x for g = dY * weight (fp32)."""
    if kind == "group":
        B = g.shape[0]
        gg, xh = g.reshape(B, arg, -1), x_hat.reshape(B, arg, -1)
        out = rstd * (gg - gg.mean(-1, keepdim=True) - xh * (gg * xh).mean(-1, keepdim=True))
        return out.reshape_as(g)
    dims = tuple(range(g.dim() - len(arg), g.dim()))
    proj = x_hat * (g * x_hat).mean(dims, keepdim=True)
    if kind == "layer":
        return rstd * (g - g.mean(dims, keepdim=True) - proj)
    return rstd * (g - proj)


def _param_view(kind, w, x):
    """Weight [C] (group) or [*normalized_shape] broadcast against x."""
    if kind == "group":
        return w.reshape(1, -1, *([1] * (x.dim() - 2)))
    return w


def _per_sample(kind, t, arg):
    """Sum [B, ...] over every dim the parameter is shared across -> [B, *param.shape]."""
    if kind == "group":
        return t.sum(dim=tuple(range(2, t.dim()))) if t.dim() > 2 else t
    keep = len(arg)
    dims = tuple(range(1, t.dim() - keep))
    return t.sum(dim=dims) if dims else t


class _NormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, anchor, wtap, btap, kind, arg, eps, op):
        y = op(x, arg, w, b, eps) if kind != "rms" else op(x, arg, w, eps)
        ctx.save_for_backward(x, w)
        ctx.args = (wtap, btap, kind, arg, eps)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        wtap, btap, kind, arg, eps = ctx.args
        x_hat, rstd = _normalized(kind, x, arg, eps)
        dyf = upcast(dy)
        gx = None
        if ctx.needs_input_grad[0]:
            g = dyf * _param_view(kind, upcast(w), x) if w is not None else dyf
            gx = _input_grad(kind, x_hat, rstd, g, arg).to(x.dtype)
        if wtap is not None:
            wtap.finish(DenseGrad(wtap._fdp_param, wtap._fdp_ctx.owner, _per_sample(kind, dyf * x_hat, arg)))
        if btap is not None:
            btap.finish(DenseGrad(btap._fdp_param, btap._fdp_ctx.owner, _per_sample(kind, dyf, arg)))
        return (gx,) + (None,) * 9


def _norm(kind, op, x, arg, w, b, eps):
    wtap, btap = taps_of(w, b)
    x = plain_input(x, op.__name__, (wtap, btap))
    if kind == "group" and x.dim() < 2:
        raise UnsupportedLayerError("group_norm needs a [B, C, ...] input")
    if kind != "group":
        arg = tuple(arg) if isinstance(arg, (tuple, list, torch.Size)) else (arg,)
    xv, wv, bv = values(x, w, b)
    for t in (wtap, btap):
        if t is not None:
            t.announce()
    return _NormFn.apply(xv, wv, bv, anchor_of(wtap, btap), wtap, btap, kind, arg, eps, op)


@register_op(F.layer_norm)
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _norm("layer", F.layer_norm, input, normalized_shape, weight, bias, eps)


@register_op(F.group_norm)
def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    return _norm("group", F.group_norm, input, num_groups, weight, bias, eps)


@register_op(F.rms_norm)
def rms_norm(input, normalized_shape, weight=None, eps=None):
    return _norm("rms", F.rms_norm, input, normalized_shape, weight, None, eps)


@register_op(F.batch_norm, torch.batch_norm, F.instance_norm, torch.instance_norm)
def _refuse_batch_norm(*args, **kwargs):
    from fastdp.tap import ParamTap

    tap = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, ParamTap))
    raise UnsupportedLayerError(
        f"{tap.label}: BatchNorm/InstanceNorm parameters are not supported under DP (BatchNorm mixes samples "
        "through batch statistics). Replace it with nn.GroupNorm (e.g. opacus.validators.ModuleValidator.fix) "
        "or freeze it and keep it in eval mode.")
