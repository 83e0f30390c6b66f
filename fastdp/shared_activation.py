"""Lookups that may be shared by the batch: an embedding's output until the ops it meets say how it is used.

``SharedActivation`` wraps every embedding lookup's output (``fastdp.layers.embedding``); its
``__torch_function__`` routes each op through ``_SharedOp.resolve``: the wrapper is kept through ops on the lookup
alone, and the lookup's per-sample gradients are taken where it meets the batch (broadcast over it, or one row per
sample). See the class docstring for the rules.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from fastdp.op_sets import (
    _T,
    CASTS,
    ELEMENTWISE,
    EXPANDERS,
    METADATA,
    RANDOM,
    RESHAPES,
    SHAPE_ONLY,
    SHAPE_OPS,
    F_dropout,
    inactive_dropout,
    is_inplace,
)
from fastdp.tap import (
    BatchSizeError,
    ParamTap,
    UnsupportedLayerError,
    _autograd_function_class,
    _batched,
    per_sample_grad_of_broadcast,
    unwrap,
)


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

    _fdp_resolves_first = True  # a ParamTap in the same op defers to this class (``ParamTap.__torch_function__``)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA and isinstance(args[0], SharedActivation):
            return func(args[0]._fdp_value, *args[1:], **kwargs)
        return _SharedOp(func, args, kwargs).resolve()


class _SharedOp:
    """One op that received a ``SharedActivation``: ``resolve`` decides, top to bottom, whether the lookup stays
    shared (a function of it alone), meets the batch (broadcast over it, or taken per row), or is refused."""

    def __init__(self, func, args, kwargs):
        self.func, self.args, self.kwargs = func, args, kwargs
        self.flat, self.spec = tree_flatten((args, kwargs))
        self.shared = [a for a in self.flat if isinstance(a, SharedActivation)]
        self.plain = [a._fdp_value if isinstance(a, SharedActivation) else a for a in self.flat]
        self.first = args[0] if args else None
        self.name = getattr(func, "__name__", str(func))

    def call(self, values):
        a2, k2 = tree_unflatten(values, self.spec)
        return self.func(*a2, **k2)

    def resolve(self):
        func, first, shared = self.func, self.first, self.shared
        if func in (_T.detach, _T.data.__get__):
            return self.call(self.plain)  # no gradient flows through it
        if not torch.is_grad_enabled():
            return self._without_grad()
        if func in SHAPE_ONLY and not isinstance(first, SharedActivation):  # ``x.type_as(e)``: e's dtype / shape only
            return self.call([unwrap(v) for v in self.plain])
        if func in CASTS and len(shared) == 1:  # a cast of the lookup: reads the other argument's dtype/device only
            return SharedActivation(self.call([unwrap(v) for v in self.plain]), first._fdp_src, first._fdp_fn,
                                    first._fdp_rows)
        if any(isinstance(a, ParamTap) for a in self.flat):  # the parameter's handler takes the op
            return self.call([_for_parameter_op(a, func) if isinstance(a, SharedActivation) else a for a in self.flat])
        src = shared[0]._fdp_src
        batched = [] if func in SHAPE_ONLY else [a for a in self.flat if isinstance(a, torch.Tensor)
                                                 and not isinstance(a, SharedActivation) and _batched(a, src.batch_size)]
        if func in ELEMENTWISE:
            out_shape = torch.broadcast_shapes(*(v.shape for v in self.plain if isinstance(v, torch.Tensor)))
            if self._meets_batch(batched, out_shape):  # broadcast over the batch, or taken per row
                return self.call([_at_batched_op(a, out_shape, self.name) if isinstance(a, SharedActivation) else a
                                  for a in self.flat])
        if func in EXPANDERS and isinstance(first, SharedActivation) and len(shared) == 1:
            out = self.call(self.plain)
            if _batch_broadcast(first, out.shape) and (func is not _T.repeat or _repeat_is_expand(first, out.shape)):
                return _at_batched_op(first, out.shape, self.name)  # an explicit broadcast over the batch
        if all(s._fdp_src is src for s in shared) and not batched and not is_inplace(func):
            return self._on_lookup_alone(src)
        return self._with_batch()

    def _without_grad(self):
        """Grad mode off: the op on the values. Inside a custom Function's forward the lookup escapes the engine
        (its backward is unseen): taken per row later only if its rows were still the samples here."""
        if _autograd_function_class() is not None:
            for s in self.shared:
                if not s._fdp_rows:
                    s._fdp_src.escaped = "unaligned"
                elif not s._fdp_src.escaped:
                    s._fdp_src.escaped = True
        return self.call(self.plain)

    def _meets_batch(self, batched, out_shape) -> bool:
        """An elementwise op (output shape ``out_shape``) with operands carrying the batch: batched tensors, or lookups
        one row per sample aligned with the output beside lookups that are not."""
        aligned = [s for s in self.shared if s._fdp_rows and s.dim() == len(out_shape) and s.shape[0] == out_shape[0]]
        return bool(batched) or 0 < len(aligned) < len(self.shared)

    def _on_lookup_alone(self, src):
        """A function of the lookup alone (reshapes, permutes, constant indexing or scaling, activations...): the
        wrapper is kept, with the function, until the value meets the batch."""
        func, first, shared = self.func, self.first, self.shared
        if func in RANDOM:
            if isinstance(first, SharedActivation) and inactive_dropout(func, self.args, self.kwargs):
                return first
            if func is F_dropout and isinstance(first, SharedActivation):
                return _dropout(first, self.args, self.kwargs)
            raise UnsupportedLayerError(
                f"{src.label}: random op {self.name} on the output of a lookup that is not one row of ids per sample "
                f"(ids of shape {src.ids_shape}), before it meets the batch: not supported (apply it after)")
        out = self.call(self.plain)
        if not any(isinstance(o, torch.Tensor) and o.requires_grad for o in tree_flatten(out)[0]):
            return out  # a query or a constant (shape, comparisons, argmax...)
        s = first if isinstance(first, SharedActivation) else shared[0]
        pure = len(shared) == 1 and s._fdp_fn is None and _order_preserving(func, self.args, self.kwargs)
        fn = None if pure else _compose(func, self.flat, self.spec)
        rows = all(t._fdp_rows for t in shared)
        if isinstance(out, torch.Tensor):
            return SharedActivation(out, src, fn, rows and _keeps_rows(func, self.args, self.kwargs, s, out))
        if isinstance(out, (tuple, list)) and fn is not None:  # split, chunk, unbind, var_mean...
            return type(out)(
                SharedActivation(o, src, (lambda u, i=i: fn(u)[i]), rows and _keeps_rows(func, self.args, self.kwargs, s, o))
                if isinstance(o, torch.Tensor) and o.requires_grad else o for i, o in enumerate(out))
        return self._with_batch()

    def _with_batch(self):
        """Any other op: fine for lookups one row per sample (taken per row); a shared lookup is refused."""
        out = self.call(self.plain)
        if not _has_tensor(out):
            return out  # a query (repr, item, tolist, grad_fn...)
        if all(s._fdp_rows for s in self.shared):
            for s in self.shared:
                s._fdp_src.set_mode("rows")
            return out
        s = next(s for s in self.shared if not s._fdp_rows)
        raise BatchSizeError(
            f"{s._fdp_src.label}: the ids (shape {s._fdp_src.ids_shape}) are not one row of ids per sample (batch "
            f"size {s._fdp_src.batch_size}), and the lookup's output (shape {tuple(s.shape)}) enters {self.name} with "
            "the batch before it is broadcast over it. fastdp takes the per-sample gradients of such a lookup where an "
            "elementwise op broadcasts it against the batch (x + pos(ids), possibly after ops on the lookup alone: "
            "[None], unsqueeze(0), casts, dropout, scaling...), or at .expand(B, ...). Broadcast it first, or look "
            "the ids up per sample (ids of shape [B, T], e.g. ids.expand(B, -1)).")


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
