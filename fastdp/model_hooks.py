"""The engine's hooks on the model: parameter slots swapped for taps around the root forward, guards, pickling.

``ModelHooks(engine, module)`` validates the model (BatchNorm, InstanceNorm's running statistics), registers a root forward pre-hook that puts a
``ParamTap`` (``fastdp.tap``) in every trainable parameter slot for the forward and a forward hook that puts the
parameters back, and a post-accumulate-grad hook per parameter that raises if autograd ever reaches ``.grad`` (a
use the engine did not see). A deep copy or a pickle of the model carries inert hooks (``_InertHooks``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Mapping
from typing import Dict, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from fastdp import checkpointing
from fastdp.tap import BatchSizeError, ParamTap, TapContext, UnsupportedLayerError

# Modules whose forward flattens a [B, T, d] input to [B*T, d] rows in sample order before a matmul.
SAMPLE_MAJOR_FLATTENERS = {"transformers.pytorch_utils.Conv1D"}


class ModelHooks:
    """Hooks of ``engine`` on ``module``. ``batch_size``: the leading dim of the root forward's input, set by the
    pre-hook (layers check their inputs against it); ``batch_source``: the tensor it was read from, during the
    forward. ``param_names``: {param: "name = alias"} of every parameter."""

    def __init__(self, engine, module: nn.Module):
        self.engine, self.module = engine, module
        self.batch_size: Optional[int] = None
        self.batch_source: Optional[torch.Tensor] = None
        self.module_names = {m: n for n, m in module.named_modules()}
        names: Dict[nn.Parameter, list] = {}
        for n, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(p, []).append(n)
        self.param_names = {p: " = ".join(ns) for p, ns in names.items()}
        self._swapped: Optional[list] = None
        self._excluded: set = set()  # slots another swapper handles (``exclude_slots``)
        self.replaying = False  # a checkpointed region is being recomputed in backward (``replay``)
        self.reentrant: Optional[tuple] = None  # (forward, outer pass task id) while a reentrant region is replayed
        self._contexts: Dict[nn.Module, TapContext] = {}
        self._taps: Dict[tuple, ParamTap] = {}
        self._handles = []
        self._guarded = set()
        self._attach()

    def _attach(self) -> None:
        batchnorms = [(n, m) for n, m in self.module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for name, m in batchnorms:  # validate everything before touching the model
            _check_batchnorm(name, m)
        if self.engine.batch_first:
            for name, m in self.module.named_modules():
                _check_sequence_first(name, m)
        for name, m in batchnorms:  # (partial, not a lambda: the model stays picklable)
            self._handles.append(m.register_forward_pre_hook(functools.partial(_check_batchnorm_hook, name)))
        instancenorms = [(n, m) for n, m in self.module.named_modules()
                         if isinstance(m, nn.modules.instancenorm._InstanceNorm)]
        for name, m in instancenorms:
            _check_running_stats(name, m)
        for name, m in instancenorms:
            self._handles.append(m.register_forward_pre_hook(functools.partial(_check_running_stats_hook, name)))
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
        if self._swapped is not None:
            return
        if not torch.is_grad_enabled() and (self.replaying or checkpointing.reentrant_ctx() is None):
            return  # (a forward inside a reentrant checkpoint region runs under no_grad: its taps are swapped in)
        if torch._C._current_graph_task_id() != -1:  # (a checkpoint's replay has swapped already: returned above)
            raise UnsupportedLayerError(
                f"the model's forward ({type(module).__name__}) ran inside a backward pass, outside a "
                "torch.utils.checkpoint recomputation (e.g. a custom autograd.Function that recomputes the model in "
                "its backward): fastdp cannot count its parameter uses as part of the backward pass. Use "
                "torch.utils.checkpoint instead.")
        batch_first = getattr(self.engine, "batch_first", True)
        self.batch_source = leading_tensor(args, kwargs, batch_first)
        self.batch_size = None if self.batch_source is None else self.batch_source.shape[0 if batch_first else 1]
        if self.batch_size is None:  # every layer's batch check would be skipped: fail closed
            which = "dim 0" if batch_first else "dim 1 (batch_first=False: inputs [T, B, ...])"
            raise BatchSizeError(
                f"the model's forward ({type(module).__name__}) got no tensor argument with a batch dim "
                "(looked through tensors, lists, tuples, dicts and other mappings, dataclasses): fastdp takes the "
                "batch size from it to check every layer input. Pass the batch as a tensor, or a container of "
                f"tensors, whose {which} is the sample dim.")
        self.engine.new_forward()
        frame = checkpointing.region_frame()
        if frame is not None and frame is not checkpointing.RECOMPUTING:  # the forward runs in a checkpointed region
            self.adopt_checkpoint(frame)
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

    def rebase_batch(self, size: int, packed) -> bool:
        """Make ``size`` this forward's batch size if it was read from one of the tensors ``packed`` (an op's inputs
        that pack the samples without leading with them: EmbeddingBag's flat ids and offsets). Returns whether it did."""
        if self.batch_source is None or not any(t is self.batch_source for t in packed if t is not None):
            return False
        self.batch_size = size
        return True

    def _swap_out(self, module, args, kwargs, output):
        if self.replaying:  # the model's forward recomputed inside a checkpointed region: ``replay`` swaps back
            return
        swapped, self._swapped = self._swapped, None
        self.batch_source = None
        for m, n, p in swapped or ():
            m._parameters[n] = p

    def adopt_checkpoint(self, frame) -> None:
        """An op of this forward runs in the checkpointed region ``frame`` (``fastdp.checkpointing``): its
        recomputation in backward will be a ``replay`` at this forward's batch size."""
        checkpointing.adopt(frame, self, functools.partial(self.replay, self.batch_size))

    def join_reentrant_region(self, taps) -> None:
        """Ops on ``taps`` run (under no_grad) in a reentrant checkpoint region's forward: adopt the region (its
        recomputation will be a reentrant ``replay`` at this forward's batch size) and hold a pending use of each
        tap's parameter until the recomputation opens the region's uses (``fastdp.checkpointing.ReentrantRegion``)."""
        if self.replaying and self.reentrant is None:
            return  # a non-reentrant region's recomputation: the original forward's region is the one that runs
        ctxs = checkpointing.reentrant_ctxs()
        if len(ctxs) > 1 or self.replaying:
            raise UnsupportedLayerError(f"{taps[0].label} is used inside {checkpointing.REENTRANT_NESTED_HELP}")
        if not ctxs:  # (called only under CheckpointFunction's forward)
            raise checkpointing.CheckpointReplayError(
                f"{taps[0].label}: fastdp found no reentrant checkpoint region's forward on the stack")
        ctx = ctxs[0]
        engine, batch_size, forward = self.engine, self.batch_size, self.engine._forward

        def make(fn):
            ctx.register_prehook(_refuse_create_graph)
            return checkpointing.ReentrantRegion(
                fn, lambda task: self.replay(batch_size, reentrant=(forward, task)), engine.join_pass)

        region = checkpointing.adopt_reentrant(ctx, self, make)
        for tap in taps:
            region.hold(tap._fdp_param, engine.hold_use)

    @contextlib.contextmanager
    def replay(self, batch_size: Optional[int], reentrant: Optional[tuple] = None):
        """Recomputing a checkpointed region in backward: every trainable slot holds its tap again (as in the forward
        that ran the region), layers check their inputs against that forward's ``batch_size``. The uses they open
        are not counted for a non-reentrant region (``GradSampleEngine.open_use``: the original forward's nodes carry
        the counted ones); for a reentrant one (``reentrant``: (the forward's ``ForwardPass``, the outer backward
        pass's graph task id)) they are its only uses, counted in that pass."""
        if self._excluded:
            raise UnsupportedLayerError(
                "activation checkpointing on an FSDP2 (fully_shard) model is not supported by fastdp yet: the "
                "recomputation in backward would run on FSDP's parameters without the DP layers. Disable it "
                "(model.gradient_checkpointing_disable()), or use DistributedDataParallel.")
        saved = self.batch_size, self.batch_source, self.replaying, self.reentrant
        swapped = None
        if self._swapped is None:  # (else a forward is under way: its taps are in place)
            swapped = []
            for m, n in self._slots:
                p = m._parameters[n]
                if p is not None and p.requires_grad and not isinstance(p, ParamTap):
                    m._parameters[n] = self._tap(p, m, n)
                    swapped.append((m, n, p))
            self._swapped = swapped
        self.batch_size, self.batch_source, self.replaying, self.reentrant = batch_size, None, True, reentrant
        try:
            yield
        finally:
            self.batch_size, self.batch_source, self.replaying, self.reentrant = saved
            if swapped is not None:
                self._swapped = None
                for m, n, p in swapped:
                    m._parameters[n] = p

    def exclude_slots(self, slots, on_detach) -> None:
        """Leave ``slots`` ((module, name) pairs) to another swapper (``fastdp.fsdp.ShardedTaps``: FSDP2's managed
        parameters get their taps after its all-gather); ``on_detach`` runs on ``detach()``."""
        self._slots = [s for s in self._slots if s not in slots]
        self._excluded = set(slots)
        self._handles.append(_Callback(on_detach))

    def context(self, module: nn.Module) -> TapContext:
        """The ``TapContext`` of the taps in ``module``'s slots (one per module: its name and type for errors)."""
        ctx = self._contexts.get(module)
        if ctx is None:
            owner_type = type(module)
            ctx = TapContext(self.engine, self.module_names.get(module, owner_type.__name__), owner_type.__name__,
                             rows_sample_major=_qualname(owner_type) in SAMPLE_MAJOR_FLATTENERS)
            self._contexts[module] = ctx
        return ctx

    def _tap(self, p: nn.Parameter, module: nn.Module, name: str) -> ParamTap:
        """The parameter's tap in ``module``, reused across calls while it still aliases the parameter's storage."""
        key = (id(p), id(module))
        tap = self._taps.get(key)
        v = tap._fdp_value if tap is not None else None
        if v is None or v.data_ptr() != p.data_ptr() or v.dtype != p.dtype or v.shape != p.shape or v.device != p.device:
            if p not in self._guarded:  # unfrozen or replaced after attach
                self._guard(p)
            tap = ParamTap(p, p, None, self.context(module), name)
            self._taps[key] = tap
        return tap


