"""The audited training runs: the DP optimizer of each method, the Poisson-sampled loop, and the two threat models'
canary scores (white-box Dirac gradient canaries, ``fastdp.audit.canaries``; black-box input canaries).

Sampling: every non-canary sample and every included canary joins each step's batch independently with probability
``sample_rate = expected_batch_size / (n + m)`` (n data, m canaries: the dataset size counts every canary, included
or not; the accountant only sees the rate). ``steps_per_epoch = round(1 / sample_rate)``.

Data-parallel (white-box, a ``DistributedDataParallel`` model, ``rank`` of ``world``): every rank draws the same
global Poisson batch (the batch generator is seeded alike on every rank) and trains the samples ``rank::world`` of
it, so the ranks' shards partition one Poisson sample of the data at ``sample_rate``, the rate the accountant counts.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from fastdp.audit.canaries import CanaryHook, DiracCanaries
from fastdp.methods import SPARTA, AdaDPIGU, BiTFiT, LastLayer, RandomGroups, RandomSparsification
from fastdp.micro_adam import DPMicroAdam
from fastdp.optimizer import DPOptimizer

METHODS = ("dpsgd", "per-layer", "sparta", "rs", "adadpigu", "bitfit", "last-layer", "random-groups", "dpmicroadam")
METHOD_DEFAULTS: Dict[str, dict] = {
    "sparta": {"sparsity": 0.2, "warmup_epochs": 0},
    "rs": {"final_rate": 0.9},
    "adadpigu": {"retention": 0.6, "pretrain_epochs": 1},
    "random-groups": {"sparsity": 0.2},
}
DEFAULT_LR = {"dpmicroadam": 1e-3}  # SGD-based methods: 0.1


def derived_generator(seed: Optional[int], stream: str) -> torch.Generator:
    """A CPU generator for one random stream of the audit: from SHA-256 of (seed, stream), or OS entropy if
    ``seed`` is None."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{stream}".encode()).digest()[:8], "little"))
    return g


def make_optimizer(method: str, model: nn.Module, *, lr: Optional[float], epochs: int, method_kwargs: dict,
                   **dp) -> DPOptimizer:
    """The DP optimizer of ``method`` on ``model`` (SGD for all but DP-MicroAdam), ``dp``: DPOptimizer's arguments."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    kw = {**METHOD_DEFAULTS.get(method, {}), **method_kwargs}
    lr = DEFAULT_LR.get(method, 0.1) if lr is None else lr
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    phased = {"sparta": SPARTA, "adadpigu": AdaDPIGU, "bitfit": BiTFiT, "last-layer": LastLayer,
              "random-groups": RandomGroups}
    if method in ("dpsgd", "per-layer", "dpmicroadam"):
        dp.pop("steps_per_epoch", None)  # no epochs in these optimizers
    if method == "dpsgd":
        return DPOptimizer(model, sgd, **dp, **kw)
    if method == "per-layer":
        n = sum(1 for p in model.parameters() if p.requires_grad)
        r = float(dp.pop("max_grad_norm"))
        return DPOptimizer(model, sgd, clipping="per_layer", max_grad_norm=[r / math.sqrt(n)] * n, **dp, **kw)
    if method == "rs":
        return RandomSparsification(model, sgd, epochs=epochs, **dp, **kw)
    if method == "dpmicroadam":
        return DPMicroAdam(model, lr=lr, **dp, **kw)
    if method == "sparta" and epochs < kw["warmup_epochs"] + 2:
        raise ValueError(f"sparta needs epochs >= warmup_epochs + 2 = {kw['warmup_epochs'] + 2} to reach its sparse "
                         f"phase, got epochs={epochs}")
    if method == "adadpigu" and epochs < kw["pretrain_epochs"] + 1:
        raise ValueError(f"adadpigu needs epochs >= pretrain_epochs + 1 = {kw['pretrain_epochs'] + 1} to reach its "
                         f"sparse phase, got epochs={epochs}")
    return phased[method](model, sgd, **dp, **kw)


def stack_dataset(train_set) -> Tuple[torch.Tensor, torch.Tensor]:
    """All ``(x, y)`` of a map-style dataset as two tensors ([n, ...], [n])."""
    n = len(train_set)
    if n == 0:
        raise ValueError("train_set is empty")
    xs, ys = zip(*(train_set[i] for i in range(n)))
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor([int(y) for y in ys], dtype=torch.long)


def sum_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the batch (an empty batch gives 0, not NaN)."""
    return F.cross_entropy(logits, y, reduction="sum")


