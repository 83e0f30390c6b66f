"""MicroAdam's row-wise top-k (``fastdp/kernels/rows_topk.py``): the CPU threshold path and the ``torch.topk``
reference against an independent oracle (a stable descending sort: ties to the lowest index)."""
import pytest
import torch

from fastdp.kernels.rows_topk import rows_topk, rows_topk_ref


def oracle(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the k largest of each row, ties to the lowest index (NaN largest, as torch.topk)."""
    key = torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x).double()
    key = torch.where(torch.isnan(x), key + 1, key)  # NaN above +inf
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


def data(kind: str, rows: int, L: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, L, generator=gen).abs()
    if kind == "ties":  # a few distinct values: the k-th largest is tied across many entries
        x = (x * 2).round() / 2
    elif kind == "zeros":  # rows with fewer than k nonzeros: the threshold is 0
        x[:, L // 3:] = 0
        x[0] = 0
    elif kind == "nan":
        x[0, ::97] = float("nan")
    elif kind == "structured":  # the sampled cache lines (16 values every 37 lines) hold only small values: the
        x = torch.rand(rows, L, generator=gen) + 1.0  # threshold passes every entry, the rows are redone
        sampled = (torch.arange(L) % (16 * 37)) < 16
        x[:, sampled] *= 1e-3
    return x


@pytest.mark.parametrize("kind", ["random", "ties", "zeros", "nan", "structured"])
@pytest.mark.parametrize("rows,L,k", [(5, 32000, 320), (1, 100_003, 1000), (3, 5000, 1), (2, 4096, 512), (4, 300, 7)])
def test_rows_topk_matches_oracle(kind, rows, L, k):
    gen = torch.Generator().manual_seed(rows * L + k)
    x = data(kind, rows, L, gen)
    want = oracle(x, k)
    assert torch.equal(rows_topk_ref(x, k), want)
    got = rows_topk(x, k)
    assert got.dtype == torch.int64 and torch.equal(got, want)


def test_strided_rows_and_scratch_mask():
    """Rows of a larger buffer (stride > L, storage offset) as MicroAdam's geometry views; a scratch mask."""
    gen = torch.Generator().manual_seed(0)
    buf = torch.randn(6 * 33_000 + 17, generator=gen).abs()
    x = buf[17:].view(6, 33_000)[:, 500:500 + 32_000]
    mask = torch.empty(10 ** 6, dtype=torch.bool)
    assert torch.equal(rows_topk(x, 320, mask=mask), oracle(x, 320))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="fp32"):
        rows_topk(torch.zeros(2, 5000, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="k <= L"):
        rows_topk(torch.zeros(2, 50), 51)


def test_threshold_path_runs_and_redoes_only_the_rows_it_must(monkeypatch):
    """Random rows are served by the threshold path alone; rows whose sample misleads it are redone exactly."""
    import fastdp.kernels.rows_topk as mod
    redone = []
    ref = mod.rows_topk_ref
    monkeypatch.setattr(mod, "rows_topk_ref", lambda x, k: redone.append(x.shape[0]) or ref(x, k))
    gen = torch.Generator().manual_seed(1)
    x = data("random", 8, 32000, gen)
    assert torch.equal(mod.rows_topk(x, 320), oracle(x, 320)) and sum(redone) <= 1
    redone.clear()
    x = data("structured", 3, 32000, gen)
    assert torch.equal(mod.rows_topk(x, 320), oracle(x, 320)) and redone == [3]
