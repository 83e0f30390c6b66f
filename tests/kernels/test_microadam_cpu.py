"""MicroAdam's compiled CPU step (``fastdp/kernels/microadam_cpu.py``): its row top-k against the oracle of
``test_rows_topk`` on every path (whole-row partition, sampled threshold, radix select), and its bf16 / bit helpers.
The whole step against the unfused reference, bit for bit: ``tests/methods/test_micro_adam.py`` (``fused_impl``)."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_rows_topk import data, oracle  # noqa: E402

from fastdp.kernels import microadam_cpu as M  # noqa: E402

pytestmark = pytest.mark.skipif(not M.HAS_NUMBA, reason="numba not installed")


def row_topk(a: np.ndarray, k: int) -> np.ndarray:
    """The kernel's top-k of one fp32 row, with scratch sized as MicroAdam sizes it."""
    L = a.shape[0]
    s = M.sample_stride(L, k)
    size = M.scratch_sizes([(L, k, s)])
    out = np.full(size["picks"], -1, np.int64)
    M._row_topk(a.view(np.int32), k, s, out, np.zeros(size["cand"], np.int64), np.zeros(size["cand"], np.int32),
                np.zeros(size["sample"], np.int32), np.zeros(65536, np.int64), np.zeros(M.MASK_PIECE, np.uint8))
    return out[:k]


def structured(L: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Rows whose sampled lines hold only small values: the threshold passes every entry (candidate overflow)."""
    x = torch.rand(1, L, generator=gen) + 1.0
    stride = M.sample_stride(L, k)
    sampled = (torch.arange(L) % (M.LINE * stride)) < M.LINE
    x[:, sampled] *= 1e-3
    return x


@pytest.mark.parametrize("kind", ["random", "ties", "zeros", "nan", "structured"])
@pytest.mark.parametrize("L,k", [(32000, 320), (100_003, 1000), (5000, 1), (4096, 512), (300, 7), (4096, 4096),
                                 (40000, 9000)])
def test_row_topk_matches_oracle(kind, L, k):
    """Signed values (the kernel ranks |a|); every path: L < 4096 partitions the row, 8 k > L takes the radix
    select, else the sampled threshold (falling back to the radix select on overflow: "ties", "zeros",
    "structured")."""
    gen = torch.Generator().manual_seed(L + k)
    x = structured(L, k, gen) if kind == "structured" else data(kind, 1, L, gen)
    sign = torch.where(torch.rand(1, L, generator=gen) < 0.5, -1.0, 1.0)
    a = (x * sign).float()
    got = row_topk(a[0].numpy().copy(), k)
    assert np.array_equal(got, oracle(x, k)[0].numpy())


def test_bf16_rounding_matches_torch():
    """fp32 -> bf16 bits (round to nearest even; NaN -> 0x7FC0) and back, as torch converts."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=gen) * 10 ** torch.randint(-30, 30, (20000,), generator=gen),
                   torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8,
                                 3.4e38, 1e-40])])
    want = x.to(torch.bfloat16)
    got = np.array([M._f32_to_bf16(np.float32(v)) for v in x.numpy()], dtype=np.int64).astype(np.uint16)
    assert np.array_equal(got, want.view(torch.int16).numpy().view(np.uint16))
    back = np.array([M._bf16_to_f32(np.int16(b)) for b in want.view(torch.int16).numpy()], dtype=np.float32)
    assert np.array_equal(back, want.float().numpy())
    assert M._f32_to_bf16(np.float32("nan")) == 0x7FC0


def test_sample_stride_is_prime_and_in_the_row():
    for L, k in [(32000, 320), (2_412_480, 24125), (4096, 41), (5000, 1), (147456, 1475)]:
        s = M.sample_stride(L, k)
        assert s >= 1 and (s <= 2 or all(s % f for f in range(2, int(s ** 0.5) + 1)))
        assert (L - M.LINE) // (M.LINE * s) + 1 >= 1
