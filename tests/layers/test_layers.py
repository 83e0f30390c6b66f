"""Per-layer parity: the engine's per-sample norms and clipped sums against torch.func per-sample gradients."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdp
from fastdp.grad_sample import NormRule
from helpers import assert_close, check_layer, sq_loss


def check(model, x, *, dtype=torch.float64, R=None, loss=sq_loss, extra=()):
    """Engine vs reference, with clipping active (R below most norms) and inactive (R huge)."""
    check_layer(model, x, *extra, dtype=dtype, R=R, loss=loss)


@pytest.fixture(params=["auto", "ghost", "direct"])
def norm_rule(request, monkeypatch):
    monkeypatch.setattr(NormRule, "mode", request.param)
    return request.param


@pytest.mark.parametrize("shape", [(7, 5), (6, 9, 5), (4, 3, 2, 5), (1, 5), (5, 1, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(shape, bias, norm_rule):
    check(nn.Linear(5, 4, bias=bias), torch.randn(*shape))


def test_linear_fp32():
    check(nn.Linear(9, 41), torch.randn(6, 11, 9), dtype=torch.float32)


def test_linear_frozen_weight_trains_bias_only():
    m = nn.Linear(5, 3)
    m.weight.requires_grad_(False)
    check(m, torch.randn(4, 6, 5))


class MatmulLayer(nn.Module):
    """A custom layer using ``x @ W`` with its own parameter."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(5, 3))

    def forward(self, x):
        return x @ self.W


def test_matmul_parameter(norm_rule):
    check(MatmulLayer(), torch.randn(4, 6, 5))


def test_hf_conv1d(norm_rule):
    transformers = pytest.importorskip("transformers")
    m = transformers.pytorch_utils.Conv1D(7, 5)  # nf=7 outputs, nx=5 inputs
    nn.init.normal_(m.bias)
    check(m, torch.randn(3, 4, 5))


CONV2D = [
    dict(),
    dict(stride=2, padding=1),
    dict(padding=2, dilation=2),
    dict(groups=3, padding=1),
    dict(padding="same"),
    dict(kernel_size=(2, 4), padding="same", dilation=(1, 2)),  # asymmetric 'same'
    dict(padding=1, padding_mode="reflect"),
    dict(padding=(1, 2), padding_mode="circular", bias=False),
]


@pytest.mark.parametrize("kw", CONV2D, ids=str)
def test_conv2d(kw, norm_rule):
    kw = {"kernel_size": 3, **kw}
    check(nn.Conv2d(6, 9, **kw), torch.randn(3, 6, 7, 8))


@pytest.mark.parametrize("kw", [dict(), dict(stride=2, padding=2, dilation=2), dict(groups=2, padding="same"),
                                dict(kernel_size=4, padding="same"), dict(padding=1, padding_mode="replicate")], ids=str)
def test_conv1d(kw, norm_rule):
    kw = {"kernel_size": 3, **kw}
    check(nn.Conv1d(4, 6, **kw), torch.randn(3, 4, 11))


def test_conv2d_fp32():
    check(nn.Conv2d(3, 8, 3, padding=1), torch.randn(5, 3, 9, 9), dtype=torch.float32)


