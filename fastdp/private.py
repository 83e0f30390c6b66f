"""``make_private``: Opacus' ``PrivacyEngine.make_private`` names, returning fastdp objects.

The model is returned as is (hooks attached, no wrapper class), the optimizer as a
``DPOptimizer``, and the data loader as opacus' Poisson-sampling ``DPDataLoader``.
"""
from __future__ import annotations

import math
import numbers
import secrets
import warnings
from typing import Optional, Sequence, Union

import torch
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader

from fastdp.distributed import poisson_shard_loader
from fastdp.fsdp import fsdp_modules
from fastdp.optimizer import DPOptimizer


def make_private(*, module: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader,
                 max_grad_norm: Union[float, Sequence[float], dict], noise_multiplier: Optional[float] = None,
                 target_epsilon: Optional[float] = None, target_delta: Optional[float] = None,
                 epochs: Optional[float] = None, loss_reduction: str = "mean", poisson_sampling: bool = True,
                 clipping: str = "flat", accountant: str = "prv", noise_generator: Optional[torch.Generator] = None,
                 secure_mode: bool = False, sample_generator: Optional[torch.Generator] = None,
                 batch_first: bool = True, criterion=None, grad_sample_mode: Optional[str] = None,
                 optimizer_class: type = DPOptimizer, **kwargs):
    """Make ``module``, ``optimizer`` and ``data_loader`` differentially private.

    Returns:
        ``(module, optimizer, data_loader)``: the same module with hooks attached, a ``DPOptimizer``
        and a Poisson-sampling loader with expected batch size ``data_loader.batch_size``.

    ``noise_multiplier`` or ``target_epsilon`` + ``target_delta`` + ``epochs`` must be given.
    Extra keyword arguments go to ``optimizer_class`` (``DPOptimizer`` or a method such as ``fastdp.SPARTA``;
    e.g. ``gamma`` for automatic clipping, ``sparsity`` for SPARTA). A method's epochs are ``len(data_loader)``
    steps (its ``steps_per_epoch``, unless given).
    Opacus-only arguments are accepted so existing calls run: ``criterion`` and ``grad_sample_mode`` are
    not needed (fastdp has one exact engine and leaves the loss untouched; the return value is always the
    3-tuple). ``batch_first=False`` is for sequence-first models (inputs [T, B, ...]), as in Opacus: it goes to
    ``DPOptimizer``.

    Distributed (``module`` wrapped in ``DistributedDataParallel`` or sharded with FSDP2's ``fully_shard``, one
    process per rank): each rank's loader is
    its Poisson sample of its shard of the dataset (``fastdp.distributed.poisson_shard_loader``, opacus' distributed
    sampler) at the global rate ``1 / len(data_loader)``, and the optimizer gets the GLOBAL expected batch size
    (``rate x len(dataset)``, all ranks together) and the whole dataset's size: call ``make_private`` on every rank
    with the same arguments. Pass a plain ``DataLoader`` over the whole dataset (no ``DistributedSampler``: the
    sampler splits the dataset itself); ``data_loader.batch_size`` is then the global expected batch.
    ``sample_generator``, if given, must differ between ranks.

    Randomness: without ``sample_generator`` the Poisson sampler gets its own generator seeded from OS entropy, not
    torch's default one (Opacus' choice), whose state the public initial weights reveal (Mersenne Twister is
    predictable from its outputs). Pass ``sample_generator`` and ``noise_generator`` for reproducible runs: seed them
    with distinct secret seeds (one seed for both would tie the noise to the batch membership on the CPU).
    Without ``noise_generator`` (and ``secure_mode``) the noise comes from torch's default generator, as in Opacus.
    """
    del criterion, grad_sample_mode  # accepted for Opacus compatibility; nothing to configure
    if not isinstance(data_loader, DataLoader):
        raise TypeError("data_loader must be a torch DataLoader")
    sample_size = len(data_loader.dataset)
    batch_size = data_loader.batch_size or getattr(data_loader.batch_sampler, "batch_size", None)
    if batch_size is None:
        raise ValueError("cannot infer the batch size from data_loader; give it a batch_size")
    if poisson_sampling:
        if sample_generator is None:  # not torch's default generator: it initialised the (public) model
            sample_generator = torch.Generator().manual_seed(secrets.randbits(62))
        if isinstance(module, nn.parallel.DistributedDataParallel) or fsdp_modules(module):  # DDP / FSDP2: this
            # rank's Poisson sample of its shard of the data
            sample_rate = 1 / len(data_loader)
            dp_loader = poisson_shard_loader(data_loader, sample_rate, generator=sample_generator)
        else:
            dp_loader = DPDataLoader.from_data_loader(data_loader, generator=sample_generator)
            sample_rate = dp_loader.sample_rate
    else:
        warnings.warn("poisson_sampling=False: the accountant assumes Poisson sampling, so the reported epsilon "
                      "is not a proven guarantee for fixed-size shuffled batches", UserWarning, stacklevel=2)
        dp_loader = data_loader
        sample_rate = 1 / len(data_loader)
    expected_batch_size = max(1, int(round(sample_rate * sample_size)))
    if target_epsilon is not None and epochs is None:
        raise ValueError("target_epsilon needs epochs")
    if epochs is not None:
        if not (isinstance(epochs, numbers.Real) and not isinstance(epochs, bool) and math.isfinite(epochs)
                and epochs > 0):
            raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}")
        if target_epsilon is not None and int(epochs * len(data_loader)) < 1:
            raise ValueError(f"epochs={epochs!r} of {len(data_loader)} steps each is "
                             f"{epochs * len(data_loader):.3g} steps: at least one step is needed")
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, DPOptimizer)):
        raise TypeError("optimizer_class must be DPOptimizer or a subclass (a fastdp method)")
    if getattr(optimizer_class, "needs_epochs", False):
        kwargs.setdefault("epochs", epochs)  # e.g. random sparsification's cooling schedule
    if getattr(optimizer_class, "takes_steps_per_epoch", False):
        kwargs.setdefault("steps_per_epoch", len(dp_loader))  # the methods' epochs are the loader's epochs
    dp_opt = optimizer_class(
        module, optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size, sample_size=sample_size, target_epsilon=target_epsilon,
        target_delta=target_delta, steps=int(epochs * len(data_loader)) if target_epsilon is not None else None,
        loss_reduction=loss_reduction, accountant=accountant, generator=noise_generator, secure_mode=secure_mode,
        clipping=clipping, sample_rate=sample_rate, batch_first=batch_first, **kwargs)
    return module, dp_opt, dp_loader
