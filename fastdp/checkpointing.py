"""Activation checkpointing under the engine: a checkpointed region's recomputation replays the forward's taps.

``torch.utils.checkpoint.checkpoint(fn, ..., use_reentrant=False)`` (the default of HF's
``gradient_checkpointing_enable()``) runs ``fn`` under saved-tensor hooks that drop the tensors its ops save, and in
backward runs ``fn`` again to recompute them when the first one is needed. By then the model's forward has ended and
every parameter slot holds its parameter: the recomputation would run plain ops on the parameters instead of the layer
handlers' autograd functions, so what it saves would not be what the handlers' backward reads.

So the engine *adopts* every checkpoint region a parameter op runs in (``region_frame`` finds the region from the
saved-tensor hook on top; ``adopt`` wraps its recomputation): the recomputation then runs inside
``ModelHooks.replay``, which puts the same taps back in the slots and restores the batch size of the forward that
opened the region. The handlers' ops in a replay open ``RecomputedUse``s (``fastdp.engine_state``), which are not
counted: the nodes whose backward runs are the original forward's, their per-sample gradients are computed from the
recomputed tensors, and each arrives once, with the use the original forward opened.

``use_reentrant=True`` (``ReentrantRegion``): the region's forward runs under ``no_grad`` inside checkpoint's
``CheckpointFunction``, so its ops on taps are constants and record no use; the engine *holds* one pending use per
parameter the region touched (per-layer fused clipping must not clip such a parameter before the recomputation's
uses exist) and wraps ``ctx.run_function``. In backward, ``CheckpointFunction.backward`` calls it with grad on: the
recomputation runs inside ``ModelHooks.replay`` (taps in the slots, the forward's batch size), joins the outer
backward pass, and opens ``ReentrantUse``s (``fastdp.engine_state``), the region's only uses, counted; then the held
uses are released. Their gradients arrive in the nested backward pass checkpoint runs on the recomputed outputs, and
the engine adds them to the outer pass (one clip group per sample: ``GradSampleEngine.submit``). A reentrant region
inside another reentrant region is refused (``REENTRANT_NESTED_HELP``); inside a non-reentrant one it works (the
original forward's inner region is the one whose backward runs). ``create_graph=True`` through a reentrant region is
refused by a pre-hook on its node (``ModelHooks.join_reentrant_region``).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, ContextManager

import torch

_CHECKPOINT_MODULE = "torch.utils.checkpoint"

REENTRANT_NESTED_HELP = (
    "a reentrant activation checkpoint region (torch.utils.checkpoint with use_reentrant=True) nested inside another "
    "reentrant region, which fastdp does not support (the inner region's recomputation would run in a nested backward "
    "pass of the outer one's, without fastdp's layers). Use use_reentrant=False for one of the two regions.")

RECOMPUTING = object()  # ``region_frame``: a checkpoint's recomputation (in backward) is under way


class CheckpointReplayError(RuntimeError):
    """torch.utils.checkpoint's internals are not those fastdp knows: a region cannot be replayed exactly."""


def _top_pack_hook():
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except (AttributeError, TypeError) as err:  # private API: fail closed (a region could not be replayed)
        raise CheckpointReplayError(
            "fastdp cannot tell whether this op runs inside activation checkpointing with this PyTorch version "
            f"(torch._C._autograd._top_saved_tensors_default_hooks: {err}); pin the PyTorch version fastdp supports"
        ) from err
    return None if hooks is None else hooks[0]


