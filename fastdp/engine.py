"""The book-keeping engine: one backward pass turns into per-sample clipped gradient sums.

Data path, top to bottom:

1. **hooks**: a forward pre-hook on the model swaps every trainable parameter slot for a ``ParamTap``
   (``fastdp.tap``) for the duration of the forward; layer handlers run each op through an autograd
   function that computes input gradients only.
2. **norms**: in backward each use hands a compact per-sample gradient (``fastdp.grad_sample``) to
   ``submit``, which takes its per-sample squared norm at once.
3. **clip factors**: when the backward pass ends (an autograd callback), ``finalize`` adds the
   norms over parameters (cross terms for parameters used more than once) and asks the clipping
   rule for factors ``c_i``.
4. **accumulation**: each use adds ``sum_i c_i G_i`` in one pass (for Linear: the weight-gradient
   GEMM of non-private training on clip-scaled output gradients) into a flat buffer (``grad_buffer``).

Per-parameter clipping rules (``clipping="per_layer"``) need no book-keeping across parameters: steps 3
and 4 run for a parameter inside backward as soon as its last pending use has arrived (``PendingUse``
counts the uses recorded in forward), and its activations and output gradients are freed there, so
memory stays that of non-private training.

Noise and the base optimizer step are the optimizer's (``fastdp.optimizer.DPOptimizer``).
"""
from __future__ import annotations

import dataclasses
import functools
import threading
from collections import defaultdict
from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

import fastdp.layers  # noqa: F401  (registers the layer handlers)
from fastdp.clipping import ClipRule
from fastdp.grad_buffer import GradBuffer
from fastdp.grad_sample import DenseGrad, PerSampleGrad, masked, per_sample_dot
from fastdp.masks import Mask
from fastdp.tap import BatchSizeError, ParamTap, TapContext, UnsupportedLayerError

LOSS_REDUCTIONS = ("mean", "sum")

# Explicit per-sample gradients of parameters up to this many elements (biases, norm affines) are batched at the end
# of backward: one [B, S] block, a few ops for all of them (per-layer rules too: their [B, numel] is small).
SMALL_NUMEL = 1 << 16

# Modules whose forward flattens a [B, T, d] input to [B*T, d] rows in sample order before a matmul.
SAMPLE_MAJOR_FLATTENERS = {"transformers.pytorch_utils.Conv1D"}


class NonFiniteNormError(FloatingPointError):
    """A per-sample gradient norm is NaN or infinite (policy: always an error, never a silent skip)."""


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _leading_dim(args, kwargs) -> Optional[int]:
    """Leading dim of the first tensor argument of the model's forward with a dim (nested containers included:
    lists, tuples, dicts, other mappings such as HF's ``BatchEncoding``, dataclasses such as HF's model outputs)."""
    for a in tree_flatten((args, kwargs))[0]:
        if isinstance(a, torch.Tensor) and not isinstance(a, ParamTap) and a.dim() > 0:
            return a.shape[0]
        if isinstance(a, Mapping) or dataclasses.is_dataclass(a):
            inner = dict(a) if isinstance(a, Mapping) else {f.name: getattr(a, f.name) for f in dataclasses.fields(a)}
            found = _leading_dim((), inner)
            if found is not None:
                return found
    return None


class PendingCounts:
    """Per parameter, the uses recorded in forward whose gradient has not arrived. Updated from the forward thread,
    the autograd threads (one per device) and the garbage collector: under a lock."""

    def __init__(self):
        self._counts: Dict[nn.Parameter, int] = {}
        self._lock = threading.Lock()

    def add(self, param: nn.Parameter, delta: int) -> None:
        with self._lock:
            self._counts[param] = self._counts.get(param, 0) + delta

    def get(self, param: nn.Parameter) -> int:
        return self._counts.get(param, 0)


