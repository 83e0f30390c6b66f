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
"""
from __future__ import annotations

from typing import Any, Callable, Optional

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
        if self._fdp_fn is not None and not self._fdp_cast_only:
            from fastdp.grad_sample import TransformedGrad

            grad = TransformedGrad(grad, self._fdp_fn)
        self._fdp_ctx.engine.submit(grad, use)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = OP_HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if func in METADATA and isinstance(args[0], ParamTap):  # shape, dtype, dim(), ...: no graph, answer directly
            return func(args[0]._fdp_value, *args[1:], **kwargs)
        return _generic(func, args, kwargs)


def unwrap(a):
    return a._fdp_value if isinstance(a, ParamTap) else a


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
    if len({id(t._fdp_param) for t in taps}) > 1:
        raise UnsupportedLayerError(
            f"{getattr(func, '__name__', func)} combines two trainable parameters ({taps[0].label} and "
            f"{taps[1].label}); per-sample gradients of such a combination are not supported")
    ctx = tap._fdp_ctx
    plain = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, ParamTap)]
    batched = [a for a in plain if _batched(a, ctx.batch_size)]
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
    old_fn = tap._fdp_fn

    def fn(p, _i=None):
        v = p if old_fn is None else old_fn(p)
        fa, fk = tree_unflatten([v if isinstance(a, ParamTap) else a for a in flat], spec)
        out = func(*fa, **fk)
        return out if _i is None else out[_i]

    if func in EXPANDERS and isinstance(result, torch.Tensor) and ctx.batch_size is not None \
            and result.dim() >= 1 and result.shape[0] == ctx.batch_size and _leading_one(tap._fdp_value, result.dim()):
        # replicated along the batch: sample i sees fn(p)[0]
        return per_sample_broadcast(ParamTap(tap._fdp_param, result[:1], lambda p: fn(p)[:1], ctx, tap._fdp_name,
                                             cast_only=False), result.shape)
    cast_only = tap._fdp_cast_only and func in CASTS
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
    """Output of a layer called on a batch of one that the model broadcasts over the batch.

    HF GPT-2 looks position embeddings up with ids of shape [1, T] and adds them to [B, T, d]
    token embeddings. The per-sample gradient of that lookup is taken where the broadcast happens:
    the first elementwise op against a batched tensor expands this activation explicitly and hands
    sample i's gradient to ``on_grad`` ([B, *shape[1:]] fp32 or in the activation dtype).
    """

    @staticmethod
    def __new__(cls, value, on_grad: Callable[[torch.Tensor], None]):
        t = value.as_subclass(cls)  # stays attached to the autograd graph
        t._fdp_value = value
        t._fdp_on_grad = on_grad
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        shared = next(a for a in flat if isinstance(a, SharedActivation))
        plain = [a._fdp_value if isinstance(a, SharedActivation) else a for a in flat]
        others = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, SharedActivation)]
        if func in ELEMENTWISE and others:
            out_shape = torch.broadcast_shapes(*(a.shape for a in plain if isinstance(a, torch.Tensor)))
            v = shared._fdp_value
            if len(out_shape) > v.dim() or (v.shape[0] == 1 and out_shape[0] > 1):
                expanded = _SharedExpandFn.apply(v, out_shape, shared._fdp_on_grad)
                plain = [expanded if isinstance(a, SharedActivation) else a for a in flat]
        a2, k2 = tree_unflatten(plain, spec)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*a2, **k2)
        if func in CASTS and isinstance(out, torch.Tensor) and not isinstance(out, SharedActivation):
            return SharedActivation(out, shared._fdp_on_grad)  # keep waiting for the broadcast
        return out


class _SharedExpandFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, out_shape, on_grad):
        ctx.on_grad, ctx.vshape = on_grad, value.shape
        return value.reshape((1,) * (len(out_shape) - value.dim()) + tuple(value.shape)).expand(out_shape)

    @staticmethod
    def backward(ctx, grad):
        per_sample = per_sample_grad_of_broadcast(grad, ctx.vshape)  # [B, *per-sample shape]
        ctx.on_grad(per_sample)
        return per_sample.sum(0).reshape(ctx.vshape), None, None