def region_frame() -> Any:
    """The non-reentrant checkpoint region the current op runs in: its ``_CheckpointFrame`` (whose saved-tensor hook
    is on top, so the op's saved tensors would be recomputed), ``RECOMPUTING`` inside a recomputation, else None."""
    pack = _top_pack_hook()
    if pack is None or getattr(pack, "__module__", "") != _CHECKPOINT_MODULE:
        return None
    code = getattr(pack, "__code__", None)
    names = code.co_freevars if code is not None else ()
    if "_recomputation_hook" in getattr(pack, "__qualname__", ""):
        return RECOMPUTING
    if "frame" in names:
        frame = pack.__closure__[names.index("frame")].cell_contents
        if hasattr(frame, "recompute_fn"):
            return frame
    raise CheckpointReplayError(
        f"an op on a trainable parameter runs under a torch.utils.checkpoint saved-tensor hook fastdp does not know "
        f"({getattr(pack, '__qualname__', pack)}): its recomputation could not be replayed with fastdp's layers. "
        "Pin the PyTorch version fastdp supports, or disable activation checkpointing.")


def adopt(frame: Any, owner: object, replay: Callable[[], ContextManager]) -> None:
    """Run ``frame``'s recomputation inside ``replay()`` (once per ``owner``: the model hooks of one engine)."""
    fn = frame.recompute_fn
    owners = getattr(fn, "_fdp_owners", ())
    if any(o is owner for o in owners):
        return

    def recompute_with_taps(*args):
        with replay():
            fn(*args)

    recompute_with_taps._fdp_owners = owners + (owner,)
    frame.recompute_fn = recompute_with_taps


_CHECKPOINT_FUNCTION = "CheckpointFunction"


def reentrant_ctxs() -> list:
    """The ctx of every reentrant checkpoint region whose forward is running (``CheckpointFunction.forward`` frames on
    the stack), innermost first. Fails closed if such a frame's ctx cannot be read."""
    cls = getattr(torch.utils.checkpoint, _CHECKPOINT_FUNCTION, None)
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    found = []
    f = sys._getframe(1)
    while f is not None and code is not None:
        if f.f_code is code:
            ctx = f.f_locals.get("ctx")
            if ctx is None or not callable(getattr(ctx, "run_function", None)):
                raise CheckpointReplayError(
                    "fastdp cannot read the reentrant torch.utils.checkpoint region's recomputation with this PyTorch "
                    "version (CheckpointFunction.forward's ctx.run_function): it could not be replayed with fastdp's "
                    "layers. Pin the PyTorch version fastdp supports, or use use_reentrant=False.")
            found.append(ctx)
        f = f.f_back
    return found


def reentrant_ctx() -> Any:
    """The ctx of the innermost reentrant checkpoint region whose forward is running, else None."""
    found = reentrant_ctxs()
    return found[0] if found else None


class ReentrantRegion:
    """One reentrant region's recomputation under one engine, installed as its ``ctx.run_function``.

    ``held``: {param: pending use} held from the forward (which recorded none) until the recomputation has opened
    the region's own uses. ``replay(task)``: the engine's replay context for the outer backward pass ``task``."""

    def __init__(self, fn: Callable, replay: Callable[[int], ContextManager], join: Callable[[int], None]):
        self.fn, self.replay, self.join = fn, replay, join
        self.held: dict = {}

    def hold(self, param, open_held: Callable) -> None:
        if param not in self.held:
            self.held[param] = open_held(param)

    def __call__(self, *args):
        """``CheckpointFunction.backward``'s recomputation (in the outer backward pass, grad mode on)."""
        task = torch._C._current_graph_task_id()
        self.join(task)
        with self.replay(task):
            out = self.fn(*args)
        held, self.held = self.held, {}
        for use in held.values():  # the recomputation opened the region's uses: the held ones stop counting
            use.arrive()
        return out


def adopt_reentrant(ctx: Any, owner: object, make: Callable[[Callable], ReentrantRegion]) -> ReentrantRegion:
    """``ctx``'s region under ``owner`` (the model hooks of one engine): wraps ``ctx.run_function`` once per owner."""
    regions = getattr(ctx, "_fdp_regions", None)
    if regions is None:
        regions = ctx._fdp_regions = {}
    region = regions.get(id(owner))
    if region is None:
        region = regions[id(owner)] = make(ctx.run_function)
        ctx.run_function = region
    return region
