"""Masks applied to per-sample gradients before clipping (sparse DP methods).

A ``Mask`` marks the coordinates of one parameter that train. The engine clips the masked per-sample
gradients (the norm is taken after masking), keeps the clipped sum on the mask, and the optimizer adds
noise only there, so masked coordinates receive exactly zero gradient.

* ``Mask.from_rows(param, rows, dim=0)``: whole slices along ``dim`` (output neurons: dim 0 of an
  ``nn.Linear`` weight, dim 1 of an HF ``Conv1D`` weight; Conv output filters: dim 0). Linear-like and
  ungrouped Conv layers then compute norms and clipped sums on the selected output rows only (ghost norms
  stay available): the work scales with the rows kept. An empty ``rows`` gives an all-False coordinate mask
  (gradient and noise exactly zero, per-sample gradients formed); a method that keeps no row of a parameter
  should rather freeze it (``requires_grad_(False)``, as SPARTA does), which costs nothing.
* ``Mask.from_coords(bool_tensor)``: any coordinates (random sparsification). Per-sample gradients of the
  masked layer are formed explicitly (reference path; the fused kernel keeps them in registers).
* ``center`` / ``scale`` (optional, the parameter's shape): per-sample gradients are standardised,
  ``w_i = M * (g_i - center) / scale``, before clipping (AdaDPIGU / AdaCliP). The clipped sum then lives in
  standardised space; the method restores it after the noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from fastdp.grad_buffer import flat_views


@dataclass(frozen=True)
class Mask:
    dense: torch.Tensor  # bool, the parameter's shape
    rows: Optional[torch.Tensor] = None  # sorted int64 indices along ``dim``, when the mask is whole slices
    center: Optional[torch.Tensor] = None  # standardisation before clipping (see module docstring)
    scale: Optional[torch.Tensor] = None
    dim: int = 0  # the dim ``rows`` index

    @classmethod
    def from_rows(cls, param: torch.Tensor, rows: torch.Tensor, dim: int = 0) -> "Mask":
        if not 0 <= dim < param.dim():
            raise ValueError(f"dim {dim} out of range for a parameter of shape {tuple(param.shape)}")
        rows = torch.as_tensor(rows, device=param.device)
        if rows.dtype == torch.bool:  # a row selector: its True positions (as_tensor would make them 0 / 1)
            if rows.shape != (param.shape[dim],):
                raise ValueError(f"a boolean row selector needs shape ({param.shape[dim]},), got {tuple(rows.shape)}")
            rows = rows.nonzero().flatten()
        rows = rows.to(torch.long).unique(sorted=True)
        if rows.numel() and (rows[0] < 0 or rows[-1] >= param.shape[dim]):
            raise ValueError(f"row indices out of range for a parameter with {param.shape[dim]} rows along dim {dim}")
        dense = torch.zeros(param.shape, dtype=torch.bool, device=param.device)
        if not rows.numel():  # nothing trains: an all-False coordinate mask (the row-restricted kernels need a row)
            return cls(dense, None, dim=dim)
        dense.index_fill_(dim, rows, True)
        return cls(dense, rows, dim=dim)

    @classmethod
    def from_coords(cls, mask: torch.Tensor, center: Optional[torch.Tensor] = None,
                    scale: Optional[torch.Tensor] = None) -> "Mask":
        if mask.dtype != torch.bool:
            raise TypeError("a coordinate mask must be a bool tensor")
        if (center is None) != (scale is None):
            raise ValueError("give both center and scale, or neither")
        return cls(mask, None, center, scale)  # scale must be positive (not checked: no device sync per install)

    @property
    def standardizes(self) -> bool:
        return self.center is not None

    @property
    def density(self) -> float:
        return self.dense.float().mean().item() if self.dense.numel() else 0.0

    def check(self, param: torch.Tensor) -> None:
        for what, t in (("mask", self.dense), ("center", self.center), ("scale", self.scale)):
            if t is not None and (t.shape != param.shape or t.device != param.device):
                raise ValueError(f"{what} of shape {tuple(t.shape)} on {t.device} does not match the parameter "
                                 f"({tuple(param.shape)} on {param.device})")


class FlatMasks:
    """One bool tensor per flat gradient buffer: True where a coordinate trains (``engine.masks`` laid out as the
    buffer), cached until the buffer or the masks change (``engine.mask_version``)."""

    def __init__(self, engine):
        self.engine = engine
        self._cache = None

    def get(self, grads) -> list:
        """``grads``: a ``fastdp.grad_buffer.GradBuffer``; returns one [numel] bool tensor per ``grads.flats``."""
        key = (id(grads), self.engine.mask_version)
        if self._cache is None or self._cache[0] != key:
            out = []
            for flat, params in zip(grads.flats, grads.groups):
                m = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
                for p, v in zip(params, flat_views(m, params)):
                    mask = self.engine.masks.get(p)
                    if mask is not None:
                        v.copy_(mask.dense)
                out.append(m)
            self._cache = (key, out)
        return self._cache[1]
