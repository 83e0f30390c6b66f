"""Conv3d and ConvTranspose1d/2d/3d: per-sample norms and clipped sums against torch.func per-sample gradients."""
import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastdp
from fastdp.grad_sample import ConvGrad, ConvNdGrad, NormRule
from helpers import assert_engine_matches_reference, check_exact, check_layer, count_launches, dp_sgd, flat_params, sq_loss


def check(model, x, dtype=torch.float64):
    """Engine vs reference with clipping active (R below every norm) and inactive (R huge), every parameter."""
    check_layer(model, x, dtype=dtype, every_param=True)


@pytest.fixture(params=["ghost", "direct"])
def norm_rule(request, monkeypatch):
    monkeypatch.setattr(NormRule, "mode", request.param)
    return request.param


CONV3D = [
    dict(),
    dict(stride=2, padding=1),
    dict(stride=(1, 2, 1), padding=(0, 1, 2), dilation=(2, 1, 1)),
    dict(groups=2, padding="same"),
    dict(kernel_size=(2, 3, 2), padding="same"),  # asymmetric 'same'
    dict(padding=1, padding_mode="reflect", bias=False),
    dict(padding=(1, 0, 1), padding_mode="circular"),
]


@pytest.mark.parametrize("kw", CONV3D, ids=str)
def test_conv3d(kw):
    check(nn.Conv3d(4, 6, **{"kernel_size": 3, **kw}), torch.randn(3, 4, 5, 6, 5))


def test_conv3d_fp32():
    check(nn.Conv3d(3, 5, 3, padding=1), torch.randn(4, 3, 5, 5, 4), dtype=torch.float32)


def test_conv3d_records_the_nd_gradient(monkeypatch):
    """3-D convolutions take the n-d reference path (the Triton conv kernels are 1-D/2-D)."""
    seen = []
    orig = fastdp.tap.ParamTap.finish
    monkeypatch.setattr(fastdp.tap.ParamTap, "finish", lambda self, g, use=None: (seen.append(type(g)), orig(self, g, use))[1])
    check_exact(nn.Conv3d(2, 3, 2), torch.randn(2, 2, 3, 3, 3))
    assert ConvNdGrad in seen


def test_conv3d_chunks_the_batch(monkeypatch):
    """Per-sample gradients are formed a chunk of the batch at a time; chunks of one sample give the same result."""
    monkeypatch.setattr("fastdp.kernels._common.CHUNK_ELEMENTS", 1)
    check_exact(nn.Conv3d(2, 3, 2, groups=1), torch.randn(3, 2, 3, 4, 3))


CONV_T = [
    dict(),
    dict(stride=2, padding=1, output_padding=1),
    dict(stride=3, padding=2, output_padding=2, dilation=2),
    dict(stride=1, padding=1, output_padding=1, dilation=2),  # output_padding below the dilation, not the stride
    dict(stride=2, groups=2, padding=1, bias=False),
]


@pytest.mark.parametrize("kw", CONV_T, ids=str)
def test_conv_transpose1d(kw):
    check(nn.ConvTranspose1d(4, 6, 3, **kw), torch.randn(3, 4, 7))


@pytest.mark.parametrize("kw", CONV_T, ids=str)
def test_conv_transpose2d(kw, norm_rule):
    check(nn.ConvTranspose2d(4, 6, 3, **kw), torch.randn(3, 4, 5, 6))


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=1, output_padding=1), dict(stride=(1, 2, 2), groups=2),
                                dict(stride=1, padding=1, output_padding=1, dilation=2)], ids=str)
def test_conv_transpose3d(kw):
    check(nn.ConvTranspose3d(4, 6, 3, **kw), torch.randn(2, 4, 3, 4, 3))


def test_conv_transpose_fp32():
    check(nn.ConvTranspose2d(3, 8, 4, stride=2, padding=1), torch.randn(5, 3, 6, 6), dtype=torch.float32)
    check(nn.ConvTranspose3d(3, 4, 2, stride=2), torch.randn(3, 3, 3, 4, 3), dtype=torch.float32)


