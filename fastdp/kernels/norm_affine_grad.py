"""Per-sample gradients of a normalisation layer's affine parameters (LayerNorm, RMSNorm, GroupNorm).

With ``x_hat`` the normalised input, the weight's per-sample gradient is ``sum dY * x_hat`` and the bias's
``sum dY``, summed over every position the parameter is shared across. The reference forms ``x_hat`` and the
product as full-size fp32 tensors (about seven elementwise passes over the activation for bf16 inputs); the Triton
kernel reads ``x`` and ``dY`` once, rebuilds ``x_hat`` from the saved statistics in registers and writes only the
``[B, features]`` sums: one launch per layer.

Layouts (x viewed as ``[B, R, F]``: F features with a parameter each, R positions summed over):

* ``"layer"`` / ``"rms"``: x ``[B, *mid, *normalized_shape]`` (F = prod(normalized_shape), R = prod(mid)); mean and
  rstd ``[B, *mid, 1...]``, one per row (``"rms"``: no mean, ``x_hat = x * rstd``).
* ``"group"``: x ``[B, C, *spatial]`` (F = C, R = prod(spatial)); mean and rstd ``[B, G]``, one per channel group.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ._backend import HAS_TRITON, backend_for_op
from ._common import LAUNCH_OPTIONS, acc_dtype, on_input_device, upcast

KINDS = ("layer", "rms", "group")

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _norm_affine_grad_kernel(x, dy, mean, rstd, gw, gb, R, F, fpg, sx_b, sx_r, sx_f, sy_b, sy_r, sy_f,
                                 ss_b, ss_r, ss_g, BR: tl.constexpr, BF: tl.constexpr, HAS_MEAN: tl.constexpr):
        """gw[b, f] = sum_r dy * (x - mean) * rstd, gb[b, f] = sum_r dy for one (sample, feature block)."""
        b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: tensors past 2^31 elements
        f = tl.program_id(1) * BF + tl.arange(0, BF)
        acc_w = tl.zeros([BF], dtype=tl.float32)
        acc_b = tl.zeros([BF], dtype=tl.float32)
        f64 = f.to(tl.int64)  # 64-bit offsets inside a sample too: a position or feature stride past 2^31 elements
        x_cols = x + b * sx_b + f64[None, :] * sx_f
        y_cols = dy + b * sy_b + f64[None, :] * sy_f
        s_cols = b * ss_b + (f64[None, :] // fpg) * ss_g
        for r0 in range(0, R, BR):
            r = r0 + tl.arange(0, BR)
            r64 = r.to(tl.int64)
            inside = (r[:, None] < R) & (f[None, :] < F)
            xv = tl.load(x_cols + r64[:, None] * sx_r, mask=inside, other=0.0).to(tl.float32)
            g = tl.load(y_cols + r64[:, None] * sy_r, mask=inside, other=0.0).to(tl.float32)
            s = s_cols + r64[:, None] * ss_r
            if HAS_MEAN:
                xv -= tl.load(mean + s, mask=inside, other=0.0).to(tl.float32)
            xh = xv * tl.load(rstd + s, mask=inside, other=0.0).to(tl.float32)
            acc_w += tl.sum(g * xh, axis=0)
            acc_b += tl.sum(g, axis=0)
        tl.store(gw + b * F + f, acc_w, mask=f < F)
        tl.store(gb + b * F + f, acc_b, mask=f < F)


def _check(x, dy, mean, rstd, kind, arg):
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {tuple(dy.shape)}, x {tuple(x.shape)}")
    if (mean is None) != (kind == "rms"):
        raise ValueError("give mean for layer/group norms and no mean for rms norm")
    if kind == "group":
        if x.dim() < 2 or x.shape[1] % arg:
            raise ValueError(f"group norm needs x [B, C, ...] with C divisible by {arg}, got {tuple(x.shape)}")
        want = (x.shape[0], arg)
    else:
        if tuple(x.shape[x.dim() - len(arg):]) != tuple(arg) or x.dim() <= len(arg):
            raise ValueError(f"x {tuple(x.shape)} does not end with normalized_shape {tuple(arg)} after a batch dim")
        want = tuple(x.shape[:x.dim() - len(arg)])
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t is not None and t.numel() != math.prod(want):
            raise ValueError(f"{name} has {t.numel()} elements, expected one per {want}")


def norm_affine_grad_ref(x: torch.Tensor, dy: torch.Tensor, mean: Optional[torch.Tensor], rstd: torch.Tensor,
                         kind: str, arg, weight: bool = True) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Per-sample ``(sum dY * x_hat, sum dY)``.

    Args:
        x, dy: the layer input and output gradient (same shape, any float dtype).
        mean, rstd: the forward's statistics (``mean`` None for ``"rms"``), shapes as in the module docstring.
        kind: "layer", "rms" or "group". arg: normalized_shape (tuple) for layer/rms, the number of groups for group.
        weight: False when only the bias trains (the weight's sums are then None).

    Returns:
        (weight, bias) per-sample gradients, each ``[B, *normalized_shape]`` (layer/rms) or ``[B, C]`` (group), fp32
        (fp64 for fp64 inputs).

    Examples:
        >>> x, dy = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
        >>> _, mean, rstd = torch.native_layer_norm(x, (4,), None, None, 1e-5)
        >>> gw, gb = norm_affine_grad_ref(x, dy, mean, rstd, "layer", (4,))
        >>> torch.allclose(gb, dy.sum(1)) and gw.shape == (2, 4)
        True
    """
    _check(x, dy, mean, rstd, kind, arg)
    g = upcast(dy)
    dims = tuple(range(2, x.dim())) if kind == "group" else tuple(range(1, x.dim() - len(arg)))
    gb = g.sum(dims) if dims else g.clone()
    if not weight:
        return None, gb
    xf = upcast(x)
    if kind == "group":
        xg = xf.reshape(x.shape[0], arg, math.prod(x.shape[1:]) // arg)  # explicit: B may be 0
        x_hat = ((xg - mean.reshape(x.shape[0], arg, 1)) * rstd.reshape(x.shape[0], arg, 1)).reshape(x.shape)
    else:
        x_hat = (xf - mean) * rstd if kind == "layer" else xf * rstd
    gw = g * x_hat
    return (gw.sum(dims) if dims else gw), gb


@on_input_device
def norm_affine_grad(x: torch.Tensor, dy: torch.Tensor, mean: Optional[torch.Tensor], rstd: torch.Tensor,
                     kind: str, arg, weight: bool = True) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Dispatching ``norm_affine_grad_ref`` / the Triton kernel (same arguments and results; the kernel forms both
    sums in its one pass and drops the weight's when ``weight`` is False)."""
    if backend_for_op("norm_affine_grad", x) == "reference" or x.dtype == torch.float64:
        return norm_affine_grad_ref(x, dy, mean, rstd, kind, arg, weight)
    _check(x, dy, mean, rstd, kind, arg)
    B = x.shape[0]
    if kind == "group":
        F, R, fpg = x.shape[1], math.prod(x.shape[2:]), x.shape[1] // arg
        x3, dy3 = x.reshape(B, F, R), dy.reshape(B, F, R)
        (sx_b, sx_f, sx_r), (sy_b, sy_f, sy_r) = x3.stride(), dy3.stride()
        ss_b, ss_r, ss_g = arg, 0, 1
        out_shape = (B, F)
    else:
        F, fpg = math.prod(arg), 1
        R = x.numel() // max(1, B * F)
        x3, dy3 = x.reshape(B, R, F), dy.reshape(B, R, F)
        (sx_b, sx_r, sx_f), (sy_b, sy_r, sy_f) = x3.stride(), dy3.stride()
        ss_b, ss_r, ss_g = R, 1, 0
        out_shape = (B, *arg)
    gw = torch.empty(B, F, dtype=acc_dtype(x), device=x.device)
    gb = torch.empty(B, F, dtype=acc_dtype(x), device=x.device)
    if B * F == 0 or R == 0:
        gw.zero_(), gb.zero_()
    else:
        _launch(x3, dy3, mean, rstd, gw, gb, R, F, fpg, (sx_b, sx_r, sx_f), (sy_b, sy_r, sy_f), (ss_b, ss_r, ss_g))
    return (gw.reshape(out_shape) if weight else None), gb.reshape(out_shape)


def _launch(x3, dy3, mean, rstd, gw, gb, R, F, fpg, sx, sy, ss):
    rstd_c = rstd.contiguous()
    mean_c = mean.contiguous() if mean is not None else rstd_c  # unused without a mean (HAS_MEAN=False)
    BF = 64 if F >= 64 else max(16, triton.next_power_of_2(F))
    _norm_affine_grad_kernel[(x3.shape[0], triton.cdiv(F, BF))](
        x3, dy3, mean_c, rstd_c, gw, gb, R, F, fpg, *sx, *sy, *ss, BR=32, BF=BF, HAS_MEAN=mean is not None,
        **LAUNCH_OPTIONS)
