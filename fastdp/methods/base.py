"""Shared machinery of the sparse DP methods: epochs counted from steps, phases, parameter roles.

A method is a ``DPOptimizer`` whose trainable set or masks change with the epoch. Epoch boundaries come
from ``steps_per_epoch``: give the number of batches per epoch of the data loader (``make_private`` passes
``len(data_loader)``); without it, ``round(sample_size / expected_batch_size)``, which can be one step off the
loader's ``len``. ``_begin_epoch(e)`` runs after the last step of epoch ``e - 1``, so masks are in place before
that epoch's forward. Epoch 0 is set up by each method's constructor. ``load_state_dict`` calls ``_begin_epoch``
again for the current epoch (possibly mid-epoch, ``steps_taken % steps_per_epoch != 0``): it must then restore the
epoch's setup from the loaded state, not start the epoch afresh. Every step is accounted by the DP optimizer with
the (sigma, q) it used; a phase that releases something else than a gradient still counts as one
subsampled-Gaussian step.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from fastdp.accounting import is_int
from fastdp.grad_buffer import flat_views
from fastdp.optimizer import DPOptimizer

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def find_head(model: nn.Module, head: Union[None, str, nn.Module] = None) -> nn.Module:
    """The classification/LM head: the module given (or named), else the last ``nn.Linear`` of the model."""
    if isinstance(head, nn.Module):
        return head
    if isinstance(head, str):
        return model.get_submodule(head)
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError("no nn.Linear head found; pass head=<module or name>")
    return last


def _is_hf_conv1d(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``x @ W + b`` with W stored [d_in, d_out]."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers") and hasattr(m, "nf")


def row_group_dims(model: nn.Module) -> Dict[nn.Parameter, int]:
    """For each Linear-like / Conv weight, the dim of its output neurons (the row groups of the sparse methods):
    0 for ``nn.Linear`` and convolutions, 1 for transformers' ``Conv1D``."""
    dims: Dict[nn.Parameter, int] = {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter) or w.dim() < 2 or w in dims:
            continue
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            dims[w] = 0
        elif _is_hf_conv1d(m):
            dims[w] = 1
    return dims


def parameter_roles(model: nn.Module, head: nn.Module) -> Dict[nn.Parameter, str]:
    """Role of each parameter: "head", "bias", "norm" (norm-layer affine), "weight" (Linear/Conv/HF Conv1D weight,
    the maskable row groups, see ``row_group_dims``), or "other" (embeddings, direct parameters...)."""
    roles: Dict[nn.Parameter, str] = {}
    groups = row_group_dims(model)
    head_params = set(head.parameters())
    for m in model.modules():
        for n, p in m.named_parameters(recurse=False):
            if p in roles:
                continue
            if p in head_params:
                roles[p] = "head"
            elif isinstance(m, NORM_LAYERS):
                roles[p] = "norm"
            elif n == "bias":
                roles[p] = "bias"
            elif n == "weight" and p in groups:
                roles[p] = "weight"
            else:
                roles[p] = "other"
    return roles


class PhasedDPOptimizer(DPOptimizer):
    """``DPOptimizer`` with epochs, a ``phase`` name and named ``masks`` (see module docstring)."""

    phase: str = "dp"
    takes_steps_per_epoch = True  # ``make_private`` passes ``steps_per_epoch=len(data_loader)``

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, steps_per_epoch: Optional[int] = None,
                 **dp):
        if steps_per_epoch is not None and not (is_int(steps_per_epoch) and steps_per_epoch > 0):
            raise ValueError(f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
        super().__init__(model, optimizer, **dp)
        spe = steps_per_epoch or max(1, round(self.sample_size / self.expected_batch_size))
        self.steps_per_epoch = spe
        self.param_name = {p: n.split(" = ")[0] for p, n in self.engine.param_names.items()}

    @property
    def epoch(self) -> int:
        return self.steps_taken // self.steps_per_epoch

    @property
    def masks(self) -> Dict[str, torch.Tensor]:
        """Parameter name -> bool tensor of the coordinates that currently train (masked parameters only)."""
        return {self.param_name[p]: m.dense for p, m in self.engine.masks.items()}

    def _begin_epoch(self, epoch: int) -> None:
        """Set masks / trainable parameters for ``epoch`` (before its first forward)."""

    def after_step(self) -> None:
        """A new epoch begins: its phase's masks and trainable parameters."""
        if self.steps_taken % self.steps_per_epoch == 0:
            self._begin_epoch(self.epoch)

    def _freeze(self, params, frozen: bool) -> None:
        for p in params:
            p.requires_grad_(not frozen)

    def _reset_optimizer_state(self, params) -> None:
        """Drop the wrapped optimizer's state (momentum, Adam moments) of ``params``."""
        for p in params:
            self.original_optimizer.state.pop(p, None)

    def state_dict(self):
        sd = super().state_dict()
        sd["fastdp"]["method"] = self._method_state()
        return sd

    def load_state_dict(self, state_dict):
        """All or nothing, as ``DPOptimizer.load_state_dict``: a method part that fails to load restores the step
        count, the accountant, the wrapped optimizer and the method's own state as they were."""
        backup = copy.deepcopy(self.state_dict())
        super().load_state_dict(state_dict)
        try:
            self._load_method_state(state_dict["fastdp"].get("method", {}))
        except BaseException:
            super().load_state_dict(backup)
            self._load_method_state(backup["fastdp"]["method"])
            raise
        self._begin_epoch(self.epoch)

    def _method_state(self) -> dict:
        return {}

    def _load_method_state(self, state: dict) -> None:
        pass


def split_by_params(flat: torch.Tensor, params: List[nn.Parameter]) -> List[Tuple[nn.Parameter, torch.Tensor]]:
    """Views of a flat tensor as consecutive pieces shaped like ``params``."""
    return list(zip(params, flat_views(flat, params)))
