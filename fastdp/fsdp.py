"""FSDP2 (``torch.distributed.fsdp.fully_shard``) under the DP engine: taps on the all-gathered parameters.

``fully_shard`` registers each managed parameter as a sharded DTensor; its forward pre-hook all-gathers the
parameters of the module's group and puts the unsharded tensors in the module slots, and its forward hook puts the
shards back. ``ShardedTaps`` hooks each FSDP module after FSDP's pre-hook and before its post-hook: while the
module's forward runs, each of its managed slots holds a ``ParamTap`` whose value is the unsharded parameter and
whose identity (the engine's key: buffer view, masks, names) is the registered shard. So every rank computes the
exact per-sample gradients of its own samples over the full parameters, as DDP does; no norm crosses ranks.
FSDP itself never sees a gradient (the layer handlers keep the parameters out of autograd), so its reduce-scatter
never runs; the step then adds rank 0's noise, reduce-scatters the flat buffer of clipped sums in FSDP2's shard
layout (all-reduces it for optimizers that read the whole release: ``reduce_release_``) and gives each rank its shard
of the result as the DTensor ``.grad`` (``ShardedDataParallel.set_grads``).

Every method works on it (masks and scores are full-shape, like the buffer); DP-MicroAdam steps full-shape replicas
of the parameters (``fastdp.DPMicroAdam``).
Memory: parameters and optimizer state are sharded as in FSDP; the flat buffer of clipped sums is full-size on every
rank (as DDP's gradients), where non-private FSDP holds sharded gradients.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from fastdp.tap import ParamTap, UnsupportedLayerError


def fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    return FSDPModule


def fsdp_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    kind = fsdp_module_type()
    return [] if kind is None else [(n, m) for n, m in model.named_modules() if isinstance(m, kind)]


def _param_group(module: nn.Module):
    """FSDP2's parameter group of ``module`` (private API, checked: a torch without it is refused)."""
    try:
        return module._get_fsdp_state()._fsdp_param_group
    except AttributeError as err:
        raise UnsupportedLayerError(f"this torch's FSDP2 internals differ from what fastdp knows ({err}): FSDP2 "
                                    "models are not supported with it; use DistributedDataParallel") from None


