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

``use_reentrant=True`` is refused (``REENTRANT_HELP``): its region runs under ``no_grad`` in forward (no use is
recorded) and its backward runs a nested backward pass inside the outer one, which the engine would finalise as a
pass of its own (the region's part of each sample's gradient clipped apart from the rest).
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager

import torch

_CHECKPOINT_MODULE = "torch.utils.checkpoint"

REENTRANT_HELP = (
    "reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True, or HF "
    "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': True})), which fastdp does not "
    "support: the region runs without autograd in forward, and its backward runs a nested backward pass inside the "
    "outer one, which fastdp would clip as a pass of its own (each sample's gradient clipped in two parts). Use "
    "use_reentrant=False (HF's default), which fastdp supports exactly.")

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
