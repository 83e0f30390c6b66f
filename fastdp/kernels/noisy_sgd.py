"""Masked Gaussian noise, scaling and ``torch.optim.SGD``'s update in one pass over the coordinates that train.

For every coordinate ``j`` that trains (all of them, or where the bool ``mask`` is set, or on the given ``rows``
along dim 0), in fp32:

    g[j] = (g[j] + std * N_j) * scale                  (written back: the privatised gradient)
    d    = -g[j] if maximize else g[j]
    d    = d + weight_decay * p[j]                     (if weight_decay != 0)
    buf[j] = d if first_step else momentum * buf[j] + (1 - dampening) * d      (if momentum != 0)
    d    = d + momentum * buf[j] if nesterov else buf[j]                       (if momentum != 0)
    p[j] = p[j] - lr * d                               (stored in p's dtype)

which is ``g`` noised as ``masked_noise`` does, scaled (``scale = 1 / expected_batch_size``) and then exactly one
``torch.optim.SGD`` step on that coordinate. ``first_step`` is torch's rule for a momentum buffer that does not
exist yet: it is created as the gradient, without dampening (its old contents are not read). A caller whose
buffers exist for some coordinates only zero-fills the missing ones and passes ``first_step=False``: with
``dampening == 0`` that is the same update.

Coordinates outside ``mask`` / ``rows`` are not read or written: ``p``, ``g`` and ``buf`` stay bit-identical there.
This differs from torch's SGD fed a zero gradient on those coordinates, which still moves them by weight decay and
by a non-zero momentum buffer; it is the masked methods' invariant "masked coordinates never move" (equal to torch's
step when ``weight_decay == 0`` and ``buf`` is zero outside the mask, which is what ``DPOptimizer`` checks before it
uses this op with a mask). A new buffer (``first_step``) is not written outside the mask: zero-fill it.

The Triton kernel draws the same Philox normals as ``masked_noise``'s kernel, ``tl.randn(key, j)`` at flat index
``j`` (the row kernel's int64 index with ``rows``; ``key``: the seed's full 64 bits, never reduced), so it equals
``masked_noise`` + scale + the SGD update up to fp rounding; it allocates no noise tensor and makes one launch per
call. Rows outside ``[0, g.shape[0])`` raise ``IndexError`` before the launch and are masked in the kernel too.
``p`` may also be a list of contiguous tensors laid out consecutively in ``g`` (a ``GradBuffer``'s parameters): the
kernel then reaches them through a table of their addresses, still in one launch. The reference draws from a ``torch.Generator`` seeded with ``seed``
(the values of ``masked_noise_ref``, not of the kernel).

Bytes per trained coordinate (fp32 ``p``, momentum on): read g, p, buf and write them back, 24 B (+1 B with a
``mask``); without momentum (or on the first step, which does not read ``buf``) 16 B / 20 B.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ._backend import HAS_TRITON, backend_for_op, interpreting
from ._common import LAUNCH_OPTIONS, on_input_device
from .masked_noise import check_rows, seed_halves

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .masked_noise import _philox_key

    @triton.jit
    def _update(p_ptrs, g_ptrs, b_ptrs, counter, sel, seed_hi, seed_lo, lr, std, scale, momentum, damp1, wd,
                FIRST: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                WD: tl.constexpr, ROUND_BF16: tl.constexpr):
        """Noise, scale and SGD on the selected lanes (fp32 arithmetic, p stored in its dtype)."""
        g = (tl.load(g_ptrs, mask=sel, other=0.0) + std * tl.randn(_philox_key(seed_hi, seed_lo), counter)) * scale
        tl.store(g_ptrs, g, mask=sel)
        p = tl.load(p_ptrs, mask=sel, other=0.0).to(tl.float32)
        if MAXIMIZE:
            d = -g
        else:
            d = g
        if WD:
            d = d + wd * p
        if MOMENTUM:
            if FIRST:
                b = d
            else:
                b = tl.load(b_ptrs, mask=sel, other=0.0) * momentum + damp1 * d
            tl.store(b_ptrs, b, mask=sel)
            if NESTEROV:
                d = d + momentum * b
            else:
                d = b
        new = p - lr * d
        if ROUND_BF16:  # the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even: round here
            u = new.to(tl.uint32, bitcast=True)
            new = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        tl.store(p_ptrs, new.to(p_ptrs.dtype.element_ty), mask=sel)

    @triton.jit(do_not_specialize=["seed_hi", "seed_lo"])
    def _noisy_sgd_kernel(p_ptr, g_ptr, b_ptr, mask_ptr, d, seed_hi, seed_lo, lr, std, scale, momentum, damp1, wd,
                          HAS_MASK: tl.constexpr, FIRST: tl.constexpr, MOMENTUM: tl.constexpr,
                          NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, WD: tl.constexpr, ROUND_BF16: tl.constexpr,
                          BLOCK: tl.constexpr):
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # masked_noise's (64-bit) counters
        sel = j < d
        if HAS_MASK:
            sel = sel & (tl.load(mask_ptr + j, mask=sel, other=0) != 0)
        _update(p_ptr + j, g_ptr + j, b_ptr + j, j, sel, seed_hi, seed_lo, lr, std, scale, momentum, damp1, wd,
                FIRST, MOMENTUM, NESTEROV, MAXIMIZE, WD, ROUND_BF16)

    @triton.jit(do_not_specialize=["seed_hi", "seed_lo"])
    def _noisy_sgd_multi_kernel(table_ptr, g_ptr, b_ptr, mask_ptr, seed_hi, seed_lo, lr, std, scale, momentum, damp1,
                                wd, P_BF16: tl.constexpr, HAS_MASK: tl.constexpr, FIRST: tl.constexpr,
                                MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                                WD: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK: tl.constexpr):
        # one block of one parameter per program: (address of the block's first element, its flat index in g,
        # the parameter's end in g)
        addr = tl.load(table_ptr + 3 * tl.program_id(0))
        start = tl.load(table_ptr + 3 * tl.program_id(0) + 1)
        end = tl.load(table_ptr + 3 * tl.program_id(0) + 2)
        if P_BF16:
            p_ptr = addr.to(tl.pointer_type(tl.bfloat16))
        else:
            p_ptr = addr.to(tl.pointer_type(tl.float32))
        o = tl.arange(0, BLOCK)
        j = start + o  # int64
        sel = j < end
        if HAS_MASK:
            sel = sel & (tl.load(mask_ptr + j, mask=sel, other=0) != 0)
        _update(p_ptr + o, g_ptr + j, b_ptr + j, j, sel, seed_hi, seed_lo, lr, std, scale, momentum, damp1, wd,
                FIRST, MOMENTUM, NESTEROV, MAXIMIZE, WD, ROUND_BF16)

    @triton.jit(do_not_specialize=["seed_hi", "seed_lo"])
    def _noisy_sgd_rows_kernel(p_ptr, g_ptr, b_ptr, rows_ptr, k, cols, n_rows, seed_hi, seed_lo, lr, std, scale,
                               momentum, damp1, wd, FIRST: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                               MAXIMIZE: tl.constexpr, WD: tl.constexpr, ROUND_BF16: tl.constexpr,
                               BLOCK: tl.constexpr):
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # over the k * cols selected elements
        inb = e < k * cols
        r = tl.load(rows_ptr + e // cols, mask=inb, other=-1)
        sel = inb & (r >= 0) & (r < n_rows)  # a row outside g is never touched (the host check raises first)
        j = r * cols + e % cols  # int64, as in masked_noise's row kernel
        _update(p_ptr + j, g_ptr + j, b_ptr + j, j, sel, seed_hi, seed_lo, lr, std, scale, momentum, damp1, wd,
                FIRST, MOMENTUM, NESTEROV, MAXIMIZE, WD, ROUND_BF16)

_BLOCK = 1024
_P_DTYPES = (torch.float32, torch.bfloat16)
Params = Union[torch.Tensor, Sequence[torch.Tensor]]


def _check(p: Params, g: torch.Tensor, buf: Optional[torch.Tensor], lr, std, seed, scale, momentum, dampening,
           weight_decay, nesterov, mask, rows) -> Tuple[List[torch.Tensor], bool]:
    """Validate the arguments (both backends); returns (the parameters as a list, whether ``p`` was a list)."""
    multi = not isinstance(p, torch.Tensor)
    params = list(p) if multi else [p]
    if not isinstance(g, torch.Tensor) or g.dtype != torch.float32 or not g.is_contiguous():
        raise ValueError("noisy_sgd needs g as a contiguous fp32 tensor")
    for name, v in (("lr", lr), ("std", std), ("scale", scale), ("momentum", momentum), ("dampening", dampening),
                    ("weight_decay", weight_decay)):
        if isinstance(v, torch.Tensor) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"noisy_sgd: {name} must be a finite Python number, got {v!r}")
    for name, v in (("lr", lr), ("std", std), ("scale", scale), ("momentum", momentum),
                    ("weight_decay", weight_decay)):
        if v < 0:
            raise ValueError(f"noisy_sgd: {name} must be >= 0, got {v}")
    if not isinstance(seed, int):
        raise ValueError(f"noisy_sgd: seed must be an int, got {type(seed).__name__}")
    seed_halves(seed)  # in [-2^63, 2^64), both backends
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("noisy_sgd: nesterov needs momentum > 0 and dampening == 0 (torch.optim.SGD's rule)")
    if mask is not None and rows is not None:
        raise ValueError("noisy_sgd: give mask or rows, not both")
    if not params or any(not isinstance(t, torch.Tensor) for t in params):
        raise ValueError("noisy_sgd: p must be a tensor or a non-empty list of tensors")
    if any(t.dtype not in _P_DTYPES for t in params) or len({t.dtype for t in params}) != 1:
        got = sorted({str(t.dtype) for t in params})
        raise ValueError(f"noisy_sgd: parameters must all be fp32 or all bf16, got {got}")
    if any(not t.is_contiguous() for t in params):
        raise ValueError("noisy_sgd: parameters must be contiguous")
    if any(t.device != g.device for t in params):
        raise ValueError("noisy_sgd: parameters and g must be on the same device")
    if multi:
        if sum(t.numel() for t in params) != g.numel():
            raise ValueError(f"noisy_sgd: the parameters hold {sum(t.numel() for t in params)} values, g {g.numel()}")
        if rows is not None:
            raise ValueError("noisy_sgd: rows needs a single parameter tensor, not a list")
    elif p.shape != g.shape:
        raise ValueError(f"noisy_sgd: p has shape {tuple(p.shape)}, g {tuple(g.shape)}")
    if momentum != 0:
        if not isinstance(buf, torch.Tensor) or buf.dtype != torch.float32 or not buf.is_contiguous():
            raise ValueError("noisy_sgd: momentum needs buf as a contiguous fp32 tensor")
        if buf.shape != g.shape or buf.device != g.device:
            raise ValueError(f"noisy_sgd: buf has shape {tuple(buf.shape)} on {buf.device}, g {tuple(g.shape)} on "
                             f"{g.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError("noisy_sgd: mask must be a bool tensor")
        if mask.shape != g.shape or mask.device != g.device:
            raise ValueError(f"noisy_sgd: mask has shape {tuple(mask.shape)}, g {tuple(g.shape)}")
    if rows is not None:  # 1-D int64 on g's device (ValueError), in [0, g.shape[0]) (IndexError; cached per tensor)
        check_rows(rows, g, "noisy_sgd", dtypes=(torch.int64,))
    return params, multi


def noisy_sgd_ref(p: Params, g: torch.Tensor, buf: Optional[torch.Tensor], *, lr: float, std: float, seed: int,
                  scale: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                  nesterov: bool = False, maximize: bool = False, first_step: bool = False,
                  mask: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None) -> Params:
    """Noise + scale + SGD step in place (module docstring), in PyTorch.

    Args:
        p: parameter (fp32 or bf16, contiguous, ``g``'s shape), or a list of such tensors (one dtype) whose sizes
            add up to ``g.numel()``, laid out in ``g`` in order.
        g: fp32 clipped gradient sum (contiguous); becomes the privatised, scaled gradient.
        buf: fp32 momentum buffer, ``g``'s shape (ignored, may be None, when ``momentum == 0``).
        lr, momentum, dampening, weight_decay, nesterov, maximize: ``torch.optim.SGD``'s (Python numbers).
        std: noise standard deviation (units of ``g``); scale: factor after the noise (1 / expected batch size).
        seed: noise seed, an integer in ``[-2^63, 2^64)`` (a ``torch.Generator`` here: the reference's noise values
            are not the kernel's, and on the CPU they depend on the seed's low 32 bits only: see ``masked_noise_ref``;
            the kernel's Philox key is the seed's full 64 bits, as ``masked_noise``'s).
        first_step: create the momentum buffer (``buf = d``, torch's first step); buf's old values are not used.
        mask: bool, ``g``'s shape: only where set. rows: 1-D int64 indices along dim 0 of ``g``, distinct (not
            checked) and in ``[0, g.shape[0])`` (``IndexError`` otherwise; read once per rows tensor, see
            ``masked_noise.check_rows``). At most one of mask / rows.

    Returns:
        ``p``.
    """
    params, _ = _check(p, g, buf, lr, std, seed, scale, momentum, dampening, weight_decay, nesterov, mask, rows)
    if rows is not None:
        cols = g[0].numel()
        idx = (rows[:, None] * cols + torch.arange(cols, device=g.device)).reshape(-1)
    elif mask is not None:
        idx = mask.reshape(-1).nonzero().flatten()
    else:
        idx = None
    n = g.numel() if idx is None else idx.numel()
    if n == 0:
        return p

    def take(t):  # the selected values of a tensor laid out like g, as a new fp32 tensor
        flat = t.reshape(-1)
        return (flat.clone() if idx is None else flat[idx]).float()

    def put(t, v):
        if idx is None:
            t.view(-1).copy_(v)
        else:
            t.view(-1).index_copy_(0, idx, v.to(t.dtype))

    gen = torch.Generator(device=g.device).manual_seed(int(seed))
    z = torch.randn(n, generator=gen, device=g.device, dtype=torch.float32)
    grad = take(g).add_(std * z).mul_(scale)
    put(g, grad)
    pflat = torch.cat([t.reshape(-1) for t in params]) if len(params) > 1 else params[0].reshape(-1).clone()
    pv = take(pflat)
    d = -grad if maximize else grad
    if weight_decay != 0:
        d = d.add(pv, alpha=weight_decay)
    if momentum != 0:
        b = d.clone() if first_step else take(buf).mul_(momentum).add_(d, alpha=1 - dampening)
        put(buf, b)
        d = d.add(b, alpha=momentum) if nesterov else b
    put(pflat, pv.add_(d, alpha=-lr))
    offset = 0
    for t in params:  # unselected values go back unchanged (bf16 -> fp32 -> bf16 is exact)
        t.view(-1).copy_(pflat[offset:offset + t.numel()])
        offset += t.numel()
    return p


_TABLES: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()  # (device, itemsize, ((address, numel), ...)) -> table


def _block_table(params: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    """[n_blocks, 3] int64 on ``device``: per block of ``_BLOCK`` values of one parameter, the address of its first
    value, its flat index in ``g`` and the parameter's end in ``g``. A function of the addresses and sizes only, so
    it is cached on them (16 layouts)."""
    es = params[0].element_size()
    layout = tuple((t.data_ptr(), t.numel()) for t in params)
    key = (device, es, layout)
    table = _TABLES.get(key)
    if table is not None:
        _TABLES.move_to_end(key)
        return table
    pieces, start = [], 0
    for addr, n in layout:
        s = torch.arange(0, n, _BLOCK, dtype=torch.int64)
        pieces.append(torch.stack([addr + s * es, start + s, torch.full_like(s, start + n)], 1))
        start += n
    table = torch.cat(pieces).to(device)
    _TABLES[key] = table
    if len(_TABLES) > 16:
        _TABLES.popitem(last=False)
    return table


@on_input_device
def noisy_sgd(p: Params, g: torch.Tensor, buf: Optional[torch.Tensor], *, lr: float, std: float, seed: int,
              scale: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
              nesterov: bool = False, maximize: bool = False, first_step: bool = False,
              mask: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None) -> Params:
    """Dispatching ``noisy_sgd_ref`` / the Philox Triton kernel (same arguments; one launch per call).

    Examples:
        >>> p, g, buf = torch.zeros(3), torch.ones(3), torch.zeros(3)
        >>> _ = noisy_sgd_ref(p, g, buf, lr=0.5, std=0.0, seed=0, scale=0.5, momentum=0.9, first_step=True)
        >>> p.tolist(), g.tolist(), buf.tolist()
        ([-0.25, -0.25, -0.25], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    """
    if backend_for_op("noisy_sgd", g) == "reference":
        return noisy_sgd_ref(p, g, buf, lr=lr, std=std, seed=seed, scale=scale, momentum=momentum,
                             dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                             first_step=first_step, mask=mask, rows=rows)
    params, multi = _check(p, g, buf, lr, std, seed, scale, momentum, dampening, weight_decay, nesterov, mask, rows)
    hi, lo = seed_halves(seed)  # masked_noise's full 64-bit key: the same Philox stream
    b = buf if momentum != 0 else g  # never dereferenced without momentum
    scalars = (hi, lo, float(lr), float(std), float(scale), float(momentum), float(1 - dampening), float(weight_decay))
    flags = dict(FIRST=bool(first_step), MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
                 WD=weight_decay != 0, BLOCK=_BLOCK,
                 ROUND_BF16=interpreting() and params[0].dtype == torch.bfloat16, **LAUNCH_OPTIONS)
    if rows is not None:
        rows = rows.contiguous()  # the kernel reads rows at stride 1
        cols = g[0].numel()
        n = rows.numel() * cols
        if n:
            _noisy_sgd_rows_kernel[(triton.cdiv(n, _BLOCK),)](p, g, b, rows, rows.numel(), cols, g.shape[0], *scalars,
                                                              **flags)
        return p
    if g.numel() == 0:
        return p
    m = mask.reshape(-1).contiguous().view(torch.uint8) if mask is not None else g  # bool: no copy if contiguous
    if multi:
        table = _block_table(params, g.device)
        _noisy_sgd_multi_kernel[(table.shape[0],)](table, g, b, m, *scalars, P_BF16=params[0].dtype == torch.bfloat16,
                                                   HAS_MASK=mask is not None, **flags)
    else:
        _noisy_sgd_kernel[(triton.cdiv(g.numel(), _BLOCK),)](p, g, b, m, g.numel(), *scalars,
                                                             HAS_MASK=mask is not None, **flags)
    return p
