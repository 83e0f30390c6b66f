"""Ghost norm: per-sample squared Frobenius norms of ``dY_i^T X_i`` without forming it.

For a Linear-like layer with input ``X_i`` [T, d] and output gradient ``dY_i`` [T, p] of sample i,
the per-sample weight gradient is ``G_i = dY_i^T X_i`` [p, d] and

    ||G_i||_F^2 = sum_{t,s} (X_i X_i^T)[t, s] * (dY_i dY_i^T)[t, s]

which costs O(T^2 (d + p)) instead of O(T p d). The inner product of two such gradients (a weight
used twice, e.g. tied layers) is the same sum with the cross Gram matrices.

The Triton kernel (issue: fused kernels) tiles (t, s) so the T x T Grams never reach memory; this
file holds the reference it is tested against and which the engine runs elsewhere.
"""
from __future__ import annotations

import torch

from ._common import CHUNK_ELEMENTS, acc_dtype, as_btd, batch_chunks, bmm_acc, upcast


def ghost_dot_ref(x_a: torch.Tensor, dy_a: torch.Tensor, x_b: torch.Tensor, dy_b: torch.Tensor) -> torch.Tensor:
    """Per-sample ``<dY_a,i^T X_a,i, dY_b,i^T X_b,i>_F``.

    Args:
        x_a: [B, *, d] inputs of use a. dy_a: [B, *, p] output gradients of use a.
        x_b, dy_b: the same for use b (its own sequence length; same d and p).

    Returns:
        [B] fp32.
    """
    x_a, dy_a, x_b, dy_b = as_btd(x_a), as_btd(dy_a), as_btd(x_b), as_btd(dy_b)
    B, Ta, Tb = x_a.shape[0], x_a.shape[1], x_b.shape[1]
    if 2 * B * Ta * Tb <= CHUNK_ELEMENTS:  # one chunk: no slicing
        gx = bmm_acc(x_a, x_b.transpose(1, 2))
        return (gx * bmm_acc(dy_a, dy_b.transpose(1, 2))).sum(dim=(1, 2))
    out = torch.empty(B, dtype=acc_dtype(x_a), device=x_a.device)
    for sl in batch_chunks(B, 2 * Ta * Tb):
        gx = bmm_acc(x_a[sl], x_b[sl].transpose(1, 2))
        gy = bmm_acc(dy_a[sl], dy_b[sl].transpose(1, 2))
        out[sl] = (gx * gy).sum(dim=(1, 2))
    return out


def ghost_norm_ref(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-sample ``||dY_i^T X_i||_F^2`` from the two T x T Gram matrices.

    Args:
        x: [B, *, d] layer input. dy: [B, *, p] gradient of the layer output.

    Returns:
        [B] fp32 squared norms.

    Examples:
        >>> x, dy = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
        >>> ref = torch.einsum("btp,btd->bpd", dy, x).pow(2).sum((1, 2))
        >>> torch.allclose(ghost_norm_ref(x, dy), ref, rtol=1e-5)
        True
    """
    x, dy = as_btd(x), as_btd(dy)
    if x.shape[1] == 1:  # T = 1: ||dy||^2 ||x||^2, no Gram needed
        return upcast(x).pow(2).sum((1, 2)) * upcast(dy).pow(2).sum((1, 2))
    return ghost_dot_ref(x, dy, x, dy)