class ForwardPass:
    """One forward of the model, shared by the uses it opened: ``done`` once a backward pass that took its samples'
    gradients was finalised (a later pass reaching other uses of it would clip the same samples again)."""

    __slots__ = ("done",)

    def __init__(self):
        self.done = False


class PendingUse:
    """One use of a parameter recorded in a forward whose per-sample gradient has not reached the engine.

    Layer handlers open one per parameter use (``GradSampleEngine.open_use``) and pass it with the
    gradient to ``submit``. It lives in the autograd graph (the op's ctx): if the graph is freed
    without a backward, the use stops counting.
    """

    __slots__ = ("counts", "param", "arrived", "forward")

    def __init__(self, counts: PendingCounts, param: nn.Parameter, forward: Optional["ForwardPass"] = None):
        self.arrived = True  # nothing for __del__ to undo until the count is taken
        self.counts, self.param, self.forward = counts, param, forward
        counts.add(param, 1)
        self.arrived = False

    def arrive(self) -> bool:
        """Mark the gradient as arrived; False if it had arrived before (a retained graph run again)."""
        if self.arrived:
            return False
        self.arrived = True
        self.counts.add(self.param, -1)
        return True

    def __del__(self):  # also runs on an object whose __init__ raised: then there is nothing to undo
        if not getattr(self, "arrived", True):
            self.counts.add(self.param, -1)


