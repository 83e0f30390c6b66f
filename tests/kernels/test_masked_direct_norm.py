"""Masked / standardised direct per-sample norm: Triton kernel (interpreter on the CPU) and reference vs explicit
per-sample gradients."""
import pytest
import torch

from fastdp.kernels.masked_direct_norm import masked_direct_norm, masked_direct_norm_ref

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 33, 41, 9), (1, 1, 7, 5), (2, 64, 16, 48), (4, 5, 3, 70)]


def explicit(x, dy, mask, center, scale):
    g = torch.einsum("btp,btd->bpd", dy.double(), x.double())
    if center is not None:
        g = (g - center.double()) / scale.double()
    return (g * mask.double()).pow(2).sum((1, 2))


@pytest.mark.parametrize("B,T,D,P", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_masked_direct_norm(B, T, D, P, dtype, tol, affine, backend, monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", backend)
    x = torch.randn(B, T, D, device=DEVICE).to(dtype)
    dy = torch.randn(B, T, P, device=DEVICE).to(dtype)
    mask = torch.rand(P, D, device=DEVICE) < 0.4
    center = torch.randn(P, D, device=DEVICE) if affine else None
    scale = torch.rand(P, D, device=DEVICE) + 0.5 if affine else None
    ref = explicit(x.cpu(), dy.cpu(), mask.cpu(), *(t.cpu() if t is not None else None for t in (center, scale)))
    got = masked_direct_norm(x, dy, mask, center, scale)
    assert got.dtype == torch.float32
    assert ((got.double().cpu() - ref).abs() / ref.clamp(min=1e-12)).max() < tol
    # a transposed (strided) mask / centre, as for HF Conv1D weights stored [d, p]
    got_t = masked_direct_norm(x, dy, mask.t().contiguous().t(), *(t.t().contiguous().t() if t is not None else None
                                                                  for t in (center, scale)))
    assert torch.allclose(got_t, got, rtol=1e-6)


def test_masked_direct_norm_argument_checks():
    x, dy = torch.randn(2, 3, 4), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="mask has shape"):
        masked_direct_norm_ref(x, dy, torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="both center and scale"):
        masked_direct_norm_ref(x, dy, torch.ones(5, 4, dtype=torch.bool), torch.zeros(5, 4))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_empty_sequence_with_an_affine_term(backend, monkeypatch):
    """T = 0: every G_i is 0, so the standardised norm is ||M * (0 - a) / b||^2 (not 0); without the affine term 0."""
    monkeypatch.setenv("FASTDP_BACKEND", backend)
    x, dy = torch.randn(2, 0, 4, device=DEVICE), torch.randn(2, 0, 3, device=DEVICE)
    mask = torch.rand(3, 4, device=DEVICE) < 0.6
    center, scale = torch.randn(3, 4, device=DEVICE), torch.rand(3, 4, device=DEVICE) + 0.5
    want = (mask * (0 - center) / scale).pow(2).sum()
    got = masked_direct_norm(x, dy, mask, center, scale)
    assert got.shape == (2,) and want > 0
    torch.testing.assert_close(got, want.expand(2), rtol=1e-6, atol=0)
    assert torch.equal(masked_direct_norm(x, dy, mask), torch.zeros(2, device=DEVICE))
    assert masked_direct_norm(x[:0], dy[:0], mask, center, scale).shape == (0,)
