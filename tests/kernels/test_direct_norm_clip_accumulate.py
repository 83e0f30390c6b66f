"""Direct per-sample norm and clip-and-accumulate kernels (Triton; the interpreter on the CPU) vs references."""
import pytest
import torch

from fastdp.kernels.clip_accumulate import clip_accumulate, clip_accumulate_ref
from fastdp.kernels.direct_norm import direct_norm, direct_norm_ref

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 1e-2)]
SHAPES = [(3, 33, 41, 9), (1, 1, 7, 5), (2, 64, 16, 48), (4, 5, 3, 70)]


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