class ShardedTaps:
    """The hooks that put taps in an FSDP2 model's managed slots (module docstring). ``slots``: the (module, name)
    slots FSDP manages, which the engine's root hook leaves alone."""

    def __init__(self, engine, model: nn.Module):
        self.engine = engine
        self.slots = set()
        self._handles = []
        self._unsharded = {}  # (module, name) -> the unsharded parameter its slot held before the tap
        for name, m in fsdp_modules(model):
            group = _param_group(m)
            if group is None:
                continue
            policy = getattr(group, "mp_policy", None)
            if policy is not None and (policy.param_dtype is not None or policy.reduce_dtype is not None):
                raise UnsupportedLayerError(
                    f"module '{name or '<root>'}' is sharded with an FSDP2 MixedPrecisionPolicy: not supported by "
                    "fastdp (use torch.autocast, e.g. bf16, around the forward)")
            managed = []
            for fp in group.fsdp_params:
                info = fp._module_info
                owners = [(info.module, info.param_name)] + list(zip(info.shared_modules, info.shared_param_names))
                if not isinstance(fp.sharded_param, nn.Parameter) or type(fp.sharded_param.data).__name__ != "DTensor":
                    raise RuntimeError(f"module '{name or '<root>'}': build the DP optimizer while the FSDP2 model is "
                                       "sharded (before the first forward, or after a step)")
                for owner, pname in owners:
                    managed.append((owner, pname, fp.sharded_param))
                    self.slots.add((owner, pname))
            self._handles.append(m.register_forward_pre_hook(
                lambda mod, args, managed=managed: self._swap_in(managed)))
            self._handles.append(m.register_forward_hook(
                lambda mod, args, out, managed=managed: self._swap_out(managed), prepend=True, always_call=True))

    def _swap_in(self, managed) -> None:
        """After FSDP's all-gather: each managed slot's unsharded parameter becomes a tap keyed by its shard."""
        if not torch.is_grad_enabled():
            return
        for owner, pname, sharded in managed:
            value = owner._parameters[pname]
            if isinstance(value, ParamTap) or not sharded.requires_grad:
                continue
            if type(getattr(value, "data", value)).__name__ == "DTensor":
                raise RuntimeError(f"FSDP2 did not all-gather parameter '{pname}' of module "
                                   f"'{self.engine.hooks.module_names.get(owner, type(owner).__name__)}' before its forward")
            owner._parameters[pname] = ParamTap(sharded, value, None, self.engine.hooks.context(owner), pname)
            self._unsharded[owner, pname] = value

    def _swap_out(self, managed) -> None:
        """Before FSDP reshards: the unsharded parameters back in their slots."""
        for owner, pname, _ in managed:
            if isinstance(owner._parameters.get(pname), ParamTap):
                owner._parameters[pname] = self._unsharded.pop((owner, pname))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class ShardedDataParallel:
    """The collectives of one ``DPOptimizer`` on an FSDP2 model: as ``fastdp.distributed.DataParallel`` (rank 0's
    noise, one all-reduce per flat buffer), then each rank keeps its shard of the sum as the DTensor ``.grad``."""

    def __init__(self, model: nn.Module, group: Optional[dist.ProcessGroup] = None):
        self.model = model
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    shards_grads = True  # ``.grad`` is this rank's shard (``DPOptimizer.released`` reads the full gradient)

    def supports(self, optimizer_class: type) -> bool:
        """Every method (DP-MicroAdam steps full-shape replicas of the parameters: ``fastdp.DPMicroAdam``)."""
        return True

    @property
    def adds_noise(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, tensors) -> None:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def reduce_release_(self, grads, full: bool) -> None:
        """The step's reduction of the (noised) clipped sums ``grads`` (a ``GradBuffer``).

        ``full``: the optimizer post-processes the whole released gradient (``DPOptimizer.needs_full_release``): one
        all-reduce per flat buffer, twice the bytes of FSDP's reduce-scatter. Otherwise one reduce-scatter per flat
        buffer in FSDP2's shard layout (dim 0 cut in ``torch.chunk`` pieces, one per rank): the bytes of non-private
        FSDP; each rank's reduced rows are written back into its views, the other rows are stale (``released`` then
        refuses to read them)."""
        self.scattered = not full and all(_shard0(p, self.world_size) for p in grads.params)
        if not self.scattered:
            self.all_reduce_(grads.flats)
            return
        for flat, params in zip(grads.flats, grads.groups):
            send, pieces = _shard_major(flat, params, self.world_size)
            out = torch.empty(send.numel() // self.world_size, dtype=flat.dtype, device=flat.device)
            dist.reduce_scatter_tensor(out, send, group=self.group)
            offset = 0
            for p, (rows, row_numel) in zip(params, pieces):
                lo, hi = min(self.rank * rows, p.shape[0]), min((self.rank + 1) * rows, p.shape[0])
                mine = grads.views[p].reshape(p.shape[0], row_numel)[lo:hi]
                mine.copy_(out[offset:offset + (hi - lo) * row_numel].view(hi - lo, row_numel))
                offset += rows * row_numel

    scattered = False  # the last release was reduce-scattered (only this rank's rows of the buffer are reduced)

    def check_same_config(self, config: dict) -> None:
        from fastdp.distributed import compare_configs
        compare_configs(config, self.world_size, self.group)

    def set_grads(self, views: dict) -> None:
        """``p.grad`` = this rank's shard of the full reduced gradient ``views[p]`` (no communication)."""
        from torch.distributed.tensor import distribute_tensor
        for p, g in views.items():
            local = g if g.dtype == p.dtype else g.to(p.dtype)
            p.grad = distribute_tensor(local, p.device_mesh, p.placements, src_data_rank=None)


def _shard0(p: torch.Tensor, world_size: int) -> bool:
    """``p`` is an FSDP2 shard along dim 0 over a 1-D mesh of ``world_size`` ranks (the layout ``_shard_major``
    writes)."""
    placements = getattr(p, "placements", None)
    mesh = getattr(p, "device_mesh", None)
    return (p.dim() >= 1 and placements is not None and len(placements) == 1 and mesh is not None
            and mesh.ndim == 1 and mesh.size() == world_size and type(placements[0]).__name__ == "Shard"
            and placements[0].dim == 0)


def _shard_major(flat: torch.Tensor, params, world_size: int):
    """``flat`` (the parameters' gradients, one after the other) rearranged rank by rank: rank r's block holds, for
    each parameter, its rows ``[r * rows, (r + 1) * rows)`` (``rows = ceil(dim0 / world_size)``, zero-padded), as
    FSDP2's ``torch.chunk`` shards. Returns ([world_size * block] tensor, [(rows, row_numel) per parameter])."""
    parts, pieces, offset = [], [], 0
    for p in params:
        dim0 = p.shape[0]
        rows, row_numel = -(-dim0 // world_size), p.numel() // max(dim0, 1)
        padded = flat.new_zeros(world_size * rows, row_numel)
        padded[:dim0] = flat[offset:offset + p.numel()].view(dim0, row_numel)
        parts.append(padded.view(world_size, rows * row_numel))
        pieces.append((rows, row_numel))
        offset += p.numel()
    return torch.cat(parts, dim=1).reshape(-1), pieces