class _Callback:
    """A hook handle whose ``remove()`` calls ``fn`` (``ModelHooks.detach`` removes handles)."""

    def __init__(self, fn):
        self.fn = fn

    def remove(self) -> None:
        self.fn()


class _InertHooks:
    """What a deep-copied or unpickled model's hooks are bound to: they swap nothing (see ModelHooks.__deepcopy__
    and __reduce__). A deep copy binds ``ModelHooks._swap_in`` itself to this object: ``_swapped`` then always
    reads as a forward under way, so it returns at once (and ``_swap_out`` finds nothing to put back)."""

    replaying = False

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
    t = leading_tensor(args, kwargs)
    return None if t is None else t.shape[0]


def leading_tensor(args, kwargs, batch_first: bool = True) -> Optional[torch.Tensor]:
    """The first tensor argument of the model's forward with a dim (searched as ``leading_dim`` says); with
    ``batch_first=False`` the first with at least two dims ([T, B, ...]: the batch size is its dim 1)."""
    for a in tree_flatten((args, kwargs))[0]:
        if isinstance(a, torch.Tensor) and not isinstance(a, ParamTap) and a.dim() > (0 if batch_first else 1):
            return a
        if isinstance(a, Mapping) or dataclasses.is_dataclass(a):
            inner = dict(a) if isinstance(a, Mapping) else {f.name: getattr(a, f.name) for f in dataclasses.fields(a)}
            found = leading_tensor((), inner, batch_first)
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


