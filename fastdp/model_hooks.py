"""The engine's hooks on the model: parameter slots swapped for taps around the root forward, guards, pickling.

``ModelHooks(engine, module)`` validates the model (BatchNorm), registers a root forward pre-hook that puts a
``ParamTap`` (``fastdp.tap``) in every trainable parameter slot for the forward and a forward hook that puts the
parameters back, and a post-accumulate-grad hook per parameter that raises if autograd ever reaches ``.grad`` (a
use the engine did not see). A deep copy or a pickle of the model carries inert hooks (``_InertHooks``).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Dict, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from fastdp.tap import BatchSizeError, ParamTap, TapContext, UnsupportedLayerError

# Modules whose forward flattens a [B, T, d] input to [B*T, d] rows in sample order before a matmul.
SAMPLE_MAJOR_FLATTENERS = {"transformers.pytorch_utils.Conv1D"}


class ModelHooks:
    """Hooks of ``engine`` on ``module``. ``batch_size``: the leading dim of the root forward's input, set by the
    pre-hook (layers check their inputs against it). ``param_names``: {param: "name = alias"} of every parameter."""

    def __init__(self, engine, module: nn.Module):
        self.engine, self.module = engine, module
        self.batch_size: Optional[int] = None
        self.module_names = {m: n for n, m in module.named_modules()}
        names: Dict[nn.Parameter, list] = {}
        for n, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(p, []).append(n)
        self.param_names = {p: " = ".join(ns) for p, ns in names.items()}
        self._swapped: Optional[list] = None
        self._contexts: Dict[nn.Module, TapContext] = {}
        self._taps: Dict[tuple, ParamTap] = {}
        self._handles = []
        self._guarded = set()
        self._attach()

    def _attach(self) -> None:
        batchnorms = [(n, m) for n, m in self.module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for name, m in batchnorms:  # validate everything before touching the model
            _check_batchnorm(name, m)
        for name, m in batchnorms:  # (partial, not a lambda: the model stays picklable)
            self._handles.append(m.register_forward_pre_hook(functools.partial(_check_batchnorm_hook, name)))
        # (module, name) of every parameter slot, in module order: swapped for taps around the root forward
        self._slots = [(m, n) for m in self.module_names for n, p in m._parameters.items() if p is not None]
        self._handles.append(self.module.register_forward_pre_hook(self._swap_in, with_kwargs=True))
        self._handles.append(self.module.register_forward_hook(self._swap_out, with_kwargs=True, always_call=True))
        for p in self.param_names:
            if p.requires_grad:
                self._guard(p)

    def _guard(self, p: nn.Parameter) -> None:
        """Raise if autograd ever accumulates into p.grad: a use the engine did not see."""
        name = self.param_names.setdefault(p, "<parameter added after attach>")
        self._handles.append(p.register_post_accumulate_grad_hook(functools.partial(_guard_hook, name)))
        self._guarded.add(p)

    def __deepcopy__(self, memo):
        """A deep copy of the model (EMA, evaluation copies) is a plain model: its copied hooks are inert."""
        return _InertHooks()

    def __reduce__(self):
        """Pickling the model (``torch.save(model)``) saves a plain model, as ``__deepcopy__`` copies one."""
        return (_InertHooks, ())

    def detach(self) -> None:
        """Remove every hook; the module is a plain PyTorch module again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _swap_in(self, module, args, kwargs):
        """Root pre-hook: every trainable parameter slot of the model holds its tap during the forward."""
        if not torch.is_grad_enabled() or self._swapped is not None:
            return
        self.batch_size = leading_dim(args, kwargs)
        if self.batch_size is None:  # every layer's batch check would be skipped: fail closed
            raise BatchSizeError(
                f"the model's forward ({type(module).__name__}) got no tensor argument with a leading batch dim "
                "(looked through tensors, lists, tuples, dicts and other mappings, dataclasses): fastdp takes the "
                "batch size from it to check every layer input. Pass the batch as a tensor, or a container of "
                "tensors, whose dim 0 is the sample dim.")
        self.engine.new_forward()
        swapped = []
        for m, n in self._slots:
            p = m._parameters[n]
            if isinstance(p, ParamTap) and p._fdp_ctx.engine is not self.engine:
                for m2, n2, p2 in swapped:
                    m2._parameters[n2] = p2
                raise RuntimeError(
                    f"the model already has another fastdp engine attached (parameter "
                    f"'{self.param_names.get(p._fdp_param, n)}'): an earlier DPOptimizer / GradSampleEngine on this "
                    "model (or a model containing it) was not detached, and it would take every gradient. Call "
                    ".detach() on the old DPOptimizer (or engine) before building a new one.")
            if p is None or not p.requires_grad or isinstance(p, ParamTap):
                continue
            m._parameters[n] = self._tap(p, m, n)
            swapped.append((m, n, p))
        self._swapped = swapped

    def _swap_out(self, module, args, kwargs, output):
        swapped, self._swapped = self._swapped, None
        for m, n, p in swapped or ():
            m._parameters[n] = p

    def _tap(self, p: nn.Parameter, module: nn.Module, name: str) -> ParamTap:
        """The parameter's tap in ``module``, reused across calls while it still aliases the parameter's storage."""
        key = (id(p), id(module))
        tap = self._taps.get(key)
        v = tap._fdp_value if tap is not None else None
        if v is None or v.data_ptr() != p.data_ptr() or v.dtype != p.dtype or v.shape != p.shape or v.device != p.device:
            if p not in self._guarded:  # unfrozen or replaced after attach
                self._guard(p)
            ctx = self._contexts.get(module)
            if ctx is None:
                owner_type = type(module)
                ctx = TapContext(self.engine, self.module_names.get(module, owner_type.__name__), owner_type.__name__,
                                 rows_sample_major=_qualname(owner_type) in SAMPLE_MAJOR_FLATTENERS)
                self._contexts[module] = ctx
            tap = ParamTap(p, p, None, ctx, name)
            self._taps[key] = tap
        return tap


