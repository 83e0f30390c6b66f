"""Data-parallel DP training on ``torch.distributed`` (DDP): what fastdp communicates and how it samples.

A model wrapped in ``torch.nn.parallel.DistributedDataParallel`` trains under ``DPOptimizer`` (or any method) as:

1. each rank Poisson-samples its own shard of the dataset (``poisson_shard_loader``) and clips its own samples:
   a sample's norm is over all parameters, which every rank holds in full, so no norm crosses ranks;
2. DDP's own gradient all-reduce is switched off (``require_backward_grad_sync = False``: the engine never lets
   autograd reach ``.grad``, and DDP must not reduce anything of its own);
3. at ``step()`` rank 0 adds the Gaussian noise to its clipped sum, then one all-reduce (SUM) per flat buffer
   (usually one) forms ``sum over all ranks' samples of c_i g_i + N(0, sigma^2 S^2 I)``: the noise exactly once,
   whatever the world size; every rank then divides by the *global* expected batch size and steps, so the
   replicas stay identical (all-reduce gives every rank the same bits).

Bytes communicated per step: one all-reduce of the trainable parameters' fp32 gradient, as non-private DDP.

Conventions (they differ from Opacus, whose ``DistributedDPOptimizer`` takes per-rank sizes):
``expected_batch_size`` is the global expected batch (all ranks together) and ``sample_size`` the whole
dataset's size, on every rank alike; the accountant's sample rate is their ratio.

Not supported, and refused: FSDP (``fully_shard`` / ``FullyShardedDataParallel``), ``nn.DataParallel``, DDP with
``static_graph=True``, delayed all-reduce of parameters, DDP's mixed precision or a compiled DDP (python reducer),
a DDP module inside a larger model, and a model not wrapped in DDP in a process group of several ranks (each
rank would train alone on its shard while accounting the global sample rate: pass ``distributed=False`` to
``DPOptimizer`` to do that knowingly).
"""
from __future__ import annotations

import datetime
import os
from typing import Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from opacus.data_loader import wrap_collate_with_empty
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader

from fastdp.fsdp import ShardedDataParallel, ShardedTaps, fsdp_modules
from fastdp.tap import UnsupportedLayerError

# The default timeout of ``init_process_group`` (and of the process group a collective waits on): a rank that
# dies or raises makes the others fail within it instead of waiting 30 minutes (gloo's own default).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


def init_process_group(backend: Optional[str] = None, timeout: datetime.timedelta = DEFAULT_TIMEOUT, **kwargs) -> None:
    """``torch.distributed.init_process_group`` with fastdp's default timeout (5 minutes) and backend ("nccl" when
    CUDA is available, else "gloo"); ranks and addresses come from torchrun's environment variables."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)


def launched_distributed() -> bool:
    """Whether this process was started by torchrun (or another launcher) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class DataParallel:
    """The collectives of one ``DPOptimizer`` over a process group: who adds the noise, the all-reduce of the
    clipped sums, and a once-only check that every rank was configured alike."""

    def __init__(self, ddp: nn.parallel.DistributedDataParallel):
        self.ddp = ddp
        self.group = ddp.process_group
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)

    def supports(self, optimizer_class: type) -> bool:
        return True  # every method: masks and scores are the same on every rank

    @property
    def adds_noise(self) -> bool:
        """Rank 0 adds the step's noise (before the reduction: the sum then carries it exactly once)."""
        return self.rank == 0

    def all_reduce_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Sum ``tensors`` over the ranks, in place (one collective per tensor)."""
        self.check_sync_off()
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def reduce_release_(self, grads, full: bool = True) -> None:
        """The step's reduction of the (noised) clipped sums: one all-reduce per flat buffer (DDP's bytes)."""
        self.all_reduce_(grads.flats)

    def restore(self) -> None:
        """``DPOptimizer.detach``: DDP synchronises its gradients again (a plain DDP model from now on)."""
        self.ddp.require_backward_grad_sync = True
        self.ddp.require_forward_param_sync = True

    def check_sync_off(self) -> None:
        if self.ddp.require_backward_grad_sync:
            raise RuntimeError("DistributedDataParallel's gradient synchronisation was switched back on "
                               "(require_backward_grad_sync=True): fastdp all-reduces the clipped sums itself, and "
                               "DDP would reduce unclipped gradients")

    def check_same_config(self, config: dict) -> None:
        compare_configs(config, self.world_size, self.group)

    def set_grads(self, views: dict) -> None:
        """``p.grad`` = the reduced gradient's view (cast to the parameter's dtype where it differs)."""
        for p, g in views.items():
            p.grad = g if g.dtype == p.dtype else g.to(p.dtype)

    def broadcast_seed(self, seed: int) -> int:
        """Rank 0's ``seed`` on every rank (public randomness the ranks must share, e.g. mask choices)."""
        box = [seed]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return int(box[0])


