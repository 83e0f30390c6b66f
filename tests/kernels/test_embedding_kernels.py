"""Embedding kernels (Triton; the interpreter on the CPU): index-equality ghost norm / dot and the clipped
index-add, against the references and explicit per-sample gradients."""
import pytest
import torch

from fastdp.kernels.embedding_norm import (
    embedding_accumulate,
    embedding_accumulate_ref,
    embedding_dot,
    embedding_dot_ref,
    embedding_linear_dot,
    embedding_linear_dot_ref,
    embedding_norm,
)

pytestmark = pytest.mark.interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(3, 37, 11, 5), (1, 1, 4, 7), (2, 64, 70, 3), (4, 9, 2, 33)]  # B, T, V (small: repeated ids), d


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")


def explicit(idx, dy, V):
    """[B, V, d] per-sample embedding gradients (fp64)."""
    B, T, d = dy.shape
    g = torch.zeros(B, V, d, dtype=torch.float64)
    g.index_put_((torch.arange(B).repeat_interleave(T), idx.reshape(-1).cpu()), dy.double().cpu().reshape(-1, d),
                 accumulate=True)
    return g


@pytest.mark.parametrize("B,T,V,d", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
def test_embedding_norm_and_dot(B, T, V, d, dtype, tol):
    idx = torch.randint(0, V, (B, T), device=DEVICE)
    dy = torch.randn(B, T, d, device=DEVICE).to(dtype)
    g = explicit(idx, dy, V)
    got = embedding_norm(idx, dy)
    assert got.dtype == torch.float32
    assert ((got.double().cpu() - g.pow(2).sum((1, 2))).abs() / g.pow(2).sum((1, 2))).max() < tol
    idx_b = torch.randint(0, V, (B, T + 3), device=DEVICE)  # a second use with its own length
    dy_b = torch.randn(B, T + 3, d, device=DEVICE).to(dtype)
    ref = (g * explicit(idx_b, dy_b, V)).sum((1, 2))
    got = embedding_dot(idx, dy, idx_b, dy_b).double().cpu()
    scale = explicit(idx_b, dy_b, V).pow(2).sum((1, 2)).sqrt() * g.pow(2).sum((1, 2)).sqrt()
    assert ((got - ref).abs() / scale).max() < tol
    assert torch.allclose(embedding_dot(idx, dy, idx_b, dy_b), embedding_dot_ref(idx, dy, idx_b, dy_b),
                          rtol=tol, atol=tol * scale.max().item())


@pytest.mark.parametrize("B,T,V,d", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
def test_embedding_accumulate(B, T, V, d, dtype, tol):
    idx = torch.randint(0, V, (B, T), device=DEVICE)
    dy = torch.randn(B, T, d, device=DEVICE).to(dtype)
    c = torch.rand(B, device=DEVICE) + 0.1
    ref = torch.einsum("b,bvd->vd", c.double().cpu(), explicit(idx, dy, V))
    got = embedding_accumulate(idx, dy, c, V)
    assert got.dtype == torch.float32 and got.shape == (V, d)
    assert (got.double().cpu() - ref).abs().max() <= tol * ref.abs().max()
    start = torch.randn(V, d, device=DEVICE)
    out = start.clone()
    assert embedding_accumulate(idx, dy, c, V, out) is out
    assert ((out - start).double().cpu() - ref).abs().max() <= tol * ref.abs().max()
    assert torch.allclose(got, embedding_accumulate_ref(idx, dy, c, V), rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("B,T,V,d", SHAPES)
@pytest.mark.parametrize("Tl", [1, 5, 40])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
def test_embedding_linear_dot(B, T, V, d, Tl, dtype, tol):
    """Tied table used as embedding (T tokens) and as Linear weight (Tl head positions): the cross term against the
    explicit per-sample gradients of both uses, and the kernel against the reference (same rounded inputs)."""
    idx = torch.randint(0, V, (B, T), device=DEVICE)
    dy_emb = torch.randn(B, T, d, device=DEVICE).to(dtype)
    x_lin = torch.randn(B, Tl, d, device=DEVICE).to(dtype)
    dy_lin = torch.randn(B, Tl, V, device=DEVICE).to(dtype)
    g_emb = explicit(idx, dy_emb, V)
    g_lin = torch.einsum("btv,btd->bvd", dy_lin.double(), x_lin.double()).cpu()
    truth = (g_emb * g_lin).sum((1, 2))
    got = embedding_linear_dot(idx, dy_emb, x_lin, dy_lin)
    ref = embedding_linear_dot_ref(idx, dy_emb, x_lin, dy_lin)
    assert got.dtype == torch.float32 and got.shape == (B,)
    scale = truth.abs().max().item() + 1e-6
    assert (got.double().cpu() - ref.double().cpu()).abs().max().item() <= 1e-5 * scale  # same rounded inputs
    assert (got.double().cpu() - truth).abs().max().item() <= tol * scale


def test_empty_batch():
    idx, dy = torch.zeros(0, 5, dtype=torch.long, device=DEVICE), torch.zeros(0, 5, 3, device=DEVICE)
    assert embedding_norm(idx, dy).shape == (0,)
    assert (embedding_accumulate(idx, dy, torch.zeros(0, device=DEVICE), 7) == 0).all()
