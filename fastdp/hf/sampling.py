"""DPTrainer's training data: Poisson-sampled logical batches, each collated as physical batches.

``EpochPoissonSampler`` draws each epoch's logical batches with opacus' ``UniformWithReplacementSampler`` (every
sample joins each batch independently with probability ``sample_rate``) from a generator seeded by
``(seed, epoch)``: a run resumed from a checkpoint redraws the batches it has already taken in the current epoch,
skips them, and continues with the ones the uninterrupted run would have drawn. The seed is secret (OS entropy by
default): whoever knows it knows which samples were in which batch.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, List

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Sampler

from fastdp.virtual_batches import chunk_indices


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for ``epoch``'s generator, derived from the run's secret ``seed`` by SHA-256."""
    digest = hashlib.sha256(f"fastdp.hf.poisson:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class EpochPoissonSampler(Sampler[List[int]]):
    """Batches of indices in ``range(num_samples)``, ``steps`` per epoch, each a Poisson sample at ``sample_rate``."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int, seed: int):
        self.num_samples, self.sample_rate, self.steps, self.seed = num_samples, sample_rate, steps, seed
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, batches: int) -> None:
        """The next epoch iteration draws and drops its first ``batches`` batches (a resumed run)."""
        self._skip = int(batches)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        batches = iter(UniformWithReplacementSampler(num_samples=self.num_samples, sample_rate=self.sample_rate,
                                                     generator=generator, steps=self.steps))
        skip, self._skip = self._skip, 0
        for _ in range(skip):
            next(batches)
        yield from batches


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
