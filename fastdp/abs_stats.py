"""Sums of absolute clipped per-sample gradients, observed while the engine accumulates (SPARTA's row scores).

An observer is installed on the engine (``GradSampleEngine.observers``); the engine calls ``observe(p, uses, c)``
for each parameter as it adds ``sum_i c_i g_i`` to the buffer, and ``reset()`` after each step. The engine holds
no method-specific code: whoever wants a statistic installs the observer that computes it.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional

import torch
from torch import nn

from fastdp.grad_sample import PerSampleGrad


class AbsSumObserver:
    """``sums[p]``: ``sum_i |c_i g_i|`` per coordinate of each parameter in ``coords``; ``row_sums[p]``: the same
    summed over each output-neuron group along ``rows[p]`` (fused on Linear-like layers by the row-group abs-sum
    kernel, without per-sample gradients in memory). Sums add up over the micro-batches of one step.
    """

    def __init__(self, coords: Iterable[nn.Parameter] = (), rows: Optional[Mapping[nn.Parameter, int]] = None):
        self.coords: set = set(coords)
        self.rows: Dict[nn.Parameter, int] = dict(rows or {})
        self.sums: Dict[nn.Parameter, torch.Tensor] = {}
        self.row_sums: Dict[nn.Parameter, torch.Tensor] = {}

    def wants(self, p: nn.Parameter) -> bool:
        """Whether ``observe`` needs ``p``'s per-sample gradients (the engine then does not batch ``p``)."""
        return p in self.coords or p in self.rows

    def observe(self, p: nn.Parameter, uses: List[PerSampleGrad], c: torch.Tensor) -> None:
        """Called before ``uses`` (``p``'s per-sample gradients) are added with [B] factors ``c`` and freed."""
        if p in self.coords:
            _add(self.sums, p, abs_sum(uses, c))
        if p in self.rows:
            dim = self.rows[p]
            r = uses[0].row_abs_sum(c, dim) if len(uses) == 1 else None
            if r is None:
                a = abs_sum(uses, c)
                r = a.movedim(dim, 0).reshape(a.shape[dim], -1).sum(1)
            _add(self.row_sums, p, r)

    def reset(self) -> None:
        self.sums = {}
        self.row_sums = {}


def abs_sum(uses: List[PerSampleGrad], c: torch.Tensor) -> torch.Tensor:
    """``sum_i |c_i g_i|`` per coordinate of one parameter (its uses' per-sample gradients formed explicitly)."""
    it = iter(g.materialize() for g in uses)
    per_sample = next(it)
    for g in it:
        per_sample = per_sample + g
    return torch.tensordot(c.to(per_sample.dtype), per_sample.abs(), dims=1)


def _add(sums: Dict[nn.Parameter, torch.Tensor], p: nn.Parameter, value: torch.Tensor) -> None:
    sums[p] = sums[p] + value if p in sums else value
