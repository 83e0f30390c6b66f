"""Virtual batches: one Poisson-sampled (logical) batch run as several physical batches of at most N samples.

DP-SGD's guarantee is about the logical batch: it is Poisson-sampled, clipped sample by sample, noised once and
accounted once. Its size is random and can exceed what fits in memory, so it is run in pieces: ``DPOptimizer``
accumulates the clipped sums of several ``backward()`` calls before one ``step()`` (README, "What a step
computes"), and the pieces only have to be cut along sample boundaries.

    loader = fastdp.make_private(...)[2]                  # opacus' Poisson DPDataLoader
    for logical in VirtualBatches(loader, max_physical_batch_size=64):
        for x, y in logical:                              # each piece holds at most 64 samples
            F.cross_entropy(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()           # one step, one accountant step per Poisson batch

Opacus' own ``opacus.utils.batch_memory_manager.BatchMemoryManager`` also works with ``DPOptimizer`` unchanged
(it signals the pieces through ``DPOptimizer.signal_skip_step``). ``split_batch`` cuts a batch already in memory.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections import deque
from collections.abc import Mapping
from typing import Any, Iterator, List

import torch
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler, UniformWithReplacementSampler
from torch.utils.data import DataLoader, Sampler

POISSON_SAMPLERS = (UniformWithReplacementSampler, DistributedUniformWithReplacementSampler)


def _check_size(max_physical_batch_size) -> int:
    if not (isinstance(max_physical_batch_size, numbers.Integral) and not isinstance(max_physical_batch_size, bool)
            and max_physical_batch_size >= 1):
        raise ValueError(f"max_physical_batch_size must be an integer >= 1, got {max_physical_batch_size!r}")
    return int(max_physical_batch_size)


def chunk_indices(indices: List[int], max_size: int) -> List[List[int]]:
    """``indices`` cut into ``ceil(len / max_size)`` runs of nearly equal length, in order; ``[[]]`` when empty (an
    empty Poisson batch still makes one (empty) physical batch: its step adds the noise alone)."""
    n = len(indices)
    if n == 0:
        return [[]]
    parts = math.ceil(n / max_size)
    bounds = [round(k * n / parts) for k in range(parts + 1)]
    return [list(indices[bounds[k]:bounds[k + 1]]) for k in range(parts)]


class _SplittingSampler(Sampler[List[int]]):
    """Yields the pieces of each batch of ``batch_sampler``; ``last`` holds, in yield order, whether each piece ends
    its logical batch (the DataLoader returns batches in sampler order, so the flags line up with them)."""

    def __init__(self, batch_sampler, max_size: int):
        self.batch_sampler = batch_sampler
        self.max_size = max_size
        self.last: deque = deque()

    def __iter__(self):
        self.last.clear()
        for indices in self.batch_sampler:
            pieces = chunk_indices(list(indices), self.max_size)
            for k, piece in enumerate(pieces):
                self.last.append(k == len(pieces) - 1)
                yield piece

    def __len__(self):
        return len(self.batch_sampler)  # a lower bound: the number of logical batches


class PhysicalBatches:
    """Iterator over the physical batches of one logical (Poisson) batch, as the loader's ``collate_fn`` makes them."""

    def __init__(self, first, source: Iterator, last: deque):
        self._next, self._source, self._last = first, source, last
        self.exhausted = False
        self.num_physical = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.exhausted:
            raise StopIteration
        batch = self._next
        self.num_physical += 1
        if self._last.popleft():
            self.exhausted = True
            self._next = None
        else:
            self._next = next(self._source)
        return batch