def compare_configs(config: dict, world_size: int, group=None) -> None:
    """Raise on every rank if the ranks' DP configurations differ (one all_gather_object, at construction)."""
    configs: List[Optional[dict]] = [None] * world_size
    dist.all_gather_object(configs, config, group=group)
    for r, c in enumerate(configs):
        if c != configs[0]:
            diff = sorted(k for k in set(c) | set(configs[0]) if c.get(k) != configs[0].get(k))
            raise ValueError(f"the DP configuration differs between rank 0 and rank {r} in {diff}: "
                             f"{ {k: configs[0].get(k) for k in diff} } vs { {k: c.get(k) for k in diff} }. Every "
                             "rank must build its DPOptimizer with the same arguments (global expected batch size "
                             "and dataset size, noise, clipping) and the same trainable parameters.")


def data_parallel(model: nn.Module, distributed: Optional[bool] = None, engine=None):
    """The communication of a DP optimizer on ``model``: ``DataParallel`` for a DDP-wrapped model (DDP's gradient
    sync switched off), ``fastdp.fsdp.ShardedDataParallel`` for an FSDP2 model (``engine``'s taps then go on the
    all-gathered parameters), None for a single-process model; raises on what is not supported (module docstring)."""
    _refuse_sharded(model)
    ddps = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.parallel.DistributedDataParallel)]
    sharded = fsdp_modules(model)
    if sharded:
        if ddps:
            raise UnsupportedLayerError("a model with both DistributedDataParallel and FSDP2 (fully_shard) modules "
                                        "is not supported by fastdp")
        if distributed is False:
            raise ValueError("distributed=False with an FSDP2 (fully_shard) model: its parameters are sharded")
        taps = ShardedTaps(engine, model)
        engine.hooks.exclude_slots(taps.slots, taps.detach)
        _refuse_unmanaged_dtensors(model, taps)
        return ShardedDataParallel(model)
    if ddps and ddps[0][1] is not model:
        raise UnsupportedLayerError(
            f"module '{ddps[0][0]}' is a DistributedDataParallel inside the model: wrap the whole model in DDP and give "
            "that wrapper to fastdp (fastdp all-reduces the clipped sums of all parameters itself)")
    if not ddps:
        if distributed is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                f"torch.distributed runs {dist.get_world_size()} ranks but the model is not wrapped in "
                "DistributedDataParallel: each rank would train alone while the accountant counts the global sample "
                "rate. Wrap the model (DistributedDataParallel(model)) and give the wrapper to fastdp, or pass "
                "distributed=False to train independent single-process models on purpose.")
        return None
    if distributed is False:
        raise ValueError("distributed=False with a DistributedDataParallel model: give fastdp the inner module "
                         "(model.module) to train each rank alone")
    ddp = model
    _check_ddp(ddp)
    ddp.require_backward_grad_sync = False  # DDP's reducer never runs: fastdp reduces the clipped sums
    ddp.require_forward_param_sync = False
    return DataParallel(ddp)


def _check_ddp(ddp: nn.parallel.DistributedDataParallel) -> None:
    reasons = []
    if getattr(ddp, "static_graph", False):
        reasons.append("static_graph=True (its delayed all-reduce would reduce the parameters' gradients)")
    if getattr(ddp, "_delay_all_reduce_all_params", False):
        reasons.append("delay_all_reduce_named_params (it all-reduces the parameters' gradients after backward)")
    if getattr(ddp, "_use_python_reducer", False):
        reasons.append("the python reducer of a compiled DDP")
    if getattr(ddp, "mixed_precision", None) is not None:
        reasons.append("DDP's mixed_precision (use torch.autocast instead)")
    if reasons:
        raise UnsupportedLayerError("DistributedDataParallel with " + "; ".join(reasons) + " is not supported by fastdp")


