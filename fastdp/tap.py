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
* An embedding's output is a ``SharedActivation`` until the ops it meets say whether its rows are the samples
  or it is shared by the batch (position lookups), whose per-sample gradients are then taken at the broadcast.
* With grad mode off (``torch.no_grad`` inside the forward) an op on a tap is an op on a constant: it runs on
  the parameter's value and returns a plain tensor, as in PyTorch. Inside the forward of a custom
  ``torch.autograd.Function`` (grad mode is off there too) a tap is refused: the gradient that function's
  backward returns for the parameter would be dropped. Activation checkpointing is refused the same way.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from fastdp.grad_sample import DenseGrad, PerSampleGrad, pull_back
from fastdp.kernels._common import upcast


class UnsupportedLayerError(RuntimeError):
    """A trainable parameter is used in a way the engine cannot clip exactly."""


class BatchSizeError(RuntimeError):
    """A layer's leading dim is not the batch size of the model input (or layers disagree)."""


class TapContext:
    """Where a tap lives: the engine, the owning module's name and type (for errors), its flags.

    ``rows_sample_major``: the module flattens [B, T, d] to [B*T, d] rows in sample order (HF Conv1D).
    ``batch_size``: the leading dim of the model input in the current forward.
    """

    __slots__ = ("engine", "owner", "owner_type", "rows_sample_major")

    def __init__(self, engine: Any, owner: str, owner_type: str, rows_sample_major: bool = False):
        self.engine, self.owner, self.owner_type = engine, owner, owner_type
        self.rows_sample_major = rows_sample_major

    @property
    def batch_size(self) -> Optional[int]:
        return self.engine.batch_size


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
        if func is _T.requires_grad.__get__:
            return True
        if any(issubclass(t, SharedActivation) for t in types):
            return NotImplemented  # SharedActivation resolves itself first, then calls the op again
        if not torch.is_grad_enabled():
            return _without_grad(func, args, kwargs)
        _refuse_checkpointing(func, args, kwargs)
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


_CHECKPOINT_HELP = ("activation checkpointing (torch.utils.checkpoint, HF gradient_checkpointing) is not supported "
                    "by fastdp: the recomputation in backward runs outside the engine's forward. Disable it "
                    "(e.g. model.gradient_checkpointing_disable()).")


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
        if getattr(fn_cls, "__module__", "") == "torch.utils.checkpoint":
            raise UnsupportedLayerError(f"{tap.label} is used inside {_CHECKPOINT_HELP}")
        raise UnsupportedLayerError(
            f"{tap.label} is an input of the custom torch.autograd.Function {fn_cls.__qualname__} (op "
            f"{getattr(func, '__name__', func)} inside its forward): its forward runs without autograd, so fastdp "
            "cannot take per-sample gradients of the parameter and the gradient its backward returns would be "
            "dropped (the parameter would silently not train). Use PyTorch ops or a supported layer for it under "
            "DP (e.g. nn.LayerNorm instead of a fused kernel), or freeze the parameter.")
    return _on_values(func, args, kwargs)


def _refuse_checkpointing(func, args, kwargs) -> None:
    """Non-reentrant checkpointing: its saved-tensor hooks are active in the forward."""
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError, RuntimeError):  # private API: skip the check if it changed
        return
    if hooks is not None and getattr(hooks[0], "__module__", "") == "torch.utils.checkpoint":
        raise UnsupportedLayerError(f"{_first_tap(args, kwargs).label} is used inside {_CHECKPOINT_HELP}")


def is_trivial(tap: ParamTap) -> bool:
    """The tap's value is the parameter itself, possibly cast (layer handlers then use closed forms)."""
    return tap._fdp_fn is None or tap._fdp_cast_only


OP_HANDLERS: dict = {}


def register_op(*funcs):
    """Register a layer handler for torch functions that may receive a ``ParamTap``.

    The handler gets the op's own arguments (taps included) and returns its output.
    """

    def deco(handler):
        for f in funcs:
            OP_HANDLERS[f] = handler
        return handler

    return deco


