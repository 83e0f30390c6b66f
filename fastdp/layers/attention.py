"""Multi-head attention: ``F.multi_head_attention_forward`` (nn.MultiheadAttention and the nn.Transformer* stacks).

``nn.MultiheadAttention.forward`` calls the functional op with its parameters as arguments; with their taps in
place the call comes here. The handler recomputes attention from supported ops, so every parameter's per-sample
gradient is exact and the module's state dict stays its own (nothing is swapped):

* the input projections run through the Linear handler (``apply_linear``) with the samples in dim 0: the packed
  ``in_proj_weight`` is used once (``F.linear`` on the query, or on the query, key and value concatenated along
  time when they differ, then split), never sliced (a slice's per-sample gradient would be materialised densely);
  separate ``q/k/v_proj_weight`` (``kdim``/``vdim``) are one Linear each, with the packed bias's thirds;
* ``bias_k``/``bias_v`` are expanded along the batch explicitly (``per_sample_broadcast``) before the concatenation;
* the attention itself acts on activations only (``F.scaled_dot_product_attention``, or an explicit softmax when the
  weights are returned), with the masks and options of the native op; ``out_proj`` is a Linear.

The op's layout is [T, B, E] (``nn.MultiheadAttention`` transposes batch-first inputs before calling it), so the
samples are dim 1 of its inputs in both layouts of the engine (``FIXED_SAMPLE_DIM``). The cost over the native op:
for cross-attention with the packed weight the projection multiplies the concatenated inputs by all three blocks
(3x that GEMM); self-attention (query is key is value) costs what the native op does.

PyTorch's fused fast paths (``torch._native_multi_head_attention``, ``torch._transformer_encoder_layer_fwd``) are
not taken while a parameter is a tap (they require no ``__torch_function__`` argument and, in training, no grad);
should one receive a tap anyway, it is refused here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastdp.tap import FIXED_SAMPLE_DIM, BatchSizeError, ParamTap, UnsupportedLayerError, per_sample_broadcast, register_op

from .linear import apply_linear

_MHA = F.multi_head_attention_forward
FIXED_SAMPLE_DIM[_MHA] = 1  # [T, B, E]


def _tap(*args):
    return next((a for a in args if isinstance(a, ParamTap)), None)


def _label(tap: ParamTap) -> str:
    ctx = tap._fdp_ctx
    return f"module '{ctx.owner or '<root>'}' ({ctx.owner_type})"


def _linear(x, w, b):
    """Linear on [B, T, d] inputs (samples in dim 0); plain ``F.linear`` when neither w nor b trains."""
    if isinstance(w, ParamTap) or isinstance(b, ParamTap):
        return apply_linear(x, w, b, transposed=False, op="F.linear", sd=0)
    return F.linear(x, w, b)


def _float_mask(mask, dtype, name, label):
    """A boolean mask (True: not attended) as an additive float mask; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise UnsupportedLayerError(f"{label}: only bool and floating-point {name} are supported, got {mask.dtype}")
    return mask.to(dtype)


def _check_batched(query, key, value, label, B):
    if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
        raise UnsupportedLayerError(
            f"{label}: multi-head attention on unbatched inputs (query of shape {tuple(query.shape)}) has no batch "
            "dim; per-sample gradients need one")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if B is not None and t.shape[1] != B:
            raise BatchSizeError(
                f"{label}: the model input has batch size {B} but multi-head attention's {name} (layout [T, B, E]) "
                f"has {t.shape[1]} samples in dim 1 (shape {tuple(t.shape)}). A sequence-first model needs "
                "batch_first=False (DPOptimizer / make_private / GradSampleEngine); a batch-first model needs "
                "nn.MultiheadAttention(batch_first=True) (or to transpose its [B, T, E] input itself).")