def _check_sequence_first(name, m):
    """In a batch-first engine, refuse a module that takes sequence-first [T, B, ...] inputs: a sequence-first model
    run that way would be clipped per time step (its [T, B, ...] layer inputs lead with T, which is taken as the
    batch size; shapes cannot tell when T happens to equal B)."""
    if not isinstance(m, (nn.MultiheadAttention, nn.RNNBase)) or getattr(m, "batch_first", True):
        return
    if not any(p.requires_grad for p in m.parameters()):
        return
    raise UnsupportedLayerError(
        f"module '{name}' ({type(m).__name__}) has batch_first=False: it takes sequence-first [T, B, ...] inputs, "
        "but fastdp was built with batch_first=True (samples in dim 0 of the model input and of every layer "
        "input). If the model is sequence-first, pass batch_first=False to DPOptimizer / make_private / "
        "GradSampleEngine (the samples are then dim 1 of the model input); if the model is batch-first, construct "
        "the module with batch_first=True (nn.Transformer* layers take batch_first too).")


def _check_batchnorm_hook(name, module, args):
    _check_batchnorm(name, module)


def _check_running_stats(name, m):
    if m.training and m.track_running_stats:
        raise UnsupportedLayerError(
            f"module '{name}' ({type(m).__name__}) has track_running_stats=True in training mode: its running_mean / "
            "running_var are updated from the batch, a function of the private data that DP-SGD's noise does not "
            "cover and that is released with the model. Use track_running_stats=False "
            "(opacus.validators.ModuleValidator.fix does this), or call .eval() on the module.")


def _check_running_stats_hook(name, module, args):
    _check_running_stats(name, module)


def _refuse_create_graph(grad_outputs):
    """Pre-hook of a reentrant checkpoint region's node: its backward runs with grad mode on iff create_graph=True
    (its nested backward pass would then take first-order gradients only, and the engine would not see it)."""
    if torch.is_grad_enabled():
        raise UnsupportedLayerError(
            "backward with create_graph=True (double backward: gradient penalties, higher-order gradients) through a "
            "reentrant activation checkpoint region is not supported by fastdp: the layers' backward is not "
            "differentiable with respect to the parameters, so the second-order terms would be silently missing")


def _guard_hook(name, p):
    if p.grad is not None:
        raise UnsupportedLayerError(
            f"parameter '{name}' received a gradient through an operation the DP engine did not see: it was used "
            "outside the forward of the model the engine is attached to (e.g. a submodule called directly, or a "
            "parameter added to the model after the DP optimizer was built). Run the training forward through the "
            "model given to fastdp.")
