"""Noise + scale + SGD in one pass: torch.optim.SGD's steps without noise, masked_noise's draws with it, the noise
scale, nothing moved outside the mask / rows, reproducible from the seed, clear errors."""
import math

import pytest
import torch

from fastdp.kernels.masked_noise import masked_noise
from fastdp.kernels.noisy_sgd import noisy_sgd, noisy_sgd_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]
CONFIGS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    dict(momentum=0.8, nesterov=True, weight_decay=0.1),
    dict(momentum=0.5, maximize=True, weight_decay=0.02),
    dict(weight_decay=0.05, maximize=True),
]
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}  # normwise: |got - truth| <= tol * max|truth|


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", request.param)
    return request.param


def close(got, truth, tol, name):
    err = (got.double() - truth.double()).abs().max().item()
    scale = truth.double().abs().max().item()
    assert err <= tol * scale, f"{name}: max |diff| {err:.3e} > {tol:g} * {scale:.3e}"


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).clone()


CASES = [(torch.float32, c) for c in CONFIGS] + [(torch.bfloat16, CONFIGS[2]), (torch.bfloat16, CONFIGS[3])]


@pytest.mark.parametrize("dtype,config", CASES,
                         ids=[f"{str(d)[6:]}-" + ("-".join(f"{k}={v}" for k, v in c.items()) or "plain") for d, c in CASES])
@pytest.mark.parametrize("layout", ["tensor", "list"])
def test_without_noise_equals_torch_sgd(backend, dtype, config, layout):
    """std=0: three steps equal torch.optim.SGD's on p.grad = g * scale (bf16 p: fp32 SGD rounded to bf16)."""
    torch.manual_seed(0)
    sizes = [(1030,)] if layout == "tensor" else [(1,), (7,), (10, 103)]
    params = [torch.randn(s, device=DEVICE).to(dtype) for s in sizes]
    d = sum(t.numel() for t in params)
    truth = [t.detach().float().clone().requires_grad_() for t in params]
    opt = torch.optim.SGD(truth, lr=0.3, **config)
    buf = torch.zeros(d, device=DEVICE)
    scale = 0.125
    for step in range(3):
        g = torch.randn(d, device=DEVICE)
        offset = 0
        for t in truth:
            t.grad = (g[offset:offset + t.numel()] * scale).view(t.shape)
            offset += t.numel()
        opt.step()
        if dtype != torch.float32:
            with torch.no_grad():
                for t in truth:
                    t.copy_(t.to(dtype))
        got_g = g.clone()
        p = params[0].view(-1) if layout == "tensor" else params
        noisy_sgd(p, got_g, buf, lr=0.3, std=0.0, seed=step, scale=scale, first_step=step == 0, **config)
        assert torch.equal(got_g, g * scale)
        for i, (a, b) in enumerate(zip(params, truth)):
            close(a, b.detach(), TOL[dtype], f"step {step} param {i}")
        if config.get("momentum"):
            want = torch.cat([opt.state[t]["momentum_buffer"].reshape(-1) for t in truth])
            close(buf, want, TOL[dtype], f"step {step} momentum buffer")


@pytest.mark.parametrize("seed", [99, 3081012064131973355, 2 ** 64 - 5], ids=["small", "62bit", "64bit"])
@pytest.mark.parametrize("mode", ["all", "mask", "rows", "list-mask"])
def test_noise_is_masked_noise_then_the_sgd_update(backend, mode, seed):
    """std>0: noisy_sgd == masked_noise (same backend, same seed) + scale + the SGD update (reference, std=0)."""
    torch.manual_seed(1)
    shape = (41, 25)
    g, p, buf = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    if mode == "all":
        sel = {}
    elif mode == "rows":
        sel = dict(rows=torch.tensor([0, 7, 40], device=DEVICE))
    else:
        sel = dict(mask=torch.rand(shape, device=DEVICE) < 0.3)
    hyper = dict(lr=0.2, scale=0.25, momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True)
    g1, p1, b1 = g.clone(), p.clone(), buf.clone()
    if mode == "list-mask":
        pieces = [p1.view(-1)[:1].clone(), p1.view(-1)[1:8].clone(), p1.view(-1)[8:].clone()]
        noisy_sgd(pieces, g1, b1, std=0.7, seed=seed, **hyper, **sel)
        p1 = torch.cat(pieces).view(shape)
    else:
        noisy_sgd(p1, g1, b1, std=0.7, seed=seed, **hyper, **sel)
    g2, p2, b2 = g.clone(), p.clone(), buf.clone()
    masked_noise(g2, 0.7, seed, **(sel or dict(mask=torch.ones(shape, dtype=torch.bool, device=DEVICE))))
    noisy_sgd_ref(p2, g2, b2, std=0.0, seed=0, **hyper, **sel)
    for name, a, b in (("g", g1, g2), ("p", p1, p2), ("buf", b1, b2)):
        close(a, b, 1e-6, name)


