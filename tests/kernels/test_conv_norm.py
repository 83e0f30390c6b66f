"""Conv norm references: every implementation against explicit per-sample gradients from torch.func."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from fastdp.kernels import conv_norm_ref, conv_per_sample_grad_ref, unfold_patches

CASES = [  # (C_in, C_out, spatial, kernel, stride, padding, dilation, groups)
    (3, 5, (9, 8), (3, 2), (2, 1), (1, 0), (1, 2), 1),
    (4, 6, (7, 7), (3, 3), (1, 1), (1, 1), (1, 1), 2),
    (4, 4, (11,), (3,), (2,), (2,), (2,), 4),
    (2, 3, (1, 1), (1, 1), (1, 1), (0, 0), (1, 1), 1),
]


def explicit(x, dy, w_shape, stride, padding, dilation, groups):
    conv = F.conv2d if len(w_shape) == 4 else F.conv1d
    w = torch.randn(w_shape, dtype=x.dtype)

    def f(w, xi, dyi):
        return (conv(xi[None], w, None, stride, padding, dilation, groups) * dyi[None]).sum()

    return vmap(grad(f), in_dims=(None, 0, 0))(w, x, dy)


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("method", [("direct", "grouped"), ("direct", "unfold"), ("ghost", None)], ids=str)
def test_conv_norm_matches_explicit_per_sample_gradients(case, method):
    cin, cout, sp, k, s, p, d, g = case
    x = torch.randn(5, cin, *sp, dtype=torch.float64)
    out_sp = [(n + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for n, kk, ss, pp, dd in zip(sp, k, s, p, d)]
    dy = torch.randn(5, cout, *out_sp, dtype=torch.float64)
    ws = (cout, cin // g, *k)
    ref = explicit(x, dy, ws, s, p, d, g)
    assert torch.allclose(conv_per_sample_grad_ref(x, dy, ws, s, p, d, g), ref, rtol=1e-10, atol=1e-12)
    got = conv_norm_ref(x, dy, ws, s, p, d, g, ghost=method[0] == "ghost", direct_impl=method[1])
    assert torch.allclose(got, ref.flatten(1).pow(2).sum(1), rtol=1e-10)


def test_conv_norm_fp32_and_bf16_tolerances():
    x, dy = torch.randn(4, 6, 10, 10), torch.randn(4, 8, 10, 10)
    ws = (8, 6, 3, 3)
    ref = explicit(x.double(), dy.double(), ws, (1, 1), (1, 1), (1, 1), 1).flatten(1).pow(2).sum(1)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for ghost, impl in ((False, "grouped"), (False, "unfold"), (True, None)):
            got = conv_norm_ref(x.to(dt), dy.to(dt), ws, (1, 1), (1, 1), (1, 1), 1, ghost, impl)
            assert got.dtype == torch.float32
            assert ((got.double() - ref).abs() / ref).max() < tol, (dt, ghost, impl)


def test_unfold_patches_matches_F_unfold():
    x = torch.randn(3, 4, 9, 7)
    for k, s, p, d in [((3, 3), (1, 1), (1, 1), (1, 1)), ((2, 3), (2, 1), (0, 2), (2, 1))]:
        assert torch.equal(unfold_patches(x, k, s, p, d), F.unfold(x, k, dilation=d, padding=p, stride=s))


@pytest.mark.interpreter
@pytest.mark.parametrize("case", CASES + [(5, 7, (6, 9), (3, 3), (1, 2), (2, 1), (1, 1), 1),
                                          (3, 40, (5, 5), (1, 1), (1, 1), (0, 0), (1, 1), 1),
                                          (36, 4, (4, 4), (3, 3), (1, 1), (1, 1), (1, 1), 1)], ids=str)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
@pytest.mark.parametrize("ghost", [False, True], ids=["direct", "ghost"])
def test_triton_implicit_im2col_norms(case, dtype, tol, ghost, monkeypatch):
    """Implicit-im2col Triton kernels, direct and ghost (interpreter on the CPU), vs explicit per-sample gradients;
    odd sizes, padding, groups, 1-D, channels-last, an empty batch."""
    from fastdp.kernels.conv_norm import conv_norm

    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    cin, cout, sp, k, s, p, d, g = case
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(3, cin, *sp, device=dev).to(dtype)
    out_sp = [(n + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for n, kk, ss, pp, dd in zip(sp, k, s, p, d)]
    dy = torch.randn(3, cout, *out_sp, device=dev).to(dtype)
    ws = (cout, cin // g, *k)
    ref = explicit(x.double().cpu(), dy.double().cpu(), ws, s, p, d, g).flatten(1).pow(2).sum(1)
    got = conv_norm(x, dy, ws, s, p, d, g, ghost=ghost)
    assert got.dtype == torch.float32
    assert ((got.double().cpu() - ref).abs() / ref).max() < tol
    # non-contiguous input (channels-last) and an empty batch
    if x.dim() == 4:
        got_cl = conv_norm(x.to(memory_format=torch.channels_last), dy, ws, s, p, d, g, ghost=ghost)
        assert ((got_cl.double().cpu() - ref).abs() / ref).max() < tol
    assert conv_norm(x[:0], dy[:0], ws, s, p, d, g, ghost=ghost).shape == (0,)


@pytest.mark.parametrize("ghost,impl", [(False, "grouped"), (False, "unfold"), (True, None)], ids=str)
def test_bf16_norm_is_the_fp32_norm_of_what_the_clipped_sum_adds(ghost, impl):
    """bf16 operands: the per-sample gradient is the fp32 product of the bf16 values (not a bf16 rounding of it), so
    the norm equals the fp32 norm of the fp32 per-sample gradient of the same values, to fp32 rounding, and a sample
    clipped with it adds at most R to the clipped sum (the grouped direct norm, the CPU default, measured
    bf16-rounded gradients: up to 1.0002 R)."""
    from fastdp.kernels.conv_clip_accumulate import conv_clip_accumulate_ref

    geometry = ((16, 6, 3, 3), (1, 1), (1, 1), (1, 1), 1)
    worst = 0.0
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(3, 6, 8, 8, generator=gen).to(torch.bfloat16)
        dy = torch.randn(3, 16, 8, 8, generator=gen)
        dy = (dy + 2 * dy[:, :, :1, :1]).to(torch.bfloat16)  # correlated positions: cancellation inside dY^T X
        g = conv_per_sample_grad_ref(x, dy, *geometry)
        g32 = conv_per_sample_grad_ref(x.float(), dy.float(), *geometry)
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, g32, rtol=1e-5, atol=1e-5 * g32.abs().max().item())
        norm = conv_norm_ref(x, dy, *geometry, ghost=ghost, direct_impl=impl)
        torch.testing.assert_close(norm, g32.flatten(1).pow(2).sum(1), rtol=1e-5, atol=0)
        for i in range(3):
            c = (1.0 / (norm[i].sqrt() + 1e-6)).reshape(1)
            added = conv_clip_accumulate_ref(x[i:i + 1], dy[i:i + 1], c, *geometry)
            worst = max(worst, added.double().norm().item() - 1)
    assert worst <= 2e-6, worst


def test_per_sample_gradients_of_an_empty_batch():
    """B = 0: an empty [0, *weight_shape] result (a convolution with B * groups = 0 groups raises)."""
    ws = (6, 2, 3, 3)
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        x, dy = torch.randn(0, 4, 7, 7).to(dt), torch.randn(0, 6, 7, 7).to(dt)
        g = conv_per_sample_grad_ref(x, dy, ws, (1, 1), (1, 1), (1, 1), 2)
        assert g.shape == (0, *ws) and g.dtype == (torch.float64 if dt == torch.float64 else torch.float32)
        for ghost, impl in ((False, "grouped"), (False, "unfold"), (True, None)):
            assert conv_norm_ref(x, dy, ws, (1, 1), (1, 1), (1, 1), 2, ghost, impl).shape == (0,)
    g = conv_per_sample_grad_ref(torch.randn(0, 3, 9), torch.randn(0, 4, 9), (4, 3, 3), (1,), (1,), (1,), 1)
    assert g.shape == (0, 4, 3, 3)
