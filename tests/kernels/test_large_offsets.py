"""Kernels address tensors past 2^31 elements (64-bit offsets): a sample, row or coordinate beyond that is read
and written where it is, not at a wrapped 32-bit offset.

The tensors are views of storages larger than 2^31 elements that are allocated but never touched (the OS maps the
pages lazily), so each test touches a few MB: only the rows or samples the kernel reads.
"""
import pytest
import torch

from fastdp.kernels.clip_accumulate import clip_accumulate, clip_accumulate_ref
from fastdp.kernels.conv_clip_accumulate import conv_clip_accumulate, conv_clip_accumulate_ref
from fastdp.kernels.conv_norm import conv_norm, conv_norm_ref
from fastdp.kernels.direct_norm import direct_norm, direct_norm_ref
from fastdp.kernels.ghost_norm import ghost_dot, ghost_dot_ref
from fastdp.kernels.masked_direct_norm import masked_direct_norm, masked_direct_norm_ref
from fastdp.kernels.masked_noise import masked_noise
from fastdp.kernels.noisy_sgd import noisy_sgd
from fastdp.kernels.norm_affine_grad import norm_affine_grad, norm_affine_grad_ref
from fastdp.kernels.row_abs_sum import row_abs_sum, row_abs_sum_ref

pytestmark = pytest.mark.interpreter
DEV = "cuda" if torch.cuda.is_available() else "cpu"
BIG = 2 ** 30 + 64  # a per-sample stride: sample 2 starts past 2^31 elements


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")


def storage(n, dtype=torch.float32):
    try:
        return torch.empty(n, dtype=dtype, device=DEV)
    except (RuntimeError, MemoryError) as err:  # the address space or the device may not allow it
        pytest.skip(f"cannot allocate {n} elements: {err}")


def batch_view(B, *shape, dtype=torch.float32):
    """[B, *shape] random samples at a per-sample stride of BIG elements (the last sample past 2^31)."""
    inner = torch.Size(shape).numel()
    s = storage((B - 1) * BIG + inner, dtype)
    strides = [BIG] + list(torch.empty(shape).stride())
    v = s.as_strided((B, *shape), strides)
    for b in range(B):
        v[b] = torch.randn(shape, device=DEV).to(dtype)
    return v


def strided_view(shape, strides, dtype=torch.float32):
    """A random view of ``shape`` at ``strides`` into a lazily mapped storage just large enough for it."""
    s = storage(sum((n - 1) * st for n, st in zip(shape, strides)) + 1, dtype)
    v = s.as_strided(shape, strides)
    for i in range(shape[0]):
        for j in range(shape[1]):
            v[i, j] = torch.randn(shape[2:], device=DEV).to(dtype)
    return v


def rel(got, ref):
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_norms_of_samples_past_2_31(dtype):
    x, dy = batch_view(3, 20, 12, dtype=dtype), batch_view(3, 20, 10, dtype=dtype)
    assert x.storage_offset() + 2 * x.stride(0) > 2 ** 31
    assert rel(direct_norm(x, dy), direct_norm_ref(x, dy)) < 1e-5
    assert rel(ghost_dot(x, dy, x, dy), ghost_dot_ref(x, dy, x, dy)) < 1e-5


def test_clip_accumulate_rows_past_2_31():
    """Rows of dy [B*T, P] at a row stride of 2^20 elements: row 2048 starts past 2^31."""
    B, T, P, D, stride = 3, 700, 6, 5, 2 ** 20
    dy = storage(B * T * stride).as_strided((B, T, P), (T * stride, stride, 1))
    for b in range(B):
        dy[b] = torch.randn(T, P, device=DEV)
    x, c = torch.randn(B, T, D, device=DEV), torch.rand(B, device=DEV)
    assert rel(clip_accumulate(x, dy, c), clip_accumulate_ref(x, dy, c)) < 1e-5


