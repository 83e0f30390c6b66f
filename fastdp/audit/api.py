"""``fastdp.audit``: train once with canaries and bound epsilon from below (the one-run audit of Steinke, Nasr and
Jagielski 2023); ``multi_run_audit``: the classic audit over many runs of one canary each.

A correct implementation gives ``eps_lower <= epsilon`` (up to the 1 - confidence chance of a false alarm);
``eps_lower`` far above the claimed epsilon means the released gradients reveal more than the accountant says
(noise missing on some coordinates, noise too small, ...).

Under ``torch.distributed`` the white-box one-run audit runs data-parallel (``audit``'s ``distributed``): every
rank calls it alike and gets the same result; the black-box threat and ``multi_run_audit`` are refused there.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from fastdp.accounting import get_noise_multiplier
from fastdp.audit.multi_run import MultiRunBound, multi_run_bound
from fastdp.audit.one_run import AuditBound, audit_scores
from fastdp.audit.training import METHODS, derived_generator, stack_dataset, train_black_box, train_white_box

THREATS = ("white-box-gradient", "black-box-loss")


@dataclass
class AuditResult:
    """What one audit found. ``eps_lower``: the bound at ``confidence``; ``epsilon``: the accountant's epsilon for the
    same run at ``delta`` (canaries counted in the dataset size); ``scores`` / ``included`` [m]: each canary's score
    and whether it was in the training set; ``statistic`` [m]: what the guesses rank (white-box: each canary's
    log-likelihood ratio from its score, ``CanaryHook.statistic``; black-box: the score); ``candidates`` [m]: the
    canaries guessed on (white-box: those whose coordinate was released at least once; the others abstained on);
    ``max_unreleased``: white-box, the largest |noisy sum| read outside the mask (0 when nothing unreleased leaks);
    ``participations`` [m]: white-box, the steps in which each canary was in the batch with its coordinate
    trained. ``world_size``: the ranks that trained the run data-parallel (1: a single process)."""

    eps_lower: float
    epsilon: float
    delta: float
    confidence: float
    method: str
    threat: str
    canaries: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    expected_batch_size: int
    max_grad_norm: float
    bound: AuditBound
    scores: torch.Tensor
    included: torch.Tensor
    candidates: torch.Tensor
    max_unreleased: Optional[float] = None
    participations: Optional[torch.Tensor] = None
    statistic: Optional[torch.Tensor] = None
    seconds: float = 0.0
    command: str = ""
    coordinates: Optional[List[tuple]] = field(default=None, repr=False)
    world_size: int = 1

    def report(self) -> str:
        """A plain-text report (``fastdp.audit.report.text_report``)."""
        from fastdp.audit.report import text_report
        return text_report(self)

    def to_dict(self) -> dict:
        from fastdp.audit.report import result_dict
        return result_dict(self)


@contextlib.contextmanager
def _quiet_rate_one():
    """Opacus' PRV evaluates log(1 - q), which numpy warns about at sample rate 1 (harmless: that branch is unused)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning)
        yield


def _multi_rank() -> int:
    """The world size of an initialised ``torch.distributed`` default group (1 when there is none)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _check_no_ddp(what: str) -> None:
    """Refuse ``what`` under a process group of several ranks (only the white-box one-run audit runs data-parallel)."""
    world = _multi_rank()
    if world > 1:
        raise NotImplementedError(
            f"{what} under torch.distributed (world size {world}) is not supported: only the white-box one-run audit "
            "(fastdp.audit, threat='white-box-gradient') runs data-parallel. Run it in a single process.")


def _data_parallel_setup(distributed: Optional[bool], threat: str, seed: Optional[int]):
    """``(rank, world, seed)`` of the audit: ``world > 1`` when it runs data-parallel (``audit``'s docstring);
    ``seed``: the caller's, or under DDP rank 0's draw when None (every rank must draw the same canaries)."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = _multi_rank() > 1
    if not distributed:
        if _multi_rank() > 1:
            raise NotImplementedError(
                f"distributed=False under torch.distributed (world size {_multi_rank()}) is not supported: the audit "
                "would run once per rank. Leave distributed=None to audit the ranks' DDP training together, or run "
                "the audit in a single process.")
        return 0, 1, seed
    if not initialised:
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group "
                           "(fastdp.distributed.init_process_group)")
    if threat != "white-box-gradient":
        raise NotImplementedError(f"threat {threat!r} under DistributedDataParallel is not supported: the black-box "
                                  "audit runs in a single process; under DDP only threat='white-box-gradient'")
    box = [seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 2]
    dist.broadcast_object_list(box, src=0)
    return dist.get_rank(), dist.get_world_size(), int(box[0])


