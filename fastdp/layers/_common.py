"""What every layer handler shares: taps and the anchor, autocast casting, the batch-size check of a layer input."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastdp.tap import BatchSizeError, ParamTap, UnsupportedLayerError, sample_dim, unwrap


def compute_operands(device_type: str, *tensors: Optional[torch.Tensor]):
    """Cast floating operands as autocast would for a matmul-class op; returns (tensors, compute dtype or None)."""
    if torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        return tuple(t.to(dt) if t is not None and t.is_floating_point() else t for t in tensors), dt
    return tensors, None  # not autocasting: operands as they are


def taps_of(*args) -> Sequence[Optional[ParamTap]]:
    return [a if isinstance(a, ParamTap) else None for a in args]


def anchor_of(*taps: Optional[ParamTap]) -> torch.Tensor:
    """The engine's anchor: a grad-requiring scalar every handler's autograd function takes as input.

    It puts the op in the graph even when no data input requires grad (first layer), while the
    parameters themselves never appear in the graph: autograd cannot accumulate into their .grad.
    """
    return next(t for t in taps if t is not None)._fdp_ctx.engine.anchor


def open_uses(*taps: Optional[ParamTap]) -> tuple:
    """In an op's forward: one ``PendingUse`` per tap (None where no tap), handed back with its gradient."""
    engine = next(t for t in taps if t is not None)._fdp_ctx.engine
    return tuple(engine.open_use(t) for t in taps)


def plain_input(x, op: str, taps) -> torch.Tensor:
    """The data operand of a layer op must not itself be a parameter tap."""
    if isinstance(x, ParamTap):
        owner = next((t for t in taps if t is not None), x)
        raise UnsupportedLayerError(f"{op} with a trainable parameter as its data input ({x.label}) is not supported "
                                    f"(while handling {owner.label})")
    return x


def check_batch(x: torch.Tensor, taps, op: str, min_dim: int = 1, feature_dims: Optional[int] = None,
                sd: Optional[int] = None) -> int:
    """A layer's data input must have the model's batch size in its sample dim (and at least ``min_dim`` dims).

    Returns the sample dim: ``sd`` if given (a handler that knows its layout, e.g. multi-head attention's [T, B, E]),
    else ``fastdp.tap.sample_dim`` with the layer's ``feature_dims`` trailing dims (Linear: 1, LayerNorm: the
    normalized dims, embedding ids: 0); ``feature_dims=None`` is a channel-first layout ([B, C, ...]: convolutions,
    GroupNorm), whose samples are dim 0 in both layouts of the engine.
    """
    ctx = next(t for t in taps if t is not None)._fdp_ctx
    if x.dim() < min_dim:
        raise UnsupportedLayerError(f"module '{ctx.owner}' ({ctx.owner_type}): the {op} input of shape "
                                    f"{tuple(x.shape)} has no batch dim; per-sample gradients need one")
    if sd is None:
        sd = sample_dim(ctx, x.shape, feature_dims or 0, channels_first=feature_dims is None)
    B = ctx.batch_size
    if B is not None and (x.dim() <= sd or x.shape[sd] != B):
        if sd == 0:
            where, need = f"leading dim {x.shape[0]}", "the sample dim to stay leading in every layer input"
        else:
            where = f"dim {sd} of size {x.shape[sd] if x.dim() > sd else None} (its sample dim: [T, B, ...])"
            need = "the sample dim to stay dim 1 of every sequence-first layer input"
        raise BatchSizeError(
            f"module '{ctx.owner}' ({ctx.owner_type}): the model input has batch size {B} but this {op} op's input "
            f"has {where} (shape {tuple(x.shape)}); per-sample gradients need {need} (frames, crops or segments "
            "folded into the batch dim would each be clipped as a sample). A sequence-first model ([T, B, ...] "
            "inputs) needs batch_first=False (DPOptimizer / make_private / GradSampleEngine).")
    return sd


def to_front(t: Optional[torch.Tensor], sd: int) -> Optional[torch.Tensor]:
    """``t`` with its sample dim ``sd`` moved to dim 0 (a contiguous copy when ``sd`` != 0; None stays None)."""
    return t if t is None or sd == 0 else t.movedim(sd, 0).contiguous()


def values(*args):
    return tuple(unwrap(a) for a in args)
