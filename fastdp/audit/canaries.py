"""White-box Dirac gradient canaries (the white-box setting of Steinke, Nasr and Jagielski 2023), inserted into a
``DPOptimizer``'s clipped sum as extra samples. This is an audit-only code path: nothing here is used in training.

Canary c owns one coordinate j_c of one trainable parameter (distinct coordinates, drawn uniformly at random from
all coordinates that are trainable when the model is built). Its clipped gradient is exactly ``R_c e_{j_c}``: R_c
is the clipping threshold of its parameter (``max_grad_norm`` for flat and automatic clipping, that tensor's R_k for
per-layer clipping), so it is a sample clipped exactly to the bound. Each canary is "included" with probability 1/2,
once, before training; at every step each included canary joins the batch with probability ``sample_rate``, like
any sample of the Poisson batch, and the dataset size given to the optimizer counts all m canaries (so its
accountant's epsilon covers the run: the canaries only ever enter as samples).

A canary goes through what a sample goes through, in the order the engine applies it:

* its parameter is frozen at that step (BiTFiT, LastLayer, SPARTA's warm-up...): it contributes nothing;
* a method's mask leaves j_c out (masks act before clipping): it contributes nothing;
* a standardising mask (AdaDPIGU): the clipped sum lives in standardised space, and so does the canary.

Insertion: ``CanaryHook.install(optimizer)`` wraps that instance's ``clipped_sums`` (the flat buffer of
``sum_i c_i g_i`` before noise) to add the step's canaries, and its ``release`` to read the release back. Nothing
else of the optimizer changes: noise, scaling, the fused SGD kernel and each method's own release run as usual.
A release that is not a gradient (SPARTA's selection epoch releases row scores) never calls ``clipped_sums``: the
canaries take no part in it and score nothing there (a weaker attack, still a valid lower bound).

Score: per step, ``B * p.grad[j_c]`` (B the optimizer's expected batch size: the noisy clipped sum), on the mask
mapped back from standardised space with the step's public centre and scale, minus the expected clipped sum of the
non-canary data at that coordinate (the auditor knows those data and the public initial model, so it can
recompute it at each released iterate: with ``sample_rate = 1`` it is the batch's own clipped sum, read from the
buffer before the canaries enter; below 1, ``sample_rate`` times the clipped sum of the whole non-canary dataset,
from one extra pass per step), divided by R_c, summed over steps. Off the mask the release itself is read: it must
be exactly 0 (``max_unreleased`` records the largest magnitude found there).

Data-parallel training (a ``DPOptimizer`` over a ``DistributedDataParallel`` model, ``optimizer.comm`` set; see
``fastdp.distributed``): every rank clips its own shard of the batch, rank 0 adds the noise to its local clipped sum,
then one all-reduce sums the ranks' sums. The canaries enter once per step, into rank 0's local clipped sum before
that all-reduce (the reduced release carries each joining canary once, whatever the world size). Rank 0 is fixed
by the audit, not read from ``comm.adds_noise``: an engine whose ranks all forget the noise must still meet the
canaries. Every rank draws the same participations (the hook's generator is seeded alike on every rank), reads the
same reduced release, and takes the *global* data baseline: its local clipped sums at the tracked coordinates,
all-reduced in float64 (the release holds the sum over all ranks' samples, so the local part alone would leave the
other ranks' data in the score). Every rank thus computes the same scores.

Guesses rank ``CanaryHook.statistic``: each canary's log-likelihood ratio under the Gaussian model of its score,
with the noise level measured, per parameter tensor, on probe coordinates that hold no canary (their releases minus
the data's part are pure noise). Canaries differ in how many steps released them (masks) and tensors in how much
noise they received relative to R_c (per-layer clipping), so the raw scores are not comparable across canaries; the
ratio is. It also exposes an engine that left a tensor without noise: that tensor's canaries become certain.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import nn

from fastdp.optimizer import DPOptimizer, Released


class DiracCanaries:
    """m Dirac canaries over the trainable parameters of ``model`` (see module docstring).

    Attributes:
        params: the parameters that hold at least one canary, in model order.
        index: {param: (flat coordinate indices [k] int64, canary ids [k] int64)}.
        param_of: [m] position of each canary's parameter in ``params``.
        included: [m] bool, each canary in the training set with probability 1/2.
    """

    def __init__(self, model: nn.Module, m: int, generator: torch.Generator):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        sizes = [p.numel() for _, p in named]
        total = sum(sizes)
        if not (isinstance(m, int) and m >= 2):
            raise ValueError(f"canaries must be an int >= 2, got {m!r}")
        if m > total:
            raise ValueError(f"{m} Dirac canaries need {m} distinct coordinates, but the model has {total} trainable "
                             "coordinates: use fewer canaries or a larger model")
        flat = torch.randperm(total, generator=generator)[:m]
        self.included = torch.rand(m, generator=generator) < 0.5
        offsets = torch.tensor([0] + sizes).cumsum(0)
        owner = torch.searchsorted(offsets[1:], flat, right=True)  # which parameter holds each coordinate
        self.names: List[str] = []
        self.params: List[nn.Parameter] = []
        self.index: Dict[nn.Parameter, tuple] = {}
        self.param_of = torch.empty(m, dtype=torch.long)
        for k, (name, p) in enumerate(named):
            ids = (owner == k).nonzero().flatten()
            if ids.numel():
                self.param_of[ids] = len(self.params)
                self.names.append(name)
                self.params.append(p)
                self.index[p] = (flat[ids] - offsets[k], ids)
        self.m = m

    def coordinates(self) -> List[tuple]:
        """(parameter name, flat coordinate) of each canary, in canary order."""
        out: List[Optional[tuple]] = [None] * self.m
        for name, p in zip(self.names, self.params):
            coords, ids = self.index[p]
            for j, c in zip(coords.tolist(), ids.tolist()):
                out[c] = (name, j)
        return out


class CanaryHook:
    """Inserts ``canaries`` into ``optimizer``'s clipped sums and scores them from its releases.

    Args:
        sample_rate: each included canary joins a step's batch with this probability.
        generator: draws the canaries' Poisson participation and the noise probes.
        subtract_data: subtract the non-canary data's expected clipped sum from each step's score (module docstring);
            with ``sample_rate < 1`` the caller calls ``set_data_baseline`` before each step.
        probes: per parameter holding canaries, up to this many coordinates without a canary whose releases
            (minus the data's part) are pure noise: they measure the noise each tensor actually received.

    Attributes:
        scores: [m] float64, summed over the steps that released a gradient.
        exposed: [m] int, the steps in which the canary's coordinate trained (parameter trainable, inside the mask).
        participations: [m] int, the steps in which the canary was in the batch (included canaries only).
        max_unreleased: the largest |noisy sum| read at a canary coordinate outside the mask or on a frozen
            parameter (0 for a correct engine: those coordinates are never released).
    """

    def __init__(self, optimizer: DPOptimizer, canaries: DiracCanaries, *, sample_rate: float,
                 generator: torch.Generator, subtract_data: bool = True, probes: int = 256):
        self.opt, self.canaries, self.rate, self.gen = optimizer, canaries, float(sample_rate), generator
        self.subtract_data = subtract_data
        self.comm = getattr(optimizer, "comm", None)  # fastdp.distributed.DataParallel under DDP, else None
        if self.comm is not None and not hasattr(self.comm, "rank"):
            raise NotImplementedError(f"Dirac canaries under {type(self.comm).__name__} (sharded parameters, FSDP2) "
                                      "are not supported: only single-process and DistributedDataParallel training")
        self.inserts = self.comm is None or self.comm.rank == 0  # the canaries enter once: on rank 0 only
        m = canaries.m
        # slots 0..m-1: the canaries; then the noise probes of each canary parameter
        self.index: Dict[nn.Parameter, tuple] = {}
        self.probe_param: List[int] = []  # for each probe slot, the position of its parameter in canaries.params
        slot = m
        for k, p in enumerate(canaries.params):
            coords, ids = canaries.index[p]
            free = torch.ones(p.numel(), dtype=torch.bool)
            free[coords] = False
            pool = free.nonzero().flatten()
            chosen = pool[torch.randperm(pool.numel(), generator=generator)[:probes]]
            self.index[p] = (torch.cat([coords, chosen]), torch.cat([ids, torch.arange(slot, slot + chosen.numel())]))
            self.probe_param += [k] * chosen.numel()
            slot += chosen.numel()
        self.slots = slot
        self.scores = torch.zeros(m, dtype=torch.float64)
        self.exposed = torch.zeros(m, dtype=torch.long)
        self.participations = torch.zeros(m, dtype=torch.long)
        self.noise_sq = torch.zeros(len(canaries.params), dtype=torch.float64)  # per parameter: sum of probe values^2
        self.noise_count = torch.zeros(len(canaries.params), dtype=torch.float64)
        self.max_unreleased = 0.0
        self.data_baseline: Optional[torch.Tensor] = None  # [slots], the non-canary data's expected clipped sum
        self._step: Optional[dict] = None
        self.magnitude = self._magnitudes()

    def _magnitudes(self) -> torch.Tensor:
        """[slots] R of each slot's parameter (its clipping threshold: a canary's magnitude, the probes' unit)."""
        rule = self.opt.clip_rule
        out = torch.empty(self.slots, dtype=torch.float64)
        for p in self.canaries.params:
            _, ids = self.index[p]
            out[ids] = float(rule.thresholds[p]) if hasattr(rule, "thresholds") else float(rule.max_grad_norm)
        return out

    def install(self) -> "CanaryHook":
        if "clipped_sums" in vars(self.opt) or "release" in vars(self.opt):
            raise RuntimeError("this optimizer's clipped_sums / release are already wrapped (a second CanaryHook?)")
        inner_sums, inner_release = self.opt.clipped_sums, self.opt.release
        self.opt.clipped_sums = lambda: self._insert(inner_sums())
        self.opt.release = lambda: self._read(inner_release())
        return self

    def slot_values(self, grads) -> torch.Tensor:
        """[slots] the clipped sums in ``grads`` (a ``GradBuffer``) at the tracked coordinates (0 where absent)."""
        out = torch.zeros(self.slots, dtype=torch.float64)
        for p in self.canaries.params:
            view = grads.views.get(p) if grads is not None else None
            if view is not None:
                coords, ids = self.index[p]
                out[ids] = view.reshape(-1)[coords.to(view.device)].to(torch.float64).cpu()
        return out

    def global_slot_values(self, grads) -> torch.Tensor:
        """``slot_values`` summed over the ranks (one float64 all-reduce under DDP; every rank calls it)."""
        values = self.slot_values(grads)
        if self.comm is not None:
            self.comm.all_reduce_([values])
        return values

    def set_data_baseline(self, grads) -> None:
        """``sample_rate`` times the clipped sums in ``grads`` (under DDP: each rank's shard of the non-canary
        dataset, summed over the ranks): the whole non-canary dataset's, at this iterate."""
        self.data_baseline = self.rate * self.global_slot_values(grads)

    def noise_level(self) -> torch.Tensor:
        """[m] the measured standard deviation of one step's release at each canary's parameter, in units of its R
        (all parameters pooled where a parameter had no released probe)."""
        pooled = (self.noise_sq.sum() / self.noise_count.sum().clamp(min=1)).sqrt()
        per_param = torch.where(self.noise_count > 0, (self.noise_sq / self.noise_count.clamp(min=1)).sqrt(), pooled)
        return per_param[self.canaries.param_of]

    def statistic(self) -> torch.Tensor:
        """[m] each canary's log-likelihood ratio "included" vs "excluded" under the Gaussian model of its score: an
        included canary's score has mean ``sample_rate * exposed`` (in units of R), both have variance
        ``noise_level^2 * exposed``. Guessing on its order ranks canaries by how sure the released values make
        them; it uses released information only. Canaries never exposed get 0; a zero measured noise gives +-inf."""
        mu = self.rate * self.exposed.double()
        var = self.noise_level() ** 2 * self.exposed.double()
        centred = self.scores - mu / 2
        out = torch.where(var > 0, mu * centred / var.clamp(min=1e-300), torch.sign(centred) * math.inf)
        return torch.where(self.exposed > 0, out, torch.zeros_like(out))

    # ------------------------------------------------------------------------------------------- the step
    def _insert(self, grads):
        m, n = self.canaries.m, self.slots
        joins = self.canaries.included & (torch.rand(m, generator=self.gen) < self.rate)
        live = torch.zeros(n, dtype=torch.bool)  # coordinate trains at this step: parameter trainable, in the mask
        center = torch.zeros(n, dtype=torch.float64)
        scale = torch.ones(n, dtype=torch.float64)
        baseline = self.global_slot_values(grads) if self.subtract_data and self.rate == 1.0 else self.data_baseline
        masks = self.opt.engine.masks
        for p in self.canaries.params:
            view = grads.views.get(p) if grads is not None else None
            if view is None or not p.requires_grad:
                continue
            coords, ids = self.index[p]
            mask = masks.get(p)
            inside = torch.ones(coords.numel(), dtype=torch.bool)
            if mask is not None:
                inside = mask.dense.reshape(-1)[coords.to(mask.dense.device)].cpu()
                if mask.standardizes:
                    center[ids] = mask.center.reshape(-1)[coords.to(mask.center.device)].to(torch.float64).cpu()
                    scale[ids] = mask.scale.reshape(-1)[coords.to(mask.scale.device)].to(torch.float64).cpu()
            live[ids] = inside
            is_canary = ids < m
            cids = ids[is_canary]
            add = (joins[cids] & inside[is_canary]).to(torch.float64) * self.magnitude[cids]
            if not self.inserts:
                continue  # another rank inserts them; this one only tracks what trains
            flat = view.reshape(-1)
            flat.index_add_(0, coords[is_canary].to(flat.device), add.to(device=flat.device, dtype=flat.dtype))
        self.participations += (joins & live[:m]).long()
        self._step = {"live": live, "center": center, "scale": scale, "baseline": baseline}
        return grads

    def _read(self, released: Released) -> Released:
        step, self._step = self._step, None
        self.data_baseline = None
        if step is None or released is Released.NOTHING:
            return released
        m, B = self.canaries.m, float(self.opt.expected_batch_size)
        noisy = torch.zeros(self.slots, dtype=torch.float64)
        for p in self.canaries.params:
            if p.grad is not None:
                coords, ids = self.index[p]
                noisy[ids] = p.grad.reshape(-1)[coords.to(p.grad.device)].to(torch.float64).cpu() * B
        live = step["live"]
        # on the mask: back to the space the noise was added in (AdaDPIGU restores g = M (b w + a))
        noisy = torch.where(live, (noisy - B * step["center"]) / step["scale"], noisy)
        if (~live).any():
            self.max_unreleased = max(self.max_unreleased, float(noisy[~live].abs().max()))
        if step["baseline"] is not None:
            noisy = noisy - torch.where(live, step["baseline"], torch.zeros_like(noisy))
        noisy = noisy / self.magnitude
        self.scores += noisy[:m]
        self.exposed += live[:m].long()
        probe_live = live[m:].double()
        where = torch.tensor(self.probe_param, dtype=torch.long)
        self.noise_sq.index_add_(0, where, noisy[m:] ** 2 * probe_live)
        self.noise_count.index_add_(0, where, probe_live)
        return released
