"""4-bit asymmetric block quantisation of the error feedback (MicroAdam), two codes per byte.

Per quantisation block b of ``block_size`` values: ``u_b = (max_b - min_b) / 15``, ``s_b = 1 / u_b`` (0 where
``u_b == 0``), ``o_b = 0.5 - min_b * s_b`` and ``code = trunc(clamp(x * s_b + o_b, 0, 15))`` (round half up of
``(x - min_b) / u_b``; a multiply and an add per element, each rounded on its own: no FMA); element 2i goes to
the low nibble of byte i, element 2i+1 to the high nibble. Dequantisation adds ``code * u_b + min_b`` (multiply,
then add) in place. Block minima and maxima are fp32 [n_blocks] (``block_minmax``). MicroAdam's fused step
(``fastdp.micro_adam``) computes the same codes with the same float ops over all tensors at once.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ._backend import HAS_TRITON, backend_for
from ._common import LAUNCH_OPTIONS, on_input_device

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _ef_quant_kernel(x_ptr, min_ptr, max_ptr, codes_ptr, d, block_size, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # byte index
        j0 = 2 * i
        j1 = j0 + 1
        m0 = j0 < d
        m1 = j1 < d
        c0 = _code(x_ptr, min_ptr, max_ptr, j0, m0, block_size)
        c1 = _code(x_ptr, min_ptr, max_ptr, j1, m1, block_size)
        c1 = tl.where(m1, c1, 0)
        tl.store(codes_ptr + i, (c0 | (c1 << 4)).to(tl.uint8), mask=m0)

    @triton.jit
    def _code(x_ptr, min_ptr, max_ptr, j, mask, block_size):
        x = tl.load(x_ptr + j, mask=mask, other=0.0)
        b = j // block_size
        lo = tl.load(min_ptr + b, mask=mask, other=0.0)
        hi = tl.load(max_ptr + b, mask=mask, other=0.0)
        u = (hi - lo) / 15.0
        s = tl.where(u > 0, 1.0 / tl.where(u > 0, u, 1.0), 0.0)
        o = 0.5 - lo * s
        q = tl.minimum(tl.maximum(x * s + o, 0.0), 15.0)
        return q.to(tl.int32)  # q >= 0: truncation is floor

    @triton.jit
    def _ef_dequant_add_kernel(x_ptr, codes_ptr, min_ptr, max_ptr, d, block_size, BLOCK: tl.constexpr):
        j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = j < d
        byte = tl.load(codes_ptr + j // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((j % 2) * 4)) & 15
        b = j // block_size
        lo = tl.load(min_ptr + b, mask=mask, other=0.0)
        hi = tl.load(max_ptr + b, mask=mask, other=0.0)
        x = tl.load(x_ptr + j, mask=mask, other=0.0)
        tl.store(x_ptr + j, x + (code.to(tl.float32) * ((hi - lo) / 15.0) + lo), mask=mask)


_BLOCK = 1024


def block_minmax(x: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-block (min, max) of a flat fp32 tensor [d] in blocks of ``block_size`` (last block may be short)."""
    d = x.numel()
    full = d // block_size
    mins, maxs = [], []
    if full:
        v = x[:full * block_size].view(full, block_size)
        lo, hi = v.amin(dim=1), v.amax(dim=1)  # aminmax(dim=1) is ~10x slower on the CPU
        mins.append(lo)
        maxs.append(hi)
    if d % block_size:
        lo, hi = x[full * block_size:].aminmax()
        mins.append(lo.view(1))
        maxs.append(hi.view(1))
    return torch.cat(mins).float(), torch.cat(maxs).float()


def quant_affine(mins: torch.Tensor, maxs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-block (scale, offset) [n_blocks] fp32 of the 4-bit code ``x * scale + offset`` (module docstring)."""
    u = (maxs - mins) / 15.0
    scale = torch.where(u > 0, 1.0 / torch.where(u > 0, u, torch.ones_like(u)), torch.zeros_like(u))
    return scale, 0.5 - mins * scale


def _per_element(v: torch.Tensor, d: int, block_size: int) -> torch.Tensor:
    return v.repeat_interleave(block_size)[:d]


def ef_quant_ref(x: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, block_size: int) -> torch.Tensor:
    """Codes [ceil(d/2)] uint8 of flat fp32 ``x`` [d] given per-block ``mins``/``maxs`` [n_blocks] fp32."""
    d = x.numel()
    scale, offset = quant_affine(mins, maxs)
    q = (x * _per_element(scale, d, block_size) + _per_element(offset, d, block_size)).clamp_(0, 15).to(torch.uint8)
    q = q.to(torch.int32)
    if d % 2:
        q = torch.cat([q, q.new_zeros(1)])
    q = q.view(-1, 2)
    return (q[:, 0] | (q[:, 1] << 4)).to(torch.uint8)


def ef_dequant_add_ref(x: torch.Tensor, codes: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor,
                       block_size: int) -> torch.Tensor:
    """``x += code * u + min`` in place on flat fp32 ``x`` [d]; returns ``x``."""
    d = x.numel()
    c = codes.to(torch.int32)
    q = torch.stack([c & 15, c >> 4], dim=1).flatten()[:d].float()
    lo, hi = _per_element(mins, d, block_size), _per_element(maxs, d, block_size)
    return x.add_(q * ((hi - lo) / 15.0) + lo)  # multiply, then add: the fused step's order


@on_input_device
def ef_quant(x: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, block_size: int) -> torch.Tensor:
    """Dispatching ``ef_quant_ref`` / Triton kernel (``kernels._backend``). The kernel reads its operands as flat
    contiguous arrays: strided ones are copied first."""
    if backend_for(x) == "reference":
        return ef_quant_ref(x, mins, maxs, block_size)
    x, mins, maxs = x.contiguous(), mins.contiguous(), maxs.contiguous()
    d = x.numel()
    codes = torch.empty(math.ceil(d / 2), dtype=torch.uint8, device=x.device)
    grid = (triton.cdiv(codes.numel(), _BLOCK),)
    _ef_quant_kernel[grid](x, mins, maxs, codes, d, block_size, BLOCK=_BLOCK, **LAUNCH_OPTIONS)
    return codes


@on_input_device
def ef_dequant_add(x: torch.Tensor, codes: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor,
                   block_size: int) -> torch.Tensor:
    """Dispatching ``ef_dequant_add_ref`` / Triton kernel. The kernel works on flat contiguous arrays: strided
    operands are copied first, and a strided ``x`` gets the result written back (it is updated in place)."""
    if backend_for(x) == "reference":
        return ef_dequant_add_ref(x, codes, mins, maxs, block_size)
    if not x.is_contiguous():
        return x.copy_(ef_dequant_add(x.contiguous(), codes, mins, maxs, block_size))
    codes, mins, maxs = codes.contiguous(), mins.contiguous(), maxs.contiguous()
    d = x.numel()
    _ef_dequant_add_kernel[(triton.cdiv(d, _BLOCK),)](x, codes, mins, maxs, d, block_size, BLOCK=_BLOCK,
                                                      **LAUNCH_OPTIONS)
    return x
