"""Masked noise: the stated scale, independence, nothing written outside the mask, reproducible from the seed."""
import math

import pytest
import torch

from fastdp.kernels.masked_noise import masked_noise

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", request.param)
    return request.param


def _stats_ok(z, std):
    n = z.numel()
    assert abs(z.mean().item()) < 5 * std / math.sqrt(n)
    assert abs(z.var().item() / std ** 2 - 1) < 5 * math.sqrt(2 / n)
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 5 / math.sqrt(n)


def test_coordinate_mask(backend):
    g = torch.randn(300, 101, device=DEVICE)
    mask = torch.rand(300, 101, device=DEVICE) < 0.4
    before = g.clone()
    masked_noise(g, 0.7, seed=11, mask=mask)
    assert torch.equal(g[~mask], before[~mask])  # bit-identical outside the mask
    _stats_ok((g - before)[mask].double(), 0.7)
    again = before.clone()
    masked_noise(again, 0.7, seed=11, mask=mask)
    assert torch.equal(again, g)  # reproducible from the seed
    other = before.clone()
    masked_noise(other, 0.7, seed=12, mask=mask)
    assert not torch.equal(other, g)


def test_rows(backend):
    g = torch.randn(500, 77, device=DEVICE)
    rows = torch.tensor([0, 3, 17, 123, 499], device=DEVICE)
    before = g.clone()
    masked_noise(g, 1.3, seed=5, rows=rows)
    untouched = torch.ones(500, dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    assert torch.equal(g[untouched], before[untouched])
    _stats_ok((g - before)[rows].flatten().double(), 1.3)


def test_bad_arguments(backend):
    g = torch.zeros(4, 3, device=DEVICE)
    with pytest.raises(ValueError):
        masked_noise(g, 1.0, 0)
    with pytest.raises(ValueError):
        masked_noise(g, 1.0, 0, mask=torch.ones(4, 3, dtype=torch.bool), rows=torch.tensor([0]))


# -- edge cases: the full 64-bit seed, checked rows and masks ----------------------------------------------------------

SEED = 3081012064131973355  # a 62-bit per-step seed (fastdp.noise.NoiseSeeds' range)


def _noise(seed, **sel):
    g = torch.zeros(64, 50, device=DEVICE)
    if not sel:
        sel = dict(mask=torch.ones(64, 50, dtype=torch.bool, device=DEVICE))
    return masked_noise(g, 1.0, seed, **sel)


@pytest.mark.parametrize("select", ["mask", "rows"])
def test_seeds_differing_by_a_multiple_of_2_31_minus_1_give_different_noise(backend, select):
    """The seed is not reduced mod 2^31 - 1: distinct 62/64-bit seeds draw distinct streams, the same seed the same
    stream. The kernel's Philox key is all 64 bits (seeds differing in their high 32 bits only differ too; the CPU
    reference's torch.Generator keeps the low 32 bits only, see masked_noise_ref)."""
    sel = {} if select == "mask" else dict(rows=torch.tensor([1, 5, 63], device=DEVICE))
    a = _noise(SEED, **sel)
    assert torch.equal(a, _noise(SEED, **sel))
    others = [SEED + (2 ** 31 - 1), SEED + 7 * (2 ** 31 - 1), 2 ** 64 - 1]
    if backend == "triton" or DEVICE == "cuda":
        others += [SEED + 2 ** 32, SEED ^ (1 << 61)]
    for other in others:
        assert not torch.equal(a, _noise(other, **sel)), other


def test_bad_seeds_raise(backend):
    for seed in (2 ** 64, -(2 ** 63) - 1, 1.5):
        with pytest.raises(ValueError):
            _noise(seed)


@pytest.mark.interpreter
def test_kernel_seed_keeps_small_seeds_and_splits_large_ones(monkeypatch):
    """Kernel: seed < 2^31 - 1 keeps its stream (Philox key = seed); the key is seed mod 2^64
    (a negative seed is its two's complement)."""
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    from fastdp.kernels.masked_noise import seed_halves
    assert seed_halves(5) == (0, 5) and seed_halves(2 ** 62 + 3) == (2 ** 30, 3) and seed_halves(-1) == (-1, -1)
    assert torch.equal(_noise(-1), _noise(2 ** 64 - 1))
    assert not torch.equal(_noise(-1), _noise(2 ** 63 - 1))


def test_rows_out_of_range_raise_and_write_nothing(backend):
    buf = torch.zeros(8, 3, device=DEVICE)
    for g, rows in ((buf[:4], [5]), (buf[:4], [0, 4]), (buf[4:], [-1])):
        with pytest.raises(IndexError):
            masked_noise(g, 1.0, 0, rows=torch.tensor(rows, device=DEVICE))
        assert (buf == 0).all()


def test_rows_int32_and_strided(backend):
    """int32 rows are taken as int64; strided rows as their values."""
    want = _noise(9, rows=torch.tensor([0, 2, 63], device=DEVICE))
    assert torch.equal(_noise(9, rows=torch.tensor([0, 2, 63], dtype=torch.int32, device=DEVICE)), want)
    assert torch.equal(_noise(9, rows=torch.tensor([0, 1, 2, 3, 63], device=DEVICE)[::2]), want)
    with pytest.raises(ValueError):
        _noise(9, rows=torch.tensor([0.0, 2.0], device=DEVICE))


def test_rows_range_is_read_once_per_rows_tensor(backend, monkeypatch):
    """The range check (a device sync on CUDA) runs once per rows tensor, again after an in-place change."""
    import fastdp.kernels.masked_noise as mn
    calls = []
    orig = mn._rows_range
    monkeypatch.setattr(mn, "_rows_range", lambda r: (calls.append(1), orig(r))[1])
    rows = torch.tensor([0, 3], device=DEVICE)
    g = torch.zeros(4, 2, device=DEVICE)
    for _ in range(3):
        masked_noise(g, 1.0, 1, rows=rows)
    assert len(calls) == 1
    rows[1] = 4  # in place: the version counter moves, the check runs again
    with pytest.raises(IndexError):
        masked_noise(g, 1.0, 1, rows=rows)
    assert len(calls) == 2


@pytest.mark.interpreter
def test_row_kernel_never_writes_outside_g():
    """The in-kernel guard (should a row escape the host check): rows outside [0, n_rows) write nothing."""
    import triton

    from fastdp.kernels.masked_noise import _row_noise_kernel
    buf = torch.zeros(8, 3, device=DEVICE)
    g = buf[2:6]
    rows = torch.tensor([-2, -1, 1, 4, 5], device=DEVICE)
    _row_noise_kernel[(triton.cdiv(15, 1024),)](g, rows, 5, 3, 4, 1.0, 0, 7, BLOCK=1024)
    assert (buf[:3] == 0).all() and (buf[4:] == 0).all() and (buf[3] != 0).all()


def test_mask_shape_and_float_masks(backend):
    g = torch.zeros(4, 3, device=DEVICE)
    for bad in (torch.ones(3, 4, dtype=torch.bool), torch.ones(12, dtype=torch.bool), torch.ones(6, dtype=torch.bool)):
        with pytest.raises(ValueError):
            masked_noise(g, 1.0, 0, mask=bad.to(DEVICE))
    for m in (torch.full((4, 3), 0.5), torch.full((4, 3), 2, dtype=torch.int64)):  # nonzero = set, as the reference
        g = torch.zeros(4, 3, device=DEVICE)
        masked_noise(g, 1.0, 0, mask=m.to(DEVICE))
        assert (g != 0).all()
    g = torch.zeros(6, device=DEVICE)
    strided = torch.tensor([1, 0] * 6, dtype=torch.bool, device=DEVICE)[::2]  # all True, stride 2
    masked_noise(g, 1.0, 0, mask=strided)
    assert (g != 0).all()
