"""SPARTA's baselines: DP-BiTFiT, last-layer training, random row groups.

* ``BiTFiT``: biases (norm-layer biases included) and, with ``train_head``, the head train; everything
  else is frozen (``requires_grad=False``), so the engine stores no weight activations for it.
* ``LastLayer``: only the head trains.
* ``RandomGroups``: SPARTA's random-mask baseline: each Linear/Conv weight (head excluded) trains a random
  ``sparsity`` fraction of its rows (output neurons / filters); head, biases and norm parameters train fully;
  other parameters (embeddings, direct parameters) are frozen, as in SPARTA. The row mask is drawn once from
  ``seed`` (data-independent, so it costs no privacy).
"""
from __future__ import annotations

import torch

from fastdp.masks import Mask
from fastdp.methods.base import PhasedDPOptimizer, find_head, parameter_roles, row_group_dims


class BiTFiT(PhasedDPOptimizer):
    """DP-BiTFiT (Bu et al.): biases (+ norm biases, + head if ``train_head``) train, all else is frozen."""

    phase = "bitfit"

    def __init__(self, model, optimizer, *, train_head: bool = True, head=None, **dp):
        head = find_head(model, head)
        roles = parameter_roles(model, head)
        names = {p: n for n, p in model.named_parameters()}
        for p, role in roles.items():
            keep = names.get(p, "").endswith("bias") or (train_head and role == "head")
            p.requires_grad_(keep)
        super().__init__(model, optimizer, **dp)


class LastLayer(PhasedDPOptimizer):
    """Only the head trains (DP linear probing)."""

    phase = "last-layer"

    def __init__(self, model, optimizer, *, head=None, **dp):
        head_params = set(find_head(model, head).parameters())
        for p in model.parameters():
            p.requires_grad_(p in head_params)
        super().__init__(model, optimizer, **dp)


def keep_rows(n_rows: int, sparsity: float) -> int:
    """Rows kept per layer at ``sparsity`` (fraction kept): SPARTA's code drops int(n * (1 - s)) rows."""
    return n_rows - int(n_rows * (1 - sparsity))


def check_sparsity(sparsity: float) -> None:
    if not 0 < sparsity <= 1:
        raise ValueError(f"sparsity (fraction of rows kept) must be in (0, 1], got {sparsity}")


class RandomGroups(PhasedDPOptimizer):
    """Random row groups at SPARTA's sparsity (see module docstring)."""

    phase = "sparse"

    def __init__(self, model, optimizer, *, sparsity: float = 0.2, seed: int = 0, head=None, **dp):
        check_sparsity(sparsity)
        roles = parameter_roles(model, find_head(model, head))
        dims = row_group_dims(model)
        for p, role in roles.items():
            if role == "other":
                p.requires_grad_(False)
        super().__init__(model, optimizer, **dp)
        gen = torch.Generator().manual_seed(seed)
        self.sparsity, self.seed = sparsity, seed
        for p, role in roles.items():
            if role == "weight":
                n = p.shape[dims[p]]
                rows = torch.randperm(n, generator=gen)[:keep_rows(n, sparsity)]
                self.engine.set_mask(p, Mask.from_rows(p, rows, dims[p]))

    @property
    def kept_fraction(self) -> float:
        kept = sum(m.dense.sum().item() for m in self.engine.masks.values())
        return kept / max(1, sum(m.dense.numel() for m in self.engine.masks.values()))


__all__ = ["BiTFiT", "LastLayer", "RandomGroups", "keep_rows"]