_T = torch.Tensor
ELEMENTWISE = {
    torch.add, _T.add, _T.__add__, _T.__radd__, _T.add_, _T.__iadd__,
    torch.sub, _T.sub, _T.__sub__, _T.__rsub__, _T.sub_, _T.__isub__, torch.rsub,
    torch.mul, _T.mul, _T.__mul__, _T.__rmul__, _T.mul_, _T.__imul__,
    torch.div, _T.div, _T.__truediv__, _T.__rtruediv__, _T.div_, _T.__itruediv__, torch.true_divide,
    torch.where, _T.where, torch.addcmul, _T.addcmul, torch.addcdiv, _T.addcdiv, torch.lerp, _T.lerp,
    torch.maximum, torch.minimum, torch.pow, _T.pow, _T.__pow__, _T.__rpow__,
}
# Queries of a tensor's metadata: answered from the tap's value (models ask ``weight.dtype`` or ``weight.shape``).
METADATA = {
    _T.dim, _T.ndimension, _T.size, _T.numel, _T.nelement, _T.stride, _T.is_contiguous, _T.element_size,
    _T.get_device, _T.is_floating_point, _T.is_complex, _T.shape.__get__, _T.dtype.__get__, _T.device.__get__,
    _T.ndim.__get__, _T.is_cuda.__get__, _T.layout.__get__, _T.is_sparse.__get__,
}
# Ops on a parameter alone that replicate it along a new or size-1 leading (batch) dim.
EXPANDERS = {_T.expand, _T.expand_as, torch.broadcast_to, _T.broadcast_to, _T.repeat}
CASTS = {_T.to, _T.float, _T.half, _T.bfloat16, _T.double, _T.type_as, _T.type, _T.contiguous, _T.cuda, _T.cpu}


def _batched(t: torch.Tensor, batch_size: Optional[int]) -> bool:
    """A plain tensor operand carries the batch: it is part of the autograd graph, or leads with B."""
    return t.requires_grad or (batch_size is not None and t.dim() >= 1 and t.shape[0] == batch_size)


def _generic(func, args, kwargs):
    flat, spec = tree_flatten((args, kwargs))
    taps = [a for a in flat if isinstance(a, ParamTap)]
    tap = taps[0]
    if func == _T.requires_grad.__get__:
        return True
    if func in (_T.detach, _T.data.__get__):
        return tap._fdp_value
    if func in CASTS and not isinstance(args[0], ParamTap):  # ``x.type_as(w)``, ``x.to(w)``: reads dtype/device
        return _on_values(func, args, kwargs)
    if func in RANDOM and not _inactive_dropout(func, args, kwargs):
        raise UnsupportedLayerError(f"random op {getattr(func, '__name__', func)} on {tap.label} (e.g. DropConnect): "
                                    "its per-sample gradients cannot be pulled back exactly; not supported")
    if len({id(t._fdp_param) for t in taps}) > 1:
        raise UnsupportedLayerError(
            f"{getattr(func, '__name__', func)} combines two trainable parameters ({taps[0].label} and "
            f"{taps[1].label}); per-sample gradients of such a combination are not supported")
    ctx = tap._fdp_ctx
    plain = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, ParamTap)]
    # a cast reads only the dtype/device of a tensor argument (``p.to(h)``, ``p.type_as(h)``)
    batched = [] if func in CASTS else [a for a in plain if _batched(a, ctx.batch_size)]
    values = [unwrap(a) for a in flat]
    if batched:
        if func not in ELEMENTWISE:
            raise UnsupportedLayerError(
                f"{getattr(func, '__qualname__', func)} with batched inputs is not supported for {tap.label}. "
                "Supported: the layers in fastdp's table (Linear, Conv1d/2d, Embedding, LayerNorm, GroupNorm, "
                "RMSNorm, HF Conv1D, matmul) and elementwise broadcasting of a parameter against the batch.")
        shapes = [v.shape for v in values if isinstance(v, torch.Tensor)]
        out_shape = torch.broadcast_shapes(*shapes)
        new_flat = [per_sample_broadcast(a, out_shape) if isinstance(a, ParamTap) else a for a in flat]
        a2, k2 = tree_unflatten(new_flat, spec)
        return func(*a2, **k2)
    a2, k2 = tree_unflatten(values, spec)
    result = func(*a2, **k2)
    if not isinstance(result, (torch.Tensor, tuple, list)):
        return result  # metadata: shape, dtype, dim(), ...
    if any(result is v for v in values if isinstance(v, torch.Tensor)) and func not in CASTS:
        raise UnsupportedLayerError(f"in-place {getattr(func, '__name__', func)} on {tap.label} inside forward")
    # each tap of the parameter with its own function of it (``W + W.t()``, ``w - w.mean(1, keepdim=True)``)
    tap_fns = [a._fdp_fn if isinstance(a, ParamTap) else None for a in flat]
    is_tap = [isinstance(a, ParamTap) for a in flat]

    def fn(p, _i=None):
        fa, fk = tree_unflatten([(p if f is None else f(p)) if t else a for a, f, t in zip(flat, tap_fns, is_tap)],
                                spec)
        out = func(*fa, **fk)
        return out if _i is None else out[_i]

    if func in EXPANDERS and isinstance(result, torch.Tensor) and ctx.batch_size is not None \
            and result.dim() >= 1 and result.shape[0] == ctx.batch_size and _leading_one(tap._fdp_value, result.dim()):
        # replicated along the batch: sample i sees fn(p)[0]
        return per_sample_broadcast(ParamTap(tap._fdp_param, result[:1], lambda p: fn(p)[:1], ctx, tap._fdp_name,
                                             cast_only=False), result.shape)
    cast_only = len(taps) == 1 and tap._fdp_cast_only and func in CASTS
    if isinstance(result, torch.Tensor):
        return ParamTap(tap._fdp_param, result, fn, ctx, tap._fdp_name, cast_only)
    return type(result)(
        ParamTap(tap._fdp_param, r, (lambda p, i=i: fn(p, i)), ctx, tap._fdp_name, False)
        if isinstance(r, torch.Tensor) else r for i, r in enumerate(result))


