"""Fused ghost-norm kernel (Triton; the interpreter on the CPU) against the PyTorch reference."""
import pytest
import torch

from fastdp.kernels.ghost_norm import ghost_dot, ghost_dot_ref, ghost_norm, ghost_norm_ref

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)]


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")


def _rel(a, b):
    return ((a.double() - b.double()).abs() / b.double().abs().clamp(min=1e-12)).max().item()


@pytest.mark.parametrize("B,T,D,P", [(3, 33, 41, 9), (1, 1, 7, 5), (2, 64, 16, 48), (4, 5, 3, 70)])
@pytest.mark.parametrize("dtype,tol", TOL)
def test_ghost_norm_matches_reference(B, T, D, P, dtype, tol):
    x, dy = torch.randn(B, T, D, device=DEVICE, dtype=dtype), torch.randn(B, T, P, device=DEVICE, dtype=dtype)
    got = ghost_norm(x, dy)
    assert got.dtype == torch.float32
    assert _rel(got, ghost_norm_ref(x, dy)) < tol


@pytest.mark.parametrize("dtype,tol", TOL[:2])
def test_ghost_cross_term_matches_reference(dtype, tol):
    xa, dya = torch.randn(3, 20, 12, device=DEVICE, dtype=dtype), torch.randn(3, 20, 6, device=DEVICE, dtype=dtype)
    xb, dyb = torch.randn(3, 37, 12, device=DEVICE, dtype=dtype), torch.randn(3, 37, 6, device=DEVICE, dtype=dtype)
    ref = ghost_dot_ref(xa, dya, xb, dyb)
    assert (ghost_dot(xa, dya, xb, dyb) - ref).abs().max() <= tol * ref.abs().max()


def test_non_contiguous_and_empty_inputs():
    x = torch.randn(2, 40, 9, device=DEVICE).transpose(1, 2)  # [2, 9, 40] non-contiguous
    dy = torch.randn(2, 5, 9, device=DEVICE).transpose(1, 2)
    assert _rel(ghost_norm(x, dy), ghost_norm_ref(x, dy)) < 1e-5
    assert ghost_norm(torch.randn(0, 4, 3), torch.randn(0, 4, 2)).shape == (0,)
