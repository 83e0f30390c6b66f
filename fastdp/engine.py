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

from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

import fastdp.layers  # noqa: F401  (registers the layer handlers)
from fastdp.clipping import ClipRule
from fastdp.engine_state import ForwardPass, PassState, PendingCounts, PendingUse, RecomputedUse, ReentrantUse, SumState
from fastdp.grad_buffer import GradBuffer
from fastdp.grad_sample import DenseGrad, PerSampleGrad, masked, per_sample_dot
from fastdp.masks import Mask
from fastdp.model_hooks import ModelHooks
from fastdp.small_params import SmallBlock, SmallParamBatcher, is_small
from fastdp.tap import BatchSizeError, ParamTap, UnsupportedLayerError

LOSS_REDUCTIONS = ("mean", "sum")


class NonFiniteNormError(FloatingPointError):
    """A per-sample gradient norm is NaN or infinite (policy: always an error, never a silent skip)."""


class GradSampleEngine:
    """Attach to ``module``; after each backward, ``summed[p]`` holds ``sum_i c_i g_i`` for every trainable p.

    Several backward passes before a reset accumulate (micro-batches). Only passes that compute the parameters'
    gradients count (``loss.backward()``): ``torch.autograd.grad(loss, x)`` or ``backward(inputs=[x])`` leave the
    engine untouched, as they leave ``.grad`` untouched in PyTorch. Running a retained graph backward a second
    time is refused (its samples would be clipped and added twice), and so is ``create_graph=True``.

    Args:
        module: the model. Sample dim is dim 0 of every layer input (``batch_first=False``: dim 1 of the model
            input and of every [T, B, ...] layer input, as Opacus' ``GradSampleModule(batch_first=False)``).
        clip_rule: turns per-sample squared norms into clip factors (``fastdp.clipping``).
        loss_reduction: "mean" if the loss averages over the batch (per-sample gradients are then
            ``B`` times the per-sample output gradients), "sum" otherwise.
        fused_per_layer: clip and accumulate each parameter inside backward once all its uses have arrived
            (only for per-parameter rules; default: whenever the rule is per-parameter).

    Parts: ``hooks`` (``fastdp.model_hooks``: taps swapped in around the forward), ``sums`` and ``pass_``
    (``fastdp.engine_state``: the buffer's lifecycle across a step, the backward pass under way), ``observers``
    (e.g. ``fastdp.abs_stats.AbsSumObserver``: statistics of the clipped per-sample gradients, installed by a
    method), ``small`` (``fastdp.small_params``: small parameters batched at the end of backward).
    """

    def __init__(self, module: nn.Module, clip_rule: ClipRule, *, loss_reduction: str = "mean",
                 fused_per_layer: Optional[bool] = None, batch_first: bool = True):
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be True or False, got {batch_first!r}")
        self.batch_first = batch_first
        if fused_per_layer and not clip_rule.per_param:
            raise ValueError(f"fused_per_layer needs a per-parameter clipping rule, got {clip_rule!r}")
        self.module, self.clip_rule, self.loss_reduction = module, clip_rule, loss_reduction
        self.fused_per_layer = clip_rule.per_param if fused_per_layer is None else bool(fused_per_layer)
        self.sums = SumState()
        self.pass_ = PassState()
        self.observers: list = []
        self.small = SmallParamBatcher()
        self.num_samples = 0
        self.num_backward = 0
        # the last backward's flat per-sample norms and factors at the recorded scale, and that scale (the loss
        # reduction's B): ``last_norms`` / ``last_factors`` convert them when read
        self._last = None
        self.last_fused = 0  # parameters the last backward clipped during backward (fused per-layer clipping)
        self.masks: Dict[nn.Parameter, Mask] = {}
        self.mask_version = 0  # bumped by every set_mask (caches of flattened masks key on it)
        self._ready: Dict[nn.Parameter, List[PerSampleGrad]] = {}  # this pass's uses not yet accumulated
        self._callback_queued = None  # graph task id of the backward pass whose callback is queued
        self._pending = PendingCounts()  # uses recorded in forward whose gradient has not arrived
        # every handler's autograd function takes this scalar, so ops join the graph without the parameters
        self.anchor = torch.zeros((), requires_grad=True)
        # its AccumulateGrad node (held, so every graph uses this one): a backward pass computes the parameters'
        # gradients iff it executes this node (``recording``)
        self._anchor_node = torch.autograd.graph.get_gradient_edge(self.anchor).node
        self._forward = ForwardPass()  # the current (last) forward of the model
        self._task_recording = (None, False)  # (graph task id, whether it records) of the last pass asked
        self.hooks = ModelHooks(self, module)
        self.param_names = self.hooks.param_names  # {param: its name(s) in the model}

    # ------------------------------------------------------------------ the model's side
    @property
    def batch_size(self) -> Optional[int]:
        """Leading dim of the root module's input in the current forward."""
        return self.hooks.batch_size

    def new_forward(self) -> None:
        """Called by the root pre-hook: uses opened from now on belong to a new forward."""
        self._forward = ForwardPass()

    def detach(self) -> None:
        """Remove every hook; the module is a plain PyTorch module again."""
        self.hooks.detach()

    def open_use(self, tap: Optional[ParamTap]):
        """Record (in forward) a use of ``tap``'s parameter whose gradient will reach ``submit`` (a ``PendingUse``; a
        ``RecomputedUse``, not counted, while a checkpointed region is recomputed: ``fastdp.checkpointing``)."""
        if tap is None:
            return None
        if self.hooks.replaying:
            if self.hooks.reentrant is not None:  # a reentrant region's recomputation: its only uses, counted
                forward, task = self.hooks.reentrant
                return ReentrantUse(self._pending, tap._fdp_param, forward, task)
            return RecomputedUse(tap._fdp_param)
        return PendingUse(self._pending, tap._fdp_param, self._forward)

    def hold_use(self, param: nn.Parameter) -> PendingUse:
        """A pending use of ``param`` held from a reentrant checkpoint region's forward (which records none) until its
        recomputation in backward opens the region's uses: per-layer fused clipping waits for them."""
        return PendingUse(self._pending, param, None)

    def set_mask(self, param: nn.Parameter, mask: Optional[Mask]) -> None:
        """Train only ``mask``'s coordinates of ``param`` (norms after masking); None removes the mask."""
        if param not in self.param_names:
            raise KeyError("not a parameter of the model this engine is attached to")
        if self.sums.dirty:  # masks act on the sums at backward, on the noise at step: they must agree
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

    # ------------------------------------------------------------------ backward: norms as gradients arrive
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

    def submit(self, grad: PerSampleGrad, use: Optional[PendingUse] = None) -> None:
        """Take one use's per-sample gradient (from backward); its squared norm is computed now.

        ``use``: the ``PendingUse`` opened for it in forward (per-parameter rules then clip the parameter as
        soon as no use of it is pending).
        """
        reentrant = isinstance(use, ReentrantUse)
        if not reentrant and not self.recording():  # a pass that does not compute the parameters' gradients
            grad.release()
            return
        self._check_use(grad, use)
        if reentrant:  # in the nested backward pass of a reentrant checkpoint: part of the outer pass
            if self._callback_queued != use.task:
                raise RuntimeError(
                    f"parameter '{self.param_names.get(grad.param, '?')}' received a gradient from a reentrant "
                    "checkpoint region's recomputation after the backward pass that recomputed it ended: fastdp cannot "
                    "add it to that pass's clipping")
        else:
            self.join_pass(torch._C._current_graph_task_id())
        if use is not None and use.forward is not None:
            self.pass_.forwards.add(use.forward)
        if use is None:  # untracked use: its parameter is clipped at the end of backward
            if self.pass_.fused:
                raise RuntimeError(
                    f"parameter '{self.param_names.get(grad.param, '?')}' received a gradient of a use not recorded "
                    "in forward after per-layer fused clipping started in this backward pass; build the DPOptimizer "
                    "with fused_per_layer=False.")
            self.pass_.no_fuse = True
        grad = self._take_norm(grad)
        self._ready.setdefault(grad.param, []).append(grad)
        if (self.fused_per_layer and not self.pass_.no_fuse and self._pending.get(grad.param) == 0
                and not is_small(grad)):
            self._clip_in_backward(grad.param)

    def join_pass(self, task: int) -> None:
        """Make the backward pass ``task`` (a graph task id: the current one) the pass under way: on its first use, drop
        what a failed earlier pass may have left and queue ``_finalize`` for its end. A reentrant checkpoint region
        joins the outer pass when it recomputes (its uses' gradients then arrive in a nested pass: ``submit``)."""
        if self._callback_queued != task:
            self._abandon_pass()
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize)
            self._callback_queued = task

    def _check_use(self, grad: PerSampleGrad, use: Optional[PendingUse]) -> None:
        """Refuse a gradient whose samples were already clipped: a forward backpropagated twice (or the graph of a
        checkpointed region's recomputation, whose original nodes hand over the same gradients)."""
        if isinstance(use, RecomputedUse):
            raise RuntimeError(
                f"parameter '{self.param_names.get(grad.param, '?')}' received a gradient through the graph that "
                "activation checkpointing recomputed in backward (a backward pass run inside a checkpointed "
                "region): its samples' gradients also come through the original forward's graph and would be clipped "
                "twice. Do not backpropagate inside a checkpointed region.")
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

    def _take_norm(self, grad: PerSampleGrad) -> PerSampleGrad:
        """Mask ``grad`` and take its squared norm now (deferred for small gradients and standardising masks)."""
        mask = self.masks.get(grad.param) if self.masks else None
        if mask is not None and mask.standardizes:
            grad.sq_self = None  # standardised once all uses of the parameter are summed (``_standardise``)
            return grad
        if mask is not None:
            grad = self._apply_mask(grad)
        grad.sq_self = None if is_small(grad) else grad.sq_norm()  # small: batched at the end (``small``)
        return grad

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

    # ------------------------------------------------------------------ per-layer rules: clip inside backward
    def _clip_in_backward(self, p: nn.Parameter) -> None:
        """Per-parameter rules: clip and accumulate ``p`` now (all its uses in this graph have arrived)."""
        uses = self._standardise(p, self._ready.pop(p))
        batch = self._batch_size(uses, self.pass_.batch)
        if not self.pass_.fused:
            self.sums.check_not_released(self.param_names)
            self.pass_.was_dirty = self.sums.dirty
            self._open_buffer()
            self.sums.dirty = True
            self.pass_.fused = True
        self.pass_.batch = batch
        red = float(batch) if self.loss_reduction == "mean" else 1.0
        sq = _param_sq_norm(uses)  # of the recorded gradients, 1/red of the per-sample ones
        c = self.clip_rule.factors({p: sq}, red)[p]  # red * c_i: applies to the recorded gradients
        self._accumulate(p, uses, c, self.sums.buffer)
        self.pass_.sq[p] = sq
        self.pass_.factors[p] = c

    # ------------------------------------------------------------------ end of backward: clip factors, sums
    def _finalize(self) -> None:
        self._callback_queued = None
        ready, self._ready = self._ready, {}  # taken before anything can raise: the next pass starts clean
        if not ready and not self.pass_.fused:
            return
        try:
            self._finalize_pass(ready)
        except BaseException:
            self._abandon_pass()
            raise
        for f in self.pass_.forwards:
            f.done = True
        self.pass_ = PassState()

    def _abandon_pass(self) -> None:
        """A pass ended without finalising: drop what it accumulated (or poison the micro-batch sums)."""
        self.sums.abandon(self.pass_)
        self._ready = {}
        self.pass_ = PassState()

    def _finalize_pass(self, ready: Dict[nn.Parameter, List[PerSampleGrad]]) -> None:
        """Norms over parameters -> clip factors -> ``sum_i c_i g_i`` into the buffer, for ``ready``'s parameters
        (and the flat norm over those clipped inside backward)."""
        self.sums.check_not_released(self.param_names)
        ready = {p: self._standardise(p, uses) for p, uses in ready.items()}
        batch = self._batch_size([g for uses in ready.values() for g in uses], self.pass_.batch)
        red = float(batch) if self.loss_reduction == "mean" else 1.0
        buf = self._open_buffer() if not self.pass_.fused else self.sums.buffer
        small = self.small.block(ready, buf, batch, self._observed)
        large = {p: uses for p, uses in ready.items() if small is None or p not in small.members}
        # squared norms of the recorded gradients (per-sample gradients are ``red`` times them: factors and the
        # reported norms account for it)
        sq = {p: _param_sq_norm(uses) for p, uses in large.items()}
        parts = list(sq.values()) + list(self.pass_.sq.values())  # (the latter: clipped during backward)
        if small is not None:
            parts.append(small.sq_norm(self.clip_rule.per_param))
        total = _stack_sum(parts)
        self._check_finite(total, {**self.pass_.sq, **sq}, small)
        factors = self._factors(ready, sq, total, red, small)
        for p, uses in large.items():
            self._accumulate(p, uses, factors[p], buf)
        if small is not None:
            small.accumulate(buf, None if self.clip_rule.per_param else factors[small.params[0]])
        self._record(total, {**self.pass_.factors, **factors}, red, batch)

    def _factors(self, ready, sq, total: torch.Tensor, red: float, small: Optional[SmallBlock]):
        """{param: [B] clip factors} of ``ready``'s parameters (a flat rule: one tensor shared by all)."""
        if not self.clip_rule.per_param:
            return dict.fromkeys(ready, self.clip_rule.shared_factor(total, red))
        factors = self.clip_rule.factors(sq, red)
        if small is not None:
            factors.update(small.per_param_factors(self.clip_rule, red))
        return factors

    def _record(self, total: torch.Tensor, factors, red: float, batch: int) -> None:
        self._last = (total, factors, red)
        self.last_fused = len(self.pass_.factors)
        self.num_samples += batch
        self.num_backward += 1
        self.sums.dirty = True

    def _observed(self, p: nn.Parameter) -> bool:
        return any(obs.wants(p) for obs in self.observers)

    def _accumulate(self, p: nn.Parameter, uses: List[PerSampleGrad], c: torch.Tensor, buf: GradBuffer) -> None:
        """Add ``sum_i c_i g_i`` of ``p``'s uses into ``buf`` and free them (``c``: [B] factors, loss scale in)."""
        out = buf.view(p)
        for obs in self.observers:
            obs.observe(p, uses, c)
        for g in uses:
            g.clipped_sum(c, out)
            g.release()

    def _open_buffer(self) -> GradBuffer:
        """The accumulation buffer over the currently trainable parameters."""
        return self.sums.open(p for p in self.param_names if p.requires_grad)

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

    def _check_finite(self, total: torch.Tensor, sq, small: Optional[SmallBlock] = None) -> None:
        """Raise on a NaN/inf per-sample norm (one reduction; the per-parameter search only on failure).

        ``small``: the batched parameters, whose norms are taken one by one only on failure."""
        if bool(torch.isfinite(total).all()):
            return
        sq = {**sq, **(small.per_param_sq() if small is not None else {})}
        p, v = next((p, v) for p, v in sq.items() if not bool(torch.isfinite(v).all()))
        idx = (~torch.isfinite(v)).nonzero().flatten().tolist()
        raise NonFiniteNormError(
            f"non-finite per-sample gradient norm for parameter '{self.param_names.get(p, '?')}' at samples "
            f"{idx[:10]} of the batch. Check the loss and inputs (with fp16, the loss scale).")

    # ------------------------------------------------------------------ what a step reads
    @property
    def buffer(self) -> Optional[GradBuffer]:
        return self.sums.buffer

    @property
    def summed(self) -> Dict[nn.Parameter, torch.Tensor]:
        """``sum_i c_i g_i`` per parameter touched since the last reset (views into the flat buffer)."""
        return self.sums.summed()

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

    def reset(self) -> None:
        """Forget accumulated sums (after a step, or on zero_grad); the buffer is zeroed lazily."""
        self.sums.reset()
        for obs in self.observers:
            obs.reset()
        self.num_samples = 0
        self.num_backward = 0


def _param_sq_norm(uses: List[PerSampleGrad]) -> torch.Tensor:
    """[B] squared norm of one parameter's per-sample gradient over its uses (cross terms for tied weights)."""
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


def _stack_sum(tensors: List[torch.Tensor]) -> torch.Tensor:
    """Sum of [B] tensors in one reduction (one launch instead of one add per tensor)."""
    return tensors[0] if len(tensors) == 1 else torch.stack(tensors).sum(0)


def _sum(tensors):
    it = iter(tensors)
    total = next(it)
    for t in it:
        total = total + t
    return total
