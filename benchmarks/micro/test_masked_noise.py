"""Masked Gaussian noise in place (``fastdp/kernels/masked_noise.py``) vs a full-size ``torch.randn`` masked / gathered."""
import functools
import math

import pytest
import torch

from fastdp.kernels.masked_noise import masked_noise, masked_noise_ref

STD, SEED = 0.7, 1234


def naive_mask(g, gen, mask):
    return g.add_(torch.randn(g.shape, generator=gen, device=g.device).mul_(STD).mul_(mask))


def naive_rows(g, gen, rows):
    return g.index_add_(0, rows, torch.randn(g.shape, generator=gen, device=g.device)[rows].mul_(STD))


@pytest.mark.parametrize("impl", ["reference", "triton", "naive"])
@pytest.mark.parametrize("mode", ["mask", "rows"])
def test_masked_noise(micro, grid_shape, mode, impl):
    s = grid_shape
    micro.setup("masked_noise", f"{s.name}-{mode}", impl)
    dev = micro.device
    g = torch.randn(s.rows, s.cols, device=dev)
    if mode == "mask":
        sel = torch.rand(s.rows, s.cols, device=dev) < s.density
        select = dict(mask=sel)
        op_bytes = sel.numel() + 8 * int(sel.sum())
    else:
        rows = torch.randperm(s.rows, device=dev)[:max(1, round(s.density * s.rows))].sort().values
        sel = torch.zeros(s.rows, dtype=torch.bool, device=dev)
        sel[rows] = True
        sel = sel[:, None].expand(-1, s.cols)
        select = dict(rows=rows)
        op_bytes = 8 * rows.numel() * s.cols + 8 * rows.numel()
    if impl == "naive":
        gen = torch.Generator(device=dev).manual_seed(SEED)
        fn = functools.partial(naive_mask if mode == "mask" else naive_rows, gen=gen, **select)
    else:
        fn = functools.partial(masked_noise_ref if impl == "reference" else masked_noise, std=STD, seed=SEED, **select)
    before = g.clone()
    fn(g)
    z = (g - before)[sel].double() / STD
    n = z.numel()
    micro.assert_property(torch.equal(g[~sel], before[~sel]), "coordinates outside the selection changed")
    micro.assert_property(abs(z.mean().item()) < 5 / math.sqrt(n) and abs(z.var().item() - 1) < 5 * math.sqrt(2 / n),
                          f"noise is not N(0, {STD}^2): mean {z.mean().item() * STD:.3g}, std {z.std().item() * STD:.3g}")
    micro.time(fn, g, op_bytes=op_bytes)