def _wrap_ddp(model: nn.Module) -> nn.Module:
    """``model`` inside ``DistributedDataParallel`` (a DDP model is taken as it is); FSDP2 models are refused."""
    from fastdp.fsdp import fsdp_modules
    if fsdp_modules(model):
        raise NotImplementedError("fastdp.audit of an FSDP2 (fully_shard) model is not supported: the Dirac canaries "
                                  "index full parameters; audit under DistributedDataParallel or in one process")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    return nn.parallel.DistributedDataParallel(model)


def audit(model_fn: Callable[[], nn.Module], train_set, *, canaries: int = 1000,
          threat: str = "white-box-gradient", method: str = "dpsgd", epochs: int = 1,
          expected_batch_size: Optional[int] = None, noise_multiplier: Optional[float] = None,
          target_epsilon: Optional[float] = None, max_grad_norm: float = 1.0, delta: float = 1e-5,
          confidence: float = 0.95, seed: Optional[int] = None, lr: Optional[float] = None,
          guesses: Union[None, int, Sequence[int]] = None, method_kwargs: Optional[dict] = None,
          subtract_data: bool = True, accountant: str = "prv", command: str = "",
          distributed: Optional[bool] = None) -> AuditResult:
    """One-run privacy audit of ``method`` training ``model_fn()`` on ``train_set``.

    Args:
        model_fn: returns a fresh ``nn.Module`` (classifier: logits [B, classes]).
        train_set: map-style dataset of ``(x, y)`` (y an int class).
        canaries: m. White-box: Dirac gradient canaries, each on its own trainable coordinate (m <= the model's
            trainable coordinates); black-box: m samples of ``train_set`` relabelled at random (m < len(train_set)).
        threat: "white-box-gradient" (scores from every step's released noisy gradient, ``fastdp.audit.canaries``)
            or "black-box-loss" (score: the canary's loss before training minus after).
        method: one of ``fastdp.audit.training.METHODS`` (sparse methods with defaults that reach their sparse
            phase; ``method_kwargs`` overrides them).
        epochs: passes over the n + m samples (steps = epochs * round(1 / sample_rate)).
        expected_batch_size: B; the sample rate is B / (n + m). Default n + m: every sample and every included
            canary in every step (the paper's "canary in every step" setting, accounted at sample rate 1).
        noise_multiplier / target_epsilon: sigma, or the epsilon to calibrate sigma to over the run (one of them).
        max_grad_norm: R (per-layer: R / sqrt(k) for each of the k trainable tensors).
        delta, confidence: of both the claim and the bound.
        seed: derives every random stream (canaries, inclusion, batches, noise, model init); None: OS entropy.
        guesses: k, or candidate k's (Bonferroni-corrected); default ``fastdp.audit.one_run.guess_counts``.
        subtract_data: white-box: subtract the non-canary data's expected clipped sum from each step's score.
        distributed: None (default): data-parallel when ``torch.distributed`` is initialised with several ranks;
            True: data-parallel (an initialised process group needed); False: single-process (refused under
            several ranks). Data-parallel (white-box only): every rank calls ``audit`` with the same arguments and
            data; the audit wraps ``model_fn()`` in ``DistributedDataParallel`` (a DDP model is taken as it is;
            FSDP2 refused), every rank draws the same global Poisson batches and trains the samples ``rank::world``
            of each (``expected_batch_size`` and the sample rate are global), the canaries enter rank 0's clipped
            sum once per step before the all-reduce, and the data baseline is the sum over the ranks
            (``fastdp.audit.canaries``). Every rank returns the same result (seed None: rank 0's draw).

    Returns:
        ``AuditResult`` (``.eps_lower``, ``.epsilon``, ``.report()``).
    """
    start = time.perf_counter()
    if threat not in THREATS:
        raise ValueError(f"threat must be one of {THREATS}, got {threat!r}")
    rank, world, seed = _data_parallel_setup(distributed, threat, seed)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier and target_epsilon")
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    x, y = stack_dataset(train_set)
    n, m = x.shape[0], int(canaries)
    size = n + m if threat == "white-box-gradient" else n  # black-box canaries are drawn from train_set
    batch = size if expected_batch_size is None else int(expected_batch_size)
    if not 1 <= batch <= size:
        raise ValueError(f"expected_batch_size must be in [1, {size}] (the data plus the canaries), got {batch}")
    rate = batch / size
    steps_per_epoch = max(1, round(1 / rate))
    steps = epochs * steps_per_epoch
    with _quiet_rate_one():
        sigma = noise_multiplier if noise_multiplier is not None else get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate, steps=steps, accountant=accountant)
    with torch.random.fork_rng():
        torch.manual_seed(derived_generator(seed, "model").initial_seed())
        model = model_fn()
    if world > 1:
        _same_on_every_rank(x, y, canaries=m, threat=threat, method=method, epochs=epochs, batch=batch,
                            sigma=float(sigma), max_grad_norm=max_grad_norm, delta=delta, confidence=confidence,
                            seed=seed, guesses=guesses, method_kwargs=method_kwargs, subtract_data=subtract_data,
                            accountant=accountant)
        model = _wrap_ddp(model)
    common = dict(method=method, m=m, steps=steps, steps_per_epoch=steps_per_epoch, sample_rate=rate,
                  expected_batch_size=batch, noise_multiplier=float(sigma), max_grad_norm=max_grad_norm, lr=lr,
                  epochs=epochs, method_kwargs=dict(method_kwargs or {}), seed=seed, accountant=accountant)
    ties = derived_generator(seed, "ties")
    if threat == "white-box-gradient":
        opt, dirac, hook = train_white_box(model, x, y, subtract_data=subtract_data, rank=rank, world=world,
                                           **common)
        scores, included, candidates = hook.scores, dirac.included, hook.exposed > 0
        statistic = hook.statistic()
        unreleased, coords, joined = hook.max_unreleased, dirac.coordinates(), hook.participations
    else:
        opt, scores, included = train_black_box(model, x, y, **common)
        statistic = scores
        candidates, unreleased, coords, joined = torch.ones(m, dtype=torch.bool), None, None, None
    if int(candidates.sum()) >= 2:
        bound = audit_scores(statistic, included, delta=delta, confidence=confidence, guesses=guesses,
                             candidates=candidates, generator=ties)
    else:  # nothing released about (almost) any canary: nothing to guess
        bound = AuditBound(0.0, 0, 0, 0, m, int(candidates.sum()), delta, confidence, ())
    with _quiet_rate_one():
        epsilon = opt.epsilon(delta) if opt.noise_multiplier > 0 else math.inf
    return AuditResult(eps_lower=bound.eps_lower, epsilon=epsilon, delta=delta, confidence=confidence, method=method,
                       threat=threat, canaries=m, noise_multiplier=float(sigma), sample_rate=rate, steps=steps,
                       expected_batch_size=batch, max_grad_norm=max_grad_norm, bound=bound, scores=scores,
                       included=included, candidates=candidates, max_unreleased=unreleased, participations=joined,
                       statistic=statistic, seconds=time.perf_counter() - start, command=command, coordinates=coords,
                       world_size=world)


