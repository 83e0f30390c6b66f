"""Clip factors from per-sample squared norms: flat, automatic and per-layer clipping.

A rule turns per-sample gradient norms into factors ``c_i`` such that each sample's scaled gradient has L2 norm
at most ``sensitivity`` (the noise is calibrated to it). The engine records gradients at ``1 / scale`` of the
per-sample gradients (``scale`` = B for a mean-reduced loss), so rules take the recorded squared norms ``s_i``
(true norm ``scale * sqrt(s_i)``) and return ``scale * c_i``, the factor to apply to the recorded gradients, through
``fastdp.kernels.clip_factor`` (one launch with the Triton kernel, four PyTorch ops otherwise): this matters when
per-layer rules run once per parameter inside backward.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence, Union

import torch

from fastdp.kernels.clip_factor import clip_factor

# Opacus' margin: c = R / (||g|| + 1e-6) keeps ||c g|| strictly below R.
_MARGIN = 1e-6


class ClipRule:
    """Base rule; ``per_param`` rules clip each parameter on its own (no cross-layer book-keeping)."""

    per_param = False
    sensitivity: float

    def factors(self, sq_norms: Dict[torch.nn.Parameter, torch.Tensor],
                scale: float = 1.0) -> Dict[torch.nn.Parameter, torch.Tensor]:
        """Per-parameter rules: ``scale * c_i`` [B] per parameter from its recorded per-sample squared norms [B]."""
        raise NotImplementedError

    def shared_factor(self, sq_norm: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Flat rules: ``scale * c_i`` [B] shared by every parameter, from the recorded flat squared norms [B]."""
        raise NotImplementedError


def _scaled_min_factor(threshold: float, sq: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * min(1, R / (scale * n + margin))`` = ``min(scale, R / (n + margin / scale))``, ``n = sqrt(sq)``."""
    return clip_factor(sq, threshold, _offset(_MARGIN, scale), cap=scale)


def _offset(margin: float, scale: float) -> float:
    return margin / scale if scale else margin  # scale 0: an empty batch (norm has no elements)


class FlatClip(ClipRule):
    """``c_i = min(1, R / ||g_i||)`` with ``g_i`` all trainable parameters together (Abadi et al.)."""

    def __init__(self, max_grad_norm: float):
        _check_norm(max_grad_norm)
        self.max_grad_norm = self.sensitivity = float(max_grad_norm)

    def shared_factor(self, sq_norm, scale=1.0):
        return _scaled_min_factor(self.max_grad_norm, sq_norm, scale)

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

    def shared_factor(self, sq_norm, scale=1.0):
        # scale * R / (scale * n + gamma) = R / (n + gamma / scale)
        return clip_factor(sq_norm, self.max_grad_norm, _offset(self.gamma, scale))

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
        self._stacked = None  # (key, [k] thresholds on the device) of the last stacked_factors call

    def factors(self, sq_norms, scale=1.0):
        out = {}
        for p, sq in sq_norms.items():
            r = self.thresholds.get(p)
            if r is None:
                raise KeyError("per-layer clipping has no threshold for a trainable parameter "
                               "(did its requires_grad change after the optimizer was built?)")
            out[p] = _scaled_min_factor(r, sq, scale)
        return out

    def stacked_factors(self, params, sq_norms, scale=1.0):
        """``scale * c_ik`` [B, k] for the k ``params`` at once from their recorded squared norms [B, k]."""
        norms = sq_norms
        key = (tuple(map(id, params)), norms.device, norms.dtype)
        if self._stacked is None or self._stacked[0] != key:
            missing = [p for p in params if p not in self.thresholds]
            if missing:
                raise KeyError("per-layer clipping has no threshold for a trainable parameter "
                               "(did its requires_grad change after the optimizer was built?)")
            self._stacked = (key, torch.tensor([self.thresholds[p] for p in params], dtype=norms.dtype,
                                                  device=norms.device))
        return torch.div(self._stacked[1], norms.sqrt() + _offset(_MARGIN, scale)).clamp_(max=scale)

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
