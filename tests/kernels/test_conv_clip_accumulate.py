"""Convolution clip-and-accumulate: reference vs explicit per-sample gradients, the Triton kernel (the interpreter
on the CPU) vs the reference, and the clip bound of what a clipped sample adds."""
import pytest
import torch

from fastdp.kernels import conv_per_sample_grad_ref
from fastdp.kernels.conv_clip_accumulate import conv_clip_accumulate, conv_clip_accumulate_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [  # (C_in, C_out, spatial, kernel, stride, padding, dilation, groups)
    (3, 5, (9, 8), (3, 2), (2, 1), (1, 0), (1, 2), 1),
    (4, 6, (7, 7), (3, 3), (1, 1), (1, 1), (1, 1), 2),
    (4, 4, (11,), (3,), (2,), (2,), (2,), 4),
    (2, 3, (1, 1), (1, 1), (1, 1), (0, 0), (1, 1), 1),
    (3, 40, (6, 6), (3, 3), (1, 1), (1, 1), (1, 1), 1),
]


def inputs(case, B, dtype, seed=0):
    cin, cout, sp, k, s, p, d, g = case
    gen = torch.Generator().manual_seed(seed)
    out_sp = [(n + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for n, kk, ss, pp, dd in zip(sp, k, s, p, d)]
    x = torch.randn(B, cin, *sp, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    dy = torch.randn(B, cout, *out_sp, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    c = (torch.rand(B, generator=gen) + 0.1).to(DEVICE)
    return x, dy, c, (cout, cin // g, *k), s, p, d, g


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_is_the_scaled_sum_of_per_sample_gradients(case):
    x, dy, c, ws, s, p, d, g = inputs(case, 5, torch.float64)
    truth = torch.einsum("b,b...->...", c.double(), conv_per_sample_grad_ref(x, dy, ws, s, p, d, g))
    torch.testing.assert_close(conv_clip_accumulate_ref(x, dy, c, ws, s, p, d, g), truth, rtol=1e-10, atol=1e-12)
    start = torch.randn(ws, dtype=torch.float64, device=DEVICE)
    out = conv_clip_accumulate_ref(x, dy, c, ws, s, p, d, g, start.clone())
    torch.testing.assert_close(out, start + truth, rtol=1e-10, atol=1e-12)


@pytest.mark.interpreter
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case, dtype, tol, B, monkeypatch):
    """Same rounded inputs, fp32 products either way: only the summation order differs (bf16 included)."""
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    x, dy, c, ws, s, p, d, g = inputs(case, B, dtype, seed=1)
    ref = conv_clip_accumulate_ref(x, dy, c, ws, s, p, d, g)
    scale = ref.abs().max().item()
    for out in (None, torch.randn(ws, device=DEVICE), torch.randn(ws, device=DEVICE).to(torch.bfloat16)):
        start = out.clone().float() if out is not None else 0.0
        got = conv_clip_accumulate(x, dy, c, ws, s, p, d, g, out)
        assert got.shape == ws and (out is None or got is out)
        atol = tol * scale if out is None or out.dtype == torch.float32 else 1e-2 * (scale + start.abs().max())
        torch.testing.assert_close(got.float() - start, ref, rtol=0, atol=atol)


@pytest.mark.parametrize("impl", [pytest.param("triton", marks=pytest.mark.interpreter), "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_clipped_contribution_is_at_most_R(impl, dtype, monkeypatch):
    """A sample clipped to R (norm measured in fp64 on the rounded inputs) adds a gradient of norm <= R up to fp32
    rounding: the kernel scales fp32 per-sample partials, the reference on the CPU runs an fp32 convolution. The
    reference's CUDA path for 16-bit inputs rounds the scaled dY: there the excess is bounded by 2e-3."""
    monkeypatch.setenv("FASTDP_BACKEND", impl)
    fn = conv_clip_accumulate if impl == "triton" else conv_clip_accumulate_ref
    worst = 0.0
    for seed in range(8):
        x, dy, _, ws, s, p, d, g = inputs(CASES[4], 1, dtype, seed=seed)
        dy = (dy + dy[:, :, :1, :1]).to(dtype)  # correlated positions: cancellation inside dY^T X
        n = conv_per_sample_grad_ref(x.double(), dy.double(), ws, s, p, d, g).norm()
        c = (1.0 / (n + 1e-6)).float().reshape(1)
        worst = max(worst, fn(x, dy, c, ws, s, p, d, g).double().norm().item() - 1)
    rounded = impl == "reference" and DEVICE == "cuda" and dtype != torch.float32
    assert worst <= (2e-3 if rounded else 2e-6), worst


@pytest.mark.interpreter
def test_empty_batch_and_bad_arguments(monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    x, dy, c, ws, s, p, d, g = inputs(CASES[1], 0, torch.float32)
    assert torch.equal(conv_clip_accumulate(x, dy, c, ws, s, p, d, g), torch.zeros(ws, device=DEVICE))
    x, dy, c, ws, s, p, d, g = inputs(CASES[1], 3, torch.float32)
    for fn in (conv_clip_accumulate, conv_clip_accumulate_ref):
        with pytest.raises(ValueError, match="batch"):
            fn(x, dy, c[:2], ws, s, p, d, g)
        with pytest.raises(ValueError, match="channels"):
            fn(x, dy, c, (ws[0], ws[1] + 1, *ws[2:]), s, p, d, g)
        with pytest.raises(ValueError, match="out has shape"):
            fn(x, dy, c, ws, s, p, d, g, torch.zeros(3, device=DEVICE))
