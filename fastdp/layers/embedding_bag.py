"""Embedding bags: ``F.embedding_bag`` (nn.EmbeddingBag), modes sum, mean and max.

The sample is the bag. A 2-D input [B, L] holds B bags of L ids (it leads with the batch, as any layer input). A 1-D
input packs the bags' ids one after the other, ``offsets`` [B] (or [B + 1] with ``include_last_offset``) giving where
each starts: its leading dim is the number of ids, not of samples. When the model's batch size was read from those
packed tensors (``model(ids, offsets)``: the engine takes dim 0 of the model's first tensor argument), the number of
bags becomes the batch size of the forward (``ModelHooks.rebase_batch``): every other layer input, and every other
per-sample gradient of the backward, must then lead with it, or the engine refuses the step. Offsets that do not
describe bags of consecutive ids covering the input (first offset not 0, decreasing, past the input; with
``include_last_offset`` a last offset other than the number of ids, where PyTorch reads past its bags) are refused.

Sum and mean modes: bag b's output is ``sum_j a_j W[id_j]`` over its ids (``a_j`` the per-sample weight, 1, or
1 / bag size in mean mode; ``padding_idx`` entries are skipped and not counted), so its gradient is the outer
product of the bag's row weights and ``dY_b`` (``EmbeddingBagGrad``: norm from the distinct (bag, row) pairs, the
clipped sum one index-add). Max mode: coordinate d comes from row ``max_indices[b, d]`` of the forward, so the
gradient has one entry per column and the norm is ``||dY_b||`` (``EmbeddingBagMaxGrad``). ``per_sample_weights``
(sum mode) may require grad: its gradient ``<W[id_j], dY_b>`` is returned. ``max_norm`` (renormalises the table in
place), ``scale_grad_by_freq`` (batch-wide counts) and ``sparse=True`` are refused, as for nn.Embedding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdp.grad_sample import EmbeddingBagGrad, EmbeddingBagMaxGrad
from fastdp.tap import BatchSizeError, ParamTap, UnsupportedLayerError, register_op

from ._common import check_batch, open_uses, taps_of

_MODES = {"sum": 0, "mean": 1, "max": 2}


class _EmbeddingBagFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, psw, w, anchor, tap, ids, offsets, bag, coef, mode, include_last_offset, padding_idx):
        out, _, _, max_indices = torch.embedding_bag(w, ids, offsets, False, _MODES[mode], False, psw,
                                                     include_last_offset, padding_idx)
        ctx.save_for_backward(w if ctx.needs_input_grad[0] else None, ids, bag, coef,
                              max_indices if mode == "max" else None)
        ctx.tap, ctx.mode = tap, mode
        ctx.psw_dtype = psw.dtype if psw is not None else None
        ctx.uses = open_uses(tap)
        return out

    @staticmethod
    def backward(ctx, dy):
        w, ids, bag, coef, max_indices = ctx.saved_tensors
        tap = ctx.tap
        g_psw = None
        if ctx.needs_input_grad[0]:  # d out_b / d psw_j = W[id_j] . dY_b (0 for padding entries: coef 0 there)
            g_psw = ((w[ids] * dy[bag]).sum(1) * (coef != 0)).to(ctx.psw_dtype)
        if ctx.mode == "max":
            g = EmbeddingBagMaxGrad(tap._fdp_param, tap._fdp_ctx.owner, tap._fdp_value.shape[0])
            nonempty = torch.zeros(dy.shape[0], dtype=torch.bool, device=dy.device).index_fill_(0, bag[coef != 0], True)
            g.set(max_indices, nonempty, dy)
        else:
            g = EmbeddingBagGrad(tap._fdp_param, tap._fdp_ctx.owner, tap._fdp_value.shape[0])
            g.set(ids, bag, coef, dy)
        tap.finish(g, ctx.uses[0])
        return (g_psw,) + (None,) * 10


def _packed_bags(ids: torch.Tensor, offsets: torch.Tensor, include_last_offset: bool, label: str) -> torch.Tensor:
    """The bag of each id [N] of a 1-D input, after checking that ``offsets`` describes bags of consecutive ids
    that cover the input (what PyTorch's kernels assume without checking all of it)."""
    if offsets.dim() != 1 or offsets.is_floating_point():
        raise UnsupportedLayerError(f"{label}: offsets must be a 1-D integer tensor, got shape {tuple(offsets.shape)}")
    N = ids.numel()
    starts = offsets[:-1] if include_last_offset else offsets
    if offsets.numel():
        first, last = int(offsets[0]), int(offsets[-1])
        bad = (first != 0 or bool((offsets[1:] < offsets[:-1]).any()) or last > N
               or (include_last_offset and last != N))
        if bad:
            raise UnsupportedLayerError(
                f"{label}: offsets {offsets.tolist() if offsets.numel() <= 16 else tuple(offsets.shape)} do not "
                f"split the {N} ids into consecutive bags (first offset 0, non-decreasing, at most {N}"
                f"{f', last offset {N} with include_last_offset' if include_last_offset else ''}); per-sample "
                "gradients need each id to belong to one bag")
    elif N:
        raise UnsupportedLayerError(f"{label}: {N} ids but no offsets (no bag)")
    pos = torch.arange(N, device=ids.device, dtype=starts.dtype)
    return torch.searchsorted(starts, pos, right=True) - 1


@register_op(F.embedding_bag)
def embedding_bag(input, weight, offsets=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, mode="mean",
                  sparse=False, per_sample_weights=None, include_last_offset=False, padding_idx=None):
    (tap,) = taps_of(weight)
    others = [a for a in (input, offsets, per_sample_weights) if isinstance(a, ParamTap)]
    if tap is None or others:
        t = others[0] if others else tap
        raise UnsupportedLayerError(f"F.embedding_bag with a trainable parameter as ids, offsets or "
                                    f"per_sample_weights ({t.label}) is not supported")
    label = f"embedding_bag {tap.label}"
    if max_norm is not None:
        raise UnsupportedLayerError(f"{label}: max_norm renormalises the table in place during forward; not "
                                    "supported under DP (drop max_norm)")
    if scale_grad_by_freq:
        raise UnsupportedLayerError(f"{label}: scale_grad_by_freq scales gradients by batch-wide id counts, which "
                                    "mixes samples; not supported under DP")
    if sparse:
        raise UnsupportedLayerError(f"{label}: sparse=True gradients are not supported; use sparse=False")
    if mode not in _MODES:
        raise ValueError(f"mode has to be one of sum, mean or max, got {mode!r}")
    if per_sample_weights is not None and mode != "sum":
        raise NotImplementedError(f"embedding_bag: per_sample_weights is only supported for mode='sum' (got "
                                  f"mode={mode!r}), as in PyTorch")
    if getattr(input, "is_nested", False):
        raise UnsupportedLayerError(f"{label}: nested-tensor ids are not supported; pass a 1-D input with offsets "
                                    "or a 2-D [B, L] input")
    if per_sample_weights is not None and per_sample_weights.shape != input.shape:
        raise ValueError(f"embedding_bag: per_sample_weights of shape {tuple(per_sample_weights.shape)} must have "
                         f"the shape of the input {tuple(input.shape)}")
    w = tap._fdp_value
    V = w.shape[0]
    if padding_idx is not None:
        if not -V <= padding_idx < V:
            raise ValueError(f"padding_idx must be within the number of embeddings, -{V} through {V - 1}, but got "
                             f"{padding_idx}")
        padding_idx = padding_idx + V if padding_idx < 0 else padding_idx
    hooks = tap._fdp_ctx.engine.hooks
    if input.dim() == 2:
        if offsets is not None:
            raise ValueError("embedding_bag: if input is 2D, then offsets has to be None")
        check_batch(input, (tap,), "embedding_bag", min_dim=2)  # [B, L]: B bags of L ids
        n_bags, L = input.shape
        ids = input.reshape(-1)
        offsets = torch.arange(0, ids.numel(), max(L, 1), dtype=input.dtype, device=input.device)[:n_bags]
        include_last_offset = False
        bag = torch.arange(n_bags, device=input.device).repeat_interleave(L)
        psw = per_sample_weights.reshape(-1) if per_sample_weights is not None else None
    elif input.dim() == 1:
        if offsets is None:
            raise ValueError("embedding_bag: a 1-D input needs offsets (the start of each bag)")
        bag = _packed_bags(input, offsets, include_last_offset, label)
        n_bags = offsets.numel() - (1 if include_last_offset else 0)
        if hooks.batch_size != n_bags and not hooks.rebase_batch(n_bags, (input, offsets, per_sample_weights)):
            raise BatchSizeError(
                f"module '{tap._fdp_ctx.owner}' ({tap._fdp_ctx.owner_type}): embedding_bag packs {n_bags} bags "
                f"(samples) in {input.numel()} ids, but the model input has batch size {hooks.batch_size}. Each bag "
                "must be one sample: pass the ids (or offsets) unchanged as the model's first tensor argument (the "
                "batch size is then the number of bags), put a tensor leading with the number of bags first, or "
                "pass a 2-D [B, L] input with padding_idx")
        ids, psw = input, per_sample_weights
    else:
        raise ValueError(f"embedding_bag: input has to be a 1D or 2D tensor, got {input.dim()} dims")
    valid = ids != padding_idx if padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
    acc = torch.float64 if w.dtype == torch.float64 else torch.float32
    if mode == "sum":
        coef = psw.detach().to(acc) if psw is not None else torch.ones(ids.shape, dtype=acc, device=ids.device)
    else:  # mean: 1 / (non-padding ids in the bag); max: only whether the id counts
        count = torch.zeros(n_bags, dtype=acc, device=ids.device).index_add_(0, bag, valid.to(acc))
        coef = 1.0 / count.clamp(min=1)[bag] if mode == "mean" else torch.ones(ids.shape, dtype=acc, device=ids.device)
    coef = coef * valid
    return _EmbeddingBagFn.apply(psw, w, tap._fdp_ctx.engine.anchor, tap, ids, offsets, bag, coef, mode,
                                 include_last_offset, padding_idx)


@register_op(torch.embedding_bag)
def _refuse_aten_embedding_bag(*args, **kwargs):
    tap = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, ParamTap))
    raise UnsupportedLayerError(f"torch.embedding_bag on {tap.label}: call F.embedding_bag (nn.EmbeddingBag) instead, "
                                "which fastdp clips per bag")
