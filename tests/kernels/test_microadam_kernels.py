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


def test_strided_operands_match_reference():
    """The kernels index their operands as flat contiguous arrays: strided inputs are copied first, and strided
    in-place arguments (x, out, p) are updated where they are, as the references update them."""
    d, qbs = 1030, 100
    base = torch.randn(2 * d, device=DEVICE) * 3
    x = base[::2]  # stride 2
    lo, hi = block_minmax(x.contiguous(), qbs)
    assert torch.equal(ef_quant(x, lo, hi, qbs), ef_quant(x.contiguous(), lo, hi, qbs))
    codes = ef_quant_ref(x, lo, hi, qbs)
    acc = torch.randn(2 * d, device=DEVICE)
    a, b = acc.clone(), acc.clone()
    got = ef_dequant_add(a[1::2], codes[None].expand(2, -1)[1], lo[None].expand(3, -1)[2], hi, qbs)
    ef_dequant_add_ref(b[1::2], codes, lo, hi, qbs)
    assert got.data_ptr() == a[1::2].data_ptr()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)

    idx = torch.topk(x.abs(), 50).indices.to(torch.int32)
    idx_strided = torch.stack([idx, idx]).t()[:, 1]  # stride 2
    x1, x2 = base.clone(), base.clone()
    o1, o2 = torch.zeros(2, 50, device=DEVICE), torch.zeros(2, 50, device=DEVICE)
    out = gather_zero(x1[::2], idx_strided, o1.t()[:, 1], 0, 0)
    gather_zero_ref(x2[::2], idx, o2.t()[:, 1], 0, 0)
    assert out.data_ptr() == o1.t()[:, 1].data_ptr()
    assert torch.equal(x1, x2) and torch.equal(o1, o2) and (o1[1] != 0).all()

    R, n = 3, 40
    ring = torch.stack([torch.randperm(d)[:n] for _ in range(2 * R)]).to(torch.int32).to(DEVICE)
    vals = torch.randn(n, 2 * R, device=DEVICE)
    w1 = torch.tensor([0.81, 0.9, 1.0], device=DEVICE)
    w2 = torch.tensor([0.998, 0.999, 1.0], device=DEVICE)
    kw = dict(lr=0.01, eps=1e-8, c1=0.3, c2=0.002, decay=0.999)
    p = torch.randn(d, 2, device=DEVICE)
    p1, p2 = p.clone(), p.clone()
    ring_s, vals_s = ring[::2], vals.t()[1::2]  # strided rows / columns of the ring
    microadam_update(p1[:, 1], ring_s, vals_s, w1, w2, workspace=torch.zeros(2, d, device=DEVICE), **kw)
    microadam_update_ref(p2[:, 1], ring_s, vals_s, w1, w2, **kw)
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-7)
    assert not torch.equal(p1[:, 1], p[:, 1]) and torch.equal(p1[:, 0], p[:, 0])
