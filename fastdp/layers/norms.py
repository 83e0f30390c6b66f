"""Normalisation layers: ``F.layer_norm``, ``F.group_norm``, ``F.rms_norm``.

Their affine parameters act elementwise, so per-sample gradients are cheap to form explicitly
([B, C]): ``sum dY * x_hat`` for the weight and ``sum dY`` for the bias (``fastdp/kernels/norm_affine_grad.py``: one
pass over the activation on the GPU). Forward and the input
gradient use PyTorch's native kernels (LayerNorm, GroupNorm) with the dtype autocast would pick;
the batch-summed parameter gradients are never formed. BatchNorm mixes samples through batch
statistics and is refused with a pointer to GroupNorm.

``F.instance_norm`` (nn.InstanceNorm1d/2d/3d) normalises each sample's channels alone: with instance statistics it is
GroupNorm with one channel per group (PyTorch's GroupNorm kernels, forward and input gradient), per sample by
construction. Running statistics updated in training (``track_running_stats=True``) are a function of the private
batch released with the model and are refused; in eval mode they are constants and the layer is the same affine
map with fixed statistics (per-sample gradients by the same sums).
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

from ._common import anchor_of, check_batch, open_uses, plain_input, taps_of, to_front, values


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
        if kind == "instance":
            return F.instance_norm(x, weight=w).dtype
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
    def forward(ctx, x, w, b, anchor, wtap, btap, kind, arg, eps, sd=0):
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
        ctx.sd = sd  # x's sample dim (1: a sequence-first [T, B, ...] input)
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
            sd = ctx.sd
            gw, gb = norm_affine_grad(to_front(xc, sd), to_front(dy, sd), to_front(mean, sd), to_front(rstd, sd),
                                      kind, arg, weight=wtap is not None)
            if wtap is not None:
                wtap.finish(DenseGrad(wtap._fdp_param, wtap._fdp_ctx.owner, gw), ctx.uses[0])
            if btap is not None:
                btap.finish(DenseGrad(btap._fdp_param, btap._fdp_ctx.owner, gb), ctx.uses[1])
        return (gx,) + (None,) * 9


def _norm(kind, op_name, x, arg, w, b, eps):
    wtap, btap = taps_of(w, b)
    x = plain_input(x, op_name, (wtap, btap))
    if kind == "group" and (x.dim() < 2 or x.shape[1] % arg):
        raise UnsupportedLayerError(f"group_norm needs a [B, C, ...] input with C divisible by {arg}")
    if kind != "group":
        arg = tuple(arg) if isinstance(arg, (tuple, list, torch.Size)) else (arg,)
    sd = check_batch(x, (wtap, btap), op_name, min_dim=2 if kind == "group" else len(arg) + 1,
                     feature_dims=None if kind == "group" else len(arg))
    xv, wv, bv = values(x, w, b)
    return _NormFn.apply(xv, wv, bv, anchor_of(wtap, btap), wtap, btap, kind, arg, eps, sd)


@register_op(F.layer_norm)
def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    return _norm("layer", "layer_norm", input, normalized_shape, weight, bias, eps)


@register_op(F.group_norm)
def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    return _norm("group", "group_norm", input, num_groups, weight, bias, eps)


@register_op(F.rms_norm)
def rms_norm(input, normalized_shape, weight=None, eps=None):
    return _norm("rms", "rms_norm", input, normalized_shape, weight, None, eps)


@register_op(F.batch_norm, torch.batch_norm)
def _refuse_batch_norm(*args, **kwargs):
    tap = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, ParamTap))
    raise UnsupportedLayerError(
        f"{tap.label}: BatchNorm parameters are not supported under DP (BatchNorm mixes samples "
        "through batch statistics). Replace it with nn.GroupNorm (e.g. opacus.validators.ModuleValidator.fix) "
        "or freeze it and keep it in eval mode.")


class _InstanceNormFn(torch.autograd.Function):
    """Instance statistics: ``native_group_norm`` with C groups of one channel. Running statistics (eval mode,
    ``running`` = (mean, var)): the same affine map with those constants. Affine gradients [B, C] per sample."""

    @staticmethod
    def forward(ctx, x, w, b, anchor, wtap, btap, eps, running):
        dt = _compute_dtype("instance", x, w)
        xc, wc, bc = (cast(t, dt) if t is not None else None for t in (x, w, b))
        B, C = xc.shape[0], xc.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            if running is None:
                y, mean, rstd = torch.native_group_norm(xc, wc, bc, *_group_shape(xc, C), eps)
            else:  # per channel, the same for every sample: [B, C] copies for the affine-gradient kernel
                rm, rv = running
                mean = upcast(rm).reshape(1, C).expand(B, C).contiguous()
                rstd = torch.rsqrt(upcast(rv).reshape(1, C) + eps).expand(B, C).contiguous()
                shape = (B, C) + (1,) * (xc.dim() - 2)
                y = (upcast(xc) - mean.view(shape)) * rstd.view(shape)
                y = y * upcast(wc).view(1, C, *shape[2:]) if wc is not None else y
                y = (y + upcast(bc).view(1, C, *shape[2:]) if bc is not None else y).to(dt)
        ctx.save_for_backward(xc, wc, mean, rstd)
        ctx.args = (wtap, btap, x.dtype, running is not None)
        ctx.uses = open_uses(wtap, btap)
        return y

    @staticmethod
    def backward(ctx, dy):
        xc, wc, mean, rstd = ctx.saved_tensors
        wtap, btap, x_dtype, constant_stats = ctx.args
        dy = cast(dy, xc.dtype)
        B, C = xc.shape[0], xc.shape[1]
        gx = None
        if ctx.needs_input_grad[0]:
            if constant_stats:  # dY * w * rstd
                scale = rstd * upcast(wc).view(1, C) if wc is not None else rstd
                gx = upcast(dy) * scale.view(B, C, *([1] * (xc.dim() - 2)))
            else:
                gx = torch.ops.aten.native_group_norm_backward(dy, xc, mean, rstd, wc, *_group_shape(xc, C),
                                                               [True, False, False])[0]
            gx = cast(gx, x_dtype)
        gw, gb = norm_affine_grad(xc, dy, mean, rstd, "group", C, weight=wtap is not None)
        if wtap is not None:
            wtap.finish(DenseGrad(wtap._fdp_param, wtap._fdp_ctx.owner, gw), ctx.uses[0])
        if btap is not None:
            btap.finish(DenseGrad(btap._fdp_param, btap._fdp_ctx.owner, gb), ctx.uses[1])
        return (gx,) + (None,) * 7


def _instance_norm(op, x, running_mean, running_var, w, b, use_input_stats, eps):
    wtap, btap = taps_of(w, b)
    x = plain_input(x, op, (wtap, btap))
    tap = next(t for t in (wtap, btap) if t is not None)
    if use_input_stats and (running_mean is not None or running_var is not None):
        raise UnsupportedLayerError(
            f"{tap.label}: InstanceNorm with track_running_stats=True in training mode updates running_mean / "
            "running_var from the batch; those buffers are a function of the private data that DP-SGD's noise does "
            "not cover, and they are released with the model. Use track_running_stats=False "
            "(opacus.validators.ModuleValidator.fix does this), or call .eval() on the module (its running "
            "statistics are then constants).")
    check_batch(x, (wtap, btap), op, min_dim=3)  # ([B, C, *spatial]: samples in dim 0 in every engine layout)
    if use_input_stats and math.prod(x.shape[2:]) == 1:  # (PyTorch's own check, skipped when it dispatches here)
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {list(x.shape)}")
    if not use_input_stats and (running_mean is None or running_var is None):
        raise UnsupportedLayerError(f"{tap.label}: {op} with use_input_stats=False needs running_mean and running_var")
    xv, wv, bv = values(x, w, b)
    running = None if use_input_stats else (running_mean, running_var)
    return _InstanceNormFn.apply(xv, wv, bv, anchor_of(wtap, btap), wtap, btap, eps, running)


@register_op(F.instance_norm)
def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-5):
    return _instance_norm("instance_norm", input, running_mean, running_var, weight, bias, use_input_stats, eps)


@register_op(torch.instance_norm)
def _torch_instance_norm(input, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                         cudnn_enabled=True):
    return _instance_norm("instance_norm", input, running_mean, running_var, weight, bias, use_input_stats, eps)