class GradSampleEngine:
    """Attach to ``module``; after each backward, ``summed[p]`` holds ``sum_i c_i g_i`` for every trainable p.

    Several backward passes before a reset accumulate (micro-batches). Only passes that compute the parameters'
    gradients count (``loss.backward()``): ``torch.autograd.grad(loss, x)`` or ``backward(inputs=[x])`` leave the
    engine untouched, as they leave ``.grad`` untouched in PyTorch. Running a retained graph backward a second
    time is refused (its samples would be clipped and added twice), and so is ``create_graph=True``.

    Args:
        module: the model. Sample dim is dim 0 of every layer input.
        clip_rule: turns per-sample squared norms into clip factors (``fastdp.clipping``).
        loss_reduction: "mean" if the loss averages over the batch (per-sample gradients are then
            ``B`` times the per-sample output gradients), "sum" otherwise.
        fused_per_layer: clip and accumulate each parameter inside backward once all its uses have arrived
            (only for per-parameter rules; default: whenever the rule is per-parameter).
    """

    def __init__(self, module: nn.Module, clip_rule: ClipRule, *, loss_reduction: str = "mean",
                 fused_per_layer: Optional[bool] = None):
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        self.module = module
        self.clip_rule = clip_rule
        self.loss_reduction = loss_reduction
        if fused_per_layer and not clip_rule.per_param:
            raise ValueError(f"fused_per_layer needs a per-parameter clipping rule, got {clip_rule!r}")
        self.fused_per_layer = clip_rule.per_param if fused_per_layer is None else bool(fused_per_layer)
        self.buffer: Optional[GradBuffer] = None
        self._dirty = False  # the buffer holds sums not yet taken by a step
        self.num_samples = 0
        self.num_backward = 0
        # the last backward's flat per-sample norms and factors at the recorded scale, and that scale (the loss
        # reduction's B): ``last_norms`` / ``last_factors`` convert them when read
        self._last = None
        self.last_fused = 0  # parameters the last backward clipped during backward (fused per-layer clipping)
        self.stale_grad_check = False  # set by the optimizer after writing .grad; cleared by zero_grad
        self.masks: Dict[nn.Parameter, Mask] = {}
        self.mask_version = 0  # bumped by every set_mask (caches of flattened masks key on it)
        # parameters whose sum of |clipped per-sample gradient| is wanted per coordinate (``abs_sums``), or per
        # output-neuron group along the given dim (``abs_row_sums``: SPARTA's selection release, fused on Linear-like
        # layers by the row-group abs-sum kernel)
        self.collect_abs: set = set()
        self.abs_sums: Dict[nn.Parameter, torch.Tensor] = {}
        self.collect_abs_rows: Dict[nn.Parameter, int] = {}
        self.abs_row_sums: Dict[nn.Parameter, torch.Tensor] = {}
        self._ready: Dict[nn.Parameter, List[PerSampleGrad]] = {}  # this pass's uses not yet accumulated
        self._callback_queued = None  # graph task id of the backward pass whose callback is queued
        self._pending = PendingCounts()  # uses recorded in forward whose gradient has not arrived
        self.poisoned = False  # a failed pass left partial sums in a buffer holding earlier micro-batches
        self._new_pass_state()
        self.batch_size: Optional[int] = None  # leading dim of the root module's input in this forward
        self._swapped: Optional[list] = None
        self._contexts: Dict[nn.Module, TapContext] = {}
        self._taps: Dict[tuple, ParamTap] = {}
        self._handles = []
        self._guarded = set()
        # every handler's autograd function takes this scalar, so ops join the graph without the parameters
        self.anchor = torch.zeros((), requires_grad=True)
        # its AccumulateGrad node (held, so every graph uses this one): a backward pass computes the parameters'
        # gradients iff it executes this node (``recording``)
        self._anchor_node = torch.autograd.graph.get_gradient_edge(self.anchor).node
        self._forward = ForwardPass()  # the current (last) forward of the model
        self._task_recording = (None, False)  # (graph task id, whether it records) of the last pass asked
        self._module_names = {m: n for n, m in module.named_modules()}
        names = defaultdict(list)
        for n, p in module.named_parameters(remove_duplicate=False):
            names[p].append(n)
        self.param_names = {p: " = ".join(ns) for p, ns in names.items()}
        self._attach()

    # ------------------------------------------------------------------ hooks
    def _attach(self):
        for name, m in self.module.named_modules():  # validate everything before touching the model
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                _check_batchnorm(name, m)
        for name, m in self.module.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # (partial, not a lambda: the model stays picklable)
                self._handles.append(m.register_forward_pre_hook(functools.partial(_check_batchnorm_hook, name)))
        # (module, name) of every parameter slot, in module order: swapped for taps around the root forward
        self._slots = [(m, n) for m in self._module_names for n, p in m._parameters.items() if p is not None]
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
        """A deep copy of the model (EMA, evaluation copies) is a plain model: its copied hooks see an inert engine."""
        return _InertEngine()

    def __reduce__(self):
        """Pickling the model (``torch.save(model)``) saves a plain model, as ``__deepcopy__`` copies one."""
        return (_InertEngine, ())

    def detach(self) -> None:
        """Remove every hook; the module is a plain PyTorch module again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _swap_in(self, module, args, kwargs):
        """Root pre-hook: every trainable parameter slot of the model holds its tap during the forward."""
        if not torch.is_grad_enabled() or self._swapped is not None:
            return
        self.batch_size = _leading_dim(args, kwargs)
        if self.batch_size is None:  # every layer's batch check would be skipped: fail closed
            raise BatchSizeError(
                f"the model's forward ({type(module).__name__}) got no tensor argument with a leading batch dim "
                "(looked through tensors, lists, tuples, dicts and other mappings, dataclasses): fastdp takes the "
                "batch size from it to check every layer input. Pass the batch as a tensor, or a container of "
                "tensors, whose dim 0 is the sample dim.")
        self._forward = ForwardPass()
        swapped = []
        for m, n in self._slots:
            p = m._parameters[n]
            if isinstance(p, ParamTap) and p._fdp_ctx.engine is not self:
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
                ctx = TapContext(self, self._module_names.get(module, owner_type.__name__), owner_type.__name__,
                                 rows_sample_major=_qualname(owner_type) in SAMPLE_MAJOR_FLATTENERS)
                self._contexts[module] = ctx
            tap = ParamTap(p, p, None, ctx, name)
            self._taps[key] = tap
        return tap

    # --------------------------------------------------------------- backward
    def set_mask(self, param: nn.Parameter, mask: Optional[Mask]) -> None:
        """Train only ``mask``'s coordinates of ``param`` (norms after masking); None removes the mask."""
        if param not in self.param_names:
            raise KeyError("not a parameter of the model this engine is attached to")
        if self._dirty:  # masks act on the sums at backward, on the noise at step: they must agree
            raise RuntimeError("set_mask between backward() and optimizer.step(): the clipped sums already taken "
                               "were masked with the old mask, and the step's noise would follow the new one "
                               "(coordinates could be released without noise). Change masks after step() or "
                               "zero_grad().")
        if mask is None:
            self.masks.pop(param, None)
        else:
            mask.check(param)
            self.masks[param] = mask
        self.mask_version += 1

    def _apply_mask(self, grad: PerSampleGrad) -> PerSampleGrad:
        mask = self.masks.get(grad.param)
        if mask is None:
            return grad
        if mask.rows is not None and not mask.standardizes and grad.restrict_rows(mask.rows, mask.dim):
            return grad
        center = mask.center
        if center is not None and self.loss_reduction == "mean" and grad.batch_size:
            # the recorded gradients are those of the mean loss, g_i / B (scaled by B at the clip step):
            # (g_i / B - center / B) / scale, times B, is the wanted (g_i - center) / scale
            center = center / grad.batch_size
        return masked(grad, mask.dense, center, mask.scale)

    def recording(self) -> bool:
        """Called in backward: whether the current backward pass computes the parameters' gradients.

        ``loss.backward()`` does (it runs the anchor's AccumulateGrad node); ``torch.autograd.grad(loss, x)`` and
        ``loss.backward(inputs=[x])`` do not (PyTorch leaves ``.grad`` untouched there): their per-sample gradients
        are dropped. ``create_graph=True`` is refused: the layer functions' backward is not differentiable with
        respect to the parameters, so second-order terms (gradient penalties) would be silently missing.
        """
        if torch.is_grad_enabled():  # grad mode in backward: create_graph=True
            raise UnsupportedLayerError(
                "backward with create_graph=True (double backward: gradient penalties, higher-order gradients) is not "
                "supported by fastdp: the layers' backward is not differentiable with respect to the parameters, so "
                "the second-order terms would be silently missing")
        task = torch._C._current_graph_task_id()
        if self._task_recording[0] != task:
            try:
                rec = bool(torch._C._will_engine_execute_node(self._anchor_node))
            except RuntimeError:  # autograd.grad asking for the anchor itself (never a training pass)
                rec = False
            self._task_recording = (task, rec)
        return self._task_recording[1]

    def open_use(self, tap: Optional[ParamTap]) -> Optional[PendingUse]:
        """Record (in forward) a use of ``tap``'s parameter whose gradient will reach ``submit``."""
        return None if tap is None else PendingUse(self._pending, tap._fdp_param, self._forward)

    def _new_pass_state(self) -> None:
        self._pass_batch: Optional[int] = None
        self._pass_sq: Dict[nn.Parameter, torch.Tensor] = {}  # parameters already clipped in this pass
        self._pass_factors: Dict[nn.Parameter, torch.Tensor] = {}
        self._pass_fused = False  # something was accumulated during this pass
        self._pass_was_dirty = False  # ... into a buffer that already held earlier micro-batches
        self._pass_no_fuse = False
        self._pass_forwards: set = set()  # the ForwardPass of every use that reached this pass

    def _abandon_pass(self) -> None:
        """A pass ended without finalising: drop what it accumulated (or poison the micro-batch sums)."""
        if self._pass_fused:
            if self._pass_was_dirty:
                self.poisoned = True
            else:
                self._dirty = False  # the buffer is zeroed before its next use
        self._ready = {}
        self._new_pass_state()

    def submit(self, grad: PerSampleGrad, use: Optional[PendingUse] = None) -> None:
        """Take one use's per-sample gradient (from backward); its squared norm is computed now.

        ``use``: the ``PendingUse`` opened for it in forward (per-parameter rules then clip the parameter as
        soon as no use of it is pending).
        """
        if not self.recording():  # a pass that does not compute the parameters' gradients
            grad.release()
            return
        if use is not None and use.forward is not None and use.forward.done and not use.arrived:
            raise RuntimeError(
                f"parameter '{self.param_names.get(grad.param, '?')}' received a gradient from a forward whose samples "
                "were already clipped in an earlier backward pass (one forward, several backward calls, e.g. two "
                "losses or two heads with retain_graph=True): each sample would be clipped once per pass, and its "
                "contribution could exceed max_grad_norm. Sum the losses and call backward once.")
        if use is not None and not use.arrive():  # a retained graph run backward again
            raise RuntimeError(
                f"parameter '{self.param_names.get(grad.param, '?')}' received a gradient from a graph that was "
                "already backpropagated (retain_graph=True): the same samples would be clipped twice (their "
                "contribution would exceed max_grad_norm). Sum the losses and call backward once.")
        task = torch._C._current_graph_task_id()
        if self._callback_queued != task:
            # first use of this backward pass (a failed earlier pass may have left stale state: drop it)
            self._abandon_pass()
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
            self._callback_queued = task
        if use is not None and use.forward is not None:
            self._pass_forwards.add(use.forward)
        if use is None:  # untracked use: its parameter is clipped at the end of backward
            if self._pass_fused:
                raise RuntimeError(
                    f"parameter '{self.param_names.get(grad.param, '?')}' received a gradient of a use not recorded "
                    "in forward after per-layer fused clipping started in this backward pass; build the DPOptimizer "
                    "with fused_per_layer=False.")
            self._pass_no_fuse = True
        mask = self.masks.get(grad.param) if self.masks else None
        if mask is not None and mask.standardizes:
            grad.sq_self = None  # standardised once all uses of the parameter are summed (``_standardise``)
        else:
            if mask is not None:
                grad = self._apply_mask(grad)
            grad.sq_self = None if _is_small(grad) else grad.sq_norm()  # small: batched at the end (``_small``)
        self._ready.setdefault(grad.param, []).append(grad)
        if (self.fused_per_layer and not self._pass_no_fuse and self._pending.get(grad.param) == 0
                and not _is_small(grad)):
            self._clip_in_backward(grad.param)

    def _clip_in_backward(self, p: nn.Parameter) -> None:
        """Per-parameter rules: clip and accumulate ``p`` now (all its uses in this graph have arrived)."""
        uses = self._standardise(p, self._ready.pop(p))
        batch = self._batch_size(uses, self._pass_batch)
        if not self._pass_fused:
            self._check_not_stale()
            self._pass_was_dirty = self._dirty
            self._buffer()
            self._dirty = True
            self._pass_fused = True
        self._pass_batch = batch
        red = float(batch) if self.loss_reduction == "mean" else 1.0
        sq = self._param_sq_norm(uses)  # of the recorded gradients, 1/red of the per-sample ones
        c = self.clip_rule.factors({p: sq}, red)[p]  # red * c_i: applies to the recorded gradients
        self._accumulate(p, uses, c, self.buffer)
        self._pass_sq[p] = sq
        self._pass_factors[p] = c

    def _standardise(self, p: nn.Parameter, uses: List[PerSampleGrad]) -> List[PerSampleGrad]:
        """A standardising mask applies to the parameter's whole per-sample gradient: the uses of a parameter used
        more than once (tied weights) are summed first (explicitly), then standardised and masked."""
        mask = self.masks.get(p)
        if mask is None or not mask.standardizes:
            return uses
        g = uses[0]
        if len(uses) > 1:
            g = DenseGrad(p, uses[0].owner, _sum(u.materialize() for u in uses))
            for u in uses:
                u.release()
        g = self._apply_mask(g)
        g.sq_self = g.sq_norm()
        return [g]

    def _check_not_stale(self) -> None:
        if self.stale_grad_check:
            if all(p.grad is None for p in self.param_names):  # cleared another way: model.zero_grad(), ...
                self.stale_grad_check = False
                return
            raise RuntimeError("backward() after optimizer.step() without optimizer.zero_grad(): the previous "
                               "step's noisy gradients are still in .grad. Call zero_grad() before the next backward.")

    def _finalize(self) -> None:
        self._callback_queued = None
        ready, self._ready = self._ready, {}  # taken before anything can raise: the next pass starts clean
        fused = self._pass_fused
        if not ready and not fused:
            return
        try:
            self._finalize_pass(ready)
        except BaseException:
            self._abandon_pass()
            raise
        for f in self._pass_forwards:
            f.done = True
        self._new_pass_state()

    def _finalize_pass(self, ready: Dict[nn.Parameter, List[PerSampleGrad]]) -> None:
        self._check_not_stale()
        ready = {p: self._standardise(p, uses) for p, uses in ready.items()}
        batch = self._batch_size([g for uses in ready.values() for g in uses], self._pass_batch)
        red = float(batch) if self.loss_reduction == "mean" else 1.0
        buf = self._buffer() if not self._pass_fused else self.buffer
        small = self._small(ready, buf)  # explicit small gradients as one [B, S] block
        block = torch.cat([ready[p][0].g.reshape(batch, p.numel()) for p in small], 1) if small else None
        in_small = set(small)  # (a set: ``in`` on a list of tensors would compare values)
        per_param = self.clip_rule.per_param
        # squared norms of the recorded gradients (per-sample gradients are ``red`` times them: factors and the
        # reported norms account for it)
        sq = {p: self._param_sq_norm(uses) for p, uses in ready.items() if p not in in_small}
        parts = list(sq.values()) + list(self._pass_sq.values())  # (the latter: clipped during backward)
        if small:
            block_sq = block.pow(2)
            if per_param:  # [B, k] squared norms of the k small parameters, one segment sum
                segments = self._segments(small, block.device)
                small_sq = block_sq.new_zeros(batch, len(small)).index_add_(1, segments, block_sq)
                parts.append(small_sq.sum(1))
            else:
                parts.append(block_sq.sum(1))
        total = _stack_sum(parts)
        self._check_finite(total, {**self._pass_sq, **sq}, small and {p: ready[p][0] for p in small})
        if per_param:
            factors = self.clip_rule.factors(sq, red)
            if small:
                small_c = self.clip_rule.stacked_factors(small, small_sq, red)  # [B, k]
                factors.update(zip(small, small_c.unbind(1)))
        else:
            factors = dict.fromkeys(ready, self.clip_rule.shared_factor(total, red))
        for p, uses in ready.items():
            if p not in in_small:
                self._accumulate(p, uses, factors[p], buf)
        if small:  # sum_i c_i g_i of every small parameter at once, one foreach add into their views
            if per_param:  # factor of coordinate s's parameter, per sample
                sums = (block * small_c.index_select(1, segments).to(block.dtype)).sum(0)
            else:
                sums = torch.mv(block.t(), factors[small[0]].to(block.dtype))
            torch._foreach_add_([buf.view(p).view(-1) for p in small], list(sums.split([p.numel() for p in small])))
            for p in small:
                ready[p][0].release()
        self._last = (total, {**self._pass_factors, **factors}, red)
        self.last_fused = len(self._pass_factors)
        self.num_samples += batch
        self.num_backward += 1
        self._dirty = True

    @property
    def last_norms(self) -> Optional[torch.Tensor]:
        """[B] flat per-sample gradient norms of the last backward pass (None before the first)."""
        if self._last is None:
            return None
        total, _, red = self._last  # squared norms of the recorded gradients
        norm = total.sqrt()
        return norm * red if red not in (0.0, 1.0) else norm

    @property
    def last_factors(self) -> Optional[Dict[nn.Parameter, torch.Tensor]]:
        """{param: [B] clip factors c_i} of the last backward pass (the clipped sum is ``sum_i c_i g_i``)."""
        if self._last is None:
            return None
        _, factors, red = self._last
        if red in (0.0, 1.0):  # 0: an empty batch (no factors)
            return dict(factors)
        unscaled = {}  # flat rules share one tensor: divide it once
        for c in factors.values():
            if id(c) not in unscaled:
                unscaled[id(c)] = c / red
        return {p: unscaled[id(c)] for p, c in factors.items()}

    def _accumulate(self, p: nn.Parameter, uses: List[PerSampleGrad], c: torch.Tensor, buf: GradBuffer) -> None:
        """Add ``sum_i c_i g_i`` of ``p``'s uses into ``buf`` and free them (``c``: [B] factors, loss scale in)."""
        out = buf.view(p)
        if p in self.collect_abs:  # sum_i |c_i g_i| per coordinate: needs the per-sample gradients
            a = _abs_sum(uses, c)
            self.abs_sums[p] = self.abs_sums[p] + a if p in self.abs_sums else a
        if p in self.collect_abs_rows:  # the same summed over each output-neuron group
            dim = self.collect_abs_rows[p]
            r = uses[0].row_abs_sum(c, dim) if len(uses) == 1 else None
            if r is None:
                a = _abs_sum(uses, c)
                r = a.movedim(dim, 0).reshape(a.shape[dim], -1).sum(1)
            self.abs_row_sums[p] = self.abs_row_sums[p] + r if p in self.abs_row_sums else r
        for g in uses:
            g.clipped_sum(c, out)
            g.release()

    def _buffer(self) -> GradBuffer:
        """The accumulation buffer over the currently trainable parameters (rebuilt if that set changed)."""
        params = self._trainable()
        if self.buffer is None or not self.buffer.matches(params):
            if self._dirty:
                raise RuntimeError("the set of trainable parameters changed between backward passes of one step")
            self.buffer = GradBuffer(params)
        elif not self._dirty:
            self.buffer.zero_()
        return self.buffer

    @property
    def summed(self) -> Dict[nn.Parameter, torch.Tensor]:
        """``sum_i c_i g_i`` per parameter touched since the last reset (views into the flat buffer)."""
        if self.buffer is None or not self._dirty:
            return {}
        return {p: self.buffer.views[p] for p in self.buffer.touched}

    def _batch_size(self, ready: Iterable[PerSampleGrad], known: Optional[int] = None) -> int:
        sizes = {} if known is None else {known: "an earlier layer of this pass"}
        for g in ready:
            sizes.setdefault(g.batch_size, g.owner)
        if len(sizes) > 1:
            desc = ", ".join(f"{b} (module '{o}')" for b, o in sizes.items())
            raise BatchSizeError(f"layers saw different batch sizes in one backward: {desc}. The sample dim must "
                                 "be dim 0 of every layer input (broadcast inputs shared by the batch must be "
                                 "expanded to the batch size)")
        return next(iter(sizes))

    def _small(self, ready: Dict[nn.Parameter, List[PerSampleGrad]], buf: GradBuffer) -> List[nn.Parameter]:
        """Parameters whose norms and clipped sums are batched: one small plain explicit use, no abs sums, the
        accumulation dtype of the buffer. At least two, else nothing is gained."""
        small, dtype = [], None
        for p, uses in ready.items():
            g = uses[0]
            if len(uses) != 1 or not _is_small(g) or p in self.collect_abs or p in self.collect_abs_rows:
                continue
            if g.g.dtype != buf.views[p].dtype or (dtype is not None and g.g.dtype != dtype):
                continue
            dtype = g.g.dtype
            small.append(p)
        return small if len(small) > 1 else []

    def _segments(self, params: List[nn.Parameter], device: torch.device) -> torch.Tensor:
        """[S] int64: for each coordinate of the concatenated ``params``, the index of its parameter (cached)."""
        key = (tuple(map(id, params)), device)
        cache = getattr(self, "_segment_cache", None)
        if cache is None or cache[0] != key:
            sizes = torch.tensor([p.numel() for p in params])
            idx = torch.repeat_interleave(torch.arange(len(params)), sizes).to(device)
            self._segment_cache = cache = (key, idx)
        return cache[1]

    @staticmethod
    def _param_sq_norm(uses: List[PerSampleGrad]) -> torch.Tensor:
        for g in uses:
            if g.sq_self is None:  # deferred at submit (small explicit gradients)
                g.sq_self = g.sq_norm()
        if len(uses) == 1:
            return uses[0].sq_self
        total = _sum(g.sq_self for g in uses)
        for i in range(len(uses)):
            for j in range(i + 1, len(uses)):
                total = total + 2.0 * per_sample_dot(uses[i], uses[j])
        return total.clamp(min=0.0)  # cross terms may round a zero norm slightly negative

    def _check_finite(self, total: torch.Tensor, sq, small=None) -> None:
        """Raise on a NaN/inf per-sample norm (one reduction; the per-parameter search only on failure).

        ``small``: {param: gradient} of batched parameters, whose norms are taken one by one only on failure."""
        if bool(torch.isfinite(total).all()):
            return
        sq = {**sq, **{p: g.sq_norm() for p, g in (small or {}).items()}}
        p, v = next((p, v) for p, v in sq.items() if not bool(torch.isfinite(v).all()))
        idx = (~torch.isfinite(v)).nonzero().flatten().tolist()
        raise NonFiniteNormError(
            f"non-finite per-sample gradient norm for parameter '{self.param_names.get(p, '?')}' at samples "
            f"{idx[:10]} of the batch. Check the loss and inputs (with fp16, the loss scale).")

    def _trainable(self) -> List[nn.Parameter]:
        return [p for p in self.param_names if p.requires_grad]

    def reset(self) -> None:
        """Forget accumulated sums (after a step, or on zero_grad); the buffer is zeroed lazily."""
        self._dirty = False
        self.poisoned = False
        self.abs_sums = {}
        self.abs_row_sums = {}
        self.num_samples = 0
        self.num_backward = 0


