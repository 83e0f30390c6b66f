"""Row-group absolute sums (SPARTA's selection release) against explicit per-sample gradients."""
import pytest
import torch

from fastdp.kernels.row_abs_sum import row_abs_sum, row_abs_sum_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("B,T,D,P", [(3, 33, 41, 9), (1, 1, 7, 5), (2, 40, 16, 70)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_row_abs_sum(backend, B, T, D, P, dtype, tol, monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", backend)
    x, dy = torch.randn(B, T, D, device=DEVICE, dtype=dtype), torch.randn(B, T, P, device=DEVICE, dtype=dtype)
    c = torch.rand(B, device=DEVICE)
    g = torch.einsum("btp,btd->bpd", dy.double(), x.double())
    ref = torch.einsum("b,bpd->p", c.double(), g.abs())
    got = row_abs_sum(x, dy, c)
    assert got.shape == (P,) and got.dtype == torch.float32
    assert ((got.double() - ref).abs() / ref).max() < tol
    assert torch.allclose(row_abs_sum_ref(x, dy, c).double(), ref, rtol=tol)
