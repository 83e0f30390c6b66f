"""Flat accumulation buffer for the clipped gradient sums of all trainable parameters.

One contiguous fp32 (fp64 for fp64 parameters) buffer per device: layers add their clipped sums
into per-parameter views, and noise and scaling then touch the whole buffer in one op each. The
optimizer hands the views to the wrapped optimizer as ``p.grad`` (no copy for fp32 parameters).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

from fastdp.kernels._common import acc_dtype


class GradBuffer:
    """Flat buffers over ``params`` (grouped by device and accumulation dtype) with per-parameter views."""

    def __init__(self, params: Sequence[nn.Parameter]):
        self.params: Tuple[nn.Parameter, ...] = tuple(params)
        groups: Dict[tuple, List[nn.Parameter]] = {}
        for p in self.params:
            groups.setdefault((p.device, acc_dtype(p)), []).append(p)
        self.flats: List[torch.Tensor] = []
        self.groups: List[List[nn.Parameter]] = []  # the parameters of each flat, in buffer order
        self.views: Dict[nn.Parameter, torch.Tensor] = {}
        for (device, dtype), ps in groups.items():
            flat = torch.zeros(sum(p.numel() for p in ps), dtype=dtype, device=device)
            self.views.update(zip(ps, flat_views(flat, ps)))
            self.flats.append(flat)
            self.groups.append(ps)
        self.touched: set = set()

    def matches(self, params: Sequence[nn.Parameter]) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))

    def zero_(self) -> None:
        for f in self.flats:
            f.zero_()
        self.touched.clear()

    def view(self, p: nn.Parameter) -> torch.Tensor:
        """Accumulation view of ``p`` (marks it as touched)."""
        self.touched.add(p)
        return self.views[p]


def flat_views(flat: torch.Tensor, like: Iterable[torch.Tensor]) -> List[torch.Tensor]:
    """Consecutive views of the 1-D ``flat``, shaped like each tensor of ``like`` in turn (no copy)."""
    out, offset = [], 0
    for t in like:
        n = t.numel()
        out.append(flat[offset:offset + n].view(t.shape))
        offset += n
    return out
