"""Per-sample gradients, kept implicit.

One ``PerSampleGrad`` stands for the gradient of one use of one parameter (a layer call in one
forward) for every sample of the batch, in whatever compact form that layer allows:

* ``LinearGrad``: ``G_i = dY_i^T X_i`` from the layer input and output gradient (Linear, Conv1D,
  matmul); its norm is a ghost norm or a direct per-sample norm, whichever costs fewer FLOPs.
* ``ConvGrad``: a convolution, i.e. a Linear over unfolded patches, summed by the conv backward (also a
  transposed convolution, operands swapped); ``ConvNdGrad``: the same for 3-D, through PyTorch's n-d convolution.
* ``EmbeddingGrad``: rows of dY scattered to the looked-up indices; ``EmbeddingBagGrad`` /
  ``EmbeddingBagMaxGrad``: one bag per sample (sum / mean, max).
* ``DenseGrad``: an explicit [B, *param.shape] tensor (biases, norm layers, generic parameters).

Each knows its per-sample squared norm (``sq_norm``), how to materialise itself (the exact fallback
for any pair without a closed form), and its clipped sum ``sum_i c_i G_i`` (``clipped_sum``). Inner
products between two uses of one parameter (tied weights) dispatch on the pair of types through
``register_dot``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from fastdp.kernels import (
    conv_per_sample_grad_ref,
    direct_dot_ref,
)
from fastdp.kernels._common import acc_dtype, as_btd, batch_chunks, cast, upcast
from fastdp.kernels.clip_accumulate import clip_accumulate
from fastdp.kernels.conv_clip_accumulate import conv_clip_accumulate
from fastdp.kernels.conv_norm import conv_norm
from fastdp.kernels.direct_norm import direct_norm
from fastdp.kernels.embedding_norm import embedding_accumulate, embedding_dot, embedding_linear_dot, embedding_norm
from fastdp.kernels.ghost_norm import ghost_dot, ghost_norm
from fastdp.kernels.masked_direct_norm import masked_direct_norm
from fastdp.kernels.row_abs_sum import row_abs_sum


def prefer_ghost(T: int, p: int, d: int) -> bool:
    """True when the ghost norm costs fewer FLOPs than direct per-sample tiles.

    Ghost: 2 T^2 (p + d) per sample; direct: 2 T p d per sample.
    """
    return T * (p + d) < p * d


class NormRule:
    """Which per-sample norm a Linear-like use takes: ``"auto"`` (cheaper by FLOPs), ``"ghost"`` or ``"direct"``.

    Tests force each method to check both against the same reference.
    """

    mode: str = "auto"

    @classmethod
    def use_ghost(cls, T: int, p: int, d: int) -> bool:
        if cls.mode == "ghost":
            return True
        if cls.mode == "direct":
            return False
        return prefer_ghost(T, p, d)


class PerSampleGrad:
    """Per-sample gradient of one use of ``param``; ``batch_size`` samples; fp32 norms."""

    def __init__(self, param: torch.nn.Parameter, owner: str):
        self.param = param
        self.owner = owner
        self.batch_size: Optional[int] = None
        self.sq_self: Optional[torch.Tensor] = None

    def sq_norm(self) -> torch.Tensor:
        """[B] fp32 squared norms of this use's per-sample gradients."""
        raise NotImplementedError

    def materialize(self) -> torch.Tensor:
        """[B, *param.shape] fp32 per-sample gradients (exact fallback; memory B * numel)."""
        raise NotImplementedError

    def clipped_sum(self, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add ``sum_i scale_i G_i`` (shape of ``param``) into ``out``. ``scale``: [B] fp32."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop the saved activations once the clipped sum is formed."""

    def restrict_rows(self, rows: torch.Tensor, dim: int = 0) -> bool:
        """Keep only slices ``rows`` along ``dim`` of the parameter in every per-sample gradient, if this type can
        do so without forming per-sample gradients. Returns False when it cannot (the engine then masks densely)."""
        return False

    def row_abs_sum(self, scale: torch.Tensor, dim: int) -> Optional[torch.Tensor]:
        """[param.shape[dim]] ``sum_i scale_i sum_(other coords) |G_i|`` per slice along ``dim`` without forming
        per-sample gradients, or None when this type cannot (the engine then materialises them)."""
        return None


class DenseGrad(PerSampleGrad):
    """Explicit per-sample gradients ``g`` [B, *param.shape] (fp32)."""

    def __init__(self, param, owner, g: torch.Tensor):
        super().__init__(param, owner)
        self.g = upcast(g)
        self.batch_size = g.shape[0]

    def sq_norm(self):
        return self.g.flatten(1).pow(2).sum(1)

    def materialize(self):
        return self.g

    def clipped_sum(self, scale, out):
        g = self.g.flatten(1)
        if out.dtype == g.dtype and out.is_contiguous():
            out.view(-1).addmv_(g.t(), scale.to(g.dtype))
            return out
        return out.add_(torch.mv(g.t(), scale.to(g.dtype)).view(out.shape))

    def release(self):
        self.g = None


class LinearGrad(PerSampleGrad):
    """``G_i = dY_i^T X_i`` [p, d] (``transposed``: ``X_i^T dY_i`` [d, p], as in HF Conv1D / ``x @ W``).

    x: [B, T, d] layer input (in the compute dtype); dy: [B, T, p] output gradient.
    """

    def __init__(self, param, owner, transposed: bool = False):
        super().__init__(param, owner)
        self.transposed = transposed
        self.rows = None  # output rows kept (row mask), None: all
        self.x = None
        self.dy = None

    def set(self, x: torch.Tensor, dy: torch.Tensor) -> None:
        self.x = as_btd(x)
        self.dy = cast(as_btd(dy), self.x.dtype)
        self.batch_size = x.shape[0]

    @property
    def dims(self):
        return self.x.shape[1], self.dy.shape[-1], self.x.shape[-1]

    def sq_norm(self):
        T, p, d = self.dims
        if NormRule.use_ghost(T, p, d):
            return ghost_norm(self.x, self.dy)
        return direct_norm(self.x, self.dy)

    def restrict_rows(self, rows, dim=0):
        if dim != (1 if self.transposed else 0):  # only output neurons (the p dim of dY) can be restricted
            return False
        self.dy = self.dy[..., rows]
        self.rows = rows
        return True

    def materialize(self):
        g = torch.einsum("btp,btd->bpd", upcast(self.dy), upcast(self.x))
        if self.rows is not None:
            full = g.new_zeros(g.shape[0], self.dy_features, self.x.shape[-1])
            full[:, self.rows] = g
            g = full
        return g.transpose(1, 2) if self.transposed else g

    def row_abs_sum(self, scale, dim):
        if self.rows is not None or dim != (1 if self.transposed else 0):
            return None
        return row_abs_sum(self.x, self.dy, scale)  # per output neuron: the row-group abs-sum kernel

    @property
    def dy_features(self) -> int:
        """Output features of the parameter (p), whatever rows are kept."""
        return self.param.shape[1 if self.transposed else 0]

    def clipped_sum(self, scale, out):
        if self.rows is not None:
            g = clip_accumulate(self.x, self.dy, scale).to(out.dtype)  # [p_kept, d]
            if self.transposed:
                return out.index_add_(1, self.rows, g.t())
            return out.index_add_(0, self.rows, g)
        return clip_accumulate(self.x, self.dy, scale, out.t() if self.transposed else out)

    def release(self):
        self.x = self.dy = None


class EmbeddingGrad(PerSampleGrad):
    """Embedding gradient: idx [B, T], dy [B, T, d] (padding rows zeroed), table of ``num_embeddings`` rows."""

    def __init__(self, param, owner, num_embeddings: int, padding_idx: Optional[int]):
        super().__init__(param, owner)
        self.num_embeddings = num_embeddings
        self.padding_idx = padding_idx
        self.idx = None
        self.dy = None

    def set(self, idx: torch.Tensor, dy: torch.Tensor) -> None:
        idx = idx.flatten(1)
        dy = dy.reshape(idx.shape[0], idx.shape[1], dy.shape[-1])
        if self.padding_idx is not None:
            dy = dy.masked_fill((idx == self.padding_idx).unsqueeze(-1), 0)
        self.idx, self.dy = idx, dy
        self.batch_size = idx.shape[0]

    def sq_norm(self):
        return embedding_norm(self.idx, self.dy)

    def materialize(self):
        B, T, d = self.dy.shape
        V = self.num_embeddings
        out = torch.zeros(B * V, d, dtype=acc_dtype(self.dy), device=self.dy.device)
        offs = (torch.arange(B, device=self.idx.device) * V).view(-1, 1)
        out.index_add_(0, (self.idx + offs).reshape(-1), upcast(self.dy).reshape(-1, d))
        return out.view(B, V, d)

    def clipped_sum(self, scale, out):
        return embedding_accumulate(self.idx, self.dy, scale, self.num_embeddings, out)

    def release(self):
        self.idx = self.dy = None


class ConvGrad(PerSampleGrad):
    """Convolution weight gradient (1-D or 2-D): a Linear over unfolded patches.

    x: [B, C_in, *spatial] (compute dtype); dy: [B, C_out, *spatial_out]; weight: the weight value;
    stride, padding (symmetric ints), dilation: per spatial dim.
    """

    def __init__(self, param, owner, weight: torch.Tensor, stride, padding, dilation, groups: int):
        super().__init__(param, owner)
        self.rows = None  # output filters kept (row mask), None: all
        self.weight_shape = tuple(weight.shape)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups = groups
        self.x = None
        self.dy = None

    def set(self, x, dy):
        self.x, self.dy = x, cast(dy, x.dtype)
        self.batch_size = x.shape[0]

    def sq_norm(self):
        c_out, cg = self.weight_shape[:2]
        k = math.prod(self.weight_shape[2:])
        L = math.prod(self.dy.shape[2:])
        ghost = NormRule.use_ghost(L, c_out // self.groups, cg * k)
        return conv_norm(self.x, self.dy, self.weight_shape, self.stride, self.padding, self.dilation,
                         self.groups, ghost)

    def restrict_rows(self, rows, dim=0):
        if self.groups != 1 or dim != 0:
            return False
        self.dy = self.dy[:, rows]
        self.weight_shape = (rows.numel(), *self.weight_shape[1:])
        self.rows = rows
        return True

    def materialize(self):
        g = upcast(conv_per_sample_grad_ref(self.x, self.dy, self.weight_shape, self.stride, self.padding,
                                            self.dilation, self.groups))
        if self.rows is not None:
            full = g.new_zeros(g.shape[0], *self.param.shape)
            full[:, self.rows] = g
            return full
        return g

    def clipped_sum(self, scale, out):
        geometry = (self.weight_shape, self.stride, self.padding, self.dilation, self.groups)
        if self.rows is not None:  # only the kept filters: their sum, added at their rows
            g = conv_clip_accumulate(self.x, self.dy, scale, *geometry)
            return out.index_add_(0, self.rows, g.to(out.dtype))
        return conv_clip_accumulate(self.x, self.dy, scale, *geometry, out)

    def release(self):
        self.x = self.dy = None


class MaskedGrad(DenseGrad):
    """Per-sample gradients of ``inner``, optionally standardised ``(g - center) / scale``, times a coordinate
    mask; formed explicitly ([B, *param.shape])."""

    def __init__(self, inner: PerSampleGrad, mask: torch.Tensor, center=None, scale=None):
        g = inner.materialize()
        if center is not None:
            g = (g - center) / scale
        inner.release()
        super().__init__(inner.param, inner.owner, g * mask)


class MaskedLinearGrad(PerSampleGrad):
    """``M * (G_i - center) / scale`` for a Linear-like ``inner`` (all rows), without per-sample gradients in memory.

    The norm is the masked direct norm (``fastdp.kernels.masked_direct_norm``: tiles in registers on the GPU);
    the clipped sum is one clip-and-accumulate GEMM followed by the elementwise transform, since
    ``sum_i c_i M (G_i - a) / b = M (sum_i c_i G_i - (sum_i c_i) a) / b``.
    """

    def __init__(self, inner: LinearGrad, mask: torch.Tensor, center=None, scale=None):
        super().__init__(inner.param, inner.owner)
        self.inner, self.mask, self.center, self.scale = inner, mask, center, scale
        self.batch_size = inner.batch_size

    def _pd(self, t):
        """A parameter-shaped tensor in the [p, d] layout of ``dY^T X``."""
        return t.t() if t is not None and self.inner.transposed else t

    def sq_norm(self):
        return masked_direct_norm(self.inner.x, self.inner.dy, self._pd(self.mask), self._pd(self.center),
                                  self._pd(self.scale))

    def materialize(self):
        g = self.inner.materialize()
        if self.center is not None:
            g = (g - self.center) / self.scale
        return g * self.mask

    def clipped_sum(self, scale, out):
        inner = self.inner
        g = clip_accumulate(inner.x, inner.dy, scale)  # [p, d] fp32 (fp64 for fp64)
        if inner.transposed:
            g = g.t()
        if self.center is not None:
            g = (g - scale.sum().to(g.dtype) * self.center) / self.scale
        return out.add_((g * self.mask).to(out.dtype))

    def release(self):
        self.inner.release()
        self.mask = self.center = self.scale = None


def masked(inner: PerSampleGrad, mask: torch.Tensor, center=None, scale=None) -> PerSampleGrad:
    """``inner`` restricted to ``mask`` (and standardised): without per-sample gradients for Linear-like uses."""
    if isinstance(inner, LinearGrad) and inner.rows is None:
        return MaskedLinearGrad(inner, mask, center, scale)
    return MaskedGrad(inner, mask, center, scale)


class TransformedGrad(DenseGrad):
    """Per-sample gradient of ``param`` when the layer saw ``fn(param)`` instead of ``param``.

    The layer's per-sample gradients [B, *fn(param).shape] are pulled back through ``fn`` one sample
    at a time (``vmap`` of ``vjp``): exact for any differentiable ``fn`` (reshape, slice, scaling...).
    """

    def __init__(self, inner: PerSampleGrad, fn: Callable[[torch.Tensor], torch.Tensor]):
        g = inner.materialize()
        inner.release()
        super().__init__(inner.param, inner.owner, pull_back(fn, inner.param, g))


def pull_back(fn: Callable, param: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample vector-Jacobian products ``g_i^T d fn(param) / d param``: [B, *out] -> [B, *param.shape] fp32."""
    if g.shape[0] == 0:
        return g.new_zeros((0, *param.shape), dtype=acc_dtype(g))
    primal = param.detach()
    _, vjp_fn = torch.func.vjp(fn, primal)
    out_dtype = fn(primal).dtype
    return upcast(torch.func.vmap(lambda gi: vjp_fn(gi.to(out_dtype))[0])(g))


_DOT: dict = {}


def register_dot(type_a: type, type_b: type):
    """Register a closed-form per-sample inner product for a pair of gradient types (either order)."""

    def deco(fn):
        _DOT[(type_a, type_b)] = fn
        if type_a is not type_b:
            _DOT[(type_b, type_a)] = lambda a, b: fn(b, a)
        return fn

    return deco


def per_sample_dot(a: PerSampleGrad, b: PerSampleGrad) -> torch.Tensor:
    """[B] fp32 per-sample ``<G_a,i, G_b,i>`` (closed form when registered, else materialised)."""
    fn = _DOT.get((type(a), type(b)))
    if fn is not None:
        out = fn(a, b)
        if out is not None:
            return out
    return (a.materialize().flatten(1) * b.materialize().flatten(1)).sum(1)


@register_dot(LinearGrad, LinearGrad)
def _linear_linear(a: LinearGrad, b: LinearGrad):
    if a.transposed != b.transposed:
        return None
    T = max(a.x.shape[1], b.x.shape[1])
    _, p, d = a.dims
    f = ghost_dot if NormRule.use_ghost(T, p, d) else direct_dot_ref
    if a.x.dtype != b.x.dtype:
        return f(upcast(a.x), upcast(a.dy), upcast(b.x), upcast(b.dy))
    return f(a.x, a.dy, b.x, b.dy)


@register_dot(EmbeddingGrad, EmbeddingGrad)
def _embedding_embedding(a: EmbeddingGrad, b: EmbeddingGrad):
    return embedding_dot(a.idx, a.dy, b.idx, b.dy)  # (in their common dtype: neither rounded)


@register_dot(EmbeddingGrad, LinearGrad)
def _embedding_linear(a: EmbeddingGrad, b: LinearGrad):
    if b.transposed or b.rows is not None:
        return None
    return embedding_linear_dot(a.idx, a.dy, b.x, b.dy)


class ConvNdGrad(ConvGrad):
    """A 3-D convolution's weight gradient, in ``ConvGrad``'s layout and geometry, through PyTorch's n-d
    weight-gradient convolution (the implicit-im2col kernels of ``fastdp.kernels.conv_norm`` take 1-D and 2-D only).

    Norm: direct, from the explicit per-sample gradients of a chunk of the batch at a time (one grouped
    weight-gradient convolution with the batch folded into the groups; ``batch_chunks`` bounds the chunk's
    ``chunk x numel`` temporaries). Clipped sum: one weight-gradient convolution of the clip-scaled dY (the
    non-private cost, paid once). Both upcast 16-bit operands first, so the norm measures exactly the products the
    sum adds.
    """

    def _per_sample(self, sl: slice) -> torch.Tensor:
        """[b, *weight_shape] per-sample gradients of the samples ``sl`` (kept filters only), fp32 (fp64 for fp64)."""
        x, dy = upcast(self.x[sl]), upcast(self.dy[sl])
        b, c_in, c_out = x.shape[0], x.shape[1], dy.shape[1]
        w = torch.empty((b * c_out, *self.weight_shape[1:]), dtype=x.dtype, device=x.device)  # shape only
        g = torch.ops.aten.convolution_backward(
            dy.reshape(1, b * c_out, *dy.shape[2:]), x.reshape(1, b * c_in, *x.shape[2:]), w, None,
            list(self.stride), list(self.padding), list(self.dilation), False, [0] * len(self.stride),
            b * self.groups, [False, True, False])[1]
        return g.view(b, *self.weight_shape)

    def _chunks(self):
        numel = math.prod(self.weight_shape)
        per_sample = numel + self.x[0].numel() + self.dy[0].numel()
        return batch_chunks(self.x.shape[0], per_sample)

    def sq_norm(self):
        out = torch.zeros(self.x.shape[0], dtype=acc_dtype(self.x), device=self.x.device)
        for sl in self._chunks():
            if sl.stop > sl.start:
                out[sl] = self._per_sample(sl).flatten(1).pow(2).sum(1)
        return out

    def materialize(self):
        B = self.x.shape[0]
        g = torch.zeros((B, *self.weight_shape), dtype=acc_dtype(self.x), device=self.x.device)
        for sl in self._chunks():
            if sl.stop > sl.start:
                g[sl] = self._per_sample(sl)
        if self.rows is not None:
            full = g.new_zeros(B, *self.param.shape)
            full[:, self.rows] = g
            return full
        return g

    def clipped_sum(self, scale, out):
        xx = upcast(self.x)
        scaled = upcast(self.dy) * scale.to(xx.dtype).view(-1, *([1] * (self.dy.dim() - 1)))
        w = torch.empty(self.weight_shape, dtype=xx.dtype, device=xx.device)  # shape only
        g = torch.ops.aten.convolution_backward(
            scaled, xx, w, None, list(self.stride), list(self.padding), list(self.dilation), False,
            [0] * len(self.stride), self.groups, [False, True, False])[1]
        if self.rows is not None:
            return out.index_add_(0, self.rows, g.to(out.dtype))
        return out.add_(g.to(out.dtype))


class EmbeddingBagGrad(PerSampleGrad):
    """Sum / mean-mode embedding bag (``F.embedding_bag``): bag b's gradient is ``a_b dY_b^T``, where ``a_b`` [V] holds
    the summed weight of each table row in bag b (``per_sample_weights`` or 1 in sum mode, 1 / bag size in mean mode,
    0 for ``padding_idx`` entries).

    ids [N]: the rows looked up; bag [N]: the bag (sample) of each; coef [N] (fp32, fp64 for fp64 dY): its weight;
    dy [B, D]: the output gradient. ``||G_b||^2 = ||a_b||^2 ||dY_b||^2`` (``||a_b||^2`` from the distinct (bag, row)
    pairs); the clipped sum is one index-add of the N rows ``c_bag coef dY_bag`` (the memory of PyTorch's own
    embedding-bag backward).
    """

    def __init__(self, param, owner, num_embeddings: int):
        super().__init__(param, owner)
        self.num_embeddings = num_embeddings
        self.ids = self.bag = self.coef = self.dy = None

    def set(self, ids: torch.Tensor, bag: torch.Tensor, coef: torch.Tensor, dy: torch.Tensor) -> None:
        self.dy = upcast(dy)
        self.ids, self.bag, self.coef = ids, bag, coef.to(self.dy.dtype)
        self.batch_size = dy.shape[0]

    def _keys(self) -> torch.Tensor:
        return self.bag.long() * self.num_embeddings + self.ids.long()  # (int32 ids: no overflow)

    def sq_norm(self):
        B = self.dy.shape[0]
        pairs, inv = torch.unique(self._keys(), return_inverse=True)
        a = torch.zeros(pairs.numel(), dtype=self.dy.dtype, device=self.dy.device).index_add_(0, inv, self.coef)
        a2 = torch.zeros(B, dtype=self.dy.dtype, device=self.dy.device)
        a2.index_add_(0, torch.div(pairs, self.num_embeddings, rounding_mode="floor"), a * a)
        return a2 * self.dy.pow(2).sum(1)

    def materialize(self):
        B, V = self.dy.shape[0], self.num_embeddings
        a = torch.zeros(B * V, dtype=self.dy.dtype, device=self.dy.device).index_add_(0, self._keys(), self.coef)
        return a.view(B, V, 1) * self.dy.view(B, 1, -1)

    def clipped_sum(self, scale, out):
        weight = scale.to(self.dy.dtype)[self.bag] * self.coef
        return out.index_add_(0, self.ids, (weight[:, None] * self.dy[self.bag]).to(out.dtype))

    def release(self):
        self.ids = self.bag = self.coef = self.dy = None


class EmbeddingBagMaxGrad(PerSampleGrad):
    """Max-mode embedding bag: coordinate d of bag b's output is that of row ``rows[b, d]``, so bag b's gradient has
    one entry per column, ``dY_b[d]`` at (``rows[b, d]``, d), and ``||G_b|| = ||dY_b||`` (0 for a bag without ids).

    rows [B, D] (the forward's max indices); valid [B] bool: the bag has an id (not ``padding_idx``); dy [B, D].
    """

    def __init__(self, param, owner, num_embeddings: int):
        super().__init__(param, owner)
        self.num_embeddings = num_embeddings
        self.rows = self.dy = None

    def set(self, rows: torch.Tensor, valid: torch.Tensor, dy: torch.Tensor) -> None:
        self.rows = rows
        self.dy = upcast(dy) * valid.to(upcast(dy).dtype).unsqueeze(1)  # an empty bag's output is a constant 0
        self.batch_size = dy.shape[0]

    def sq_norm(self):
        return self.dy.pow(2).sum(1)

    def materialize(self):
        B, D = self.dy.shape
        g = torch.zeros(B, self.num_embeddings, D, dtype=self.dy.dtype, device=self.dy.device)
        return g.scatter_(1, self.rows.unsqueeze(1), self.dy.unsqueeze(1))

    def clipped_sum(self, scale, out):
        cols = torch.arange(self.dy.shape[1], device=self.dy.device).expand_as(self.rows)
        vals = self.dy * scale.to(self.dy.dtype).unsqueeze(1)
        return out.index_put_((self.rows.reshape(-1), cols.reshape(-1)), vals.reshape(-1).to(out.dtype),
                              accumulate=True)

    def release(self):
        self.rows = self.dy = None
