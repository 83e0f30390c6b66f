"""Noise + scale + SGD momentum step in one pass (``fastdp/kernels/noisy_sgd.py``) vs the unfused sequence DPOptimizer runs
otherwise: a full-size ``torch.randn`` (masked), added, scaled, then ``torch.optim.SGD.step``.

On a flat fp32 parameter of d values (``flat_shape``), momentum 0.9, no weight decay, lr 0.1, B = 8; ``mask``: a
random 20% of the coordinates train (gradient and buffer start at zero outside them, so every variant leaves them
untouched). ``triton-list``: the same kernel over the parameter split into 4 tensors, as DPOptimizer calls it (the
parameters reached through a table of addresses). Bytes counted (``op_bytes``, compulsory): g, p and the momentum
buffer read and written once per trained coordinate (24 B), plus 1 B of mask per coordinate. The unfused sequence
moves 56 B per coordinate (benchmarks/NOTES.md).
"""
import functools
import math

import pytest
import torch

from fastdp.kernels.noisy_sgd import noisy_sgd, noisy_sgd_ref

STD, SEED, LR, MOMENTUM, SCALE = 0.7, 1234, 0.1, 0.9, 1 / 8
DENSITY = 0.2


def naive(p, g, buf, *, opt, gen, mask=None):
    """The unfused step: full-size normal draw, masked, added, scaled, then torch's SGD (p.grad = g)."""
    noise = torch.randn(g.shape, generator=gen, device=g.device).mul_(STD)
    if mask is not None:
        noise.mul_(mask)
    g.add_(noise).mul_(SCALE)
    p.grad = g
    opt.step()
    return p


def pieces(p):
    """``p`` as 4 consecutive parameters of unequal sizes (the list layout DPOptimizer passes: one launch through a
    table of parameter addresses)."""
    d = p.numel()
    cuts = [0, d // 2, d // 2 + 3 * d // 10, d - d // 20, d]
    return [p[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


@pytest.mark.parametrize("impl", ["reference", "triton", "triton-list", "naive"])
@pytest.mark.parametrize("mode", ["all", "mask"])
def test_noisy_sgd(micro, flat_shape, mode, impl):
    s = flat_shape
    micro.setup("noisy_sgd", f"{s.name}-{mode}", impl)
    dev = micro.device
    sel = torch.rand(s.d, device=dev) < DENSITY if mode == "mask" else torch.ones(s.d, dtype=torch.bool, device=dev)
    mask = sel if mode == "mask" else None
    # the clipped sum and the momentum are zero outside the mask (as in DPOptimizer), so torch's SGD keeps them too
    g0, p0, buf0 = torch.randn(s.d, device=dev) * sel, torch.randn(s.d, device=dev), torch.randn(s.d, device=dev) * sel
    p, g, buf = p0.clone().requires_grad_(impl == "naive"), g0.clone(), buf0.clone()
    if impl == "naive":
        opt = torch.optim.SGD([p], lr=LR, momentum=MOMENTUM)
        opt.state[p]["momentum_buffer"] = buf  # an existing buffer: the steady-state step
        fn = functools.partial(naive, opt=opt, gen=torch.Generator(device=dev).manual_seed(SEED), mask=mask)
    else:
        fn = functools.partial(noisy_sgd_ref if impl == "reference" else noisy_sgd, lr=LR, std=STD, seed=SEED,
                               scale=SCALE, momentum=MOMENTUM, mask=mask)
    target = pieces(p) if impl == "triton-list" else p  # the pieces are views: the kernel writes p
    with torch.no_grad():
        fn(target, g, buf)
        pd, gd = p.detach().double(), g.double()
        # the update given the privatised gradient the variant wrote: p0 - lr (momentum buf0 + g)
        truth = torch.where(sel, p0.double() - LR * (MOMENTUM * buf0.double() + gd), p0.double())
        micro.assert_close(pd, truth, normwise=True)
        micro.assert_property(torch.equal(p[~sel], p0[~sel]) and torch.equal(g[~sel], g0[~sel])
                              and torch.equal(buf[~sel], buf0[~sel]), "coordinates outside the mask changed")
        z = (gd / SCALE - g0.double())[sel] / STD
        n = z.numel()
        micro.assert_property(abs(z.mean().item()) < 5 / math.sqrt(n) and abs(z.var().item() - 1) < 5 * math.sqrt(2 / n),
                              f"noise is not N(0, {STD}^2): mean {z.mean().item() * STD:.3g}, "
                              f"std {z.std().item() * STD:.3g}")
    k = int(sel.sum())
    op_bytes = 24 * k + (s.d if mode == "mask" else 0)
    with torch.no_grad():
        micro.time(fn, target, g, buf, op_bytes=op_bytes)
