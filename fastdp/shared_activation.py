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
    FIXED_SAMPLE_DIM,
    OP_HANDLERS,
    BatchSizeError,
    ParamTap,
    UnsupportedLayerError,
    _autograd_function_class,
    _batched,
    broadcast_sample_dim,
    per_sample_grad_of_broadcast,
    refuse_op,
    unwrap,
)


class SharedActivation(torch.Tensor):
    """Output of a lookup that may be shared by every sample of the batch, until an op says how it is used.

    Every embedding lookup returns one: its ids may be one row per sample ([B, T] tokens, [B] user / item / label
    ids) or shared by the batch (1-D ``arange(T)``, HF GPT-2's [1, T] position ids at B > 1, T5's [T, T]
    relative-position buckets), and a leading dim equal to B can be either. ``src`` (the lookup,
    ``fastdp.layers.embedding``) knows its parameter; ``fn`` maps the lookup's output to this value (None: a plain
    reshape of it); ``rows``: the value's dim ``bdim`` is still the ids' sample dim and that dim is B (one row per
    sample, unless an op shows the value is shared). ``bdim`` is 0 for [B, ...] ids; 1 for a sequence-first model's
    [T, B] ids, or after a transpose (``nn.MultiheadAttention`` turns a batch-first [B, T, E] input into [T, B, E]).

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
    def __new__(cls, value, src, fn=None, rows=False, bdim=0):
        t = value.as_subclass(cls)  # stays attached to the autograd graph
        t._fdp_value = value
        t._fdp_src = src
        t._fdp_fn = fn
        t._fdp_rows = rows
        t._fdp_bdim = bdim
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
                                    first._fdp_rows, first._fdp_bdim)
        taps = [a for a in self.flat if isinstance(a, ParamTap)]
        if taps:  # the parameter's handler takes the op
            if func not in OP_HANDLERS and func not in ELEMENTWISE:  # the op is the cause, not the lookup
                raise refuse_op(func, taps[0])
            return self.call([_for_parameter_op(a, func) if isinstance(a, SharedActivation) else a for a in self.flat])
        src = shared[0]._fdp_src
        bf = src.tap._fdp_ctx.batch_first
        batched = [] if func in SHAPE_ONLY else [a for a in self.flat if isinstance(a, torch.Tensor)
                                                 and not isinstance(a, SharedActivation)
                                                 and _batched(a, src.batch_size, bf)]
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
        aligned = [s for s in self.shared if s._fdp_rows and s.dim() == len(out_shape)
                   and s.shape[s._fdp_bdim] == out_shape[s._fdp_bdim]]
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
        rows = all(t._fdp_rows and t._fdp_bdim == s._fdp_bdim for t in shared)

        def wrap(o, f):
            bd = _keeps_rows(func, self.args, self.kwargs, s, o) if rows else None
            return SharedActivation(o, src, f, bd is not None, bd or 0)

        if isinstance(out, torch.Tensor):
            return wrap(out, fn)
        if isinstance(out, (tuple, list)) and fn is not None:  # split, chunk, unbind, var_mean...
            return type(out)(wrap(o, (lambda u, i=i: fn(u)[i])) if isinstance(o, torch.Tensor) and o.requires_grad
                             else o for i, o in enumerate(out))
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


def _keeps_rows(func, args, kwargs, s, out):
    """The dim of ``out`` that is the sample dim ``s._fdp_bdim`` of ``s`` (for a value one row per sample along
    it), or None.

    Exact for reshapes, indexing, transposes and permutes; other ops keep rows when they keep the size of the
    sample dim (the engine's convention that the sample dim stays the sample dim: an op mixing rows, such as
    ``cumsum(0)``, is not detected).
    """
    bd = s._fdp_bdim
    if out.dim() == 0 or s.dim() <= bd:
        return None
    new = _moved_sample_dim(func, args, kwargs, s, bd)
    if new is None or out.dim() <= new or out.shape[new] != s.shape[bd]:
        return None
    if _order_preserving(func, args, kwargs) and tuple(out.shape[:new + 1]) != tuple(s.shape[:bd + 1]):
        return None  # a reshape that merged or split the dims up to the sample dim
    return new


def _moved_sample_dim(func, args, kwargs, s, bd):
    """Where a shape op moves dim ``bd`` of ``s`` (None: unknown or gone)."""
    n = s.dim()
    if _order_preserving(func, args, kwargs):
        return bd  # elements in order: checked against the leading sizes by the caller
    if func is _T.__getitem__:
        items = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(isinstance(i, (torch.Tensor, list)) or i is None for i in items):
            return None
        if len(items) > 0 and items[0] is Ellipsis:  # ``v[..., :k]``: the sample dim is in the ellipsis
            return bd if sum(1 for i in items if i is not Ellipsis) < n - bd else None
        head = items[:bd + 1]
        return bd if len(head) == bd + 1 and all(isinstance(i, slice) and i == slice(None) for i in head) else None
    if func in (_T.transpose, torch.transpose, _T.swapaxes, _T.swapdims):
        dims = [d for d in list(args[1:3]) + list(kwargs.values()) if isinstance(d, int)]
        if len(dims) != 2:
            return None
        a, b = (d % n for d in dims)
        return b if bd == a else a if bd == b else bd
    if func in (_T.permute, torch.permute):
        dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        dims = [d % n for d in kwargs.get("dims", dims)]
        return dims.index(bd) if bd in dims else None
    if func in (_T.narrow, torch.narrow, _T.select, torch.select):  # along another dim: the sample dim stays
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not isinstance(dim, int) or dim % n == bd:
            return None
        return bd - 1 if func in (_T.select, torch.select) and dim % n < bd else bd
    if func in SHAPE_OPS:  # movedim, flip, roll, t...: may move the sample dim
        return None
    return bd


def _padded_index(s: "SharedActivation", ndim: int, dim: int) -> int:
    """Index in ``s`` of dim ``dim`` of an ``ndim``-dim broadcast of it (negative: absent)."""
    return dim - (ndim - s.dim())


def _batch_broadcast(s: "SharedActivation", out_shape) -> bool:
    """Expanding ``s`` to ``out_shape`` replicates it along the output's sample dim (a new or size-1 dim); at
    batch size 1, ``expand(B, ...)`` of a shared lookup's [1, ...] value is that broadcast too (over one sample)."""
    sd = broadcast_sample_dim(s._fdp_src.tap._fdp_ctx, out_shape, s._fdp_src.label)
    i = _padded_index(s, len(out_shape), sd)
    if i < 0:
        return True
    if s.shape[i] != 1:
        return False
    return out_shape[sd] != 1 or (not s._fdp_rows and s._fdp_src.batch_size == 1)


