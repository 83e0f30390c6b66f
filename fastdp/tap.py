"""Parameter taps: how the engine sees every use of a trainable parameter.

While a module's forward runs, each of its trainable parameters is replaced (in
``module._parameters``) by a ``ParamTap``: a tensor with the parameter's value whose
``__torch_function__`` routes every op it enters.

* Ops with a registered layer handler (``F.linear``, ``F.conv2d``, ``F.embedding``, ``F.layer_norm``...)
  run through the handler's autograd function. That function computes the input gradient only:
  autograd never computes the parameter's batch gradient, and the handler records a compact
  per-sample gradient (``fastdp.grad_sample``) for the engine instead.
* Elementwise ops that broadcast the parameter against a batched tensor (``x + pos_embed``,
  ``cls_token.expand(B, -1, -1)``, ``scale * x``) expand it along the batch explicitly, so its
  backward yields exact per-sample gradients. This is the generic fallback for parameters owned by
  any module (timm's ``cls_token``/``pos_embed``, custom scales, LayerScale...).
* Ops on the parameter alone (reshape, cast, slicing, ``W.t()``) return a new tap that remembers the
  function applied; per-sample gradients are pulled back through it exactly.
* Anything else raises ``UnsupportedLayerError`` naming the module and parameter: never a silent
  fallback that would leave a parameter unclipped.
* An embedding's output is a ``SharedActivation`` (``fastdp.shared_activation``) until the ops it meets say whether its rows are the samples
  or it is shared by the batch (position lookups), whose per-sample gradients are then taken at the broadcast.
* With grad mode off (``torch.no_grad`` inside the forward) an op on a tap is an op on a constant: it runs on
  the parameter's value and returns a plain tensor, as in PyTorch. Inside the forward of a custom
  ``torch.autograd.Function`` (grad mode is off there too) a tap is refused: the gradient that function's
  backward returns for the parameter would be dropped. A reentrant checkpointed region (``use_reentrant=True``, whose
  forward runs that way) is adopted instead, and a non-reentrant one (``use_reentrant=False``) joins its region: both
  are recomputed in backward with the forward's taps (``fastdp.checkpointing``).
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from fastdp.checkpointing import RECOMPUTING, region_frame
from fastdp.grad_sample import DenseGrad, PerSampleGrad, pull_back
from fastdp.kernels._common import upcast
from fastdp.op_sets import _T, CASTS, ELEMENTWISE, EXPANDERS, METADATA, RANDOM, inactive_dropout


class UnsupportedLayerError(RuntimeError):
    """A trainable parameter is used in a way the engine cannot clip exactly."""


class BatchSizeError(RuntimeError):
    """A layer's leading dim is not the batch size of the model input (or layers disagree)."""


class TapContext:
    """Where a tap lives: the engine, the owning module's name and type (for errors), its flags.

    ``rows_sample_major``: the module flattens [B, T, d] to [B*T, d] rows in sample order (HF Conv1D).
    ``batch_size``: the number of samples of the model input in the current forward.
    ``batch_first``: the engine's layout: True, every layer input leads with the samples ([B, ...]); False
    (sequence-first models), layer inputs are [T, B, ...] (see ``sample_dim``).
    """

    __slots__ = ("engine", "owner", "owner_type", "rows_sample_major")

    def __init__(self, engine: Any, owner: str, owner_type: str, rows_sample_major: bool = False):
        self.engine, self.owner, self.owner_type = engine, owner, owner_type
        self.rows_sample_major = rows_sample_major

    @property
    def batch_size(self) -> Optional[int]:
        return self.engine.batch_size

    @property
    def batch_first(self) -> bool:
        return getattr(self.engine, "batch_first", True)


def sample_dim(ctx: TapContext, shape, feature_dims: int = 0, channels_first: bool = False) -> int:
    """The dim of a layer input of ``shape`` that holds the samples.

    0 in a batch-first engine and for channel-first layouts ([B, C, ...]: convolutions, GroupNorm). In a
    sequence-first engine (``batch_first=False``) an input whose leading dims (those before the layer's
    ``feature_dims`` trailing ones) number two or more is [T, B, ...]: dim 1; with one leading dim it is [B, ...]
    (a pooled [B, d] before a classifier head): dim 0.
    """
    if ctx.batch_first or channels_first:
        return 0
    return 1 if len(shape) - feature_dims >= 2 else 0