class _InertHooks:
    """What a deep-copied or unpickled model's hooks are bound to: they swap nothing (see ModelHooks.__deepcopy__
    and __reduce__). A deep copy binds ``ModelHooks._swap_in`` itself to this object: ``_swapped`` then always
    reads as a forward under way, so it returns at once."""

    @property
    def _swapped(self):
        return ()

    @_swapped.setter
    def _swapped(self, value):
        pass

    def _swap_in(self, module, args, kwargs):  # (an unpickled hook is bound to these)
        return None

    def _swap_out(self, module, args, kwargs, output):
        return None


def leading_dim(args, kwargs) -> Optional[int]:
    """Leading dim of the first tensor argument of the model's forward with a dim (nested containers included:
    lists, tuples, dicts, other mappings such as HF's ``BatchEncoding``, dataclasses such as HF's model outputs)."""
    for a in tree_flatten((args, kwargs))[0]:
        if isinstance(a, torch.Tensor) and not isinstance(a, ParamTap) and a.dim() > 0:
            return a.shape[0]
        if isinstance(a, Mapping) or dataclasses.is_dataclass(a):
            inner = dict(a) if isinstance(a, Mapping) else {f.name: getattr(a, f.name) for f in dataclasses.fields(a)}
            found = leading_dim((), inner)
            if found is not None:
                return found
    return None


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_batchnorm(name, m):
    trainable = any(p is not None and p.requires_grad for p in m._parameters.values())
    if m.training or trainable:
        raise UnsupportedLayerError(
            f"module '{name}' ({type(m).__name__}) is BatchNorm in training mode or with trainable affine "
            "parameters: it mixes samples through batch statistics, which breaks per-sample clipping. Replace it "
            "with nn.GroupNorm (opacus.validators.ModuleValidator.fix does this), or freeze it and call .eval() on it.")


def _check_batchnorm_hook(name, module, args):
    _check_batchnorm(name, module)


def _guard_hook(name, p):
    if p.grad is not None:
        raise UnsupportedLayerError(
            f"parameter '{name}' received a gradient through an operation the DP engine did not see: it was used "
            "outside the forward of the model the engine is attached to (e.g. a submodule called directly, or a "
            "parameter added to the model after the DP optimizer was built). Run the training forward through the "
            "model given to fastdp.")