def _repeat_is_expand(s, out_shape) -> bool:
    padded = (1,) * (len(out_shape) - s.dim()) + tuple(s.shape)
    return all(p == o or p == 1 for p, o in zip(padded, out_shape))


def _at_batched_op(s: "SharedActivation", out_shape, name: str) -> torch.Tensor:
    """``s`` meets the batch: expanded to ``out_shape`` (per-sample gradients taken there) or taken per row."""
    src = s._fdp_src
    B = src.batch_size
    sd = broadcast_sample_dim(src.tap._fdp_ctx, out_shape, src.label) if len(out_shape) else 0
    i = _padded_index(s, len(out_shape), sd)
    if i < 0 or (s.shape[i] == 1 and (out_shape[sd] != 1 or not s._fdp_rows)):
        if len(out_shape) == 0 or (B is not None and out_shape[sd] != B):
            raise BatchSizeError(
                f"{src.label}: the lookup (ids of shape {src.ids_shape}) is broadcast by {name} to shape "
                f"{tuple(out_shape)}, whose sample dim {sd} is not the batch size {B}")
        src.set_mode("shared")
        return _SharedExpandFn.apply(s._fdp_value, torch.Size(out_shape), src, s._fdp_fn, sd)
    if s._fdp_rows and i == s._fdp_bdim:
        src.set_mode("rows")
        return s._fdp_value
    if s._fdp_rows:
        raise BatchSizeError(
            f"{src.label}: the lookup's output (shape {tuple(s.shape)}) has its samples in dim {s._fdp_bdim}, but "
            f"{name} combines it with a batch whose samples are in dim {sd} (shape {tuple(out_shape)}): each "
            "sample would be mixed with another. Transpose it back first.")
    raise BatchSizeError(
        f"{src.label}: the ids (shape {src.ids_shape}) are not one row of ids per sample (batch size {B}), and {name} "
        f"combines its output (shape {tuple(s.shape)}) with the batch without broadcasting it over a leading batch "
        "dim: its rows would be taken as samples. Broadcast it (x + pos(ids)[None]) or look the ids up per sample.")