def _in_projection(q, k, v, E, in_proj_weight, in_proj_bias, separate, q_w, k_w, v_w):
    """The query/key/value projections of [B, T, *] inputs (see module docstring)."""
    if separate:
        bq = bk = bv = None
        if in_proj_bias is not None:
            bq, bk, bv = in_proj_bias.chunk(3)
        return _linear(q, q_w, bq), _linear(k, k_w, bk), _linear(v, v_w, bv)
    if q is k and k is v:
        return _linear(q, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
    inputs = [q, k] if k is v else [q, k, v]
    lengths = [t.shape[1] for t in inputs]
    proj = _linear(torch.cat(inputs, dim=1), in_proj_weight, in_proj_bias)  # [B, sum T, 3E]: one use of W
    parts = proj.split(lengths, dim=1)
    qp = parts[0][..., :E]
    kp = parts[1][..., E:2 * E]
    vp = parts[1][..., 2 * E:] if k is v else parts[2][..., 2 * E:]
    return qp, kp, vp


def _append_bias(t, bias, B, label):
    """Concatenate the learned bias [1, 1, E] to the [B, S, E] keys or values as one more position per sample."""
    if bias.dim() != 3 or bias.shape[0] != 1 or bias.shape[1] != 1:
        raise UnsupportedLayerError(f"{label}: bias_k / bias_v of shape {tuple(bias.shape)}, expected [1, 1, E]")
    if isinstance(bias, ParamTap):
        expanded = per_sample_broadcast(bias, (B, 1, bias.shape[-1]), 0)
    else:
        expanded = bias.expand(B, 1, bias.shape[-1])
    return torch.cat([t, expanded.to(t.dtype)], dim=1)


@register_op(_MHA)
def multi_head_attention(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k,
                         bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True,
                         key_padding_mask=None, need_weights=True, attn_mask=None, use_separate_proj_weight=False,
                         q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None,
                         average_attn_weights=True, is_causal=False):
    """``F.multi_head_attention_forward`` with trainable parameters (taps): [Tq, B, E] query, [S, B, *] key and
    value; returns ([Tq, B, E] output, attention weights [B, Tq, S] (averaged) / [B, H, Tq, S] or None)."""
    tap = _tap(in_proj_weight, in_proj_bias, bias_k, bias_v, out_proj_weight, out_proj_bias, q_proj_weight,
               k_proj_weight, v_proj_weight)
    label = _label(tap)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if isinstance(t, ParamTap):
            raise UnsupportedLayerError(f"{label}: multi-head attention with a trainable parameter as its {name} "
                                        f"({t.label}) is not supported")
    if static_k is not None or static_v is not None:
        raise UnsupportedLayerError(f"{label}: multi-head attention with static_k / static_v is not supported "
                                    "under DP (precomputed keys/values bypass the projections)")
    B = tap._fdp_ctx.batch_size
    _check_batched(query, key, value, label, B)
    Tq, bsz, E = query.shape
    if E != embed_dim_to_check:
        raise AssertionError(f"was expecting embedding dimension of {embed_dim_to_check}, but got {E}")
    H = num_heads
    hd = E // H
    if hd * H != E:
        raise AssertionError(f"embed_dim {E} not divisible by num_heads {H}")
    if (bias_k is None) != (bias_v is None):
        raise AssertionError("bias_k and bias_v must both be set or both be None")
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    dtype = query.dtype
    kpm = _float_mask(key_padding_mask, dtype, "key_padding_mask", label)
    sdpa_causal = bool(is_causal and key_padding_mask is None and not need_weights)
    mask = None if sdpa_causal else _float_mask(attn_mask, dtype, "attn_mask", label)

    # batch-first views [B, T, *]; identity of q / k / v kept (self-attention projects once)
    qb = query.transpose(0, 1)
    kb = qb if key is query else key.transpose(0, 1)
    vb = kb if value is key else (qb if value is query else value.transpose(0, 1))
    q, k, v = _in_projection(qb, kb, vb, E, in_proj_weight, in_proj_bias, use_separate_proj_weight,
                             q_proj_weight, k_proj_weight, v_proj_weight)
    if mask is not None:  # [Tq, S] or [B * H, Tq, S] -> broadcastable to [B, H, Tq, S]
        if mask.dim() == 2:
            if mask.shape != (Tq, k.shape[1]):
                raise RuntimeError(f"The shape of the 2D attn_mask is {mask.shape}, but should be {(Tq, k.shape[1])}.")
            mask = mask.view(1, 1, Tq, k.shape[1])
        elif mask.dim() == 3:
            if mask.shape != (bsz * H, Tq, k.shape[1]):
                raise RuntimeError(f"The shape of the 3D attn_mask is {mask.shape}, but should be "
                                   f"{(bsz * H, Tq, k.shape[1])}.")
            mask = mask.view(bsz, H, Tq, k.shape[1])
        else:
            raise RuntimeError(f"attn_mask's dimension {mask.dim()} is not supported")
    if bias_k is not None:
        k, v = _append_bias(k, bias_k, bsz, label), _append_bias(v, bias_v, bsz, label)
        mask = None if mask is None else F.pad(mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    q = q.reshape(bsz, Tq, H, hd).transpose(1, 2)  # [B, H, Tq, hd]
    k = k.reshape(bsz, k.shape[1], H, hd).transpose(1, 2)
    v = v.reshape(bsz, v.shape[1], H, hd).transpose(1, 2)
    if add_zero_attn:
        k = torch.cat([k, k.new_zeros(bsz, H, 1, hd)], dim=2)
        v = torch.cat([v, v.new_zeros(bsz, H, 1, hd)], dim=2)
        mask = None if mask is None else F.pad(mask, (0, 1))
        kpm = None if kpm is None else F.pad(kpm, (0, 1))
    S = k.shape[2]
    if kpm is not None:
        if kpm.shape != (bsz, S):
            raise AssertionError(f"expecting key_padding_mask shape of {(bsz, S)}, but got {tuple(kpm.shape)}")
        kpm = kpm.view(bsz, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    p = dropout_p if training else 0.0
    if need_weights:
        scores = torch.matmul(q * math.sqrt(1.0 / hd), k.transpose(-2, -1))  # [B, H, Tq, S]
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if p > 0.0:
            weights = F.dropout(weights, p=p)
        out = torch.matmul(weights, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, p, sdpa_causal)
        weights = None
    out = out.transpose(1, 2).reshape(bsz, Tq, E)
    out = _linear(out, out_proj_weight, out_proj_bias).transpose(0, 1)  # [Tq, B, E]
    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    return out, weights


def _refuse_fast_path(name):
    def refuse(*args, **kwargs):
        tap = _tap(*args, *kwargs.values())
        raise UnsupportedLayerError(
            f"{tap.label}: PyTorch's fused fast path {name} received a trainable parameter; it computes no "
            "per-sample gradients. It is taken only without grad (or with no parameter requiring grad): train with "
            "grad enabled, the module in train mode.")
    return refuse


register_op(torch._native_multi_head_attention)(_refuse_fast_path("torch._native_multi_head_attention"))
register_op(torch._transformer_encoder_layer_fwd)(_refuse_fast_path("torch._transformer_encoder_layer_fwd"))
