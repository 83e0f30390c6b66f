"""The fused DP-SGD step: noise, ``1 / expected_batch_size`` and ``torch.optim.SGD``'s update in one launch per flat
gradient buffer (``fastdp.kernels.noisy_sgd``), used by ``DPOptimizer.step`` when it computes what the unfused
path would (see ``DPOptimizer``'s docstring for the conditions); otherwise ``plan`` says why not.

The momentum buffers stay where torch keeps them, ``optimizer.state[p]["momentum_buffer"]``, as views of one fp32
tensor per flat buffer (so checkpoints load into a plain ``torch.optim.SGD`` and either path can resume).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch.optim import optimizer as torch_optimizer

from fastdp.grad_buffer import GradBuffer, flat_views
from fastdp.kernels._backend import backend_for_op
from fastdp.kernels.noisy_sgd import noisy_sgd
from fastdp.masks import FlatMasks
from fastdp.noise import NoiseSeeds

SGD_HYPER = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")


class FusedSGDStep:
    """Plans and runs fused steps for one ``DPOptimizer``; caches its flat momentum buffers and mask checks."""

    def __init__(self):
        self._momentum: dict = {}  # flat index -> (params, flat fp32 momentum buffer, its per-parameter views)
        self._mask_ok: dict = {}  # flat index -> (mask_version, momentum flat, zero outside the mask)

    def plan(self, opt: torch.optim.Optimizer, grads: GradBuffer, masks: dict, flat_masks: FlatMasks,
             dp_reason: Optional[str] = None) -> Tuple[Optional[list], Optional[str]]:
        """Per flat buffer of ``grads``, what the kernel needs for this step, or ``(None, reason)`` for an unfused
        step. ``masks``: the engine's {param: Mask}. ``dp_reason``: why the DP side rules fusion out (secure mode,
        overridden noise or scaling: ``DPOptimizer``'s to say), or None. Changes nothing: the momentum views are
        installed by ``run``."""
        reason = _unfusable(opt, grads, dp_reason)
        if reason is not None:
            return None, reason
        hyper_of, reason = _hyper_of(opt, grads)
        if reason is not None:
            return None, reason
        plan = []
        for k, (flat, params) in enumerate(zip(grads.flats, grads.groups)):
            item = self._plan_flat(opt, k, flat, params, hyper_of, masks, flat_masks, grads)
            if isinstance(item, str):
                return None, item
            plan.append(item)
        return plan, None

    def _plan_flat(self, opt, k: int, flat, params, hyper_of, masks, flat_masks: FlatMasks, grads):
        """The plan of flat buffer ``k``, or the reason it cannot be fused (a str)."""
        settings = {hyper_of.get(p) for p in params}
        if None in settings:
            return "a trainable parameter is not in the wrapped optimizer"
        if len(settings) != 1:
            return "parameters of one flat buffer are in param groups with different SGD settings"
        if any(p.dtype != torch.float32 or not p.is_contiguous() for p in params):
            return "a parameter is not a contiguous fp32 tensor (torch keeps bf16 gradients and momentum)"
        lr, momentum, dampening, wd, nesterov, maximize = settings.pop()
        fmask = None
        masked = [p for p in params if p in masks]
        if masked:
            if any(masks[p].standardizes for p in masked):
                return "a standardising mask"
            if wd != 0:
                return "weight decay would move masked coordinates under torch.optim.SGD"
            fmask = flat_masks.get(grads)[k]
        mom, first, views = None, False, None
        if momentum != 0:
            got = self._momentum_flat(opt, k, params, dampening)
            if got is None:
                return "momentum buffers exist for some parameters only, with dampening"
            mom, first, views = got
            if fmask is not None and not first and not self._zero_outside(flat_masks.engine.mask_version, k, mom, fmask):
                return "momentum left on masked coordinates would move them under torch.optim.SGD"
        return dict(k=k, params=params, flat=flat, mask=fmask, mom=mom, first=first, views=views,
                    hyper=dict(lr=float(lr), momentum=float(momentum), dampening=float(dampening),
                               weight_decay=float(wd), nesterov=bool(nesterov), maximize=bool(maximize)))

    def run(self, opt: torch.optim.Optimizer, plan: list, std: float, scale: float, seeds: NoiseSeeds) -> None:
        """Noise of ``std``, times ``scale`` (1 / expected_batch_size), and SGD's update: one ``noisy_sgd`` launch per
        flat buffer, each with the next seed of ``seeds``."""
        state = opt.state
        for item in plan:
            if item["views"] is not None:  # (re)built momentum flat: torch's state now holds its views
                for p, v in zip(item["params"], item["views"]):
                    state[p]["momentum_buffer"] = v
                self._momentum[item["k"]] = (tuple(item["params"]), item["mom"], item["views"])
            noisy_sgd(item["params"], item["flat"], item["mom"], std=std, seed=seeds.next(), scale=scale,
                      first_step=item["first"], mask=item["mask"], **item["hyper"])
        torch.autograd.graph.increment_version([p for item in plan for p in item["params"]])  # written in place

    def after_unfused_step(self) -> None:
        """An unfused step may move momentum outside the masks (weight decay): check again before fusing."""
        self._mask_ok = {k: v for k, v in self._mask_ok.items() if not v[2]}

    def _momentum_flat(self, opt, k: int, params: List[torch.Tensor], dampening: float):
        """(fp32 momentum flat of flat buffer ``k``, whether it is new (torch's first step), its per-parameter views
        to install in ``optimizer.state``, or None when installed already); None when some parameters have a buffer
        and others not and ``dampening != 0`` (torch would create the missing ones undamped)."""
        state = opt.state
        cur = [state[p].get("momentum_buffer") if p in state else None for p in params]
        cached = self._momentum.get(k)
        if (cached is not None and len(cached[0]) == len(params) and all(a is b for a, b in zip(cached[0], params))
                and all(c is v for c, v in zip(cur, cached[2]))):
            return cached[1], False, None
        missing = [c is None for c in cur]
        if any(missing) and not all(missing) and dampening != 0:
            return None
        flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device)
        views = flat_views(flat, params)
        for v, c in zip(views, cur):
            if c is not None:  # missing buffers stay zero: with dampening 0, torch's first step gives the same
                v.copy_(c)
        return flat, all(missing), views

    def _zero_outside(self, mask_version: int, k: int, mom: torch.Tensor, fmask: torch.Tensor) -> bool:
        """Whether ``mom`` is zero outside ``fmask`` (one device sync per mask or buffer change: fused steps keep it,
        unfused ones clear the cached answer)."""
        cached = self._mask_ok.get(k)
        if cached is not None and cached[0] == mask_version and cached[1] is mom:
            return cached[2]
        ok = not bool(mom.masked_fill(fmask, 0).any())
        self._mask_ok[k] = (mask_version, mom, ok)
        return ok


def _unfusable(opt: torch.optim.Optimizer, grads: GradBuffer, dp_reason: Optional[str]) -> Optional[str]:
    """Why the wrapped optimizer, the DP side or the buffers rule the kernel out, or None."""
    if type(opt) is not torch.optim.SGD:
        return f"the wrapped optimizer is {type(opt).__name__}, not torch.optim.SGD"
    if dp_reason is not None:
        return dp_reason
    if not grads.flats or any(f.dtype != torch.float32 or backend_for_op("noisy_sgd", f) != "triton"
                              for f in grads.flats):
        return "the noisy_sgd Triton kernel is not active for these buffers"
    if (opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
            or torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks):
        return "the wrapped optimizer has step hooks"
    patched = vars(opt).get("step")
    if patched is not None and not getattr(patched, "_wrapped_by_lr_sched", False):
        return "the wrapped optimizer's step() is patched"
    return None


def _hyper_of(opt: torch.optim.Optimizer, grads: GradBuffer):
    """({param: its group's SGD hyper-parameters} for the buffer's parameters, None), or (None, why not)."""
    hyper_of = {}
    for group in opt.param_groups:
        if group.get("differentiable"):
            return None, "differentiable=True"
        h = tuple(group[k] for k in SGD_HYPER)
        lr, momentum, dampening, wd, nesterov, _ = h
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in h[:4]):
            return None, "an SGD hyper-parameter is not a finite Python number"
        if lr < 0 or momentum < 0 or wd < 0 or (nesterov and (momentum <= 0 or dampening != 0)):
            return None, "SGD hyper-parameters outside torch.optim.SGD's checks"
        for p in group["params"]:
            if p in grads.views:
                hyper_of[p] = h
            elif p.grad is not None:
                return None, "a parameter outside the DP buffer has a .grad that SGD would apply"
    return hyper_of, None
