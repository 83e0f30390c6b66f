"""Helpers shared by the kernel references: fp32 batched products and batch chunking."""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

# Largest temporary (elements) a reference materialises at once; batches are chunked to fit.
CHUNK_ELEMENTS = 1 << 26

# Options of every engine kernel launch: no contraction of a multiply and an add into one FMA, so elementwise code
# rounds as the PyTorch references' separate ops do, whatever Triton's default (3.9 contracts and warns; 3.10 will
# not). Dots are unaffected (tensor-core or IEEE FMA accumulation either way).
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_ACC = (torch.float32, torch.float64)


def on_input_device(fn):
    """Run the dispatcher ``fn`` with the CUDA device of its first tensor argument current.

    Triton launches a kernel on the current CUDA device, whatever its pointers: a model on ``cuda:1`` in a process
    whose current device is ``cuda:0`` would otherwise run every kernel on the wrong GPU.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if t is not None and t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)
    return wrapper


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype for ``t``: fp64 stays fp64, everything else accumulates in fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its accumulation dtype (fp32, or fp64 for fp64 inputs)."""
    return t if t.dtype in _ACC else t.float()



_FLOAT_RANK = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types`` for the float dtypes without a dispatcher call (host time per launch): bf16 with fp16
    gives fp32; anything else is handed to torch."""
    if a == b:
        return a
    ra, rb = _FLOAT_RANK.get(a), _FLOAT_RANK.get(b)
    if ra is None or rb is None:
        return torch.promote_types(a, b)
    return (a if ra > rb else b) if ra != rb else torch.float32


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the dispatcher round trip when it is already that dtype (hot paths)."""
    return t if t.dtype == dtype else t.to(dtype)


def bmm_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for [B, m, k] x [B, k, n] with an fp32 (fp64 for fp64 inputs) result and accumulation.

    bf16/fp16 inputs keep tensor-core speed on CUDA (``out_dtype``, probed once); elsewhere they are upcast.
    """
    global _BMM_OUT_DTYPE
    if a.dtype in _ACC and b.dtype == a.dtype:
        return torch.bmm(a, b)
    if a.dtype in _LOW_PRECISION and a.is_cuda and a.dtype == b.dtype and _BMM_OUT_DTYPE is not False:
        try:
            out = torch.bmm(a, b, out_dtype=torch.float32)
            _BMM_OUT_DTYPE = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            _BMM_OUT_DTYPE = False
    return torch.bmm(upcast(a), upcast(b))


_BMM_OUT_DTYPE = None  # whether torch.bmm(..., out_dtype=fp32) works here (unknown until first tried)


def batch_chunks(batch: int, elements_per_sample: int):
    """Yield slices of ``range(batch)`` whose temporaries stay under CHUNK_ELEMENTS."""
    step = max(1, CHUNK_ELEMENTS // max(1, elements_per_sample))
    for start in range(0, batch, step):
        yield slice(start, min(batch, start + step))


def check_linear(x: torch.Tensor, dy: torch.Tensor, scale: Optional[torch.Tensor] = None, x_name: str = "x",
                 dy_name: str = "dy") -> None:
    """Raise ``ValueError`` unless ``x`` [B, T, d] and ``dy`` [B, T, p] (after ``as_btd``) share B and T, and
    ``scale`` (when given) is [B]: the dispatchers' and the references' shape check, before any launch."""
    if x.shape[:2] != dy.shape[:2]:
        raise ValueError(f"{x_name} {tuple(x.shape)} and {dy_name} {tuple(dy.shape)} (as [B, T, features]) disagree "
                         f"on the batch or sequence length")
    if scale is not None and tuple(scale.shape) != (x.shape[0],):
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected one factor per sample of the batch "
                         f"({x.shape[0]},)")


def check_linear_pair(x_a: torch.Tensor, dy_a: torch.Tensor, x_b: torch.Tensor, dy_b: torch.Tensor) -> None:
    """``check_linear`` of each use of a weight (``[B, T, d]`` inputs, ``[B, T, p]`` output gradients), and the two
    uses agree on B, d and p (each its own T)."""
    check_linear(x_a, dy_a, x_name="x_a", dy_name="dy_a")
    check_linear(x_b, dy_b, x_name="x_b", dy_name="dy_b")
    if x_b.shape[0] != x_a.shape[0] or x_b.shape[2] != x_a.shape[2] or dy_b.shape[2] != dy_a.shape[2]:
        raise ValueError(f"use b (x_b {tuple(x_b.shape)}, dy_b {tuple(dy_b.shape)}) and use a (x_a "
                         f"{tuple(x_a.shape)}, dy_a {tuple(dy_a.shape)}) disagree on the batch, d or p")


def as_btd(t: torch.Tensor, batch: Optional[int] = None) -> torch.Tensor:
    """View ``[B, *, d]`` as ``[B, T, d]`` (T = product of the middle dims, 1 for 2-D; empty batches too).

    ``batch``: samples in the leading dim when it holds ``batch * k`` sample-major rows.
    """
    if t.dim() == 3 and batch is None:
        return t
    if t.dim() < 2:
        raise ValueError(f"expected a tensor with a batch dim and a feature dim, got shape {tuple(t.shape)}")
    rows = math.prod(t.shape[:-1])
    B = t.shape[0] if batch is None else batch
    return t.reshape(B, rows // B if B else 0, t.shape[-1])
