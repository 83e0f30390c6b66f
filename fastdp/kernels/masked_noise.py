"""Masked Gaussian noise, in place: ``g[j] += std * N(0, 1)`` only where the mask is set (or only on selected rows).

The Triton kernel draws counter-based Philox normals ``tl.randn(key, j)`` keyed by the element's flat index:
the noise at coordinate ``j`` depends on ``(seed, j)`` only, no noise tensor of full size is allocated, and
coordinates outside the mask are never written (bit-identical after the call). The reference has the same
signature and distribution, drawing from a ``torch.Generator`` seeded with ``seed`` (different values).

Seeds: any integer in ``[-2^63, 2^64)`` (``torch.Generator.manual_seed``'s range); the Philox key is the seed's
64 bits, ``seed mod 2^64``, so distinct seeds in ``[0, 2^64)`` (and in ``[-2^63, 2^63)``) give distinct keys, hence
independent streams (a negative seed ``s`` is the same key as ``s + 2^64``). The key reaches the kernel as two signed
32-bit halves (always an ``i32`` argument, not specialised on its value: one compilation whatever the seed) and is
rebuilt there; ``noisy_sgd`` does the same, so both draw the same stream for the same seed.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ._backend import HAS_TRITON, backend_for_op
from ._common import LAUNCH_OPTIONS, on_input_device

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _philox_key(seed_hi, seed_lo):
        """The 64-bit Philox key from its two 32-bit halves (signed i32 arguments: bit patterns)."""
        hi = seed_hi.to(tl.uint32, bitcast=True).to(tl.uint64)
        lo = seed_lo.to(tl.uint32, bitcast=True).to(tl.uint64)
        return (hi << 32) | lo

    @triton.jit(do_not_specialize=["seed_hi", "seed_lo"])
    def _masked_noise_kernel(g_ptr, mask_ptr, d, std, seed_hi, seed_lo, BLOCK: tl.constexpr):
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit: > 2^31 coordinates
        inb = j < d
        keep = tl.load(mask_ptr + j, mask=inb, other=0) != 0
        sel = inb & keep
        g = tl.load(g_ptr + j, mask=sel, other=0.0)
        tl.store(g_ptr + j, g + std * tl.randn(_philox_key(seed_hi, seed_lo), j), mask=sel)

    @triton.jit(do_not_specialize=["seed_hi", "seed_lo"])
    def _row_noise_kernel(g_ptr, rows_ptr, k, cols, n_rows, std, seed_hi, seed_lo, BLOCK: tl.constexpr):
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # over the k * cols selected elements
        inb = e < k * cols
        r = tl.load(rows_ptr + e // cols, mask=inb, other=-1).to(tl.int64)
        sel = inb & (r >= 0) & (r < n_rows)  # a row outside g is never written (the host checks raise first)
        j = r * cols + e % cols
        g = tl.load(g_ptr + j, mask=sel, other=0.0)
        tl.store(g_ptr + j, g + std * tl.randn(_philox_key(seed_hi, seed_lo), j), mask=sel)

_BLOCK = 1024
_SEED_MIN, _SEED_END = -(2 ** 63), 2 ** 64


def seed_halves(seed) -> Tuple[int, int]:
    """``(hi, lo)``: the 64-bit Philox key ``seed mod 2^64`` as two signed 32-bit ints (bit patterns).

    Raises ``ValueError`` for a non-integer seed or one outside ``[-2^63, 2^64)`` (``torch.Generator``'s range).

    Examples:
        >>> seed_halves(5), seed_halves(2 ** 32 + 7), seed_halves(2 ** 64 - 1), seed_halves(-1)
        ((0, 5), (1, 7), (-1, -1), (-1, -1))
    """
    try:
        s = operator.index(seed)
    except TypeError:
        raise ValueError(f"the noise seed must be an integer, got {type(seed).__name__}") from None
    if not _SEED_MIN <= s < _SEED_END:
        raise ValueError(f"the noise seed must lie in [-2^63, 2^64), got {s}")
    u = s % _SEED_END

    def signed(x):
        return x - (1 << 32) if x >= (1 << 31) else x

    return signed(u >> 32), signed(u & 0xFFFFFFFF)


# rows tensor -> (its version, data_ptr, min, max): the range is read on the host once per rows tensor (a device
# sync on CUDA), not on every step that reuses it. An in-place change bumps the version and checks it again.
_ROWS_RANGE: "WeakIdKeyDictionary" = WeakIdKeyDictionary()


def _rows_range(rows: torch.Tensor) -> Tuple[int, int]:
    lo, hi = torch.aminmax(rows)
    return int(lo), int(hi)


def check_rows(rows, g: torch.Tensor, op: str, dtypes=(torch.int32, torch.int64)) -> torch.Tensor:
    """``rows`` as a contiguous int64 tensor after checking it: a 1-D integer tensor on ``g``'s device (``ValueError``
    otherwise) whose values lie in ``[0, g.shape[0])`` (``IndexError`` otherwise).

    The range is read once per rows tensor (cached by identity, its version counter and its address): a ``Mask``'s
    rows reused over many steps cost one host sync. A change the version counter does not see (e.g. through a
    NumPy view) escapes the cached check, but the kernels never write a row outside ``g`` either way."""
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{op}: rows must be a 1-D {names} tensor")
    if g.dim() == 0 or rows.device != g.device:
        raise ValueError(f"{op}: rows index dim 0 of g, on g's device")
    if rows.numel():
        tracked = not rows.is_inference()  # inference tensors have no version counter
        stamp = (rows._version, rows.data_ptr()) if tracked else None
        hit = _ROWS_RANGE.get(rows) if tracked else None
        if hit is not None and hit[:2] == stamp:
            lo, hi = hit[2:]
        else:
            lo, hi = _rows_range(rows)
            if tracked:
                _ROWS_RANGE[rows] = (*stamp, lo, hi)
        if lo < 0 or hi >= g.shape[0]:
            raise IndexError(f"{op}: rows hold {lo if lo < 0 else hi}, outside [0, {g.shape[0]}) (dim 0 of g)")
    return rows.to(torch.int64).contiguous()


def _check_mask(mask, g: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor) or mask.shape != g.shape or mask.device != g.device:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"masked_noise: mask must be a tensor of g's shape {tuple(g.shape)} on g's device, got {got}")


def masked_noise_ref(g: torch.Tensor, std: float, seed: int, mask: Optional[torch.Tensor] = None,
                     rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Add ``std * N(0, 1)`` in place to fp32 ``g`` where ``mask`` (g's shape; bool, or any dtype: nonzero = set)
    is set, or on ``rows`` (1-D int64/int32 indices along dim 0 of ``g``, in ``[0, g.shape[0])``: ``IndexError``
    otherwise); exactly one of ``mask`` / ``rows``. ``seed``: an integer in ``[-2^63, 2^64)``. Returns ``g``.

    Seed space: on the CPU, ``torch.Generator`` (mt19937) keeps only the seed's low 32 bits, so two seeds that agree
    there draw the same reference noise (CUDA generators keep all 64 bits, as the kernel does). Do not feed the CPU
    reference per-step 62-bit seeds where independence across many steps matters; ``DPOptimizer`` draws these seeds
    for the kernels only."""
    if (mask is None) == (rows is None):
        raise ValueError("give exactly one of mask or rows")
    seed_halves(seed)  # the same seed check as the kernel's
    gen = torch.Generator(device=g.device).manual_seed(operator.index(seed))
    if rows is not None:
        rows = check_rows(rows, g, "masked_noise")
        sel = g.index_select(0, rows)
        g.index_copy_(0, rows, sel + std * torch.randn(sel.shape, generator=gen, device=g.device, dtype=g.dtype))
        return g
    _check_mask(mask, g)
    idx = mask.reshape(-1).nonzero().flatten()
    flat = g.view(-1)
    flat[idx] += std * torch.randn(idx.numel(), generator=gen, device=g.device, dtype=g.dtype)
    return g