def test_noise_statistics_of_the_update(backend):
    """lr=1, no momentum: p moves by -(g + std z) * scale with z ~ N(0, 1) independent across coordinates."""
    torch.manual_seed(2)
    g = torch.randn(24001, device=DEVICE)
    g += torch.where(g >= 0, 0.1, -0.1)  # never zero
    p = torch.randn(24001, device=DEVICE)
    std, scale = 0.7, 0.5
    new_p, new_g = p.clone(), g.clone()
    noisy_sgd(new_p, new_g, None, lr=1.0, std=std, seed=3, scale=scale)
    z = ((p - new_p).double() / scale - g.double()) / std
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 5 / math.sqrt(n)
    assert torch.allclose(new_g, (p - new_p), rtol=0, atol=1e-6)  # the update is the privatised gradient


@pytest.mark.parametrize("mode", ["mask", "rows", "list-mask"])
@pytest.mark.parametrize("first_step", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outside_the_selection_nothing_moves(backend, mode, first_step, dtype):
    """Momentum, weight decay and noise on: p, g and buf are bit-identical outside mask / rows (a new buffer is not
    written there either), and change inside."""
    torch.manual_seed(4)
    shape = (33, 7)
    g, p = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE).to(dtype)
    buf = torch.full(shape, float("nan"), device=DEVICE) if first_step else torch.randn(shape, device=DEVICE)
    if mode == "rows":
        rows = torch.tensor([2, 3, 31], device=DEVICE)
        sel = torch.zeros(shape, dtype=torch.bool, device=DEVICE)
        sel[rows] = True
        select = dict(rows=rows)
    else:
        sel = torch.rand(shape, device=DEVICE) < 0.5
        select = dict(mask=sel)
    before = [bits(t) for t in (p, g, buf)]
    target = [p.view(-1)[:5].clone(), p.view(-1)[5:].clone()] if mode == "list-mask" else p
    noisy_sgd(target, g, buf, lr=0.1, std=1.0, seed=5, scale=0.5, momentum=0.9, weight_decay=0.1,
              first_step=first_step, **select)
    if mode == "list-mask":
        p = torch.cat(target).view(shape)
    for name, t, b in zip(("p", "g", "buf"), (p, g, buf), before):
        assert torch.equal(bits(t)[~sel], b[~sel]), f"{name} changed outside the selection"
        assert not torch.equal(bits(t)[sel], b[sel]), f"{name} did not change inside the selection"


def test_reproducible_from_the_seed(backend):
    torch.manual_seed(6)
    g0, p0, b0 = torch.randn(7, 11, device=DEVICE), torch.randn(7, 11, device=DEVICE), torch.randn(7, 11, device=DEVICE)
    mask = torch.rand(7, 11, device=DEVICE) < 0.6

    def run(seed):
        g, p, b = g0.clone(), p0.clone(), b0.clone()
        noisy_sgd(p, g, b, lr=0.1, std=0.5, seed=seed, scale=1.0, momentum=0.9, mask=mask)
        return torch.cat([g.flatten(), p.flatten(), b.flatten()])

    a = run(8)
    assert torch.equal(a, run(8))
    assert not torch.equal(a, run(9))


def test_bad_arguments_raise(backend):
    g, p, buf = torch.zeros(4, 3, device=DEVICE), torch.zeros(4, 3, device=DEVICE), torch.zeros(4, 3, device=DEVICE)
    ok = dict(lr=0.1, std=1.0, seed=0, scale=1.0, momentum=0.9)
    bad = [
        ((p, g.t().contiguous().t(), buf), {}),  # non-contiguous g
        ((p, g.double(), buf), {}),  # g not fp32
        ((p.half(), g, buf), {}),  # p fp16
        ((torch.zeros(3, 4, device=DEVICE).t(), g, buf), {}),  # non-contiguous p
        ((p[:3], g, buf), {}),  # shape mismatch
        ((p, g, None), {}),  # momentum without a buffer
        ((p, g, buf.double()), {}),  # fp64 buffer
        ((p, g, buf[:2]), {}),  # buffer shape
        ((p, g, buf), dict(mask=torch.ones(4, 3, dtype=torch.bool), rows=torch.tensor([0]))),  # both
        ((p, g, buf), dict(mask=torch.ones(4, 3))),  # mask not bool
        ((p, g, buf), dict(mask=torch.ones(3, 4, dtype=torch.bool))),  # mask shape
        ((p, g, buf), dict(rows=torch.tensor([0], dtype=torch.int32))),  # rows dtype
        ((p, g, buf), dict(nesterov=True, momentum=0.0)),  # nesterov without momentum
        ((p, g, buf), dict(nesterov=True, dampening=0.1)),  # nesterov with dampening
        ((p, g, buf), dict(lr=-0.1)),
        ((p, g, buf), dict(std=-1.0)),
        ((p, g, buf), dict(weight_decay=float("nan"))),
        ((p, g, buf), dict(lr=torch.tensor(0.1))),
        ((p, g, buf), dict(seed=1.5)),
        (([p.view(-1)[:5], p.view(-1)[5:10]], g, buf), {}),  # list sizes do not add up
        (([p.view(-1)[:6], p.view(-1)[6:].bfloat16()], g, buf), {}),  # mixed dtypes
        (([p.view(-1)], g, buf), dict(rows=torch.tensor([0]))),  # rows with a list
    ]
    for i, (args, kw) in enumerate(bad):
        with pytest.raises(ValueError):
            noisy_sgd(*args, **{**ok, **kw})
            pytest.fail(f"case {i} did not raise")


