"""The engine's state between and within backward passes, as named objects.

* ``PendingCounts`` / ``PendingUse`` / ``ForwardPass``: the parameter uses a forward recorded and whether their
  gradients have arrived (per-layer rules clip a parameter inside backward once none is pending). ``RecomputedUse``: a
  use opened by a non-reentrant checkpointed region's recomputation, which does not count. ``ReentrantUse``: a use
  opened by a reentrant region's recomputation, which counts and belongs to the outer backward pass.
* ``PassState``: what the backward pass under way has done so far (its batch size, the parameters it already
  clipped, whether it accumulated into the buffer).
* ``SumState``: the lifecycle of the flat buffer of clipped sums across the passes of one step (empty, holding
  sums, poisoned by a failed pass, or released to ``.grad`` by a step and waiting for ``zero_grad``).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from fastdp.grad_buffer import GradBuffer


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

    def __init__(self, counts: PendingCounts, param: nn.Parameter, forward: Optional[ForwardPass] = None):
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


class RecomputedUse:
    """A use opened while a checkpointed region is recomputed in backward (``fastdp.checkpointing``): not counted.

    The recomputation only rebuilds the tensors the original forward's nodes saved; those nodes' backward hands the
    per-sample gradients over, with the ``PendingUse``s the original forward opened. A gradient through the
    recomputed graph itself (a backward inside a checkpointed region) would be a second copy of them: refused.
    """

    __slots__ = ("param",)
    forward = None
    arrived = False

    def __init__(self, param: nn.Parameter):
        self.param = param

    def arrive(self) -> bool:
        """Nothing to uncount (called in forward where a use hands nothing: a shared lookup's own use)."""
        return True


class ReentrantUse(PendingUse):
    """A use opened while a reentrant checkpointed region (``use_reentrant=True``) is recomputed in backward: the
    region's forward ran without autograd, so these are its only uses. They count like the forward's, and their
    gradients, which arrive in the nested backward pass that checkpoint runs, belong to the outer pass ``task`` (its
    graph task id): one clip group per sample over the whole pass."""

    __slots__ = ("task",)

    def __init__(self, counts: PendingCounts, param: nn.Parameter, forward: Optional[ForwardPass], task: int):
        self.task = task
        super().__init__(counts, param, forward)


@dataclass
class PassState:
    """The backward pass under way.

    ``batch``: its batch size once a layer reported one. ``sq`` / ``factors``: [B] squared norms and clip factors of
    the parameters already clipped inside backward (per-layer rules). ``fused``: something was accumulated during
    the pass, ``was_dirty``: into a buffer that already held earlier micro-batches. ``no_fuse``: a use not recorded in
    forward reached the pass (nothing more may be clipped inside backward). ``forwards``: the forward of every use.
    """

    batch: Optional[int] = None
    sq: Dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)
    factors: Dict[nn.Parameter, torch.Tensor] = field(default_factory=dict)
    fused: bool = False
    was_dirty: bool = False
    no_fuse: bool = False
    forwards: set = field(default_factory=set)


class SumState:
    """The flat buffer of clipped sums and where it stands in the step.

    ``dirty``: it holds sums no step has taken. ``poisoned``: a failed pass left partial sums in it beside earlier
    micro-batches (the step must refuse them). ``released``: a step wrote noisy gradients to ``.grad``; a backward
    before ``zero_grad`` is refused.
    """

    def __init__(self):
        self.buffer: Optional[GradBuffer] = None
        self.dirty = False
        self.poisoned = False
        self.released = False

    def open(self, params: Iterable[nn.Parameter]) -> GradBuffer:
        """The buffer over the trainable ``params`` for a new pass (rebuilt if that set changed; zeroed if no earlier
        pass of this step left sums in it)."""
        params = list(params)
        if self.buffer is None or not self.buffer.matches(params):
            if self.dirty:
                raise RuntimeError("the set of trainable parameters changed between backward passes of one step")
            self.buffer = GradBuffer(params)
        elif not self.dirty:
            self.buffer.zero_()
        return self.buffer

    def abandon(self, pass_: PassState) -> None:
        """A pass failed: drop what it accumulated, or poison the sums of the earlier micro-batches it joined."""
        if pass_.fused:
            if pass_.was_dirty:
                self.poisoned = True
            else:
                self.dirty = False  # the buffer is zeroed before its next use

    def check_not_released(self, params: Iterable[nn.Parameter]) -> None:
        """Refuse a backward while the last step's noisy gradients are still in ``.grad``."""
        if not self.released:
            return
        if all(p.grad is None for p in params):  # cleared another way: model.zero_grad(), ...
            self.released = False
            return
        raise RuntimeError("backward() after optimizer.step() without optimizer.zero_grad(): the previous "
                           "step's noisy gradients are still in .grad. Call zero_grad() before the next backward.")

    def summed(self) -> Dict[nn.Parameter, torch.Tensor]:
        """``sum_i c_i g_i`` per parameter touched since the last reset (views into the flat buffer)."""
        if self.buffer is None or not self.dirty:
            return {}
        return {p: self.buffer.views[p] for p in self.buffer.touched}

    def reset(self) -> None:
        self.dirty = False
        self.poisoned = False
