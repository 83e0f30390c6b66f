"""Embeddings: ``F.embedding`` (nn.Embedding), including lookups shared across the batch.

The table's per-sample gradient is recorded as indices plus output gradients (``EmbeddingGrad``);
norms use index equality and the clipped sum is an index-add of clip-scaled rows.

Every lookup returns a ``SharedActivation`` (``fastdp.tap``): the ops its output meets decide whether it is
one row per sample (ids whose leading dim is the batch size: [B, T] token ids, [B] user / label ids; the rows are
then the samples, as for any layer input) or a lookup shared by the batch (1-D ``arange(T)``, HF GPT-2's [1, T]
position ids at B > 1, T5's [T, T] relative-position buckets), whose per-sample gradients are taken where it
is broadcast over the batch. Ids whose leading dim happens to equal B are decided by those ops too (a [T, d]
position lookup with T == B broadcast as ``pos[None]`` is shared), so a shared lookup is never attributed per
position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdp.grad_sample import EmbeddingGrad, pull_back
from fastdp.shared_activation import SharedActivation
from fastdp.tap import BatchSizeError, UnsupportedLayerError, register_op, sample_dim

from ._common import taps_of, to_front


class _Lookup:
    """One embedding lookup in a forward: the source of its ``SharedActivation``s.

    ``rows``: its dim 0 may be one row per sample (ids of leading dim B). ``mode``: how its output was used,
    "rows" (per row) or "shared" (broadcast over the batch; each broadcast hands its per-sample gradients to
    ``take``). ``escaped``: its output entered a custom autograd.Function, whose backward brings gradient to the
    lookup past the ops fastdp sees ("unaligned": a value whose rows were no longer the samples).
    """

    def __init__(self, tap, ids, num, padding_idx, rows, sd=0):
        self.tap, self.ids, self.num, self.padding_idx, self.rows = tap, ids, num, padding_idx, rows
        self.sd = sd  # the ids' sample dim (1: a sequence-first model's [T, B] ids)
        self.ids_shape = tuple(ids.shape)
        self.mode = None
        self.use = None  # the PendingUse of the lookup itself (per-row use)
        self.base = None  # the lookup's output (detached): the point the broadcasts' gradients are pulled back to
        self.base_shape = None
        self.escaped = False

    @property
    def engine(self):
        return self.tap._fdp_ctx.engine

    @property
    def batch_size(self):
        return self.tap._fdp_ctx.batch_size

    @property
    def label(self) -> str:
        return f"embedding {self.tap.label}"

    def set_mode(self, mode: str) -> None:
        if self.mode == mode:
            return
        if self.mode is not None:
            raise UnsupportedLayerError(
                f"{self.label}: the output of a lookup of ids of shape {self.ids_shape} is used both one row per "
                "sample and broadcast over the batch; per-sample gradients of such a mix are not supported")
        self.mode = mode
        if mode == "rows":
            self.base = None  # (no pull-back: autograd brings the rows' gradients; keep no activation alive)
        elif self.use is not None:
            self.use.arrive()  # the lookup itself hands nothing: each broadcast opens its own use

    def open_use(self):
        return self.engine.open_use(self.tap)

    def take(self, g: torch.Tensor, fn, use) -> None:
        """Per-sample gradients [B, *value shape] of a broadcast of ``fn(output)``: pulled back to the lookup."""
        if not self.engine.recording():
            return
        B = g.shape[0]
        g = pull_back(fn, self.base, g) if fn is not None else g.reshape(B, *self.base_shape)
        _finish(self.tap, self.ids.reshape(1, -1).expand(B, -1), g, self.num, self.padding_idx, use)


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, w, anchor, tap, padding_idx, src):
        ctx.save_for_backward(idx)
        ctx.tap, ctx.padding_idx, ctx.num, ctx.src = tap, padding_idx, w.shape[0], src
        src.use = tap._fdp_ctx.engine.open_use(tap)
        return F.embedding(idx, w, padding_idx)

    @staticmethod
    def backward(ctx, dy):
        (idx,) = ctx.saved_tensors
        tap, src = ctx.tap, ctx.src
        if not tap._fdp_ctx.engine.recording():
            return None, None, None, None, None, None
        if src.mode == "shared":  # taken per sample at its broadcasts
            if src.escaped:
                raise UnsupportedLayerError(
                    f"{src.label}: the output of a lookup shared by the batch (ids of shape {src.ids_shape}) entered "
                    "a custom torch.autograd.Function before its broadcast over the batch: the gradient that "
                    "function returns cannot be taken per sample")
        elif src.escaped != "unaligned" and (src.mode == "rows" or (src.mode is None and src.rows)):
            idx, dy = to_front(idx, src.sd), to_front(dy, src.sd)
            _finish(tap, idx.flatten(1) if idx.dim() > 1 else idx.reshape(-1, 1), dy, ctx.num, ctx.padding_idx,
                    src.use)
        else:
            raise BatchSizeError(
                f"{src.label}: the lookup of ids of shape {src.ids_shape} is not one row of ids per sample (batch "
                f"size {src.batch_size}) and its output reached the loss without being broadcast over the batch "
                "(e.g. through a custom torch.autograd.Function): its rows cannot be taken as samples. Look the ids "
                "up per sample (ids of shape [B, ...]) or broadcast the lookup (x + pos(ids)[None]).")
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
    B = tap._fdp_ctx.batch_size
    sd = sample_dim(tap._fdp_ctx, input.shape)  # [B, ...] ids; in a sequence-first model [T, B, ...] ([B] stays)
    # one row of ids per sample, or one lookup shared by the whole batch: the ops its output meets decide
    src = _Lookup(tap, input, w.shape[0], padding_idx, rows=B is None or (input.dim() > sd and input.shape[sd] == B),
                  sd=sd)
    out = _EmbeddingFn.apply(input, w, tap._fdp_ctx.engine.anchor, tap, padding_idx, src)
    src.base, src.base_shape = out.detach(), out.shape
    return SharedActivation(out, src, None, src.rows, sd)
