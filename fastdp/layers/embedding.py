"""Embeddings: ``F.embedding`` (nn.Embedding), including lookups shared across the batch.

The table's per-sample gradient is recorded as indices plus output gradients (``EmbeddingGrad``);
norms use index equality and the clipped sum is an index-add of clip-scaled rows. A lookup made
once for the whole batch (HF GPT-2's position ids of shape [1, T]) returns a ``SharedActivation``
whose broadcast against the batch yields each sample's own output gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdp.grad_sample import EmbeddingGrad
from fastdp.tap import SharedActivation, UnsupportedLayerError, register_op

from ._autocast import taps_of


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, w, anchor, tap, padding_idx, state):
        ctx.save_for_backward(idx)
        ctx.tap, ctx.padding_idx, ctx.num, ctx.state = tap, padding_idx, w.shape[0], state
        state["use"] = tap._fdp_ctx.engine.open_use(tap)
        return F.embedding(idx, w, padding_idx)

    @staticmethod
    def backward(ctx, dy):
        (idx,) = ctx.saved_tensors
        if not ctx.state["done"]:  # not already taken per sample at a broadcast
            ctx.state["done"] = True
            _finish(ctx.tap, idx.flatten(1) if idx.dim() > 1 else idx.reshape(-1, 1), dy, ctx.num, ctx.padding_idx,
                    ctx.state["use"])
        return None, None, None, None, None, None


def _finish(tap, idx2d, dy, num, padding_idx, use):
    g = EmbeddingGrad(tap._fdp_param, tap._fdp_ctx.owner, num, padding_idx)
    g.set(idx2d, dy.reshape(idx2d.shape[0], idx2d.shape[1], dy.shape[-1]))
    tap.finish(g, use)


@register_op(F.embedding)
def embedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False):
    (tap,) = taps_of(weight)
    if tap is None:
        raise UnsupportedLayerError("F.embedding with a trainable parameter as indices")
    if max_norm is not None:
        raise UnsupportedLayerError(f"{tap.label}: max_norm renormalises the table in place during forward; "
                                    "not supported under DP (drop max_norm)")
    if scale_grad_by_freq:
        raise UnsupportedLayerError(f"{tap.label}: scale_grad_by_freq scales gradients by batch-wide token "
                                    "counts, which mixes samples; not supported under DP")
    if sparse:
        raise UnsupportedLayerError(f"{tap.label}: sparse=True gradients are not supported; use sparse=False")
    w = tap._fdp_value
    if padding_idx is not None and padding_idx < 0:
        padding_idx += w.shape[0]
    state = {"done": False}  # "use" (the PendingUse) lives in the graph through the op's ctx
    out = _EmbeddingFn.apply(input, w, tap._fdp_ctx.engine.anchor, tap, padding_idx, state)
    if input.dim() == 1 or input.shape[0] == 1:
        # Possibly one lookup shared by the whole batch: take per-sample gradients where it is broadcast.
        per_sample_idx = input.reshape(1, -1)

        def on_grad(g):
            state["done"] = True
            B = g.shape[0]
            _finish(tap, per_sample_idx.expand(B, -1), g, w.shape[0], padding_idx, state["use"])

        return SharedActivation(out, on_grad)
    return out
