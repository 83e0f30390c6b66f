"""Normalisation layers: ``F.layer_norm``, ``F.group_norm``, ``F.rms_norm``.

Their affine parameters act elementwise, so per-sample gradients are cheap to form explicitly
([B, C]): ``sum dY * x_hat`` for the weight and ``sum dY`` for the bias (``fastdp/kernels/norm_affine_grad.py``: one
pass over the activation on the GPU). Forward and the input
gradient use PyTorch's native kernels (LayerNorm, GroupNorm) with the dtype autocast would pick;
the batch-summed parameter gradients are never formed. BatchNorm mixes samples through batch
statistics and is refused with a pointer to GroupNorm.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from fastdp.grad_sample import DenseGrad
from fastdp.kernels._common import cast, upcast
from fastdp.kernels.norm_affine_grad import norm_affine_grad
from fastdp.tap import ParamTap, UnsupportedLayerError, register_op

from ._common import anchor_of, check_batch, open_uses, plain_input, taps_of, values


@functools.lru_cache(maxsize=None)
def _op_dtype(kind: str, device_type: str, autocast_dtype, x_dtype: torch.dtype, w_dtype) -> torch.dtype:
    """The dtype the functional op computes in under the current autocast state (probed once, cached)."""
    x = torch.ones(1, 2, 2, dtype=x_dtype, device=device_type)
    w = torch.ones(2, dtype=w_dtype, device=device_type) if w_dtype is not None else None
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        if kind == "layer":
            return F.layer_norm(x, (2,), w, None).dtype
        if kind == "group":
            return F.group_norm(x, 1, w, None).dtype
        return F.rms_norm(x, (2,), w).dtype


def _compute_dtype(kind, x, w):
    dev = x.device.type
    ac = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    return _op_dtype(kind, dev, ac, x.dtype, w.dtype if w is not None else None)


def _group_shape(x, groups):
    N, C = x.shape[0], x.shape[1]
    return N, C, math.prod(x.shape[2:]), groups


class _NormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, anchor, wtap, btap, kind, arg, eps):
        dt = _compute_dtype(kind, x, w)
        xc, wc, bc = (cast(t, dt) if t is not None else None for t in (x, w, b))
        with torch.autocast(x.device.type, enabled=False):
            if kind == "layer":
                y, mean, rstd = torch.native_layer_norm(xc, arg, wc, bc, eps)
            elif kind == "group":
                y, mean, rstd = torch.native_group_norm(xc, wc, bc, *_group_shape(xc, arg), eps)
            else:
                y = F.rms_norm(xc, arg, wc, eps)
                mean = None
                dims = tuple(range(x.dim() - len(arg), x.dim()))
                e = torch.finfo(xc.dtype).eps if eps is None else eps
                rstd = torch.rsqrt(upcast(xc).pow(2).mean(dims, keepdim=True) + e)
        ctx.save_for_backward(xc, wc, bc, mean, rstd)
        ctx.args = (wtap, btap, kind, arg, x.dtype)
        ctx.uses = open_uses(wtap, btap)
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, wc, bc, mean, rstd = ctx.saved_tensors
        wtap, btap, kind, arg, x_dtype = ctx.args
        dy = cast(dy, xc.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            if kind == "layer":
                gx = torch.ops.aten.native_layer_norm_backward(dy, xc, arg, mean, rstd, wc, bc, [True, False, False])[0]
            elif kind == "group":
                gx = torch.ops.aten.native_group_norm_backward(dy, xc, mean, rstd, wc, *_group_shape(xc, arg),
                                                               [True, False, False])[0]
            else:  # rms: rstd * (g - x_hat * mean(g * x_hat)) with g = dY * w
                x_hat = upcast(xc) * rstd
                dims = tuple(range(xc.dim() - len(arg), xc.dim()))
                g = upcast(dy) * upcast(wc) if wc is not None else upcast(dy)
                gx = rstd * (g - x_hat * (g * x_hat).mean(dims, keepdim=True))
            gx = cast(gx, x_dtype)
        if wtap is not None or btap is not None:  # per-sample sum dY * x_hat, sum dY (one kernel on the GPU)
            gw, gb = norm_affine_grad(xc, dy, mean, rstd, kind, arg, weight=wtap is not None)
            if wtap is not None:
                wtap.finish(DenseGrad(wtap._fdp_param, wtap._fdp_ctx.owner, gw), ctx.uses[0])
            if btap is not None:
                btap.finish(DenseGrad(btap._fdp_param, btap._fdp_ctx.owner, gb), ctx.uses[1])
        return (gx,) + (None,) * 8


def _norm(kind, op_name, x, arg, w, b, eps):
    wtap, btap = taps_of(w, b)
    x = plain_input(x, op_name, (wtap, btap))
    if kind == "group" and (x.dim() < 2 or x.shape[1] % arg):
        raise UnsupportedLayerError(f"group_norm needs a [B, C, ...] input with C divisible by {arg}")
    if kind != "group":
        arg = tuple(arg) if isinstance(arg, (tuple, list, torch.Size)) else (arg,)
    check_batch(x, (wtap, btap), op_name, min_dim=2 if kind == "group" else len(arg) + 1)
    xv, wv, bv = values(x, w, b)
    return _NormFn.apply(xv, wv, bv, anchor_of(wtap, btap), wtap, btap, kind, arg, eps)


@register_op(F.layer_norm)
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _norm("layer", "layer_norm", input, normalized_shape, weight, bias, eps)


@register_op(F.group_norm)
def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    return _norm("group", "group_norm", input, num_groups, weight, bias, eps)


@register_op(F.rms_norm)
def rms_norm(input, normalized_shape, weight=None, eps=None):
    return _norm("rms", "rms_norm", input, normalized_shape, weight, None, eps)


@register_op(F.batch_norm, torch.batch_norm, F.instance_norm, torch.instance_norm)
def _refuse_batch_norm(*args, **kwargs):
    tap = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, ParamTap))
    raise UnsupportedLayerError(
        f"{tap.label}: BatchNorm/InstanceNorm parameters are not supported under DP (BatchNorm mixes samples "
        "through batch statistics). Replace it with nn.GroupNorm (e.g. opacus.validators.ModuleValidator.fix) "
        "or freeze it and keep it in eval mode.")
