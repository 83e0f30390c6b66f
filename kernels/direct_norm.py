"""Direct per-sample norm: form each sample's gradient ``dY_i^T X_i`` and reduce it.

Costs O(T p d) per sample, cheaper than the ghost norm when ``T (p + d) > p d`` (long sequences,
convolutions with many positions). The reference materialises the per-sample tiles in batch chunks
(bounded memory); the Triton kernel keeps them in registers.
"""
from __future__ import annotations

import torch

from ._common import CHUNK_ELEMENTS, acc_dtype, as_btd, batch_chunks, bmm_acc


def direct_norm_ref(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||dY_i^T X_i||_F^2`` by explicit per-sample gradients.

    Args:
        x: [B, *, d] layer input. dy: [B, *, p] output gradient.

    Returns:
        [B] fp32.

    Examples:
        >>> x, dy = torch.randn(2, 7, 3), torch.randn(2, 7, 5)
        >>> from fastdp.kernels import ghost_norm_ref
        >>> torch.allclose(direct_norm_ref(x, dy), ghost_norm_ref(x, dy), rtol=1e-4)
        True
    """
    x, dy = as_btd(x), as_btd(dy)
    B, p, d = x.shape[0], dy.shape[-1], x.shape[-1]
    if B * p * d <= CHUNK_ELEMENTS:
        return bmm_acc(dy.transpose(1, 2), x).pow(2).sum(dim=(1, 2))
    out = torch.empty(B, dtype=acc_dtype(x), device=x.device)
    for sl in batch_chunks(B, p * d):
        g = bmm_acc(dy[sl].transpose(1, 2), x[sl])
        out[sl] = g.pow(2).sum(dim=(1, 2))
    return out


def direct_dot_ref(x_a: torch.Tensor, dy_a: torch.Tensor, x_b: torch.Tensor, dy_b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``<dY_a,i^T X_a,i, dY_b,i^T X_b,i>_F`` by explicit per-sample gradients. Returns [B] fp32."""
    x_a, dy_a, x_b, dy_b = as_btd(x_a), as_btd(dy_a), as_btd(x_b), as_btd(dy_b)
    B, p, d = x_a.shape[0], dy_a.shape[-1], x_a.shape[-1]
    out = torch.empty(B, dtype=acc_dtype(x_a), device=x_a.device)
    for sl in batch_chunks(B, 2 * p * d):
        ga = bmm_acc(dy_a[sl].transpose(1, 2), x_a[sl])
        gb = bmm_acc(dy_b[sl].transpose(1, 2), x_b[sl])
        out[sl] = (ga * gb).sum(dim=(1, 2))
    return out