def test_conv_kernels_on_samples_past_2_31():
    x, dy = batch_view(3, 3, 6, 6), batch_view(3, 4, 6, 6)
    geometry = ((4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    for ghost in (False, True):
        assert rel(conv_norm(x, dy, *geometry, ghost), conv_norm_ref(x, dy, *geometry, ghost)) < 1e-5
    c = torch.rand(3, device=DEV)
    assert rel(conv_clip_accumulate(x, dy, c, *geometry), conv_clip_accumulate_ref(x, dy, c, *geometry)) < 1e-5


def test_noise_on_rows_past_2_31():
    """The last row of a [2^21 + 2, 1024] gradient (past 2^31 coordinates) gets the noise; rows before do not."""
    R, C = 2 ** 21 + 2, 1024
    g = storage(R * C).view(R, C)
    g[0] = 0.0
    g[R - 2:] = 0.0
    masked_noise(g, 2.0, 7, rows=torch.tensor([R - 1], device=DEV))
    assert (g[0] == 0).all() and (g[R - 2] == 0).all()
    assert 1.7 < g[R - 1].std().item() < 2.3 and g[R - 1].abs().max().item() < 2.0 * 7
    p = storage(R * C).view(R, C)
    p[R - 2:] = 1.0
    g[R - 2:] = 0.0
    noisy_sgd(p, g, None, lr=0.5, std=2.0, seed=7, scale=1.0, rows=torch.tensor([R - 1], device=DEV))
    assert (p[R - 2] == 1).all()
    assert 0.85 < (1 - p[R - 1]).std().item() < 1.15  # p - lr * noise with lr = 0.5, std = 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("big", ["position", "feature"])
def test_linear_norms_inside_one_sample_past_2_31(dtype, big):
    """One sample whose rows (position stride BIG: position 2 past 2^31) or features (feature stride BIG) lie past
    2^31 elements: the within-sample offsets (t * stride, k * stride), not just the batch offset, are 64-bit."""
    T, D, P = 3, 3, 3
    strides = (T * BIG, BIG, 1) if big == "position" else (T * D * BIG, 1, BIG)
    x = strided_view((1, T, D), strides, dtype)
    dy = strided_view((1, T, P), strides, dtype)
    assert x.storage_offset() + 2 * BIG > 2 ** 31
    xc, dyc, c = x.contiguous(), dy.contiguous(), torch.rand(1, device=DEV)
    assert rel(direct_norm(x, dy), direct_norm_ref(xc, dyc)) < 1e-5
    assert rel(ghost_dot(x, dy, x, dy), ghost_dot_ref(xc, dyc, xc, dyc)) < 1e-5
    assert rel(ghost_dot(xc, dyc, x, dy), ghost_dot_ref(xc, dyc, xc, dyc)) < 1e-5
    assert rel(row_abs_sum(x, dy, c), row_abs_sum_ref(xc, dyc, c)) < 1e-5
    mask, center, scale = torch.rand(P, D, device=DEV) < 0.7, torch.randn(P, D, device=DEV), torch.rand(P, D, device=DEV) + 0.5
    assert rel(masked_direct_norm(x, dy, mask, center, scale), masked_direct_norm_ref(xc, dyc, mask, center, scale)) \
        < 1e-5
    assert rel(clip_accumulate(x, dy, c), clip_accumulate_ref(xc, dyc, c)) < 1e-5


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_clip_accumulate_out_past_2_31(layout):
    """``out`` [P, D] with a row (or column) stride of BIG: the read-modify-write of row (column) 2 lands past 2^31
    elements, where it belongs."""
    P, D = 3, 3
    out = strided_view((P, D, 1), (BIG, 1, 1) if layout == "rows" else (1, BIG, 1))[..., 0]
    start = out.clone()
    x, dy, c = torch.randn(2, 5, D, device=DEV), torch.randn(2, 5, P, device=DEV), torch.rand(2, device=DEV)
    got = clip_accumulate(x, dy, c, out)
    assert got is out and rel(out - start, clip_accumulate_ref(x, dy, c)) < 1e-5


@pytest.mark.parametrize("kind", ["layer", "group"])
def test_norm_affine_grad_positions_past_2_31(kind):
    """A sample of a norm layer whose positions lie at a stride of BIG (position 2 past 2^31)."""
    F, R = 4, 3
    if kind == "layer":
        x = strided_view((1, R, F), (R * BIG, BIG, 1))
        dy = strided_view((1, R, F), (R * BIG, BIG, 1))
        _, mean, rstd = torch.native_layer_norm(x.contiguous(), (F,), None, None, 1e-5)
        arg = (F,)
    else:  # [B, C, R] with the position (spatial) stride BIG
        x = strided_view((1, F, R), (R * BIG, 1, BIG))
        dy = strided_view((1, F, R), (R * BIG, 1, BIG))
        _, mean, rstd = torch.native_group_norm(x.contiguous(), None, None, 1, F, R, 2, 1e-5)
        arg = 2
    got = norm_affine_grad(x, dy, mean, rstd, kind, arg)
    ref = norm_affine_grad_ref(x.contiguous(), dy.contiguous(), mean, rstd, kind, arg)
    for g, e in zip(got, ref):
        assert rel(g, e) < 1e-5


@pytest.mark.parametrize("ghost", [False, True], ids=["direct", "ghost"])
def test_conv_kernels_inside_a_sample_past_2_31(ghost):
    """One sample whose channels lie BIG elements apart: channel 2 starts past 2^31 inside the sample (the conv
    kernels then index in 64 bits, the O64 flag; 32-bit offsets read at a wrapped address)."""
    from fastdp.kernels.conv_norm import needs_64bit_offsets
    x = strided_view((1, 3, 6, 7), (3 * BIG, BIG, 7, 1))
    geo = ((4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    dy = torch.randn(1, 4, 6, 7, device=DEV)
    assert needs_64bit_offsets(x, dy) and not needs_64bit_offsets(dy)
    assert rel(conv_norm(x, dy, *geo, ghost), conv_norm_ref(x, dy, *geo, ghost)) < 1e-5
    if not ghost:
        c = torch.rand(1, device=DEV)
        assert rel(conv_clip_accumulate(x, dy, c, *geo), conv_clip_accumulate_ref(x, dy, c, *geo)) < 1e-5
