"""AdaDPIGU (Zhang & Xie, arXiv 2507.06525) in the DP-valid form of ``docs/methods.md`` section 3.

Two phases, counted in epochs of ``steps_per_epoch`` steps:

1. ``"pretrain"`` (``pretrain_epochs`` epochs, sigma_1 = ``pretrain_noise_multiplier``): ordinary DP-SGD.
   After each step the importance ``I_j += |g~_j|`` of every trainable coordinate accumulates from the
   released noisy gradient ``g~ = p.grad`` (post-processing). At the end, one global mask over all
   trainable parameters keeps the top ``ceil(retention * d)`` coordinates by ``I`` (ties: lower flat index
   first, parameters in model order).
2. ``"sparse"`` (sigma_2 = ``noise_multiplier``): per step, with per-coordinate statistics ``a`` (mean),
   ``s`` (second moment) and ``b = sqrt(clamp(s, *bounds))`` of the parameter's shape,

   * standardise and mask before clipping: ``w_i = M * (g_i - a) / b`` (``Mask.from_coords``);
   * clip (flat norm over all trainable parameters), sum, add ``M * N(0, sigma_2^2 C^2)``, divide by B;
   * restore ``g~ = M * (b * w~ + a)`` (this is ``p.grad``: masked coordinates get exactly zero);
   * AdaCliP update from ``g~`` only, on the mask (masked coordinates keep their statistics):
     ``a <- beta1 a + (1 - beta1) g~``,
     ``s <- beta2 s + (1 - beta2) ((g~ - a_old)^2 - b_old^2 sigma_2^2 C^2 / B^2)``,
     ``b <- sqrt(clamp(s, *bounds))``. Initially ``a = 0``, ``s = 1``.

   Progressive unfreezing: sparse epoch ``k`` keeps the fraction
   ``min(unfreeze_to, retention + unfreeze_step * min(k, unfreeze_epochs))``: the pre-training mask trains
   for the first sparse epoch, then the fraction grows at each of the next ``unfreeze_epochs`` epoch
   starts, adding currently masked coordinates in descending pre-training importance. **This schedule is not
   verified from the paper** (methods.md section 3: the official code's intent is +2% per epoch for 5 epochs
   and its scheduler is a no-op).

Privacy: each step is one Poisson-subsampled Gaussian mechanism with sensitivity C (in standardised space
during the sparse phase: ``||clip(w_i)|| <= C``; ``a``, ``b`` and ``M`` are fixed before the step), accounted
with the sigma it used (``pretrain_noise_multiplier`` in phase 1). ``I``, ``M``, ``a``, ``s`` and ``b`` are
functions of released noisy gradients only, so they cost nothing (post-processing). The guarantee equals
DP-SGD's with the same (sigma, q, steps) history.

Deviations from the official code (see methods.md): importance from noisy releases instead of un-noised
clipped means, statistics updated every step from noisy releases with the noise-variance correction and
actually used (privacy fixes); unfreezing that really adds coordinates; the optional per-sample top-k of
standardised gradients is not implemented.
"""
from __future__ import annotations

import math
from functools import reduce
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from fastdp.accounting import is_int
from fastdp.grad_buffer import GradBuffer, flat_views
from fastdp.kernels._common import acc_dtype
from fastdp.masks import Mask
from fastdp.methods.base import PhasedDPOptimizer

__all__ = ["AdaDPIGU", "global_topk_masks", "retained_count"]


def retained_count(fraction: float, d: int) -> int:
    """``ceil(fraction * d)`` clamped to ``[0, d]``, robust to float error (0.07 * 100 keeps 7, not 8)."""
    return min(d, max(0, math.ceil(fraction * d * (1 - 1e-12))))


