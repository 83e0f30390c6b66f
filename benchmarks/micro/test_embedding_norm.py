"""Embedding per-sample gradient norms through token equality (``fastdp/kernels/embedding_norm.py``: reference and Triton)
vs dense per-sample gradients [B, V, d]."""
import pytest
import torch

from fastdp.kernels.embedding_norm import (
    embedding_linear_dot,
    embedding_linear_dot_ref,
    embedding_norm,
    embedding_norm_ref,
)


def dense_grads(idx, dy, V):
    """[B, V, d] per-sample embedding gradients in dy's dtype (row v = sum of dy at the positions of token v)."""
    B, d = dy.shape[0], dy.shape[-1]
    return torch.zeros(B, V, d, dtype=dy.dtype, device=dy.device).scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d), dy)


@pytest.mark.parametrize("impl", ["reference", "triton", "naive"])
def test_embedding_norm(micro, embedding_shape, dtype, impl):
    s = embedding_shape
    micro.setup("embedding_norm", s.name, impl, dtype)
    frequent = torch.rand(s.B, s.T, device=micro.device) < 0.3  # some tokens repeat within a sample, as in text
    idx = torch.where(frequent, torch.randint(0, 32, (s.B, s.T), device=micro.device),
                      torch.randint(0, s.V, (s.B, s.T), device=micro.device))
    dy = torch.randn(s.B, s.T, s.d, device=micro.device).to(dtype)
    if impl == "naive":
        def fn(idx, dy):
            return dense_grads(idx, dy, s.V).float().pow(2).sum((1, 2))
    else:
        fn = embedding_norm_ref if impl == "reference" else embedding_norm
    truth = torch.cat([dense_grads(idx[i:i + 1], dy[i:i + 1].double(), s.V).pow(2).sum((1, 2)) for i in range(s.B)])
    micro.assert_close(fn(idx, dy), truth)
    ghost = 2 * s.B * s.T ** 2 * s.d + 2 * s.B * s.T ** 2
    micro.time(fn, idx, dy, op_flops=ghost, impl_flops=2 * s.B * s.V * s.d if impl == "naive" else ghost,
               op_bytes=s.B * s.T * s.d * dy.element_size() + 8 * s.B * s.T)


@pytest.mark.parametrize("impl", ["reference", "triton", "naive"])
def test_embedding_linear_dot(micro, embedding_shape, dtype, impl):
    """The tied embedding x LM head cross term (T tokens in, T head positions out) vs the two dense per-sample
    gradients' inner product."""
    s = embedding_shape
    micro.setup("embedding_linear_dot", s.name, impl, dtype)
    idx = torch.randint(0, s.V, (s.B, s.T), device=micro.device)
    dy_emb = torch.randn(s.B, s.T, s.d, device=micro.device).to(dtype)
    x_lin = torch.randn(s.B, s.T, s.d, device=micro.device).to(dtype)
    dy_lin = torch.randn(s.B, s.T, s.V, device=micro.device).to(dtype)
    if impl == "naive":
        def fn(idx, dy_emb, x_lin, dy_lin):
            head = torch.bmm(dy_lin.transpose(1, 2), x_lin).float()  # [B, V, d]
            return (dense_grads(idx, dy_emb, s.V).float() * head).sum((1, 2))
    else:
        fn = embedding_linear_dot_ref if impl == "reference" else embedding_linear_dot
    truth = torch.cat([(dense_grads(idx[i:i + 1], dy_emb[i:i + 1].double(), s.V)
                        * torch.bmm(dy_lin[i:i + 1].double().transpose(1, 2), x_lin[i:i + 1].double())).sum((1, 2))
                       for i in range(s.B)])
    micro.assert_close(fn(idx, dy_emb, x_lin, dy_lin), truth, normwise=True)  # a signed sum: some near 0
    tiles = 2 * s.B * s.T ** 2 * s.d + 2 * s.B * s.T ** 2
    micro.time(fn, idx, dy_emb, x_lin, dy_lin, op_flops=tiles,
               impl_flops=2 * s.B * s.T * s.V * s.d + 2 * s.B * s.V * s.d if impl == "naive" else tiles,
               op_bytes=2 * s.B * s.T * s.d * x_lin.element_size() + s.B * s.T ** 2 * dy_lin.element_size()
               + 8 * s.B * s.T)