class VirtualBatches:
    """Per Poisson batch of ``data_loader``, an iterator over its physical batches of at most
    ``max_physical_batch_size`` samples (``PhysicalBatches``); call ``optimizer.step()`` once after each.

    Args:
        data_loader: a DataLoader whose ``batch_sampler`` is opacus' Poisson sampler (``UniformWithReplacementSampler``
            or ``DistributedUniformWithReplacementSampler``), as ``fastdp.make_private`` and opacus' ``DPDataLoader``
            build it. Any other loader is refused: its batches are not Poisson samples, and the epsilon the
            accountant reports assumes they are.
        max_physical_batch_size: the most samples one forward/backward sees.

    Only the indices of a logical batch are drawn at once; each physical batch is loaded and collated on its own
    (with the loader's workers, ``collate_fn`` and pinning), so memory holds one physical batch at a time. Every
    physical batch of a logical batch must be consumed before the next logical batch is asked for: else a
    ``RuntimeError`` (the samples left over would be dropped from that step without the caller knowing).
    ``len()`` is the number of logical batches per epoch.
    """

    def __init__(self, data_loader: DataLoader, max_physical_batch_size: int):
        if not isinstance(data_loader, DataLoader):
            raise TypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
        if not isinstance(data_loader.batch_sampler, POISSON_SAMPLERS):
            raise TypeError(
                "VirtualBatches splits Poisson-sampled batches, but this DataLoader's batch_sampler is "
                f"{type(data_loader.batch_sampler).__name__}: its fixed-size batches are not what the accountant "
                "assumes. Build the loader with fastdp.make_private(...) or opacus.data_loader.DPDataLoader.")
        if getattr(data_loader, "in_order", True) is False:
            raise ValueError("data_loader has in_order=False: physical batches could arrive out of their logical "
                             "batch; use in_order=True")
        self.data_loader = data_loader
        self.max_physical_batch_size = _check_size(max_physical_batch_size)
        self._sampler = _SplittingSampler(data_loader.batch_sampler, self.max_physical_batch_size)
        dl = data_loader
        self._physical_loader = DataLoader(
            dl.dataset, batch_sampler=self._sampler, num_workers=dl.num_workers, collate_fn=dl.collate_fn,
            pin_memory=dl.pin_memory, timeout=dl.timeout, worker_init_fn=dl.worker_init_fn,
            multiprocessing_context=dl.multiprocessing_context, generator=dl.generator,
            prefetch_factor=dl.prefetch_factor, persistent_workers=dl.persistent_workers)

    def __len__(self):
        return len(self.data_loader.batch_sampler)

    def __iter__(self) -> Iterator[PhysicalBatches]:
        source = iter(self._physical_loader)
        while True:
            try:
                first = next(source)
            except StopIteration:
                return
            logical = PhysicalBatches(first, source, self._sampler.last)
            yield logical
            if not logical.exhausted:
                raise RuntimeError(
                    f"the physical batches of a logical batch were not all used (stopped after "
                    f"{logical.num_physical}): iterate over every physical batch, run backward on each, then call "
                    "optimizer.step() before asking for the next logical batch")


def split_batch(batch: Any, max_physical_batch_size: int) -> List[Any]:
    """A collated batch already in memory cut along dim 0 into pieces of at most ``max_physical_batch_size`` samples.

    ``batch`` is a tensor whose dim 0 is the sample dim, or a tuple / list / mapping (``dict``, HF ``BatchEncoding``)
    / dataclass of such tensors with one common dim-0 size; other leaves (strings, numbers, None) are repeated in
    every piece. Pieces are views, in order; an empty batch gives ``[batch]`` (one empty physical batch).
    """
    size = _check_size(max_physical_batch_size)
    sizes = leading_sizes(batch)
    if len(sizes) != 1:
        raise ValueError("split_batch needs at least one tensor and one common leading (sample) size over all tensors "
                         f"of the batch, got leading sizes {sorted(sizes)}")
    (n,) = sizes
    return [take_samples(batch, slice(piece[0], piece[-1] + 1)) if piece else take_samples(batch, slice(0, 0))
            for piece in chunk_indices(list(range(n)), size)]


def leading_sizes(batch: Any) -> set:
    """The set of dim-0 sizes of the tensors in ``batch`` (a tensor, or a tuple / list / mapping / dataclass of them)."""
    out: set = set()
    _leading_sizes(batch, out)
    return out


def _leading_sizes(x, out: set) -> None:
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise ValueError("split_batch: a 0-dim tensor has no sample dim")
        out.add(x.shape[0])
    elif isinstance(x, Mapping):
        for v in x.values():
            _leading_sizes(v, out)
    elif isinstance(x, (tuple, list)):
        for v in x:
            _leading_sizes(v, out)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            _leading_sizes(getattr(x, f.name), out)


def take_samples(x, sl: slice):
    """``x`` (a tensor, or a tuple / list / mapping / dataclass of them) with every tensor indexed by ``sl`` along dim 0."""
    if isinstance(x, torch.Tensor):
        return x[sl]
    if isinstance(x, Mapping):
        return type(x)({k: take_samples(v, sl) for k, v in x.items()})
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(take_samples(v, sl) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(take_samples(v, sl) for v in x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: take_samples(getattr(x, f.name), sl) for f in dataclasses.fields(x)
                                         if f.init})
    return x
