"""MicroAdam kernels: Triton (interpreter on the CPU, compiled on CUDA) against the PyTorch references."""
import math

import pytest
import torch

from fastdp.kernels.ef_quant import block_minmax, ef_dequant_add, ef_dequant_add_ref, ef_quant, ef_quant_ref
from fastdp.kernels.microadam_update import microadam_update, microadam_update_ref
from fastdp.kernels.topk_gather import gather_zero, gather_zero_ref

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [1, 7, 1030, 4231]


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")


@pytest.mark.parametrize("d", SIZES)
@pytest.mark.parametrize("qbs", [4, 100, 1000])
def test_ef_quant_roundtrip_matches_reference(d, qbs):
    x = torch.randn(d, device=DEVICE) * 3
    lo, hi = block_minmax(x, qbs)
    codes = ef_quant(x, lo, hi, qbs)
    ref = ef_quant_ref(x, lo, hi, qbs)
    assert codes.dtype == torch.uint8 and codes.numel() == math.ceil(d / 2)
    # codes may differ by one at exact rounding ties; the dequantised values must agree within one step
    step = ((hi - lo) / 15).repeat_interleave(qbs)[:d]
    a = ef_dequant_add(torch.zeros(d, device=DEVICE), codes, lo, hi, qbs)
    b = ef_dequant_add_ref(torch.zeros(d, device=DEVICE), ref, lo, hi, qbs)
    assert ((a - b).abs() <= step + 1e-6).all()
    assert (codes != ref).float().mean() < 0.01
    # quantisation error of a 4-bit asymmetric code: at most half a step
    assert ((a - x).abs() <= step / 2 + 1e-5 * x.abs().max()).all()


def test_ef_dequant_add_accumulates_in_place():
    x, acc = torch.randn(1030, device=DEVICE), torch.randn(1030, device=DEVICE)
    lo, hi = block_minmax(x, 100)
    codes = ef_quant_ref(x, lo, hi, 100)
    out = ef_dequant_add(acc.clone(), codes, lo, hi, 100)
    ref = ef_dequant_add_ref(acc.clone(), codes, lo, hi, 100)
    assert torch.allclose(out, ref, atol=1e-6)


def test_constant_block_quantises_exactly():
    x = torch.full((10,), 2.5, device=DEVICE)
    lo, hi = block_minmax(x, 4)
    assert torch.equal(ef_dequant_add(torch.zeros(10, device=DEVICE), ef_quant(x, lo, hi, 4), lo, hi, 4), x)


@pytest.mark.parametrize("d,per_block,bs", [(4231, 0, 0), (4231, 5, 1000), (7, 2, 4), (1, 0, 0)])
@pytest.mark.parametrize("val_dtype", [torch.float32, torch.bfloat16])
def test_gather_zero_matches_reference(d, per_block, bs, val_dtype):
    x = torch.randn(d, device=DEVICE)
    if per_block:
        nb = math.ceil(d / bs)
        pad = torch.zeros(nb * bs, device=DEVICE)
        pad[:d] = x
        idx = torch.topk(pad.view(nb, bs).abs(), per_block, dim=1).indices.reshape(-1).to(torch.int16)
    else:
        idx = torch.topk(x.abs(), max(1, d // 10)).indices.to(torch.int32)
    x1, x2 = x.clone(), x.clone()
    v1 = gather_zero(x1, idx, torch.empty(idx.numel(), dtype=val_dtype, device=DEVICE), per_block, bs)
    v2 = gather_zero_ref(x2, idx, torch.empty(idx.numel(), dtype=val_dtype, device=DEVICE), per_block, bs)
    assert torch.equal(x1, x2)
    # bf16 stores may round differently by one unit (the interpreter truncates; CUDA rounds to nearest)
    torch.testing.assert_close(v1.float(), v2.float(), rtol=0 if val_dtype == torch.float32 else 2 ** -7, atol=0)
    assert (x1 == 0).sum() >= min(idx.numel(), d) - (idx.numel() - (v2 != 0).sum())


@pytest.mark.parametrize("d,per_block,bs", [(4231, 0, 0), (4231, 7, 1000), (5, 1, 2)])
@pytest.mark.parametrize("p_dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_microadam_update_matches_reference(d, per_block, bs, p_dtype, tol):
    R = 3
    if per_block:
        nb = math.ceil(d / bs)
        idx = torch.stack([torch.stack([torch.randperm(bs)[:per_block] for _ in range(nb)]).reshape(-1)
                           for _ in range(R)]).to(torch.int16)
        vals = torch.randn(R, nb * per_block, dtype=torch.bfloat16)
    else:
        idx = torch.stack([torch.randperm(d)[:max(1, d // 20)] for _ in range(R)]).to(torch.int32)
        vals = torch.randn(R, idx.shape[1])
    idx, vals = idx.to(DEVICE), vals.to(DEVICE)
    w1 = torch.tensor([0.9 ** 2, 0.9, 1.0], device=DEVICE)
    w2 = torch.tensor([0.999 ** 2, 0.999, 1.0], device=DEVICE)
    p = torch.randn(d, device=DEVICE).to(p_dtype)
    kw = dict(lr=0.01, eps=1e-8, c1=0.3, c2=0.002, decay=0.999, per_block=per_block, block_size=bs)
    a = microadam_update(p.clone(), idx, vals, w1, w2, workspace=torch.zeros(2, d, device=DEVICE), **kw)
    b = microadam_update_ref(p.clone(), idx, vals, w1, w2, **kw)
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * 1e-2)
    assert not torch.equal(a, p)