def _same_on_every_rank(x: torch.Tensor, y: torch.Tensor, **config) -> None:
    """Raise on every rank if the ranks audit different data or arguments (one all_gather_object)."""
    from fastdp.distributed import compare_configs
    config = {k: repr(v) for k, v in config.items()}
    config["data"] = repr((tuple(x.shape), float(x.double().sum()), float((x.double() ** 2).sum()), y.tolist()))
    compare_configs(config, torch.distributed.get_world_size())


def multi_run_audit(model_fn: Callable[[], nn.Module], train_set, *, runs: int = 100, method: str = "dpsgd",
                    epochs: int = 1, noise_multiplier: float, max_grad_norm: float = 1.0, delta: float = 1e-5,
                    confidence: float = 0.95, seed: Optional[int] = None, lr: Optional[float] = None,
                    method_kwargs: Optional[dict] = None, accountant: str = "prv") -> MultiRunBound:
    """The classic audit, white-box, at sample rate 1: ``runs`` trainings of ``model_fn()`` on ``train_set`` for
    ``epochs`` steps, each with two Dirac canaries of which the first is scored (one independent trial per run; the
    second only satisfies ``DiracCanaries``' m >= 2), in the training set with probability 1/2 per run;
    Clopper-Pearson bounds on a threshold attack's error rates (``fastdp.audit.multi_run``). Its ``eps_lower`` is
    to be compared with ``fastdp.get_epsilon(noise_multiplier=..., sample_rate=1.0, steps=epochs, delta=...)``.
    Meant for small models: it costs ``runs`` trainings. Refused under torch.distributed with several ranks."""
    _check_no_ddp("fastdp.audit.multi_run_audit")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    x, y = stack_dataset(train_set)
    scores, included = [], []
    for k in range(runs):
        run_seed = None if seed is None else seed * 1_000_003 + k
        with torch.random.fork_rng():
            torch.manual_seed(derived_generator(run_seed, "model").initial_seed())
            model = model_fn()
        _, dirac, hook = train_white_box(model, x, y, method=method, m=2, steps=epochs, steps_per_epoch=1,
                                         sample_rate=1.0, expected_batch_size=x.shape[0] + 2,
                                         noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, lr=lr,
                                         epochs=epochs, method_kwargs=dict(method_kwargs or {}), seed=run_seed,
                                         accountant=accountant)
        scores.append(float(hook.scores[0]))
        included.append(bool(dirac.included[0]))
    return multi_run_bound(torch.tensor(scores), torch.tensor(included), delta=delta, confidence=confidence)
