"""MicroAdam's 4-bit error-feedback quantisation and dequantise-add (``fastdp/kernels/ef_quant.py``): reference vs Triton.
No naive variant: the reference already is the plain PyTorch formulation."""
import math

import pytest
import torch

from fastdp.kernels.ef_quant import block_minmax, ef_dequant_add, ef_dequant_add_ref, ef_quant, ef_quant_ref


def decode(codes, mins, maxs, block_size, d):
    """fp64 (values, step) per element of 4-bit codes (low nibble first) with per-block min / max."""
    c = codes.long()
    q = torch.stack([c & 15, c >> 4], dim=1).flatten()[:d].double()
    lo = mins.double().repeat_interleave(block_size)[:d]
    step = ((maxs.double() - mins.double()) / 15).repeat_interleave(block_size)[:d]
    return lo + q * step, step


def inputs(s, device):
    x = torch.randn(s.d, device=device) * 3
    mins, maxs = block_minmax(x, s.quant_block)
    return x, mins, maxs


def work_bytes(s, extra):
    return extra * s.d + 0.5 * s.d + 8 * math.ceil(s.d / s.quant_block)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_ef_quant(micro, flat_shape, impl):
    s = flat_shape
    micro.setup("ef_quant", s.name, impl)
    x, mins, maxs = inputs(s, micro.device)
    fn = ef_quant_ref if impl == "reference" else ef_quant
    codes = fn(x, mins, maxs, s.quant_block)
    micro.assert_property(codes.dtype == torch.uint8 and codes.numel() == math.ceil(s.d / 2), "wrong code layout")
    values, step = decode(codes, mins, maxs, s.quant_block, s.d)
    err = (values - x.double()).abs() - (step / 2 + 1e-5 * x.abs().max().item())
    micro.assert_property(bool((err <= 0).all()), f"quantisation error above half a step by {err.max().item():.3g}")
    micro.time(fn, x, mins, maxs, s.quant_block, op_bytes=work_bytes(s, 4))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_ef_dequant_add(micro, flat_shape, impl):
    s = flat_shape
    micro.setup("ef_dequant_add", s.name, impl)
    x, mins, maxs = inputs(s, micro.device)
    codes = ef_quant_ref(x, mins, maxs, s.quant_block)
    acc = torch.randn(s.d, device=micro.device)
    fn = ef_dequant_add_ref if impl == "reference" else ef_dequant_add
    truth = acc.double() + decode(codes, mins, maxs, s.quant_block, s.d)[0]
    micro.assert_close(fn(acc.clone(), codes, mins, maxs, s.quant_block), truth, normwise=True)
    micro.time(fn, acc, codes, mins, maxs, s.quant_block, op_bytes=work_bytes(s, 8))