class _InertEngine:
    """What a deep-copied or unpickled model's hooks are bound to: they swap nothing (see
    GradSampleEngine.__deepcopy__ and __reduce__)."""

    _slots = ()
    _swapped = None
    batch_size = None
    _taps: dict = {}

    def _swap_in(self, module, args, kwargs):  # (an unpickled hook is bound to these)
        return None

    def _swap_out(self, module, args, kwargs, output):
        return None


def _is_small(grad: PerSampleGrad) -> bool:
    """A plain explicit per-sample gradient of a small parameter: batched with the others at the end of backward."""
    return type(grad) is DenseGrad and grad.param.numel() <= SMALL_NUMEL


def _abs_sum(uses: List[PerSampleGrad], c: torch.Tensor) -> torch.Tensor:
    """``sum_i |c_i g_i|`` per coordinate of one parameter (its uses' per-sample gradients formed explicitly)."""
    per_sample = _sum(g.materialize() for g in uses)
    return torch.tensordot(c.to(per_sample.dtype), per_sample.abs(), dims=1)


def _stack_sum(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Sum of [B] tensors in one reduction (one launch instead of one add per tensor)."""
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).sum(0)


def _sum(tensors):
    it = iter(tensors)
    total = next(it)
    for t in it:
        total = total + t
    return total


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
        _untracked_use(name)


def _untracked_use(name):
    raise UnsupportedLayerError(
        f"parameter '{name}' received a gradient through an operation the DP engine did not see: it was used "
        "outside the forward of the model the engine is attached to (e.g. a submodule called directly, or a "
        "parameter added to the model after the DP optimizer was built). Run the training forward through the "
        "model given to fastdp.")