def broadcast_sample_dim(ctx: TapContext, out_shape, what: str = "") -> int:
    """The sample dim of the output of an elementwise op that broadcasts a parameter (or a shared lookup) against
    the batch. Batch-first: 0. Sequence-first: 1 for 3 or more dims ([T, B, ...]), 0 for 1-D ([B]); for 2-D,
    whichever of the two dims is the batch size (both: ambiguous, refused)."""
    if ctx.batch_first or len(out_shape) <= 1:
        return 0
    if len(out_shape) >= 3:
        return 1
    B = ctx.batch_size
    if out_shape[0] == B and out_shape[1] == B:
        raise BatchSizeError(
            f"{what}: broadcast to shape {tuple(out_shape)} in a batch_first=False model, where both dims equal the "
            f"batch size {B}: fastdp cannot tell whether it is [T, B] or [B, d]. Use a batch size different from "
            "the sequence length / feature size here")
    return 0 if out_shape[0] == B else 1


class ParamTap(torch.Tensor):
    """Stand-in for a trainable parameter during its owner's forward (see module docstring)."""

    @staticmethod
    def __new__(cls, param, value, fn, ctx, name, cast_only=True):
        t = torch.Tensor._make_subclass(cls, value.detach(), False)
        t._fdp_param = param
        t._fdp_value = value.detach()
        t._fdp_fn = fn  # None: identity
        t._fdp_cast_only = cast_only  # fn only changes dtype/device
        t._fdp_ctx = ctx
        t._fdp_name = name
        return t

    def __repr__(self):  # noqa: D105
        return f"ParamTap({self._fdp_ctx.owner}.{self._fdp_name}, shape={tuple(self._fdp_value.shape)})"

    @property
    def label(self) -> str:
        ctx = self._fdp_ctx
        return f"parameter '{ctx.owner + '.' if ctx.owner else ''}{self._fdp_name}' of module '{ctx.owner or '<root>'}' ({ctx.owner_type})"

    def finish(self, grad: PerSampleGrad, use=None) -> None:
        """Hand a completed per-sample gradient to the engine (called from backward with the ``PendingUse``
        its op opened in forward)."""
        if not self._fdp_ctx.engine.recording():  # (autograd.grad(loss, x): nothing to record)
            return
        if self._fdp_fn is not None and not self._fdp_cast_only:
            from fastdp.grad_sample import TransformedGrad

            grad = TransformedGrad(grad, self._fdp_fn)
        self._fdp_ctx.engine.submit(grad, use)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA and isinstance(args[0], ParamTap):  # shape, dtype, dim(), ...: no graph, answer directly
            return func(args[0]._fdp_value, *args[1:], **kwargs)
        if any(getattr(t, "_fdp_resolves_first", False) for t in types):
            return NotImplemented  # a SharedActivation resolves itself first, then calls the op again
        if not torch.is_grad_enabled():
            return _without_grad(func, args, kwargs)
        _join_checkpoint(args, kwargs)
        handler = OP_HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        return _generic(func, args, kwargs)


def unwrap(a):
    return a._fdp_value if isinstance(a, ParamTap) else a


def _first_tap(args, kwargs) -> ParamTap:
    flat, _ = tree_flatten((args, kwargs))
    return next(a for a in flat if isinstance(a, ParamTap))


_FUNCTION_APPLY = torch.autograd.Function.apply.__func__.__code__


def _autograd_function_class() -> Optional[type]:
    """The custom ``torch.autograd.Function`` whose forward is running (called from here), if any."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code is _FUNCTION_APPLY:
            return f.f_locals.get("cls", torch.autograd.Function)
        f = f.f_back
    return None


def _on_values(func, args, kwargs):
    """The op on the taps' values: plain tensors, no per-sample book-keeping."""
    flat, spec = tree_flatten((args, kwargs))
    a2, k2 = tree_unflatten([unwrap(a) for a in flat], spec)
    return func(*a2, **k2)