def _leading_one(v: torch.Tensor, ndim: int) -> bool:
    """``v`` right-aligned to ``ndim`` dims has size 1 (or is absent) on dim 0."""
    return v.dim() < ndim or v.shape[0] == 1


class _BatchBroadcastFn(torch.autograd.Function):
    """Expand a parameter value [*S] to ``out_shape`` [B, ...]; backward records per-sample gradients."""

    @staticmethod
    def forward(ctx, anchor, value, out_shape, tap):
        ctx.tap, ctx.use = tap, tap._fdp_ctx.engine.open_use(tap)
        ctx.vshape = value.shape
        ctx.pad = len(out_shape) - value.dim()
        return value.reshape((1,) * ctx.pad + tuple(value.shape)).expand(out_shape)

    @staticmethod
    def backward(ctx, grad):
        tap, vshape = ctx.tap, ctx.vshape
        if not tap._fdp_ctx.engine.recording():
            return None, None, None, None
        g = per_sample_grad_of_broadcast(upcast(grad), vshape).reshape(grad.shape[0], *vshape)
        if not is_trivial(tap):
            g = pull_back(tap._fdp_fn, tap._fdp_param, g)
        param = tap._fdp_param
        tap._fdp_ctx.engine.submit(DenseGrad(param, tap._fdp_ctx.owner, g.reshape(g.shape[0], *param.shape)), ctx.use)
        return None, None, None, None


def per_sample_grad_of_broadcast(grad: torch.Tensor, vshape) -> torch.Tensor:
    """Gradient of a value of shape ``vshape`` broadcast to ``grad.shape`` [B, ...], kept per sample.

    Sums over the broadcast dims except the leading (batch) one; returns [B, *padded(vshape)[1:]].
    """
    padded = (1,) * (grad.dim() - len(vshape)) + tuple(vshape)
    dims = [i for i in range(1, grad.dim()) if padded[i] == 1 and grad.shape[i] != 1]
    g = grad.sum(dim=dims, keepdim=True) if dims else grad
    return g.reshape(grad.shape[0], *padded[1:])


def per_sample_broadcast(tap: ParamTap, out_shape) -> torch.Tensor:
    """The tap's value broadcast to ``out_shape`` (leading dim = batch), with exact per-sample backward."""
    ctx = tap._fdp_ctx
    out_shape = torch.Size(out_shape)
    if len(out_shape) == 0 or (ctx.batch_size is not None and out_shape[0] != ctx.batch_size):
        raise UnsupportedLayerError(
            f"{tap.label} is broadcast to shape {tuple(out_shape)}, whose leading dim is not the batch size "
            f"{ctx.batch_size} the module was called with")
    if not _leading_one(tap._fdp_value, len(out_shape)):
        raise UnsupportedLayerError(
            f"{tap.label} (shape {tuple(tap._fdp_value.shape)}) is aligned with the batch dim of shape "
            f"{tuple(out_shape)}: each sample would use a different slice of it, which is not supported")
    return _BatchBroadcastFn.apply(ctx.engine.anchor, tap._fdp_value, out_shape, tap)


