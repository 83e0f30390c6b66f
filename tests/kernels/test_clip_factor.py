"""Clip factors from squared norms: the Triton kernel (the interpreter on the CPU) vs the reference vs the rule."""
import math

import pytest
import torch

from fastdp.kernels.clip_factor import clip_factor, clip_factor_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def squared_norms(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = torch.rand(shape, generator=g, dtype=torch.float64) * 4  # norms in [0, 4): some below R, some above
    return (n * n).to(DEVICE)


def test_reference_is_the_clip_rule():
    """min(cap, R / (sqrt(sq) + offset)) in fp64, with and without the cap."""
    sq = squared_norms((50,)).double()
    n = sq.sqrt()
    torch.testing.assert_close(clip_factor_ref(sq, 1.5, 1e-6, 8.0), torch.minimum(1.5 / (n + 1e-6), torch.tensor(8.0,
                               dtype=torch.float64, device=DEVICE)), rtol=1e-15, atol=0)
    torch.testing.assert_close(clip_factor_ref(sq, 1.5, 0.01), 1.5 / (n + 0.01), rtol=1e-15, atol=0)
    c = clip_factor_ref(sq, 1.5, 1e-6, cap=1.0)
    assert (c * n <= 1.5).all() and (c <= 1).all()


@pytest.mark.interpreter
@pytest.mark.parametrize("shape", [(1,), (7,), (130,), (3000,), (5, 9)], ids=str)
@pytest.mark.parametrize("cap", [1.0, 16.0, math.inf], ids=["cap1", "cap16", "nocap"])
def test_triton_matches_reference(shape, cap, monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    sq = squared_norms(shape, seed=1).float()
    sq.view(-1)[0] = 0.0  # a zero norm: R / offset, capped
    got, ref = clip_factor(sq, 0.7, 1e-6 / 16, cap), clip_factor_ref(sq, 0.7, 1e-6 / 16, cap)
    assert got.shape == sq.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=2.5e-7, atol=0)  # IEEE sqrt and division: within 1 ulp (measured)
    assert ((got * sq.sqrt()) <= 0.7 * (1 + 1e-6)).all()


@pytest.mark.interpreter
def test_empty_nan_and_bad_arguments(monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    assert clip_factor(torch.empty(0, device=DEVICE), 1.0, 1e-6, 1.0).shape == (0,)
    c = clip_factor(torch.tensor([float("nan"), 1.0], device=DEVICE), 1.0, 0.0, 4.0)
    assert math.isnan(c[0].item()) and c[1].item() == 1.0  # a NaN norm is not hidden by the cap
    for f in (clip_factor, clip_factor_ref):
        with pytest.raises(ValueError, match="threshold"):
            f(torch.ones(3, device=DEVICE), 0.0, 1e-6, 1.0)
        with pytest.raises(TypeError, match="float"):
            f(torch.ones(3, dtype=torch.long, device=DEVICE), 1.0, 1e-6, 1.0)
