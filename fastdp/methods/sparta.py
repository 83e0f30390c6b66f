"""SPARTA (Makni et al., KDD'25): private selection of row groups, then sparse DP fine-tuning.

Phases (epochs counted from steps):

1. ``warmup`` (``warmup_epochs``): head, biases and norm parameters train; Linear/Conv/HF Conv1D weights (the
   eligible row groups: output neurons, i.e. rows of ``nn.Linear`` weights, output filters of convolutions,
   columns of HF ``Conv1D`` weights) are frozen, other parameters (embeddings, direct parameters) stay frozen throughout.
2. ``selection`` (one epoch): the eligible weights take part in the per-sample gradient (clip over all
   trainable parameters), but nothing is updated: each step releases, per row j of each eligible weight,
   ``(sum_i sum_k |c_i G_i[j, k]| + N(0, n_j sigma^2 C^2)) / B`` (``selection="per-sample"``, the paper's
   score; row sums of the per-coordinate release ``sum_i |clip(g_i)| + N(0, sigma^2 C^2 I)``) or the same
   with ``|sum_i c_i G_i[j, k]|`` (``"aggregate"``, the official code's, ghost-compatible). Either release has
   L2 sensitivity C, so the step is one subsampled Gaussian; no gradient is released in this epoch.
3. ``sparse``: per layer (``topk="per-layer"``, the code) or over all layers (``"global"``, the rendered
   paper), the rows with the highest scores are kept (``sparsity`` = fraction kept); masked rows get no
   gradient and no noise, the per-sample norm and the weight-gradient GEMM run on the kept rows only, and
   the wrapped optimizer's state (momentum) of the eligible weights is reset. A weight left with no row (a
   global top-k can do that) is frozen (``requires_grad=False``) for the rest of training.

Accounting: every step of every phase is one step of the subsampled Gaussian mechanism.
"""
from __future__ import annotations

from typing import Dict

import torch

from fastdp.abs_stats import AbsSumObserver
from fastdp.accounting import is_int
from fastdp.grad_buffer import flat_views
from fastdp.masks import Mask
from fastdp.methods.base import PhasedDPOptimizer, find_head, parameter_roles, row_group_dims
from fastdp.methods.baselines import check_sparsity, keep_rows
from fastdp.noise import gaussian_noise
from fastdp.optimizer import Released

SELECTIONS = ("per-sample", "aggregate")
TOPK = ("per-layer", "global")