def _without_grad(func, args, kwargs):
    """An op on a tap with grad mode off: a constant, as in PyTorch; refused inside a custom autograd.Function."""
    fn_cls = _autograd_function_class()
    if fn_cls is not None:
        tap = _first_tap(args, kwargs)
        if getattr(fn_cls, "__module__", "") == "torch.utils.checkpoint":  # a reentrant checkpoint region's forward
            taps = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, ParamTap)]
            tap._fdp_ctx.engine.hooks.join_reentrant_region(taps)
            return _on_values(func, args, kwargs)
        raise UnsupportedLayerError(
            f"{tap.label} is an input of the custom torch.autograd.Function {fn_cls.__qualname__} (op "
            f"{getattr(func, '__name__', func)} inside its forward): its forward runs without autograd, so fastdp "
            "cannot take per-sample gradients of the parameter and the gradient its backward returns would be "
            "dropped (the parameter would silently not train). Use PyTorch ops or a supported layer for it under "
            "DP (e.g. nn.LayerNorm instead of a fused kernel), or freeze the parameter.")
    return _on_values(func, args, kwargs)


def _join_checkpoint(args, kwargs) -> None:
    """An op inside a non-reentrant checkpointed region (its saved tensors are dropped and recomputed in backward):
    the engine replays the region's recomputation with the forward's taps (``fastdp.checkpointing``)."""
    frame = region_frame()
    if frame is not None and frame is not RECOMPUTING:
        _first_tap(args, kwargs)._fdp_ctx.engine.hooks.adopt_checkpoint(frame)


def is_trivial(tap: ParamTap) -> bool:
    """The tap's value is the parameter itself, possibly cast (layer handlers then use closed forms)."""
    return tap._fdp_fn is None or tap._fdp_cast_only


OP_HANDLERS: dict = {}
# ops whose layout fixes the sample dim of their data inputs, whatever the engine's layout
# (F.multi_head_attention_forward: [T, B, E], dim 1)
FIXED_SAMPLE_DIM: dict = {}


def register_op(*funcs):
    """Register a layer handler for torch functions that may receive a ``ParamTap``.

    The handler gets the op's own arguments (taps included) and returns its output.
    """

    def deco(handler):
        for f in funcs:
            OP_HANDLERS[f] = handler
        return handler

    return deco


def _batched(t: torch.Tensor, batch_size: Optional[int], batch_first: bool = True) -> bool:
    """A plain tensor operand carries the batch: it is part of the autograd graph, or has B in its sample dim
    (dim 0; in a sequence-first model dim 0 or 1)."""
    if t.requires_grad:
        return True
    if batch_size is None or t.dim() == 0:
        return False
    return t.shape[0] == batch_size or (not batch_first and t.dim() >= 2 and t.shape[1] == batch_size)


def refuse_op(func, tap: "ParamTap"):
    """The error for an op on a trainable parameter that no layer handler or generic rule takes."""
    return UnsupportedLayerError(
        f"op {getattr(func, '__qualname__', func)} with batched inputs is not supported for {tap.label}: the op "
        "itself is the cause (not the layers before it). Supported: the layers in fastdp's table (Linear, Conv, "
        "Embedding, LayerNorm, GroupNorm, RMSNorm, MultiheadAttention, HF Conv1D, matmul) and elementwise "
        "broadcasting of a parameter against the batch. Freeze the parameter, or use a supported layer for it.")