class SharedActivation(torch.Tensor):
    """Output of a lookup that may be shared by every sample of the batch, until an op says how it is used.

    Every embedding lookup returns one: its ids may be one row per sample ([B, T] tokens, [B] user / item / label
    ids) or shared by the batch (1-D ``arange(T)``, HF GPT-2's [1, T] position ids at B > 1, T5's [T, T]
    relative-position buckets), and a leading dim equal to B can be either. ``src`` (the lookup,
    ``fastdp.layers.embedding``) knows its parameter; ``fn`` maps the lookup's output to this value (None: a plain
    reshape of it); ``rows``: dim 0 is still the lookup's dim 0 and the ids' leading dim is B (one row per sample,
    unless an op shows the value is shared).

    * Broadcast over the batch by an elementwise op against a batched tensor (``x + pos``), or by ``expand``:
      the value is expanded explicitly and the per-sample gradient of the lookup is taken there (pulled back
      through ``fn``). Reshapes (``[None]``, ``unsqueeze(0)``, ``view``), permutes, indexing with constant
      indices, casts, dropout and elementwise ops with constants before the broadcast keep the wrapper.
    * With ``rows`` set, any op that keeps dim 0 aligned (a layer, an elementwise op against a [B, ...] tensor, an
      activation...) takes the lookup per row: one sample per row.
    * An op with a trainable parameter goes to that parameter's handler: per row (``rows``), or after expanding a
      value with a leading dim of 1 to the batch.
    * Anything else raises: a shared lookup is never attributed per position.
    """

    @staticmethod
    def __new__(cls, value, src, fn=None, rows=False):
        t = value.as_subclass(cls)  # stays attached to the autograd graph
        t._fdp_value = value
        t._fdp_src = src
        t._fdp_fn = fn
        t._fdp_rows = rows
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA and isinstance(args[0], SharedActivation):
            return func(args[0]._fdp_value, *args[1:], **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        shared = [a for a in flat if isinstance(a, SharedActivation)]
        plain = [a._fdp_value if isinstance(a, SharedActivation) else a for a in flat]

        def call(values):
            a2, k2 = tree_unflatten(values, spec)
            return func(*a2, **k2)

        if func in (_T.detach, _T.data.__get__):
            return call(plain)  # no gradient flows through it
        if not torch.is_grad_enabled():
            if _autograd_function_class() is not None:  # inside a custom Function's forward: its backward is unseen
                for s in shared:  # (taken per row later only if its rows were still the samples here)
                    if not s._fdp_rows:
                        s._fdp_src.escaped = "unaligned"
                    elif not s._fdp_src.escaped:
                        s._fdp_src.escaped = True
            return call(plain)
        first = args[0] if args else None
        if func in SHAPE_ONLY and not isinstance(first, SharedActivation):  # ``x.type_as(e)``: e's dtype / shape only
            return call([unwrap(v) for v in plain])
        if func in CASTS and len(shared) == 1:  # a cast of the lookup: reads the other argument's dtype/device only
            return SharedActivation(call([unwrap(v) for v in plain]), first._fdp_src, first._fdp_fn, first._fdp_rows)
        if any(isinstance(a, ParamTap) for a in flat):  # the parameter's handler takes the op
            return call([_for_parameter_op(a, func) if isinstance(a, SharedActivation) else a for a in flat])
        src = shared[0]._fdp_src
        one_src = all(s._fdp_src is src for s in shared)
        B = src.batch_size
        batched = [] if func in SHAPE_ONLY else [a for a in flat if isinstance(a, torch.Tensor)
                                                 and not isinstance(a, SharedActivation) and _batched(a, B)]
        name = getattr(func, "__name__", str(func))
        if func in ELEMENTWISE:
            out_shape = torch.broadcast_shapes(*(v.shape for v in plain if isinstance(v, torch.Tensor)))
            # operands carrying the batch: batched tensors, and lookups one row per sample aligned with the output
            aligned = [s for s in shared if s._fdp_rows and s.dim() == len(out_shape) and s.shape[0] == out_shape[0]]
            if batched or 0 < len(aligned) < len(shared):  # meets the batch: broadcast over it, or per row
                return call([_at_batched_op(a, out_shape, name) if isinstance(a, SharedActivation) else a
                             for a in flat])
        if func in EXPANDERS and isinstance(first, SharedActivation) and len(shared) == 1:
            out = call(plain)
            if _batch_broadcast(first, out.shape) and (func is not _T.repeat or _repeat_is_expand(first, out.shape)):
                return _at_batched_op(first, out.shape, name)  # an explicit broadcast over the batch
        if one_src and not batched and not _is_inplace(func):
            # a function of the lookup alone (reshapes, permutes, constant indexing or scaling, activations...):
            # the wrapper is kept, with the function, until the value meets the batch
            if func in RANDOM:
                if isinstance(first, SharedActivation) and _inactive_dropout(func, args, kwargs):
                    return first
                if func is F_dropout and isinstance(first, SharedActivation):
                    return _dropout(first, args, kwargs)
                raise UnsupportedLayerError(
                    f"{src.label}: random op {name} on the output of a lookup that is not one row of ids per sample "
                    f"(ids of shape {src.ids_shape}), before it meets the batch: not supported (apply it after)")
            out = call(plain)
            outs = tree_flatten(out)[0]
            if not any(isinstance(o, torch.Tensor) and o.requires_grad for o in outs):
                return out  # a query or a constant (shape, comparisons, argmax...)
            s = first if isinstance(first, SharedActivation) else shared[0]
            pure = (len(shared) == 1 and s._fdp_fn is None and _order_preserving(func, args, kwargs))
            fn = None if pure else _compose(func, flat, spec)
            if isinstance(out, torch.Tensor):
                return SharedActivation(out, src, fn, all(s._fdp_rows for s in shared)
                                        and _keeps_rows(func, args, kwargs, s, out))
            if isinstance(out, (tuple, list)) and fn is not None:  # split, chunk, unbind, var_mean...
                return type(out)(
                    SharedActivation(o, src, (lambda u, i=i: fn(u)[i]), all(s._fdp_rows for s in shared)
                                     and _keeps_rows(func, args, kwargs, s, o))
                    if isinstance(o, torch.Tensor) and o.requires_grad else o for i, o in enumerate(out))
        out = call(plain)
        if not _has_tensor(out):
            return out  # a query (repr, item, tolist, grad_fn...)
        if all(s._fdp_rows for s in shared):
            for s in shared:
                s._fdp_src.set_mode("rows")
            return out
        s = next(s for s in shared if not s._fdp_rows)
        raise BatchSizeError(
            f"{s._fdp_src.label}: the ids (shape {s._fdp_src.ids_shape}) are not one row of ids per sample (batch "
            f"size {s._fdp_src.batch_size}), and the lookup's output (shape {tuple(s.shape)}) enters {name} with the "
            "batch before it is broadcast over it. fastdp takes the per-sample gradients of such a lookup where an "
            "elementwise op broadcasts it against the batch (x + pos(ids), possibly after ops on the lookup alone: "
            "[None], unsqueeze(0), casts, dropout, scaling...), or at .expand(B, ...). Broadcast it first, or look "
            "the ids up per sample (ids of shape [B, T], e.g. ids.expand(B, -1)).")


# ops that move no element: the lookup's per-sample gradient is a reshape of the broadcast's
RESHAPES = {_T.view, _T.view_as, _T.reshape, _T.reshape_as, _T.unsqueeze, _T.squeeze, _T.flatten, _T.unflatten,
            torch.reshape, torch.unsqueeze, torch.squeeze, torch.flatten, torch.unflatten, _T.clone, torch.clone,
            _T.__getitem__}
# other data-independent ops on the value alone: pulled back exactly through their vjp
SHAPE_OPS = {_T.permute, torch.permute, _T.transpose, torch.transpose, _T.swapaxes, _T.swapdims, _T.t, torch.t,
             _T.T.__get__, _T.mT.__get__, _T.movedim, torch.movedim, _T.moveaxis, _T.narrow, torch.narrow, _T.select,
             torch.select, _T.flip, torch.flip, _T.roll, torch.roll, _T.tril, _T.triu, torch.tril, torch.triu}
# ops that read only the shape / dtype / device of their tensor arguments other than the first
SHAPE_ONLY = EXPANDERS | CASTS | {_T.view_as, _T.reshape_as}
_F = torch.nn.functional
F_dropout = _F.dropout
# random ops: replaying them to pull gradients back would draw again (F.dropout alone is handled, with its mask)
RANDOM = {_F.dropout, _F.dropout1d, _F.dropout2d, _F.dropout3d, _F.alpha_dropout, _F.feature_alpha_dropout,
          torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout, _F.rrelu,
          torch.rrelu, torch.bernoulli, _T.bernoulli, torch.normal, torch.poisson}


def _is_inplace(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.startswith("__")) or name in ("__iadd__", "__isub__", "__imul__",
                                                                          "__itruediv__", "__ipow__", "__setitem__")


def _inactive_dropout(func, args, kwargs) -> bool:
    """A dropout call that is the identity (eval mode or p = 0)."""
    if func in (torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout):
        p, training = (args[1] if len(args) > 1 else 0.5), (args[2] if len(args) > 2 else True)
    elif func in (_F.dropout, _F.dropout1d, _F.dropout2d, _F.dropout3d, _F.alpha_dropout, _F.feature_alpha_dropout):
        default = func not in (_F.alpha_dropout, _F.feature_alpha_dropout)  # their training defaults to False
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        training = args[2] if len(args) > 2 else kwargs.get("training", default)
    else:
        return False
    return not training or p == 0


def _has_tensor(out) -> bool:
    return any(isinstance(a, torch.Tensor) for a in tree_flatten(out)[0])


def _compose(func, flat, spec):
    """The function of the lookup's output that the op computes (every shared operand comes from one lookup)."""
    parts = [(a._fdp_fn, tuple(a.shape)) if isinstance(a, SharedActivation) else None for a in flat]
    consts = [None if isinstance(a, SharedActivation) else a for a in flat]  # (no activation kept alive)

    def fn(u):
        vals = [a if part is None else (u.reshape(part[1]) if part[0] is None else part[0](u))
                for a, part in zip(consts, parts)]
        a2, k2 = tree_unflatten(vals, spec)
        return func(*a2, **k2)

    return fn


def _index_is_trivial(index) -> bool:
    """``v[None]``, ``v[:, None]``, ``v[...]``: only new axes and full slices (no element moves)."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in items)


def _order_preserving(func, args, kwargs) -> bool:
    if func not in RESHAPES:
        return False
    if func is _T.__getitem__:
        return _index_is_trivial(args[1])
    if func is _T.view:  # view(dtype) reinterprets bits
        return not any(isinstance(a, torch.dtype) for a in list(args[1:]) + list(kwargs.values()))
    return True


def _keeps_rows(func, args, kwargs, s, out) -> bool:
    """Dim 0 of ``out`` is dim 0 of ``s`` (for a value whose dim 0 is one row per sample).

    Exact for reshapes, indexing and permutes; other ops keep rows when they keep the leading size (the engine's
    convention that dim 0 is the sample dim: an op mixing rows, such as ``cumsum(0)``, is not detected).
    """
    if out.dim() == 0 or s.dim() == 0 or out.shape[0] != s.shape[0]:
        return False
    if _order_preserving(func, args, kwargs):
        return True  # same leading size, elements in order: each row stays a row
    if func is _T.__getitem__:
        items = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, (torch.Tensor, list)) for i in items):
            return False
        if len(items) > 0 and items[0] is Ellipsis:  # ``v[..., :k]``: dim 0 is in the ellipsis
            return sum(1 for i in items if i is not None and i is not Ellipsis) < s.dim()
        return len(items) > 0 and isinstance(items[0], slice) and items[0] == slice(None)
    if func in (_T.transpose, torch.transpose, _T.swapaxes, _T.swapdims):
        dims = [d for d in list(args[1:3]) + list(kwargs.values()) if isinstance(d, int)]
        return len(dims) == 2 and all(d % s.dim() != 0 for d in dims)
    if func in (_T.permute, torch.permute):
        dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        dims = kwargs.get("dims", dims)
        return len(dims) > 0 and dims[0] % s.dim() == 0
    if func in SHAPE_OPS:  # movedim, narrow, select, flip, roll, t...: may move dim 0
        return False
    return True


def _batch_broadcast(s: "SharedActivation", out_shape) -> bool:
    """Expanding ``s`` to ``out_shape`` replicates it along dim 0 of the output (a new or size-1 leading dim); at
    batch size 1, ``expand(B, ...)`` of a shared lookup's [1, ...] value is that broadcast too (over one sample)."""
    if len(out_shape) > s.dim():
        return True
    if s.dim() == 0 or s.shape[0] != 1:
        return False
    return out_shape[0] != 1 or (not s._fdp_rows and s._fdp_src.batch_size == 1)


def _repeat_is_expand(s, out_shape) -> bool:
    padded = (1,) * (len(out_shape) - s.dim()) + tuple(s.shape)
    return all(p == o or p == 1 for p, o in zip(padded, out_shape))


def _at_batched_op(s: "SharedActivation", out_shape, name: str) -> torch.Tensor:
    """``s`` meets the batch: expanded to ``out_shape`` (per-sample gradients taken there) or taken per row."""
    src = s._fdp_src
    B = src.batch_size
    if len(out_shape) > s.dim() or (s.dim() > 0 and s.shape[0] == 1 and (out_shape[0] != 1 or not s._fdp_rows)):
        if len(out_shape) == 0 or (B is not None and out_shape[0] != B):
            raise BatchSizeError(
                f"{src.label}: the lookup (ids of shape {src.ids_shape}) is broadcast by {name} to shape "
                f"{tuple(out_shape)}, whose leading dim is not the batch size {B}")
        src.set_mode("shared")
        return _SharedExpandFn.apply(s._fdp_value, torch.Size(out_shape), src, s._fdp_fn)
    if s._fdp_rows:
        src.set_mode("rows")
        return s._fdp_value
    raise BatchSizeError(
        f"{src.label}: the ids (shape {src.ids_shape}) are not one row of ids per sample (batch size {B}), and {name} "
        f"combines its output (shape {tuple(s.shape)}) with the batch without broadcasting it over a leading batch "
        "dim: its rows would be taken as samples. Broadcast it (x + pos(ids)[None]) or look the ids up per sample.")


def _for_parameter_op(s: "SharedActivation", func) -> torch.Tensor:
    """``s`` enters an op with a trainable parameter: per row, or expanded to the batch first."""
    src = s._fdp_src
    B = src.batch_size
    if s._fdp_rows:
        src.set_mode("rows")
        return s._fdp_value
    if s.dim() > 0 and s.shape[0] == 1 and B is not None:
        src.set_mode("shared")
        return _SharedExpandFn.apply(s._fdp_value, torch.Size((B, *s.shape[1:])), src, s._fdp_fn)
    raise BatchSizeError(
        f"{src.label}: the ids (shape {src.ids_shape}) are not one row of ids per sample (batch size {B}), and its "
        f"output (shape {tuple(s.shape)}) enters {getattr(func, '__name__', func)} with a trainable parameter before "
        "it is broadcast over the batch. Per-sample gradients need the batch dim there: give it a leading dim "
        "(pos(ids)[None]: it is then expanded to the batch), expand it (.expand(B, ...)), or look the ids up per "
        "sample (ids of shape [B, T]).")


def _dropout(s: "SharedActivation", args, kwargs):
    """F.dropout of a shared lookup: one mask for the batch (as PyTorch draws it), kept in the pulled-back function."""
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    training = args[2] if len(args) > 2 else kwargs.get("training", True)
    if not training or p == 0:
        return s
    v = s._fdp_value
    mask = torch.zeros_like(v) if p >= 1 else torch.empty_like(v).bernoulli_(1 - p).div_(1 - p)
    old, shape = s._fdp_fn, tuple(s.shape)

    def fn(u):
        return (u.reshape(shape) if old is None else old(u)) * mask

    return SharedActivation(v * mask, s._fdp_src, fn, s._fdp_rows)


class _SharedExpandFn(torch.autograd.Function):
    """Expand a shared value to ``out_shape`` [B, ...]; backward hands each sample's gradient to the lookup."""

    @staticmethod
    def forward(ctx, value, out_shape, src, fn):
        ctx.src, ctx.fn, ctx.vshape = src, fn, value.shape
        ctx.use = src.open_use()
        return value.reshape((1,) * (len(out_shape) - value.dim()) + tuple(value.shape)).expand(out_shape)

    @staticmethod
    def backward(ctx, grad):
        per_sample = per_sample_grad_of_broadcast(grad, ctx.vshape)  # [B, *padded value shape[1:]]
        ctx.src.take(per_sample.reshape(grad.shape[0], *ctx.vshape), ctx.fn, ctx.use)
        return per_sample.sum(0).reshape(ctx.vshape), None, None, None