def _refuse_sharded(model: nn.Module) -> None:
    """FSDP's first API (FullyShardedDataParallel) and nn.DataParallel: refused, naming the module."""
    fsdp1 = _fsdp1_type()
    for name, m in model.named_modules():
        what = None
        if fsdp1 is not None and isinstance(m, fsdp1):
            what = "is a FullyShardedDataParallel module"
        elif isinstance(m, nn.DataParallel):
            what = "is an nn.DataParallel (single-process multi-GPU replicas)"
        if what is not None:
            raise UnsupportedLayerError(
                f"module '{name or '<root>'}' {what}: fastdp does not support it (its sharded or replicated "
                "parameters would get gradients outside the DP engine). Use DistributedDataParallel or FSDP2's "
                "fully_shard, one process per device.")
    if not fsdp_modules(model):
        _refuse_unmanaged_dtensors(model, None)


def _refuse_unmanaged_dtensors(model: nn.Module, taps) -> None:
    """DTensor parameters that FSDP2 does not manage (tensor parallelism): refused."""
    managed = set() if taps is None else {id(owner._parameters[n]) for owner, n in taps.slots}
    for name, p in model.named_parameters():
        if type(getattr(p, "data", p)).__name__ == "DTensor" and id(p) not in managed:
            raise UnsupportedLayerError(f"parameter '{name}' is a DTensor not sharded by FSDP2's fully_shard (tensor "
                                        "or other parallelism): not supported by fastdp")


def _fsdp1_type():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return FullyShardedDataParallel


class PoissonShardSampler(DistributedUniformWithReplacementSampler):
    """Opacus' distributed Poisson sampler (each rank takes every ``world_size``-th sample of the epoch's shuffled
    order and includes each with probability ``sample_rate``), yielding every batch, empty ones included.

    Opacus' own ``__iter__`` skips a rank's empty batch: that rank would then run one step fewer than the others,
    and its collectives would pair with the others' next step (sums of different steps added together), or hang.
    """

    def __iter__(self) -> Iterator[List[int]]:
        if self.shuffle:
            order = torch.randperm(self.total_size, generator=torch.Generator().manual_seed(self.shuffle_seed + self.epoch))
        else:
            order = torch.arange(self.total_size)
        shard = order[self.rank:self.total_size:self.num_replicas]
        for _ in range(self.num_batches):
            keep = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield shard[keep].tolist()


def poisson_shard_loader(data_loader: DataLoader, sample_rate: float,
                         generator: Optional[torch.Generator] = None) -> DataLoader:
    """A loader over ``data_loader``'s dataset whose batches are this rank's Poisson sample at ``sample_rate`` (the
    global rate: the union of the ranks' batches is one Poisson sample of the whole dataset), with
    ``data_loader``'s collate function (empty batches keep the samples' shapes), workers and pinning.

    ``generator``: this rank's sampling generator; the ranks' generators must differ (seed them differently, or
    leave None for a fresh OS-entropy seed on each rank), else the ranks' inclusions would be correlated."""
    dataset = data_loader.dataset
    sampler = PoissonShardSampler(total_size=len(dataset), sample_rate=sample_rate, generator=generator)
    first = dataset[0]
    collate = wrap_collate_with_empty(collate_fn=data_loader.collate_fn,
                                      sample_empty_shapes=[(0, *_shape(x)) for x in first],
                                      dtypes=[_dtype(x) for x in first])
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=data_loader.num_workers,
                      pin_memory=data_loader.pin_memory, worker_init_fn=data_loader.worker_init_fn,
                      prefetch_factor=data_loader.prefetch_factor if data_loader.num_workers > 0 else None,
                      persistent_workers=data_loader.persistent_workers)


def _shape(x):
    return tuple(x.shape) if hasattr(x, "shape") else ()


def _dtype(x):
    return x.dtype if hasattr(x, "dtype") else type(x)
