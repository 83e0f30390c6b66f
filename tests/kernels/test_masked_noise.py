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