def train_white_box(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, method: str, m: int, steps: int,
                    steps_per_epoch: int, sample_rate: float, expected_batch_size: int, noise_multiplier: float,
                    max_grad_norm: float, lr: Optional[float], epochs: int, method_kwargs: dict, seed: Optional[int],
                    subtract_data: bool = True, accountant: str = "prv", loss_fn: Callable = sum_loss,
                    rank: int = 0, world: int = 1) -> Tuple[DPOptimizer, DiracCanaries, CanaryHook]:
    """Train ``model`` on ``(x, y)`` with m Dirac canaries for ``steps`` steps; returns the optimizer (its
    accountant), the canaries and the hook holding their scores. ``world > 1``: ``model`` is a
    ``DistributedDataParallel`` wrapper and this process is rank ``rank``: it trains its shard of each batch
    (module docstring); the canaries are named after the wrapped module's parameters."""
    named = model.module if world > 1 else model
    canaries = DiracCanaries(named, m, derived_generator(seed, "canaries"))
    n = x.shape[0]
    opt = make_optimizer(method, model, lr=lr, epochs=epochs, method_kwargs=method_kwargs,
                         noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, sample_size=n + m, sample_rate=sample_rate,
                         steps_per_epoch=steps_per_epoch, loss_reduction="sum", accountant=accountant,
                         generator=derived_generator(seed, "noise"))
    hook = CanaryHook(opt, canaries, sample_rate=sample_rate, generator=derived_generator(seed, "canary-batches"),
                      subtract_data=subtract_data).install()
    batches = derived_generator(seed, "data-batches")
    try:
        for _ in range(steps):
            if subtract_data and sample_rate < 1.0 and getattr(opt, "phase", None) != "selection":
                opt.zero_grad()  # the auditor's recomputation at the released iterate: nothing is released
                loss_fn(model(x[rank::world]), y[rank::world]).backward()  # this rank's shard of the data
                hook.set_data_baseline(opt.engine.buffer)  # (summed over the ranks)
            opt.zero_grad()
            take = (torch.rand(n, generator=batches) < sample_rate).nonzero().flatten()[rank::world]
            loss_fn(model(x[take]), y[take]).backward()
            opt.step()
        opt.zero_grad()
    finally:
        opt.detach()
    return opt, canaries, hook


def train_black_box(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, method: str, m: int, steps: int,
                    steps_per_epoch: int, sample_rate: float, expected_batch_size: int, noise_multiplier: float,
                    max_grad_norm: float, lr: Optional[float], epochs: int, method_kwargs: dict, seed: Optional[int],
                    accountant: str = "prv", loss_fn: Callable = sum_loss):
    """Input canaries: m samples of ``(x, y)`` drawn at random and relabelled to a random other class, each in the
    training set with probability 1/2; score = the canary's loss before training minus after. Returns
    (optimizer, scores [m], included [m])."""
    gen = derived_generator(seed, "canaries")
    n = x.shape[0]
    if not 2 <= m < n:
        raise ValueError(f"black-box canaries are drawn from train_set: need 2 <= canaries < {n}, got {m}")
    classes = int(y.max()) + 1
    if classes < 2:
        raise ValueError("black-box canaries are relabelled to another class: train_set needs >= 2 classes")
    perm = torch.randperm(n, generator=gen)
    cx, cidx, rest = x[perm[:m]], perm[:m], perm[m:]
    cy = (y[cidx] + torch.randint(1, classes, (m,), generator=gen)) % classes
    included = torch.rand(m, generator=gen) < 0.5
    tx, ty = torch.cat([x[rest], cx[included]]), torch.cat([y[rest], cy[included]])
    with torch.no_grad():
        before = F.cross_entropy(model(cx), cy, reduction="none").double()
    opt = make_optimizer(method, model, lr=lr, epochs=epochs, method_kwargs=method_kwargs,
                         noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                         expected_batch_size=expected_batch_size, sample_size=n, sample_rate=sample_rate,
                         steps_per_epoch=steps_per_epoch, loss_reduction="sum", accountant=accountant,
                         generator=derived_generator(seed, "noise"))
    batches = derived_generator(seed, "data-batches")
    try:
        for _ in range(steps):
            opt.zero_grad()
            take = torch.rand(tx.shape[0], generator=batches) < sample_rate
            loss_fn(model(tx[take]), ty[take]).backward()
            opt.step()
        opt.zero_grad()
    finally:
        opt.detach()
    with torch.no_grad():
        after = F.cross_entropy(model(cx), cy, reduction="none").double()
    return opt, before - after, included
