"""Direct per-sample norm and clip-and-accumulate kernels (Triton; the interpreter on the CPU) vs references."""
import pytest
import torch

from fastdp.kernels.clip_accumulate import clip_accumulate, clip_accumulate_ref
from fastdp.kernels.direct_norm import direct_norm, direct_norm_ref

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 1e-2)]
SHAPES = [(3, 33, 41, 9), (1, 1, 7, 5), (2, 64, 16, 48), (4, 5, 3, 70), (3, 16, 9, 40)]


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")


@pytest.mark.parametrize("B,T,D,P", SHAPES)
@pytest.mark.parametrize("dtype,tol", TOL)
def test_direct_norm_matches_reference(B, T, D, P, dtype, tol):
    x, dy = torch.randn(B, T, D, device=DEVICE, dtype=dtype), torch.randn(B, T, P, device=DEVICE, dtype=dtype)
    got, ref = direct_norm(x, dy), direct_norm_ref(x, dy)
    assert got.dtype == torch.float32
    assert ((got - ref).abs() / ref).max() < tol


@pytest.mark.parametrize("B,T,D,P", SHAPES)
@pytest.mark.parametrize("dtype,tol", TOL)
def test_clip_accumulate_matches_reference(B, T, D, P, dtype, tol):
    x, dy = torch.randn(B, T, D, device=DEVICE, dtype=dtype), torch.randn(B, T, P, device=DEVICE, dtype=dtype)
    c = torch.rand(B, device=DEVICE) + 0.1
    ref = torch.einsum("b,btp,btd->pd", c.double(), dy.double(), x.double())
    for out in (None, torch.randn(P, D, device=DEVICE), torch.randn(D, P, device=DEVICE).t()):
        start = out.clone() if out is not None else 0
        got = clip_accumulate(x, dy, c, out)
        err = ((got.double() - start.double() if out is not None else got.double()) - ref).abs().max()
        assert err <= tol * ref.abs().max(), (out is None, err)
    assert torch.allclose(clip_accumulate(x, dy, c).double(), clip_accumulate_ref(x, dy, c).double(),
                          rtol=tol, atol=tol * ref.abs().max().item())


def _clipped_contributions(fn, dtype, T, samples=24, R=1.0):
    """||fn(x_i, dy_i, c_i)|| / R for single samples clipped to R (norms in fp64 from the rounded inputs)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(samples):
        x = torch.randn(1, T, 40, generator=g).to(DEVICE, dtype)
        dy = (torch.randn(1, T, 24, generator=g) * 3).to(DEVICE, dtype)
        if T > 1:  # correlated rows: cancellation inside dY^T X, where rounding after scaling hurts most
            dy = (dy + dy[:, :1]).to(dtype)
        n = torch.einsum("btp,btd->pd", dy.double(), x.double()).norm()
        c = (R / (n + 1e-6)).float().reshape(1)
        out.append((fn(x, dy, c).double().norm() / R).item())
    return torch.tensor(out)


@pytest.mark.parametrize("T", [1, 5, 64], ids=["T1", "T5", "T64"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_clipped_contribution_is_at_most_R(impl, dtype, T):
    """A sample clipped to R adds a sum of norm <= R up to fp32 rounding, in every dtype: the kernel never rounds a
    scaled 16-bit operand (per-sample fp32 partials times C_i, or an fp32 product for T < 16), nor does the
    reference on the CPU. The reference's fast CUDA path for 16-bit inputs with T >= 16 rounds the scaled operand to
    16 bits: there the excess is pinned to its documented size (a few 1e-4, < 2e-3)."""
    ratio = _clipped_contributions(clip_accumulate if impl == "triton" else clip_accumulate_ref, dtype, T)
    rounded = impl == "reference" and DEVICE == "cuda" and dtype != torch.float32 and T >= 16
    assert ratio.max() <= (1 + 2e-3 if rounded else 1 + 2e-6), ratio.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_clip_accumulate_keeps_an_fp64_out(dtype):
    """An fp64 accumulator keeps its low-order bits: the kernel's fp32 result is added in fp64 (as the reference adds
    its fp32 product), not read, rounded to fp32 and written back."""
    x, dy = torch.randn(2, 4, 3, device=DEVICE).to(dtype), torch.randn(2, 4, 2, device=DEVICE).to(dtype)
    out = torch.full((2, 3), 1 + 1e-12, dtype=torch.float64, device=DEVICE)
    got = clip_accumulate(x, dy, torch.zeros(2, device=DEVICE), out)
    assert got is out and torch.equal(out, torch.full_like(out, 1 + 1e-12))
    c = torch.rand(2, device=DEVICE)
    start = out.clone()
    clip_accumulate(x, dy, c, out)
    ref = clip_accumulate_ref(x, dy, c, start.clone())
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert (out - start - clip_accumulate(x, dy, c).double()).abs().max() == 0  # exactly the fp32 result added