class SPARTA(PhasedDPOptimizer):
    """SPARTA (see module docstring). ``sparsity``: fraction of rows kept; ``warmup_epochs``: epochs before the
    selection epoch."""

    def __init__(self, model, optimizer, *, sparsity: float = 0.2, warmup_epochs: int = 10,
                 selection: str = "per-sample", topk: str = "per-layer", head=None, **dp):
        check_sparsity(sparsity)
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if topk not in TOPK:
            raise ValueError(f"topk must be one of {TOPK}, got {topk!r}")
        if not (is_int(warmup_epochs) and warmup_epochs >= 0):
            raise ValueError("warmup_epochs must be a non-negative int")
        roles = parameter_roles(model, find_head(model, head))
        self.eligible = [p for p, r in roles.items() if r == "weight"]
        if not self.eligible:
            raise ValueError("SPARTA found no Linear/Conv weight to select rows from (besides the head)")
        dims = row_group_dims(model)
        self.group_dim = {p: dims[p] for p in self.eligible}  # the dim of each weight's output neurons
        for p, r in roles.items():
            p.requires_grad_(r != "other")
        super().__init__(model, optimizer, **dp)
        self.sparsity, self.warmup_epochs, self.selection, self.topk = sparsity, warmup_epochs, selection, topk
        self.scores: Dict[torch.nn.Parameter, torch.Tensor] = {}
        self.selected: Dict[torch.nn.Parameter, torch.Tensor] = {}
        self.row_stats = AbsSumObserver()  # selection epoch, per-sample scores: sum_i |c_i G_i| per output neuron
        self.engine.observers.append(self.row_stats)
        self._begin_epoch(0)

    @property
    def phase(self) -> str:
        e = self.epoch
        return "warmup" if e < self.warmup_epochs else ("selection" if e == self.warmup_epochs else "sparse")

    def _begin_epoch(self, epoch: int) -> None:
        phase = self.phase
        if phase == "warmup":
            self._freeze(self.eligible, True)
        elif phase == "selection":
            self._freeze(self.eligible, False)
            starts = self.steps_taken % self.steps_per_epoch == 0  # else resumed mid-epoch: keep the loaded scores
            for p in self.eligible:
                self.engine.set_mask(p, None)
                if starts or p not in self.scores:
                    self.scores[p] = torch.zeros(p.shape[self.group_dim[p]], dtype=torch.float32, device=p.device)
            self.row_stats.rows = dict(self.group_dim) if self.selection == "per-sample" else {}
        else:
            self.row_stats.rows = {}
            if not self.selected:
                self._select_rows()
            for p in self.eligible:
                rows = self.selected[p]
                # a layer given no row (possible with topk="global") is frozen: no gradient, no noise, no update
                p.requires_grad_(rows.numel() > 0)
                self.engine.set_mask(p, Mask.from_rows(p, rows, self.group_dim[p]) if rows.numel() else None)

    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        """As ``PhasedDPOptimizer.masks``; in the sparse phase a weight that kept no row shows an all-False mask."""
        out = super().masks
        if self.phase == "sparse":
            for p, rows in self.selected.items():
                if rows.numel() == 0:
                    out[self.param_name[p]] = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        return out

    def release(self) -> Released:
        """Selection epoch: release noisy row scores, no gradient (other phases: ``DPOptimizer.release``)."""
        if self.phase != "selection":
            return super().release()
        std = self.noise_std()
        if self.comm is not None and self.selection == "aggregate":
            # |sum_i c_i G_i| needs the sum over all ranks' samples first; rank 0 then releases the scores alone
            self.comm.all_reduce_(self.engine.buffer.flats)
        released = []  # per eligible weight: its [n_rows] row sums plus noise (under DDP: rank 0's noise only)
        for p in self.eligible:
            dim = self.group_dim[p]
            n_rows = p.shape[dim]
            if self.selection == "per-sample":  # sum_i sum_k |c_i G_i[j, k]| per row j (fused on Linear-like layers)
                s = self.row_stats.row_sums.get(p)
                s = torch.zeros(n_rows, device=p.device) if s is None else s.float()
            else:
                s = self.engine.buffer.views[p].abs().movedim(dim, 0).reshape(n_rows, -1).sum(1).float()
                if self.comm is not None and not self.comm.adds_noise:
                    s = torch.zeros_like(s)  # (the reduced sums are on every rank: count them once)
            if self.comm is None or self.comm.adds_noise:
                n_j = p.numel() // n_rows  # the row's per-coordinate noises N(0, sigma^2 C^2) summed: N(0, n_j sigma^2 C^2)
                s = s + gaussian_noise(self.scores[p], std * n_j ** 0.5, generator=self.generator,
                                       secure=self.secure_mode)
            released.append(s)
        if self.comm is not None:  # one all-reduce of all rows' scores: every rank's samples, the noise once
            flat = torch.cat(released)
            self.comm.all_reduce_([flat])
            released = flat_views(flat, [self.scores[p] for p in self.eligible])
        for p, s in zip(self.eligible, released):
            self.scores[p] += s / self.expected_batch_size
        self.engine.reset()  # nothing else is released: no gradient, no update in this epoch
        return Released.NOTHING

    def _select_rows(self) -> None:
        """Keep the top rows by released score (clamped at 0), per layer or globally; reset optimizer state."""
        scores = {p: s.clamp(min=0) for p, s in self.scores.items()}
        if self.topk == "per-layer":
            for p, s in scores.items():
                self.selected[p] = torch.topk(s, keep_rows(s.numel(), self.sparsity)).indices.sort().values
        else:
            flat = torch.cat([s for s in scores.values()])
            k = keep_rows(flat.numel(), self.sparsity)
            keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            keep[torch.topk(flat, k).indices] = True
            for p, v in zip(scores, flat_views(keep, scores.values())):
                self.selected[p] = v.nonzero().flatten()
        self._reset_optimizer_state(self.eligible)

    def _method_state(self) -> dict:
        return {"scores": {self.param_name[p]: s for p, s in self.scores.items()},
                "selected": {self.param_name[p]: r for p, r in self.selected.items()}}

    def _load_method_state(self, state: dict) -> None:
        by_name = {n: p for p, n in self.param_name.items()}
        self.scores = {by_name[n]: s.to(by_name[n].device, torch.float32, copy=True)
                       for n, s in state.get("scores", {}).items()}
        self.selected = {by_name[n]: r.to(by_name[n].device, torch.long, copy=True)
                         for n, r in state.get("selected", {}).items()}
