"""DPTrainer's training data: Poisson-sampled logical batches, each collated as physical batches.

``EpochPoissonSampler`` draws each epoch's logical batches with opacus' ``UniformWithReplacementSampler`` (every
sample joins each batch independently with probability ``sample_rate``) from a generator seeded by
``(seed, epoch)``: a run resumed from a checkpoint redraws the batches it has already taken in the current epoch,
skips them, and continues with the ones the uninterrupted run would have drawn. The seed is secret (OS entropy by
default): whoever knows it knows which samples were in which batch.

With several processes (``world_size`` ranks) rank ``r`` owns the shard ``r, r + world_size, ...`` of the dataset (each
sample in exactly one shard) and includes each of its samples independently with the *global* rate, from its own
generator (seeded by ``(seed, epoch, rank)``): the union of the ranks' batches is one Poisson sample of the whole
dataset at that rate, as the accountant assumes. Every rank yields the same number of batches, empty ones included.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, List, Optional

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Sampler

from fastdp.virtual_batches import chunk_indices


def epoch_seed(seed: int, epoch: int, rank: Optional[int] = None) -> int:
    """A 63-bit seed for ``epoch``'s generator (of ``rank``'s shard when several ranks sample), derived from the
    run's secret ``seed`` by SHA-256."""
    key = f"fastdp.hf.poisson:{int(seed)}:{int(epoch)}" + ("" if rank is None else f":rank{int(rank)}")
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class EpochPoissonSampler(Sampler[List[int]]):
    """Batches of indices in ``range(num_samples)``, ``steps`` per epoch, each a Poisson sample at ``sample_rate``;
    with ``world_size > 1``, of rank ``rank``'s shard ``range(rank, num_samples, world_size)`` at that (global) rate."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"rank {rank} is not in range(world_size={world_size})")
        self.num_samples, self.sample_rate, self.steps, self.seed = num_samples, sample_rate, steps, seed
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, batches: int) -> None:
        """The next epoch iteration draws and drops its first ``batches`` batches (a resumed run)."""
        self._skip = int(batches)

    def __len__(self) -> int:
        return self.steps

    def shard(self) -> torch.Tensor:
        """[n] this rank's sample indices (all of them on one process)."""
        return torch.arange(self.rank, self.num_samples, self.world_size)

    def __iter__(self):
        if self.world_size == 1:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            batches = iter(UniformWithReplacementSampler(num_samples=self.num_samples, sample_rate=self.sample_rate,
                                                         generator=generator, steps=self.steps))
        else:
            batches = self._shard_batches()
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            next(batches)
        yield from batches

    def _shard_batches(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, self.rank))
        shard = self.shard()
        for _ in range(self.steps):
            yield shard[torch.rand(len(shard), generator=generator) < self.sample_rate].tolist()


class LogicalBatch:
    """One Poisson batch: ``physical`` holds its collated physical batches (at most ``max_physical_batch_size``
    samples each), ``num_samples`` its size. An empty Poisson batch holds one stand-in batch of one sample, whose
    loss the trainer multiplies by 0 (HF models cannot run a batch of 0 samples; the step then adds the noise alone)."""

    def __init__(self, physical: List[Any], num_samples: int):
        self.physical, self.num_samples = physical, num_samples

    def __repr__(self):
        return f"LogicalBatch({self.num_samples} samples in {len(self.physical)} physical batches)"


class LogicalCollator:
    """``collate_fn`` of the logical-batch loader: the features of one Poisson batch -> ``LogicalBatch``.

    ``collate`` is the Trainer's data collator; ``stand_in`` returns the collated one-sample batch used for an empty
    Poisson batch (``LogicalBatch``)."""

    def __init__(self, collate: Callable, max_physical_batch_size: int, stand_in: Callable[[], Any]):
        self.collate, self.max_size, self.stand_in = collate, max_physical_batch_size, stand_in

    def __call__(self, features: List[Any]) -> LogicalBatch:
        if not features:
            return LogicalBatch([self.stand_in()], 0)
        pieces = chunk_indices(list(range(len(features))), self.max_size)
        return LogicalBatch([self.collate([features[i] for i in piece]) for piece in pieces], len(features))


def collate_one(collate: Callable, example: Any):
    """``collate([example])``: the stand-in batch of an empty Poisson batch."""
    return collate([example])


class LogicalBatchLoader(DataLoader):
    """A DataLoader of ``LogicalBatch`` items whose epoch reaches its ``EpochPoissonSampler`` (``set_epoch``)."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)