def _for_parameter_op(s: "SharedActivation", func) -> torch.Tensor:
    """``s`` enters an op with a trainable parameter: per row, or expanded to the batch first. Ops whose layout
    fixes the sample dim (``FIXED_SAMPLE_DIM``: multi-head attention's [T, B, E]) take the lookup along that dim;
    in a batch-first model every other handler takes it along dim 0 (a sequence-first model's handlers check it)."""
    src = s._fdp_src
    B = src.batch_size
    batch_first = src.tap._fdp_ctx.batch_first
    want = FIXED_SAMPLE_DIM.get(func, 0 if batch_first else None)
    op = getattr(func, "__name__", func)
    if s._fdp_rows:
        if want is not None and s._fdp_bdim != want:
            raise BatchSizeError(
                f"{src.label}: the lookup's output (shape {tuple(s.shape)}) has its samples in dim {s._fdp_bdim} "
                f"(after a transpose), but {op} takes them in dim {want}: per-sample gradients would mix samples. "
                + ("A sequence-first model needs batch_first=False (DPOptimizer / make_private / "
                   "GradSampleEngine)." if batch_first else "Transpose it back first."))
        src.set_mode("rows")
        return s._fdp_value
    sd = want if want is not None else (1 if s.dim() >= 3 else 0)
    if s.dim() > sd and s.shape[sd] == 1 and B is not None:
        src.set_mode("shared")
        shape = list(s.shape)
        shape[sd] = B
        return _SharedExpandFn.apply(s._fdp_value, torch.Size(shape), src, s._fdp_fn, sd)
    raise BatchSizeError(
        f"{src.label}: the ids (shape {src.ids_shape}) are not one row of ids per sample (batch size {B}), and its "
        f"output (shape {tuple(s.shape)}) enters {op} with a trainable parameter before "
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

    return SharedActivation(v * mask, s._fdp_src, fn, s._fdp_rows, s._fdp_bdim)


class _SharedExpandFn(torch.autograd.Function):
    """Expand a shared value to ``out_shape`` (samples in dim ``sd``); backward hands each sample's gradient to the
    lookup."""

    @staticmethod
    def forward(ctx, value, out_shape, src, fn, sd=0):
        ctx.src, ctx.fn, ctx.vshape, ctx.sd = src, fn, value.shape, sd
        ctx.use = src.open_use()
        return value.reshape((1,) * (len(out_shape) - value.dim()) + tuple(value.shape)).expand(out_shape)

    @staticmethod
    def backward(ctx, grad):
        per_sample = per_sample_grad_of_broadcast(grad, ctx.vshape, ctx.sd)  # [B, *padded value shape w/o sd]
        B = per_sample.shape[0]
        ctx.src.take(per_sample.reshape(B, *ctx.vshape), ctx.fn, ctx.use)
        return per_sample.sum(0).reshape(ctx.vshape), None, None, None, None
