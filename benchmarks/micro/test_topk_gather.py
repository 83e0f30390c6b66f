"""MicroAdam's gather-and-zero of the top-k entries into a ring row (``fastdp/kernels/topk_gather.py``): per-tensor top-k
(int32 global indices, fp32 values: DP-MicroAdam's default) and block top-k (int16 block-relative indices, bf16
values: the frugal mode). Naive (per-tensor only): ``index_select`` + ``index_fill_`` with int64 indices."""
import math

import pytest
import torch

from fastdp.kernels.topk_gather import gather_zero, gather_zero_ref


def ring_row(s, x, layout):
    """(idx, per_block, block_size, value dtype) of the top-k of |x| in the given layout."""
    if layout == "tensor":
        return torch.topk(x.abs(), math.ceil(s.density * s.d)).indices.int(), 0, 0, torch.float32
    bs = min(s.topk_block, s.d)
    nb, per_block = math.ceil(s.d / bs), math.ceil(s.density * bs)
    padded = torch.zeros(nb * bs, device=x.device)
    padded[:s.d] = x.abs() + 1  # the padded tail ranks last; in a short tail block some picks fall past d
    idx = torch.topk(padded.view(nb, bs), per_block, dim=1).indices.reshape(-1).short()
    return idx, per_block, bs, torch.bfloat16


def global_index(idx, per_block, bs):
    g = idx.long()
    return g + torch.arange(idx.numel(), device=idx.device) // per_block * bs if per_block else g


def naive(x, idx64, out):
    torch.index_select(x, 0, idx64, out=out)
    x.index_fill_(0, idx64, 0.0)
    return out


@pytest.mark.parametrize("impl", ["reference", "triton", "naive"])
@pytest.mark.parametrize("layout", ["tensor", "block"])
def test_gather_zero(micro, flat_shape, layout, impl):
    s = flat_shape
    if impl == "naive" and layout == "block":
        pytest.skip("naive variant for the per-tensor layout only")
    x = torch.randn(s.d, device=micro.device)
    idx, per_block, bs, vdtype = ring_row(s, x, layout)
    micro.setup("gather_zero", f"{s.name}-{layout}", impl, vdtype)
    out = torch.empty(idx.numel(), dtype=vdtype, device=x.device)
    if impl == "naive":
        def fn(x, idx, out, per_block, bs, idx64=idx.long()):
            return naive(x, idx64, out)
    else:
        fn = gather_zero_ref if impl == "reference" else gather_zero
    g = global_index(idx, per_block, bs)
    valid = g < s.d
    x1 = x.clone()
    got = fn(x1, idx, out, per_block, bs)
    expect = torch.zeros(idx.numel(), dtype=torch.float64, device=x.device)
    expect[valid] = x[g[valid]].to(vdtype).double()
    micro.assert_close(got, expect, rtol=0.0 if vdtype == torch.float32 else 2 ** -7)  # bf16: stores may round by 1 ulp
    untouched = torch.ones(s.d, dtype=torch.bool, device=x.device)
    untouched[g[valid]] = False
    micro.assert_property(bool((x1[g[valid]] == 0).all()) and torch.equal(x1[untouched], x[untouched]),
                          "x not zeroed exactly at the gathered entries")
    micro.time(fn, x1, idx, out, per_block, bs, op_bytes=idx.numel() * (idx.element_size() + out.element_size() + 8))


@pytest.mark.parametrize("impl", ["reference", "threshold"])
@pytest.mark.parametrize("layout", ["tensor", "block"])
def test_rows_topk(micro, flat_shape, layout, impl):
    """MicroAdam's selection (``fastdp/kernels/rows_topk.py``): the canonical top-k of |g + EF| per row (blocks, or
    the whole tensor), ``torch.topk`` over the rows (reference) vs the CPU threshold path. Work: the rows read
    once, the int64 indices written."""
    from fastdp.kernels.rows_topk import rows_topk, rows_topk_ref

    s = flat_shape
    nb = math.ceil(s.d / s.topk_block) if layout == "block" else 1
    L = math.ceil(s.d / nb)
    k = math.ceil(s.density * L)
    micro.setup("rows_topk", f"{s.name}-{layout}", impl)
    x = torch.randn(nb, L, device=micro.device).abs()
    fn = rows_topk_ref if impl == "reference" else rows_topk
    got = fn(x, k)
    kth = x.topk(k, dim=1).values[:, -1:]
    chosen = torch.zeros_like(x, dtype=torch.bool).scatter_(1, got, True)
    micro.assert_property(got.shape == (nb, k) and bool((got.diff(dim=1) > 0).all())
                          and bool((x[chosen].view(nb, k) >= kth).all()) and bool((x[~chosen].view(nb, -1) <= kth).all()),
                          "not the k largest of each row, ascending")
    micro.time(fn, x, k, op_bytes=4 * nb * L + 8 * nb * k)
