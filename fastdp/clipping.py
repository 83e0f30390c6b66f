"""Clip factors from per-sample squared norms: flat, automatic and per-layer clipping.

A rule turns ``{param: [B] squared norms}`` into ``{param: [B] factors c_i}`` such that each
sample's scaled gradient has L2 norm at most ``sensitivity`` (the noise is calibrated to it).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import torch

# Opacus' margin: c = R / (||g|| + 1e-6) keeps ||c g|| strictly below R.
_MARGIN = 1e-6


class ClipRule:
    """Base rule; ``per_param`` rules clip each parameter on its own (no cross-layer book-keeping)."""

    per_param = False
    sensitivity: float

    def factors(self, sq_norms: Dict[torch.nn.Parameter, torch.Tensor],
                total: Optional[torch.Tensor] = None) -> Dict[torch.nn.Parameter, torch.Tensor]:
        """Clip factors [B] per parameter; ``total``: the flat squared norms if already summed."""
        if self.per_param:
            raise NotImplementedError
        c = self.shared_factor(total_sq_norm(sq_norms) if total is None else total)
        return {p: c for p in sq_norms}

    def shared_factor(self, total: torch.Tensor) -> torch.Tensor:
        """Flat rules: the [B] factors every parameter shares, from the flat squared norms ``total``."""
        raise NotImplementedError


def total_sq_norm(sq_norms) -> torch.Tensor:
    """[B] sum of the per-parameter squared norms (the flat per-sample squared norm)."""
    it = iter(sq_norms.values())
    total = next(it).clone()
    for v in it:
        total += v
    return total


class FlatClip(ClipRule):
    """``c_i = min(1, R / ||g_i||)`` with ``g_i`` all trainable parameters together (Abadi et al.)."""

    def __init__(self, max_grad_norm: float):
        _check_norm(max_grad_norm)
        self.max_grad_norm = self.sensitivity = float(max_grad_norm)

    def shared_factor(self, total):
        return (self.max_grad_norm / (total.sqrt() + _MARGIN)).clamp(max=1.0)

    def __repr__(self):
        return f"FlatClip(max_grad_norm={self.max_grad_norm})"


class AutomaticClip(ClipRule):
    """``c_i = R / (||g_i|| + gamma)``: normalisation instead of clipping (Bu et al., 2023)."""

    def __init__(self, max_grad_norm: float, gamma: float = 0.01):
        _check_norm(max_grad_norm)
        if gamma <= 0:
            raise ValueError(f"automatic clipping needs gamma > 0, got {gamma}")
        self.max_grad_norm = self.sensitivity = float(max_grad_norm)
        self.gamma = float(gamma)

    def shared_factor(self, total):
        return self.max_grad_norm / (total.sqrt() + self.gamma)

    def __repr__(self):
        return f"AutomaticClip(max_grad_norm={self.max_grad_norm}, gamma={self.gamma})"


class PerLayerClip(ClipRule):
    """One threshold per trainable parameter tensor (Opacus' ``clipping="per_layer"``).

    The sum's sensitivity is ``sqrt(sum_k R_k^2)``; noise is calibrated to it.
    """

    per_param = True

    def __init__(self, thresholds: Dict[torch.nn.Parameter, float]):
        for r in thresholds.values():
            _check_norm(r)
        self.thresholds = dict(thresholds)
        self.sensitivity = math.sqrt(sum(r * r for r in self.thresholds.values()))

    def factors(self, sq_norms, total=None):
        out = {}
        for p, sq in sq_norms.items():
            if p not in self.thresholds:
                raise KeyError("per-layer clipping has no threshold for a trainable parameter "
                               "(did its requires_grad change after the optimizer was built?)")
            out[p] = (self.thresholds[p] / (sq.sqrt() + _MARGIN)).clamp(max=1.0)
        return out

    def __repr__(self):
        return f"PerLayerClip({len(self.thresholds)} thresholds, sensitivity={self.sensitivity:.4g})"


def _check_norm(r):
    if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
        raise ValueError(f"max_grad_norm must be a positive finite number, got {r!r}")


def make_clip_rule(clipping: str, max_grad_norm: Union[float, Sequence[float], dict],
                   named_params: Sequence, gamma: float = 0.01) -> ClipRule:
    """Build the rule named by ``clipping`` ("flat", "automatic", "per_layer").

    ``named_params``: the trainable (name, parameter) pairs, in order; per-layer thresholds are a list
    aligned with them or a dict keyed by name.
    """
    if clipping == "flat":
        return FlatClip(max_grad_norm)
    if clipping == "automatic":
        return AutomaticClip(max_grad_norm, gamma)
    if clipping == "per_layer":
        if isinstance(max_grad_norm, dict):
            missing = [n for n, _ in named_params if n not in max_grad_norm]
            if missing:
                raise ValueError(f"per_layer clipping: no max_grad_norm for {missing}")
            return PerLayerClip({p: max_grad_norm[n] for n, p in named_params})
        if isinstance(max_grad_norm, (int, float)):
            n = len(named_params)
            raise ValueError(
                f"per_layer clipping takes one max_grad_norm per trainable parameter ({n} here), as a list or a "
                f"dict by name; e.g. [R / math.sqrt({n})] * {n} keeps the total sensitivity at R")
        if len(max_grad_norm) != len(named_params):
            raise ValueError(f"per_layer clipping: {len(max_grad_norm)} thresholds for {len(named_params)} "
                             "trainable parameters")
        return PerLayerClip({p: r for (_, p), r in zip(named_params, max_grad_norm)})
    raise ValueError(f"unknown clipping {clipping!r}; choose 'flat', 'automatic' or 'per_layer'")