# -- edge cases: the full 64-bit seed, rows (strided, out of range) and strided masks -----------------------------------

SEED = 3081012064131973355  # a 62-bit per-step seed (fastdp.noise.NoiseSeeds' range)


@pytest.mark.parametrize("mode", ["all", "mask", "rows", "list"])
def test_seeds_differing_by_a_multiple_of_2_31_minus_1_give_different_noise(backend, mode):
    """The seed is not reduced mod 2^31 - 1 (the kernel uses all 64 bits): distinct seeds, distinct noise; the same
    seed, the same noise."""
    shape = (9, 13)
    sel = dict(mask=torch.rand(shape, device=DEVICE) < 0.5) if mode == "mask" else \
        dict(rows=torch.tensor([0, 4, 8], device=DEVICE)) if mode == "rows" else {}

    def run(seed):
        g, p = torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE)
        target = [p.view(-1)[:20], p.view(-1)[20:]] if mode == "list" else p
        noisy_sgd(target, g, None, lr=1.0, std=1.0, seed=seed, scale=1.0, **sel)
        return g

    a = run(SEED)
    assert torch.equal(a, run(SEED))
    others = [SEED + (2 ** 31 - 1), SEED + 7 * (2 ** 31 - 1)]
    if backend == "triton" or DEVICE == "cuda":  # the CPU reference's generator keeps the low 32 bits only
        others += [SEED + 2 ** 32, SEED ^ (1 << 61)]
    for other in others:
        assert not torch.equal(a, run(other)), other
    for bad in (2 ** 64, -(2 ** 63) - 1):
        with pytest.raises(ValueError):
            run(bad)


def test_strided_rows_update_those_rows(backend):
    """rows[::2] (stride 2) updates rows 0 and 2, exactly as the contiguous rows [0, 2] do."""
    torch.manual_seed(7)
    shape = (4, 5)
    g0, p0, b0 = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    out = []
    for rows in (torch.tensor([0, 1, 2, 3], device=DEVICE)[::2], torch.tensor([0, 2], device=DEVICE)):
        g, p, b = g0.clone(), p0.clone(), b0.clone()
        noisy_sgd(p, g, b, lr=0.1, std=1.0, seed=3, scale=0.5, momentum=0.9, rows=rows)
        out.append((g, p, b))
    (ga, pa, ba), (gb, pb, bb) = out
    assert torch.equal(ga, gb) and torch.equal(pa, pb) and torch.equal(ba, bb)
    p = pa
    assert torch.equal(p[[1, 3]], p0[[1, 3]]) and not torch.equal(p[[0, 2]], p0[[0, 2]])


def test_rows_out_of_range_raise_and_touch_nothing(backend):
    store = torch.zeros(3, 8, 3, device=DEVICE)  # p, g, buf: each a view of 4 rows inside 8
    for lo, rows in ((0, [5]), (0, [1, 4]), (4, [-1])):
        p, g, b = (t[lo:lo + 4] for t in store)
        with pytest.raises(IndexError):
            noisy_sgd(p, g, b, lr=0.1, std=1.0, seed=1, scale=1.0, momentum=0.9, rows=torch.tensor(rows, device=DEVICE))
        assert (store == 0).all()


@pytest.mark.interpreter
def test_rows_kernel_never_writes_outside_g():
    """The in-kernel guard (should a row escape the host check): rows outside [0, n_rows) touch nothing."""
    from fastdp.kernels.noisy_sgd import _noisy_sgd_rows_kernel
    store = torch.zeros(3, 8, 3, device=DEVICE)
    p, g, b = (t[2:6] for t in store)
    rows = torch.tensor([-2, -1, 1, 4, 5], device=DEVICE)
    _noisy_sgd_rows_kernel[(1,)](p, g, b, rows, 5, 3, 4, 0, 7, 0.1, 1.0, 1.0, 0.9, 1.0, 0.0, FIRST=False,
                                 MOMENTUM=True, NESTEROV=False, MAXIMIZE=False, WD=False, ROUND_BF16=False, BLOCK=1024)
    changed = (store != 0).any(-1)  # [3, 8]: rows of p, g, buf that moved
    assert changed[:, 3].all() and not changed[:, :3].any() and not changed[:, 4:].any()


def test_strided_mask(backend):
    """A 1-D bool mask at stride 2 selects by its values (the kernel read it at stride 1)."""
    mask = torch.tensor([True, False, False, False] * 4, device=DEVICE)[::2]  # [T, F, T, F, ...], stride 2
    g, p = torch.zeros(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    noisy_sgd(p, g, None, lr=1.0, std=1.0, seed=2, scale=1.0, mask=mask)
    assert ((g != 0) == mask).all() and ((p != 0) == mask).all()
