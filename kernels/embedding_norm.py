"""Embedding per-sample norms and sums, without a [B, V, d] per-sample gradient.

Sample i's embedding gradient has row ``v`` equal to ``sum_{t: idx_t = v} dY_t``, so

    ||G_i||^2 = sum_{t,s} [idx_t == idx_s] <dY_t, dY_s>.

For a weight tied to a Linear layer (LM head ``logits = H W^T``, W [V, d]) the cross term with the
head's per-sample gradient ``dL_i^T H_i`` [V, d] is

    <G_emb,i, G_head,i> = sum_{s,t} dL_i[s, idx_t] * (H_i dE_i^T)[s, t]

built from two T x T matrices: the head's output gradient gathered at the input tokens, and the
product of the head input with the embedding-output gradient.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import acc_dtype, batch_chunks, bmm_acc, upcast


def embedding_dot_ref(idx_a: torch.Tensor, dy_a: torch.Tensor, idx_b: torch.Tensor, dy_b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product of two embedding gradients of the same table.

    Args:
        idx_a: [B, Ta] int indices. dy_a: [B, Ta, d] output gradients (rows at padding_idx zeroed).
        idx_b, dy_b: the second use.

    Returns:
        [B] fp32.
    """
    B, Ta, Tb = idx_a.shape[0], idx_a.shape[1], idx_b.shape[1]
    out = torch.empty(B, dtype=acc_dtype(dy_a), device=dy_a.device)
    for sl in batch_chunks(B, 2 * Ta * Tb):
        eq = idx_a[sl].unsqueeze(2) == idx_b[sl].unsqueeze(1)
        gy = bmm_acc(dy_a[sl], dy_b[sl].transpose(1, 2))
        out[sl] = (gy * eq).sum(dim=(1, 2))
    return out


def embedding_norm_ref(idx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norm of an embedding gradient through index equality.

    Args:
        idx: [B, T] indices. dy: [B, T, d] output gradient.

    Returns:
        [B] fp32.

    Examples:
        >>> idx, dy = torch.tensor([[1, 2, 1]]), torch.ones(1, 3, 2)
        >>> embedding_norm_ref(idx, dy)  # row 1 gets 2*dy, row 2 gets dy: 4*2 + 1*2
        tensor([10.])
    """
    return embedding_dot_ref(idx, dy, idx, dy)


def embedding_linear_dot_ref(idx: torch.Tensor, dy_emb: torch.Tensor, x_lin: torch.Tensor, dy_lin: torch.Tensor) -> torch.Tensor:
    """Per-sample ``<G_emb,i, G_lin,i>`` for a table W [V, d] used as embedding and as ``F.linear`` weight.

    Args:
        idx: [B, Te] embedding indices. dy_emb: [B, Te, d] embedding output gradient.
        x_lin: [B, Tl, d] linear input. dy_lin: [B, Tl, V] linear output gradient.

    Returns:
        [B] fp32.
    """
    B, Te, Tl = idx.shape[0], idx.shape[1], x_lin.shape[1]
    out = torch.empty(B, dtype=acc_dtype(dy_emb), device=dy_emb.device)
    for sl in batch_chunks(B, 2 * Te * Tl):
        gathered = torch.gather(dy_lin[sl], 2, idx[sl].unsqueeze(1).expand(-1, Tl, -1))  # [b, Tl, Te]
        hd = bmm_acc(x_lin[sl], dy_emb[sl].to(x_lin.dtype).transpose(1, 2))  # [b, Tl, Te]
        out[sl] = (upcast(gathered) * hd).sum(dim=(1, 2))
    return out


def embedding_accumulate_ref(idx: torch.Tensor, dy: torch.Tensor, scale: torch.Tensor, num_embeddings: int,
                             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sum_i scale_i G_emb,i`` as a dense [V, d] tensor (index-add of scaled rows).

    Args:
        idx: [B, T] indices. dy: [B, T, d]. scale: [B] fp32. num_embeddings: V.
        out: optional [V, d] tensor to accumulate into.

    Returns:
        ``out`` if given, else a new [V, d] fp32 (fp64 for fp64 inputs) tensor.
    """
    d = dy.shape[-1]
    if out is None:
        out = torch.zeros(num_embeddings, d, dtype=acc_dtype(dy), device=dy.device)
    rows = (upcast(dy) * upcast(scale).view(-1, 1, 1)).reshape(-1, d).to(out.dtype)
    return out.index_add_(0, idx.reshape(-1), rows)