class WithOutputSize(nn.Module):
    """``nn.ConvTranspose2d.forward(x, output_size=...)``: PyTorch turns the size into output_padding."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.up(x, output_size=[2 * x.shape[2], 2 * x.shape[3]])


def test_conv_transpose_output_size_argument():
    check(WithOutputSize(), torch.randn(3, 3, 4, 5))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.sampled_from([1, 2]), k=st.integers(1, 4), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       padding=st.integers(0, 2), op=st.integers(0, 2), groups=st.sampled_from([1, 2]), B=st.integers(1, 4),
       size=st.integers(1, 5))
def test_conv_transpose_generated_geometry(n, k, stride, dilation, padding, op, groups, B, size):
    op = min(op, max(stride, dilation) - 1)  # PyTorch: output_padding below the stride or the dilation
    layer = (nn.ConvTranspose1d if n == 1 else nn.ConvTranspose2d)(2 * groups, 3 * groups, k, stride=stride,
                                                                   padding=padding, output_padding=op,
                                                                   groups=groups, dilation=dilation)
    x = torch.randn(B, 2 * groups, *([size] * n))
    out_len = (size - 1) * stride - 2 * padding + dilation * (k - 1) + op + 1
    if out_len < 1:  # PyTorch refuses it too
        return
    check_exact(layer, x)


@pytest.mark.interpreter
@pytest.mark.parametrize("mode,layer,shape", [
    ("direct", lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (3, 3, 4, 5)),
    ("ghost", lambda: nn.ConvTranspose1d(4, 2, 3, stride=2, groups=2, dilation=2), (2, 4, 6))], ids=["direct", "ghost"])
def test_conv_transpose_through_the_triton_conv_kernels(mode, layer, shape, monkeypatch):
    """1-D/2-D transposed convolutions reuse the implicit-im2col kernels (operands swapped), fp32, interpreter."""
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    monkeypatch.setattr(NormRule, "mode", mode)
    norms = count_launches(monkeypatch, "conv_norm", f"_conv_{mode}_norm_kernel")
    sums = count_launches(monkeypatch, "conv_clip_accumulate", "_conv_clip_accumulate_kernel")
    m, x = layer(), torch.randn(*shape)
    assert_engine_matches_reference(m, sq_loss, x, max_grad_norm=1e-2, rtol=2e-5, atol=2e-6, every_param=True)
    assert len(norms) == len(sums) == 1  # the weight's norm and clipped sum came from the kernels


def test_each_sample_moves_the_model_by_at_most_R():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv3d(2, 3, 2), nn.Tanh(), nn.ConvTranspose3d(3, 2, 2, stride=2)).double()
    R = 1e-3
    for i in range(3):
        x = torch.randn(1, 2, 3, 3, 3, dtype=torch.float64)
        opt = dp_sgd(m, R)
        before = flat_params(m)
        m(x).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        opt.detach()
        moved = (flat_params(m) - before).norm().item()
        assert 0 < moved <= R * (1 + 1e-9)


def test_conv_transpose_weight_gradient_type_is_a_conv_grad(monkeypatch):
    seen = []
    orig = fastdp.tap.ParamTap.finish
    monkeypatch.setattr(fastdp.tap.ParamTap, "finish", lambda self, g, use=None: (seen.append(type(g)), orig(self, g, use))[1])
    check_exact(nn.ConvTranspose2d(2, 3, 2, stride=2), torch.randn(2, 2, 3, 3))
    assert ConvGrad in seen


@pytest.mark.parametrize("layer,shape", [(lambda: nn.Conv3d(3, 5, 2), (3, 3, 3, 4, 3)),
                                         (lambda: nn.ConvTranspose2d(5, 4, 3, stride=2), (3, 5, 4, 4)),
                                         (lambda: nn.ConvTranspose3d(4, 3, 2, stride=2), (2, 4, 2, 3, 2))],
                         ids=["conv3d", "conv_transpose2d", "conv_transpose3d"])
def test_row_mask_on_the_weight_keeps_its_filters_only(layer, shape):
    """A row mask (dim 0 of the weight) restricts the recorded gradient; norms and sums equal the masked reference."""
    from fastdp.masks import Mask
    from helpers import per_sample_grads
    m = layer().double()
    x = torch.randn(*shape, dtype=torch.float64)
    rows = torch.tensor([0, 2])
    mask = Mask.from_rows(m.weight, rows)
    g = per_sample_grads(m, sq_loss, x)
    g["weight"] = g["weight"] * mask.dense
    norms = torch.cat([v.flatten(1) for v in g.values()], 1).norm(dim=1)
    R = 1e-2
    c = (R / (norms + 1e-6)).clamp(max=1.0)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(R))
    eng.set_mask(m.weight, mask)
    sq_loss(m(x)).backward()
    eng.detach()
    torch.testing.assert_close(eng.last_norms, norms, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(eng.summed[m.weight], torch.einsum("b,b...->...", c, g["weight"]), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(eng.summed[m.bias], torch.einsum("b,b...->...", c, g["bias"]), rtol=1e-9, atol=1e-12)