class EmbedSum(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(11, 4, **kw)

    def forward(self, idx):
        return self.emb(idx) * torch.arange(1, 5, dtype=self.emb.weight.dtype)


@pytest.mark.parametrize("kw", [dict(), dict(padding_idx=0), dict(padding_idx=-1)], ids=str)
@pytest.mark.parametrize("shape", [(5, 7), (6,), (1, 9), (2, 3, 4)])
def test_embedding(kw, shape):
    check(EmbedSum(**kw), torch.randint(0, 11, shape))


def test_embedding_refuses_batch_mixing_options():
    for kw in (dict(scale_grad_by_freq=True), dict(max_norm=1.0), dict(sparse=True)):
        m = nn.Embedding(5, 3, **kw)
        eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
        with pytest.raises(fastdp.UnsupportedLayerError):
            m(torch.randint(0, 5, (2, 3)))
        eng.detach()


@pytest.mark.parametrize("layer,shape", [
    (lambda: nn.LayerNorm(6), (4, 6)),
    (lambda: nn.LayerNorm(6), (4, 5, 6)),
    (lambda: nn.LayerNorm((5, 6)), (3, 5, 6)),
    (lambda: nn.LayerNorm(6, bias=False), (4, 3, 6)),
    (lambda: nn.GroupNorm(3, 6), (4, 6, 5, 5)),
    (lambda: nn.GroupNorm(2, 6), (4, 6, 7)),
    (lambda: nn.GroupNorm(3, 6), (4, 6)),
    (lambda: nn.RMSNorm(6), (4, 5, 6)),
    (lambda: nn.RMSNorm(6, eps=1e-3), (4, 6)),
], ids=lambda v: str(v) if isinstance(v, tuple) else "")
def test_norm_layers(layer, shape):
    m = layer()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    # a nonlinear loss so the input gradient matters upstream
    pre = nn.Linear(shape[-1], shape[-1]) if len(shape) != 4 else nn.Identity()
    check(nn.Sequential(pre, m), torch.randn(*shape))


def test_norm_input_gradient_matches_autograd():
    """The analytic input gradients of the norm layers equal PyTorch's."""
    for m, shape in [(nn.LayerNorm(6), (3, 4, 6)), (nn.GroupNorm(2, 6), (3, 6, 5)), (nn.RMSNorm(6), (3, 6))]:
        m = m.double()
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        g_ref, = torch.autograd.grad(m(x).sin().sum(), x)
        eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
        g, = torch.autograd.grad(m(x).sin().sum(), x)
        eng.detach()
        assert_close(g, g_ref, 1e-10, 1e-12, type(m).__name__)


class TokensAndPositions(nn.Module):
    """timm-ViT-like root parameters: cls_token concatenated, pos_embed added, a LayerScale-like gamma."""

    def __init__(self, d=6, n=4):
        super().__init__()
        self.proj = nn.Linear(3, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, d))
        self.gamma = nn.Parameter(torch.randn(d))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        x = self.proj(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        x = torch.tanh(x) * self.gamma
        return self.head(x[:, 0])


@pytest.mark.parametrize("B", [1, 5])
def test_direct_parameters_of_any_module(B):
    check(TokensAndPositions(), torch.randn(B, 4, 3))


class TransposedUse(nn.Module):
    """A parameter transformed before the layer op: the exact pull-back path."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4))

    def forward(self, x):
        return F.linear(x, 2.0 * self.w.t())


def test_transformed_parameter_is_exact():
    check(TransposedUse(), torch.randn(3, 6, 5))


class AsksWeightMetadata(nn.Module):
    """A forward that reads its weight's metadata (as HF models read ``weight.dtype``): answered from the tap."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.seen = []

    def forward(self, x):
        w = self.lin.weight
        self.seen.append(type(w))
        assert w.shape == (4, 5) and w.size(1) == 5 and w.dim() == w.ndim == 2 and w.numel() == 20
        assert w.is_contiguous() and w.stride() == (5, 1) and w.is_floating_point() and not w.is_cuda
        assert w.requires_grad
        return self.lin(x.to(w.dtype).to(w.device))


def test_metadata_queries_on_a_parameter_in_forward():
    from fastdp.tap import ParamTap

    model = AsksWeightMetadata()
    check(model, torch.randn(3, 6, 5))
    assert ParamTap in model.seen  # the engine's forwards asked the tap (the reference's asked the parameter)


class TwoParamsCombined(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.ones(3, 1))
        self.v = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return F.linear(x, self.g * self.v)


class UsesBilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(4, 4, 2)

    def forward(self, x):
        return self.bil(x, x)


@pytest.mark.parametrize("model", [TwoParamsCombined, UsesBilinear])
def test_unsupported_use_is_an_error_naming_the_module(model):
    m = model()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError) as err:
        out = m(torch.randn(2, 5, 4))
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    eng.detach()
    assert "module" in str(err.value)


def test_batchnorm_is_refused_with_a_suggestion():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(fastdp.UnsupportedLayerError, match="GroupNorm"):
        fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    m[1].eval()
    m[1].requires_grad_(False)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))  # frozen BN in eval mode is per-sample
    m(torch.randn(2, 3, 5, 5)).sum().backward()
    m[1].train()
    with pytest.raises(fastdp.UnsupportedLayerError, match="GroupNorm"):
        m(torch.randn(2, 3, 5, 5))
    eng.detach()


class ParentUsesChildWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)

    def forward(self, idx):
        h = self.emb(idx)
        return h @ self.emb.weight.t()  # the weight used outside its owner's forward


def test_parent_using_a_child_weight_is_exact():
    """Every parameter slot is tapped for the whole model forward, so `h @ self.emb.weight.t()` is tracked."""
    check(ParentUsesChildWeight(), torch.randint(0, 7, (3, 5)))


def test_calling_a_submodule_outside_the_model_forward_is_an_error():
    m = ParentUsesChildWeight()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError, match="outside the forward"):
        m.emb(torch.randint(0, 7, (2, 3))).sum().backward()
    eng.detach()


def test_mismatched_batch_dims_are_an_error():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.a(x).sum() + self.b(x[:2]).sum()

    m = Bad()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.BatchSizeError, match="batch size"):
        m(torch.randn(4, 3)).backward()
    eng.detach()


def test_nonfinite_norm_is_an_error_naming_the_parameter():
    m = nn.Linear(3, 2)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    x = torch.randn(4, 3)
    x[2, 0] = math.inf
    with pytest.raises(fastdp.NonFiniteNormError, match="weight"):
        m(x).pow(2).mean().backward()
    eng.detach()


def test_non_scalar_loss_is_an_error():
    m = nn.Linear(3, 2)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(RuntimeError, match="scalar"):
        m(torch.randn(4, 3)).backward()
    eng.detach()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["one-slope", "per-channel-2d", "per-channel-conv"])
def test_prelu(case, dtype):
    """nn.PReLU's slopes: per-sample gradient sum(min(0, x) * dY) over each channel's positions (README's example
    of a layer handler, fastdp/layers/prelu.py)."""
    if case == "one-slope":
        model, x = nn.Sequential(nn.Linear(5, 4), nn.PReLU(), nn.Linear(4, 3)), torch.randn(6, 7, 5)
    elif case == "per-channel-2d":
        model, x = nn.Sequential(nn.Linear(5, 4), nn.PReLU(4), nn.Linear(4, 3)), torch.randn(6, 5)
    else:
        model, x = nn.Sequential(nn.Conv2d(2, 3, 3), nn.PReLU(3), nn.Flatten(), nn.Linear(48, 3)), torch.randn(6, 2, 6, 6)
    with torch.no_grad():  # slopes of both signs, so both branches of the input gradient are taken
        for m in model:
            if isinstance(m, nn.PReLU):
                m.weight.uniform_(-0.5, 0.5)
    check(model, x, dtype=dtype)
