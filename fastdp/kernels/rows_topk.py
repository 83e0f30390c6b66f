"""Exact top-k of every row of a non-negative matrix (MicroAdam's selection of the largest ``|g + EF|``).

``rows_topk(x, k)``: x [rows, L] fp32 >= 0 (rows may be strided, the last dim contiguous) -> int64 [rows, k],
the column indices of the k largest entries of each row, ascending. Canonical ties: every entry above the k-th
largest value, then the lowest-indexed entries equal to it. Values compare as their int32 bit patterns (the same
order for x >= 0; NaN ranks above +inf, as in ``torch.topk``).

CPU path (``rows_topk``): one pass of compares over all rows instead of ``torch.topk``'s per-row partial sort
(~25 ns per element on one core): a threshold per row from a sample of whole cache lines, ``x >= tau``, a
``nonzero`` over 8-byte words, then the canonical top-k of the packed candidates (about k + 2.5 sigma per row).
Exact whatever the sample: a row whose candidate count is below k or above the packing width is redone with
``rows_topk_ref``. Other devices and small
rows: ``rows_topk_ref``, ``torch.topk`` on all rows at once (a few launches, no host synchronisation).
"""
from __future__ import annotations

import math

import torch

_LINE = 16  # fp32 per 64-byte cache line: the sample reads whole lines
_STRIDE_LINES = 37  # every 37th line (prime: no alignment with the row length of a weight matrix)
_MIN_ROW = 4096  # shorter rows: torch.topk


def _canonical(v: torch.Tensor, k: int, sync: bool = False) -> torch.Tensor:
    """bool [rows, n]: the k largest of each row of int32 ``v`` [rows, n], ties to the lowest index. ``sync``:
    may read a count on the host, to skip the tie-break when no row has a tie at its k-th value (the usual)."""
    kth = torch.topk(v, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    if sync:
        chosen = v >= kth
        if int(chosen.sum()) == v.shape[0] * k:  # each row >= k: exactly k everywhere
            return chosen
    above = v > kth
    tied = v == kth
    return above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))


def rows_topk_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """The canonical top-k of each row through ``torch.topk`` over whole rows: int64 [rows, k], ascending."""
    rows = x.shape[0]  # exactly k per row: a static-size nonzero (no host synchronisation on CUDA)
    return torch.nonzero_static(_canonical(x.view(torch.int32), k), size=rows * k)[:, 1].view(rows, k)


def _threshold(x: torch.Tensor, k: int):
    """Per-row int32 threshold [rows, 1] with about k + 2.5 sigma entries at or above it, or None (sample too
    small)."""
    rows, L = x.shape
    n_lines = (L - _LINE) // (_LINE * _STRIDE_LINES) + 1
    m = n_lines * _LINE
    expect = m * k / L  # sample entries expected among the row's top k
    kk = math.ceil(expect + 2.5 * math.sqrt(expect) + 1)  # a row short of k (~1%) is redone with torch.topk
    if kk >= m // 2:
        return None
    xi = x.view(torch.int32)
    sample = xi.as_strided((rows, n_lines, _LINE), (xi.stride(0), _LINE * _STRIDE_LINES, 1), xi.storage_offset())
    return torch.topk(sample.reshape(rows, m), kk, dim=1, sorted=False).values.amin(dim=1, keepdim=True)


def _flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Ascending int64 positions of the True entries of a flat bool [8 j] mask with few of them: ``nonzero`` over
    8-byte words, then over the bytes of the nonzero words only (~1/3 of a plain ``nonzero``'s time at 2%)."""
    words = mask.view(torch.int64)
    hit = words.ne(0).nonzero().view(-1)
    sub = words.index_select(0, hit).view(torch.uint8).view(-1, 8).nonzero()
    return hit.index_select(0, sub[:, 0]).mul_(8).add_(sub[:, 1])


def rows_topk(x: torch.Tensor, k: int, mask: torch.Tensor = None) -> torch.Tensor:
    """Dispatching: the threshold path on the CPU for rows of >= 4096 entries (``mask``: optional bool scratch of
    >= rows * L elements), else ``rows_topk_ref``. The same indices as ``rows_topk_ref``, ties included."""
    if x.dtype != torch.float32 or x.dim() != 2 or not 1 <= k <= x.shape[1]:
        raise ValueError(f"rows_topk needs fp32 x [rows, L] and 1 <= k <= L, got {x.dtype} {tuple(x.shape)}, k={k}")
    rows, L = x.shape
    if x.device.type != "cpu" or L < _MIN_ROW or x.stride(1) != 1 or 8 * k > L:
        return rows_topk_ref(x, k)
    tau = _threshold(x, k)
    if tau is None:
        return rows_topk_ref(x, k)
    n = rows * L
    n8 = -(-n // 8) * 8
    if mask is None or mask.numel() < n8:
        mask = torch.empty(n8, dtype=torch.bool, device=x.device)
    mask = mask.view(-1)
    # x >= 0: its int32 bit patterns order as the values (and NaN above +inf, as torch.topk ranks it); the int
    # compare is ~25% faster than the float one on the CPU
    xi = x.view(torch.int32)
    torch.ge(xi, tau, out=mask[:n].view(rows, L))
    mask[n:n8] = False
    pos = _flat_nonzero(mask[:n8])  # ascending: rows, then columns
    r = pos.div(L, rounding_mode="floor")
    c = pos - r * L
    counts = torch.bincount(r, minlength=rows)
    width = max(k, min(int(counts.max()), 4 * k + 64))  # candidate slots per row
    bad = (counts < k) | (counts > width)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(r.numel(), device=x.device) - torch.repeat_interleave(starts, counts, output_size=r.numel())
    rank.clamp_(max=width - 1)  # overflow only in rows redone below
    flat = r * width + rank
    base = xi.as_strided((x.untyped_storage().nbytes() // 4,), (1,), 0)
    vals = base.index_select(0, r * x.stride(0) + (c + x.storage_offset()))
    cand = torch.full((rows * width,), -1, dtype=torch.int32, device=x.device).scatter_(0, flat, vals)
    cols = torch.zeros(rows * width, dtype=torch.int64, device=x.device).scatter_(0, flat, c)
    chosen = _canonical(cand.view(rows, width), k, sync=True).view(-1).nonzero().view(-1)  # ascending columns
    idx = cols.index_select(0, chosen).view(rows, k)
    if bool(bad.any()):
        redo = bad.nonzero().view(-1)
        idx[redo] = rows_topk_ref(x[redo], k)
    return idx