@on_input_device
def masked_noise(g: torch.Tensor, std: float, seed: int, mask: Optional[torch.Tensor] = None,
                 rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dispatching ``masked_noise_ref`` / the Philox Triton kernel (``g`` contiguous fp32; same arguments).

    ``rows`` are checked on the host once per rows tensor (``check_rows``) and masked in the kernel as well."""
    if backend_for_op("masked_noise", g) == "reference":
        return masked_noise_ref(g, std, seed, mask, rows)
    if (mask is None) == (rows is None):
        raise ValueError("give exactly one of mask or rows")
    if not g.is_contiguous() or g.dtype != torch.float32:
        raise ValueError("masked_noise needs a contiguous fp32 tensor")
    hi, lo = seed_halves(seed)  # the full 64-bit key (not reduced: distinct seeds, distinct streams)
    if rows is not None:
        rows = check_rows(rows, g, "masked_noise")
        cols = g[0].numel() if g.dim() > 1 else 1
        n = rows.numel() * cols
        if n:
            _row_noise_kernel[(triton.cdiv(n, _BLOCK),)](g, rows, rows.numel(), cols, g.shape[0], float(std), hi, lo,
                                                         BLOCK=_BLOCK, **LAUNCH_OPTIONS)
        return g
    _check_mask(mask, g)
    d = g.numel()
    if d:
        m = mask.reshape(-1)
        m = (m if m.dtype == torch.bool else m != 0).contiguous().view(torch.uint8)  # bool: no copy; else nonzero
        _masked_noise_kernel[(triton.cdiv(d, _BLOCK),)](g, m, d, float(std), hi, lo, BLOCK=_BLOCK, **LAUNCH_OPTIONS)
    return g
