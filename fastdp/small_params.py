"""Small parameters (biases, norm affines) batched at the end of backward: one [B, S] block, a few ops for all.

Their explicit per-sample gradients are concatenated once; squared norms, clip factors and clipped sums of every
small parameter then take one op each instead of a few per parameter. Per-layer rules work on the block too
(their [B, numel] is small): one segment sum gives the [B, k] squared norms of the k parameters.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from fastdp.clipping import ClipRule
from fastdp.grad_buffer import GradBuffer
from fastdp.grad_sample import DenseGrad, PerSampleGrad

# Explicit per-sample gradients of parameters up to this many elements are batched at the end of backward.
SMALL_NUMEL = 1 << 16


def is_small(grad: PerSampleGrad) -> bool:
    """A plain explicit per-sample gradient of a small parameter: batched with the others at the end of backward."""
    return type(grad) is DenseGrad and grad.param.numel() <= SMALL_NUMEL


class SmallBlock:
    """The [B, S] block of the small parameters of one pass (``params``, in block order)."""

    def __init__(self, params: List[nn.Parameter], grads: List[DenseGrad], batch: int,
                 segment_index: Callable[[List[nn.Parameter], torch.device], torch.Tensor]):
        self.params, self.grads, self.batch = params, grads, batch
        self.members = set(params)  # (a set: ``in`` on a list of tensors would compare values)
        self.block = torch.cat([g.g.reshape(batch, p.numel()) for p, g in zip(params, grads)], 1)
        self._segment_index = segment_index
        self.segments: Optional[torch.Tensor] = None  # [S]: the parameter index of each coordinate (per-layer rules)
        self.sq: Optional[torch.Tensor] = None  # [B, k] per-parameter squared norms (per-layer rules)
        self.factors: Optional[torch.Tensor] = None  # [B, k] per-parameter clip factors (per-layer rules)

    def sq_norm(self, per_param: bool) -> torch.Tensor:
        """[B] squared norm of each sample's block row (per-layer rules: kept per parameter in ``sq`` too)."""
        block_sq = self.block.pow(2)
        if not per_param:
            return block_sq.sum(1)
        self.segments = self._segment_index(self.params, self.block.device)
        self.sq = block_sq.new_zeros(self.batch, len(self.params)).index_add_(1, self.segments, block_sq)
        return self.sq.sum(1)

    def per_param_factors(self, rule: ClipRule, red: float) -> Dict[nn.Parameter, torch.Tensor]:
        """{p: [B] factors} of a per-layer rule, from ``sq`` (``sq_norm(per_param=True)`` first)."""
        self.factors = rule.stacked_factors(self.params, self.sq, red)  # [B, k]
        return dict(zip(self.params, self.factors.unbind(1)))

    def accumulate(self, buf: GradBuffer, shared: Optional[torch.Tensor]) -> None:
        """Add ``sum_i c_i g_i`` of every small parameter with one foreach add into its view, then free the block.
        ``shared``: the [B] factors of a flat rule; None for a per-layer rule (``per_param_factors`` first)."""
        if shared is None:  # factor of coordinate s's parameter, per sample
            sums = (self.block * self.factors.index_select(1, self.segments).to(self.block.dtype)).sum(0)
        else:
            sums = torch.mv(self.block.t(), shared.to(self.block.dtype))
        torch._foreach_add_([buf.view(p).view(-1) for p in self.params], list(sums.split([p.numel() for p in self.params])))
        for g in self.grads:
            g.release()

    def per_param_sq(self) -> Dict[nn.Parameter, torch.Tensor]:
        """{p: [B] squared norms}, one parameter at a time (only to name a non-finite one)."""
        return {p: g.sq_norm() for p, g in zip(self.params, self.grads)}


class SmallParamBatcher:
    """Picks the small parameters of a pass and builds their block (caching the segment index across steps)."""

    def __init__(self):
        self._segments = None  # (key, [S] int64)

    def block(self, ready: Dict[nn.Parameter, List[PerSampleGrad]], buf: GradBuffer, batch: int,
              excluded: Callable[[nn.Parameter], bool]) -> Optional[SmallBlock]:
        """The block of ``ready``'s batchable parameters: one small plain explicit use in the buffer's accumulation
        dtype, not ``excluded`` (an observer wants its per-sample gradients). None if fewer than two qualify."""
        params, dtype = [], None
        for p, uses in ready.items():
            g = uses[0]
            if len(uses) != 1 or not is_small(g) or excluded(p):
                continue
            if g.g.dtype != buf.views[p].dtype or (dtype is not None and g.g.dtype != dtype):
                continue
            dtype = g.g.dtype
            params.append(p)
        if len(params) < 2:
            return None
        return SmallBlock(params, [ready[p][0] for p in params], batch, self._segment_index)

    def _segment_index(self, params: List[nn.Parameter], device: torch.device) -> torch.Tensor:
        """[S] int64: for each coordinate of the concatenated ``params``, the index of its parameter (cached)."""
        key = (tuple(map(id, params)), device)
        if self._segments is None or self._segments[0] != key:
            sizes = torch.tensor([p.numel() for p in params])
            self._segments = (key, torch.repeat_interleave(torch.arange(len(params)), sizes).to(device))
        return self._segments[1]