def _generic(func, args, kwargs):
    """Any op on a tap without a layer handler: a cast of another tensor to the parameter's dtype, a broadcast of the
    parameter against the batch (exact per-sample gradients), or an op on the parameter alone (a new tap)."""
    flat, spec = tree_flatten((args, kwargs))
    taps = [a for a in flat if isinstance(a, ParamTap)]
    tap = taps[0]
    if func == _T.requires_grad.__get__:  # (a fresh method-wrapper on every access: compared by ==)
        return True
    if func in (_T.detach, _T.data.__get__):
        return tap._fdp_value
    if func in CASTS and not isinstance(args[0], ParamTap):  # ``x.type_as(w)``, ``x.to(w)``: reads dtype/device
        return _on_values(func, args, kwargs)
    if func in RANDOM and not inactive_dropout(func, args, kwargs):
        raise UnsupportedLayerError(f"random op {getattr(func, '__name__', func)} on {tap.label} (e.g. DropConnect): "
                                    "its per-sample gradients cannot be pulled back exactly; not supported")
    if len({id(t._fdp_param) for t in taps}) > 1:
        raise UnsupportedLayerError(
            f"{getattr(func, '__name__', func)} combines two trainable parameters ({taps[0].label} and "
            f"{taps[1].label}); per-sample gradients of such a combination are not supported")
    plain = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, ParamTap)]
    # a cast reads only the dtype/device of a tensor argument (``p.to(h)``, ``p.type_as(h)``)
    if func not in CASTS and any(_batched(a, tap._fdp_ctx.batch_size, tap._fdp_ctx.batch_first) for a in plain):
        return _broadcast_against_batch(func, flat, spec, tap)
    return _on_parameter_alone(func, flat, spec, taps)


def _broadcast_against_batch(func, flat, spec, tap: ParamTap):
    """An elementwise op of the parameter with batched tensors: the parameter is expanded along the batch first."""
    if func not in ELEMENTWISE:
        raise refuse_op(func, tap)
    out_shape = torch.broadcast_shapes(*(unwrap(a).shape for a in flat if isinstance(a, torch.Tensor)))
    sd = broadcast_sample_dim(tap._fdp_ctx, out_shape, tap.label)
    new_flat = [per_sample_broadcast(a, out_shape, sd) if isinstance(a, ParamTap) else a for a in flat]
    a2, k2 = tree_unflatten(new_flat, spec)
    return func(*a2, **k2)


def _on_parameter_alone(func, flat, spec, taps):
    """An op on the parameter (and constants): a new tap that remembers the function of the parameter, or a
    broadcast over the batch when the op replicates the parameter along it (``cls_token.expand(B, -1, -1)``)."""
    tap = taps[0]
    ctx = tap._fdp_ctx
    values = [unwrap(a) for a in flat]
    a2, k2 = tree_unflatten(values, spec)
    result = func(*a2, **k2)
    if not isinstance(result, (torch.Tensor, tuple, list)):
        return result  # metadata: shape, dtype, dim(), ...
    if any(result is v for v in values if isinstance(v, torch.Tensor)) and func not in CASTS:
        raise UnsupportedLayerError(f"in-place {getattr(func, '__name__', func)} on {tap.label} inside forward")
    fn = _replay(func, flat, spec)
    sd = _expanded_sample_dim(ctx, tap._fdp_value, result) if func in EXPANDERS else None
    if sd is not None:  # replicated along the batch: sample i sees fn(p) at index 0 of the sample dim
        return per_sample_broadcast(ParamTap(tap._fdp_param, result.narrow(sd, 0, 1),
                                             lambda p: fn(p).narrow(sd, 0, 1), ctx, tap._fdp_name, cast_only=False),
                                    result.shape, sd)
    cast_only = len(taps) == 1 and tap._fdp_cast_only and func in CASTS
    if isinstance(result, torch.Tensor):
        return ParamTap(tap._fdp_param, result, fn, ctx, tap._fdp_name, cast_only)
    return type(result)(
        ParamTap(tap._fdp_param, r, (lambda p, i=i: fn(p, i)), ctx, tap._fdp_name, False)
        if isinstance(r, torch.Tensor) else r for i, r in enumerate(result))


def _replay(func, flat, spec):
    """The op as a function of the parameter: each tap replaced by its own function of it (``W + W.t()``,
    ``w - w.mean(1, keepdim=True)``); ``_i`` picks one output of a multi-output op."""
    tap_fns = [a._fdp_fn if isinstance(a, ParamTap) else None for a in flat]
    is_tap = [isinstance(a, ParamTap) for a in flat]

    def fn(p, _i=None):
        fa, fk = tree_unflatten([(p if f is None else f(p)) if t else a for a, f, t in zip(flat, tap_fns, is_tap)],
                                spec)
        out = func(*fa, **fk)
        return out if _i is None else out[_i]

    return fn


