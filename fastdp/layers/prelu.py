"""``F.prelu`` (``nn.PReLU``): ``y = max(0, x) + w * min(0, x)``, one slope per channel (dim 1) or one in all.

The smallest complete layer handler (README, "How to add a layer"): the autocast function computes the output and
the input gradient only; its backward forms the slope's per-sample gradient ``sum min(0, x) * dY`` over the
positions of each channel ([B, C], explicit: tiny) and hands it to the engine through the tap.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdp.grad_sample import DenseGrad
from fastdp.kernels._common import upcast
from fastdp.tap import broadcast_sample_dim, register_op

from ._common import anchor_of, check_batch, open_uses, plain_input, taps_of, to_front, values


class _PReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, anchor, wtap, sd=0):
        ctx.save_for_backward(x, w)
        ctx.sd = sd  # x's sample dim (one slope in a sequence-first model: 1 for [T, B, ...])
        ctx.wtap, ctx.uses = wtap, open_uses(wtap)  # one PendingUse per tap, handed back with its gradient
        return F.prelu(x, w)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        slope = w.reshape(1, -1, *([1] * (x.dim() - 2))) if w.numel() > 1 else w.reshape(())
        gx = torch.where(x > 0, dy, dy * slope.to(dy.dtype)) if ctx.needs_input_grad[0] else None
        per_channel = to_front(upcast(x).clamp(max=0) * upcast(dy), ctx.sd)  # [B, C, ...] in fp32
        B = per_channel.shape[0]
        g = per_channel.reshape(B, w.numel(), -1).sum(2) if w.numel() > 1 else per_channel.reshape(B, -1).sum(1)
        wtap = ctx.wtap
        wtap.finish(DenseGrad(wtap._fdp_param, wtap._fdp_ctx.owner, g.reshape(B, *w.shape)), ctx.uses[0])
        return gx, None, None, None, None


@register_op(F.prelu, torch.prelu)
def prelu(input, weight):
    (wtap,) = taps_of(weight)
    x = plain_input(input, "prelu", (wtap,))
    one_slope = weight.numel() == 1  # elementwise: a sequence-first [T, B, ...] input has its samples in dim 1
    sd = broadcast_sample_dim(wtap._fdp_ctx, x.shape, wtap.label) if one_slope and x.dim() >= 1 else None
    sd = check_batch(x, (wtap,), "prelu", min_dim=1 if one_slope else 2, sd=sd)
    xv, wv = values(x, weight)
    return _PReLUFn.apply(xv, wv, anchor_of(wtap), wtap, sd)