def global_topk_masks(scores: Sequence[torch.Tensor], k: int) -> List[torch.Tensor]:
    """Bool masks (shapes of ``scores``) keeping the ``k`` largest scores over all tensors together.

    Ties are broken deterministically: lower position in the concatenation of the flattened tensors first.
    The masks are nested in ``k`` (the kept set for ``k`` contains the one for any smaller ``k``).
    """
    if not scores:
        return []
    device = scores[0].device
    dtype = reduce(torch.promote_types, (s.dtype for s in scores))
    flat = torch.cat([s.detach().reshape(-1).to(device=device, dtype=dtype) for s in scores])
    d = flat.numel()
    if torch.isnan(flat).any():
        raise ValueError("importance scores contain NaN")
    if k >= d:
        keep = torch.ones(d, dtype=torch.bool, device=device)
    elif k <= 0:
        keep = torch.zeros(d, dtype=torch.bool, device=device)
    else:
        thr = torch.kthvalue(flat, d - k + 1).values  # the k-th largest value
        keep = flat > thr
        need = k - int(keep.sum())
        keep[(flat == thr).nonzero().flatten()[:need]] = True
    return [v.to(s.device) for v, s in zip(flat_views(keep, scores), scores)]


class AdaDPIGU(PhasedDPOptimizer):
    """DP pre-training for importance, then sparse DP-SGD with coordinate-wise adaptive clipping (see module doc).

    Args:
        model, optimizer: as for ``DPOptimizer``.
        retention: fraction r_0 of all trainable coordinates kept after pre-training (paper: 0.6).
        pretrain_epochs: epochs of phase 1 (>= 1).
        unfreeze_to: largest kept fraction (default ``min(1, retention + unfreeze_step * unfreeze_epochs)``).
        unfreeze_step: growth of the kept fraction per unfreezing epoch.
        unfreeze_epochs: number of growth events (at the starts of sparse epochs 1..unfreeze_epochs).
        betas: (beta1, beta2) of the AdaCliP mean and second-moment averages.
        bounds: (h1, h2) clamp of ``s`` before ``b = sqrt(s)``.
        pretrain_noise_multiplier: sigma_1 of phase 1 (default: the phase-2 ``noise_multiplier``).
        **dp: ``DPOptimizer`` / ``PhasedDPOptimizer`` arguments (``noise_multiplier`` is sigma_2; with
            ``target_epsilon`` and no ``pretrain_noise_multiplier`` one sigma is calibrated for all steps).

    Only flat and automatic clipping (sensitivity C = ``max_grad_norm``). The wrapped optimizer's state
    (momentum, Adam moments) is dropped once when the sparse phase starts: pre-training momentum would
    otherwise keep moving masked coordinates. Weight decay in the wrapped optimizer still moves them.
    A parameter used more than once (tied weights) is standardised on the sum of its uses' per-sample gradients
    (formed explicitly for that parameter).

    Examples:
        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = AdaDPIGU(model, torch.optim.SGD(model.parameters(), lr=0.1), retention=0.5, pretrain_epochs=1,
        ...                noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8, sample_size=16,
        ...                generator=torch.Generator().manual_seed(0))
        >>> for _ in range(3):
        ...     model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step(); opt.zero_grad()
        >>> opt.phase, int(opt.masks["weight"].sum() + opt.masks["bias"].sum())
        ('sparse', 5)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, retention: float = 0.6,
                 pretrain_epochs: int, unfreeze_to: Optional[float] = None, unfreeze_step: float = 0.02,
                 unfreeze_epochs: int = 5, betas: Tuple[float, float] = (0.9, 0.999),
                 bounds: Tuple[float, float] = (1e-6, 1e6), pretrain_noise_multiplier: Optional[float] = None,
                 **dp):
        clipping = dp.get("clipping", "flat")
        if clipping not in ("flat", "automatic"):
            raise ValueError(f"AdaDPIGU supports clipping='flat' or 'automatic', got {clipping!r}: per-layer "
                             "thresholds are in raw-gradient units per tensor, while AdaDPIGU clips standardised "
                             "coordinates under one global mask (a tensor may keep no coordinate at all)")
        if pretrain_noise_multiplier is not None and dp.get("target_epsilon") is not None:
            raise ValueError("give noise_multiplier (not target_epsilon) together with pretrain_noise_multiplier; "
                             "choose the pair with fastdp.accounting so the composed epsilon meets the target")
        if not (is_int(pretrain_epochs) and pretrain_epochs >= 1):
            raise ValueError(f"pretrain_epochs must be an int >= 1, got {pretrain_epochs!r}")
        if not 0 < retention <= 1:
            raise ValueError(f"retention must be in (0, 1], got {retention}")
        if not (is_int(unfreeze_epochs) and unfreeze_epochs >= 0) or unfreeze_step < 0:
            raise ValueError("unfreeze_epochs must be an int >= 0 and unfreeze_step >= 0")
        if unfreeze_to is None:
            unfreeze_to = min(1.0, retention + unfreeze_step * unfreeze_epochs)
        if not retention <= unfreeze_to <= 1:
            raise ValueError(f"unfreeze_to must be in [retention, 1], got {unfreeze_to}")
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not 0 < bounds[0] <= bounds[1]:
            raise ValueError(f"bounds must satisfy 0 < h1 <= h2, got {bounds}")
        super().__init__(model, optimizer, **dp)
        self.retention = float(retention)
        self.pretrain_epochs = pretrain_epochs
        self.unfreeze_to = float(unfreeze_to)
        self.unfreeze_step = float(unfreeze_step)
        self.unfreeze_epochs = unfreeze_epochs
        self.betas = (float(betas[0]), float(betas[1]))
        self.bounds = (float(bounds[0]), float(bounds[1]))
        self.sparse_noise_multiplier = self.noise_multiplier
        self.pretrain_noise_multiplier = (self.noise_multiplier if pretrain_noise_multiplier is None else
                                          self._resolve_sigma(pretrain_noise_multiplier, None, None, None, None))
        self._params = [p for p in self.engine.param_names if p.requires_grad]  # the masked set, model order
        self._importance = {p: torch.zeros(p.shape, dtype=acc_dtype(p), device=p.device) for p in self._params}
        self._a = {p: torch.zeros_like(i) for p, i in self._importance.items()}
        self._s = {p: torch.ones_like(i) for p, i in self._importance.items()}
        self._b = {p: torch.ones_like(i) for p, i in self._importance.items()}
        self._mask: Dict[nn.Parameter, torch.Tensor] = {}  # empty until the sparse phase
        self.retained_fraction: Optional[float] = None
        self.phase = "pretrain"
        self._begin_epoch(self.epoch)

    # ---------------------------------------------------------------- schedule
    def retention_at(self, sparse_epoch: int) -> float:
        """Kept fraction during sparse epoch ``sparse_epoch`` (0 = the first epoch after pre-training)."""
        grown = self.retention + self.unfreeze_step * min(max(sparse_epoch, 0), self.unfreeze_epochs)
        return min(self.unfreeze_to, grown)

    def _begin_epoch(self, epoch: int) -> None:
        if epoch < self.pretrain_epochs:
            self.phase = "pretrain"
            self.noise_multiplier = self.pretrain_noise_multiplier
            for p in self._params:
                self.engine.set_mask(p, None)
            return
        self.phase = "sparse"
        self.noise_multiplier = self.sparse_noise_multiplier
        fraction = self.retention_at(epoch - self.pretrain_epochs)
        if not self._mask:  # leaving pre-training (not on resume: the checkpoint holds the masks)
            self._reset_optimizer_state(self._params)
        if fraction != self.retained_fraction or not self._mask:
            d = sum(p.numel() for p in self._params)
            masks = global_topk_masks([self._importance[p] for p in self._params], retained_count(fraction, d))
            if self._mask:  # the schedule only adds coordinates (post-processing of the same importance)
                assert all(bool((self._mask[p] <= m).all()) for p, m in zip(self._params, masks))
            self._mask = dict(zip(self._params, masks))
            self.retained_fraction = fraction
        self._install_masks()

    # ------------------------------------------------------------------- masks
    def _install_masks(self) -> None:
        """Give the engine ``Mask.from_coords(M, center=a, scale=b)`` for every masked parameter."""
        for p, m in self._mask.items():
            self.engine.set_mask(p, Mask.from_coords(m, center=self._a[p], scale=self._b[p]))

    # -------------------------------------------------------------------- step
    def scale_grad(self, grads: GradBuffer) -> None:
        """After the division by B: pre-training accumulates importance; the sparse phase restores
        ``g~ = M * (b * w~ + a)`` in place and updates the AdaCliP statistics from it."""
        super().scale_grad(grads)
        if self.phase == "pretrain":
            for p, v in grads.views.items():
                if p in self._importance:
                    self._importance[p] += v.abs()
            return
        beta1, beta2 = self.betas
        noise_var = (self.noise_std() / self.expected_batch_size) ** 2  # of w~; of g~ it is b^2 times this
        for p, m in self._mask.items():
            v = grads.views.get(p)
            if v is None:
                continue
            a, s, b = self._a[p], self._s[p], self._b[p]
            v.mul_(b).add_(a).mul_(m)  # g~, exactly 0 off the mask
            s_new = beta2 * s + (1 - beta2) * ((v - a) ** 2 - b * b * noise_var)
            a_new = beta1 * a + (1 - beta1) * v
            a.copy_(torch.where(m, a_new, a))
            s.copy_(torch.where(m, s_new, s))
            torch.sqrt(s.clamp(*self.bounds), out=b)

    def after_step(self) -> None:
        super().after_step()  # may start a new epoch (new phase or a grown mask)
        if self.phase == "sparse":
            self._install_masks()  # the new a, b

    # ------------------------------------------------------------------ views
    @property
    def importance(self) -> Dict[str, torch.Tensor]:
        """Parameter name -> accumulated ``sum_t |g~_t|`` of pre-training (the parameter's shape)."""
        return {self.param_name[p]: v for p, v in self._importance.items()}

    @property
    def statistics(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Parameter name -> {"a", "s", "b"} AdaCliP statistics (each the parameter's shape)."""
        return {self.param_name[p]: {"a": self._a[p], "s": self._s[p], "b": self._b[p]} for p in self._params}

    def __repr__(self):
        return (f"AdaDPIGU(phase={self.phase!r}, retention={self.retention}, kept={self.retained_fraction}, "
                f"sigma_pretrain={self.pretrain_noise_multiplier:.4g}, sigma={self.sparse_noise_multiplier:.4g}, "
                f"clip={self.clip_rule!r}, expected_batch_size={self.expected_batch_size}, "
                f"sample_rate={self.sample_rate:.4g}, wrapping {type(self.original_optimizer).__name__})")

    # ------------------------------------------------------------------ state
    def _method_state(self) -> dict:
        def by_name(d):
            return {self.param_name[p]: v.detach().clone() for p, v in d.items()}

        return {"importance": by_name(self._importance), "a": by_name(self._a), "s": by_name(self._s),
                "masks": by_name(self._mask), "retained_fraction": self.retained_fraction}

    def _load_method_state(self, state: dict) -> None:
        if not state:
            raise ValueError("no AdaDPIGU state in this checkpoint")
        named = {self.param_name[p]: p for p in self._params}
        if set(state["importance"]) != set(named):
            raise ValueError(f"checkpoint parameters {sorted(state['importance'])} do not match the trainable "
                             f"parameters {sorted(named)}")
        for key, store in (("importance", self._importance), ("a", self._a), ("s", self._s)):
            for n, v in state[key].items():
                store[named[n]].copy_(v)
        for p in self._params:
            torch.sqrt(self._s[p].clamp(*self.bounds), out=self._b[p])
        self._mask = {named[n]: m.to(named[n].device) for n, m in state["masks"].items()}
        self.retained_fraction = state["retained_fraction"]