def _leading_one(v: torch.Tensor, ndim: int, dim: int = 0) -> bool:
    """``v`` right-aligned to ``ndim`` dims has size 1 (or is absent) on ``dim``."""
    i = dim - (ndim - v.dim())
    return i < 0 or v.shape[i] == 1


def _expanded_sample_dim(ctx: TapContext, value: torch.Tensor, result) -> Optional[int]:
    """The sample dim along which an expand of the parameter alone (``cls_token.expand(B, -1, -1)``; in a
    sequence-first model ``pos.expand(-1, B, -1)``) replicates it, or None if it does not."""
    B = ctx.batch_size
    if not isinstance(result, torch.Tensor) or B is None or result.dim() == 0:
        return None
    dims = [0] if ctx.batch_first or result.dim() == 1 else [1, 0]
    for d in dims:
        if d < result.dim() and result.shape[d] == B and _leading_one(value, result.dim(), d):
            return d
    return None


class _BatchBroadcastFn(torch.autograd.Function):
    """Expand a parameter value [*S] to ``out_shape`` (the samples in dim ``sd``); backward records per-sample
    gradients."""

    @staticmethod
    def forward(ctx, anchor, value, out_shape, tap, sd):
        ctx.tap, ctx.use = tap, tap._fdp_ctx.engine.open_use(tap)
        ctx.vshape, ctx.sd = value.shape, sd
        ctx.pad = len(out_shape) - value.dim()
        return value.reshape((1,) * ctx.pad + tuple(value.shape)).expand(out_shape)

    @staticmethod
    def backward(ctx, grad):
        tap, vshape = ctx.tap, ctx.vshape
        if not tap._fdp_ctx.engine.recording():
            return None, None, None, None, None
        g = per_sample_grad_of_broadcast(upcast(grad), vshape, ctx.sd)
        g = g.reshape(g.shape[0], *vshape)
        if not is_trivial(tap):
            g = pull_back(tap._fdp_fn, tap._fdp_param, g)
        param = tap._fdp_param
        tap._fdp_ctx.engine.submit(DenseGrad(param, tap._fdp_ctx.owner, g.reshape(g.shape[0], *param.shape)), ctx.use)
        return None, None, None, None, None


def per_sample_grad_of_broadcast(grad: torch.Tensor, vshape, sd: int = 0) -> torch.Tensor:
    """Gradient of a value of shape ``vshape`` broadcast to ``grad.shape`` (samples in dim ``sd``), kept per sample.

    Sums over the broadcast dims except the sample dim; returns [B, *padded(vshape) without dim sd]
    (``reshape(B, *vshape)`` of it is the per-sample gradient of the value).
    """
    padded = (1,) * (grad.dim() - len(vshape)) + tuple(vshape)
    if sd:
        grad = grad.movedim(sd, 0)
        padded = (padded[sd],) + padded[:sd] + padded[sd + 1:]
    dims = [i for i in range(1, grad.dim()) if padded[i] == 1 and grad.shape[i] != 1]
    g = grad.sum(dim=dims, keepdim=True) if dims else grad
    return g.reshape(grad.shape[0], *padded[1:])


def per_sample_broadcast(tap: ParamTap, out_shape, sd: int = 0) -> torch.Tensor:
    """The tap's value broadcast to ``out_shape`` (samples in dim ``sd``), with exact per-sample backward."""
    ctx = tap._fdp_ctx
    out_shape = torch.Size(out_shape)
    if len(out_shape) <= sd or (ctx.batch_size is not None and out_shape[sd] != ctx.batch_size):
        where = "leading dim" if ctx.batch_first else f"dim {sd} (its sample dim in this batch_first=False model)"
        raise UnsupportedLayerError(
            f"{tap.label} is broadcast to shape {tuple(out_shape)}, whose {where} is not the batch size "
            f"{ctx.batch_size} the module was called with")
    if not _leading_one(tap._fdp_value, len(out_shape), sd):
        raise UnsupportedLayerError(
            f"{tap.label} (shape {tuple(tap._fdp_value.shape)}) is aligned with the batch dim of shape "
            f"{tuple(out_shape)}: each sample would use a different slice of it, which is not supported")
    return _BatchBroadcastFn.apply(ctx.engine.anchor, tap._fdp_value, out_shape, tap, sd)
