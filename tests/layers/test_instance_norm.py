"""InstanceNorm1d/2d/3d: each sample is normalised alone, so its affine parameters clip exactly per sample; running
statistics updated in training are refused (they would release a function of the batch)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdp
from helpers import check_bf16_autocast, check_exact, check_layer


def check(model, x, dtype=torch.float64):
    """Engine vs reference with clipping active (R below every norm) and inactive (R huge), every parameter."""
    check_layer(model, x, dtype=dtype, every_param=True)


def randomised(m: nn.Module) -> nn.Module:
    """Affine parameters away from their (1, 0) initialisation: a zero bias has an exactly zero mean gradient here."""
    torch.manual_seed(3)
    for p in m.parameters():
        nn.init.normal_(p)
    return m


class ConvInstanceNorm(nn.Module):
    """Conv -> InstanceNorm -> nonlinearity -> conv: the norm's input gradient is checked through the first conv
    (without a bias: the normalisation removes it, its gradient is exactly zero)."""

    def __init__(self, dims: int, **kw):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims]
        self.c1, self.n, self.c2 = conv(2, 4, 3, padding=1, bias=False), norm(4, affine=True, **kw), conv(4, 3, 1)

    def forward(self, x):
        return self.c2(torch.tanh(self.n(self.c1(x))))


@pytest.mark.parametrize("dims,shape", [(1, (3, 2, 9)), (2, (3, 2, 5, 6)), (3, (2, 2, 3, 4, 3))])
def test_instance_norm_in_a_conv_net(dims, shape):
    check(randomised(ConvInstanceNorm(dims)), torch.randn(*shape))


@pytest.mark.parametrize("layer,shape", [(nn.InstanceNorm1d(5, affine=True), (4, 5, 7)),
                                         (nn.InstanceNorm2d(3, affine=True, eps=1e-3), (3, 3, 4, 5)),
                                         (nn.InstanceNorm3d(2, affine=True), (2, 2, 3, 3, 4))], ids=str)
def test_instance_norm_alone(layer, shape):
    check(randomised(layer), torch.randn(*shape) * 3 + 1)


def test_instance_norm_fp32():
    check(randomised(ConvInstanceNorm(2)), torch.randn(5, 2, 6, 6), dtype=torch.float32)


def test_instance_norm_weight_only_trainable():
    m = randomised(ConvInstanceNorm(2))
    m.n.bias.requires_grad_(False)
    check(m, torch.randn(3, 2, 4, 4))


def test_instance_norm_bf16_autocast():
    m = randomised(ConvInstanceNorm(2)).float()
    x = torch.randn(4, 2, 5, 5)
    check_bf16_autocast(m, x, torch.zeros(4), lambda out, y: out.pow(2).mean(), "cpu", max_grad_norm=0.05)


def test_eval_mode_running_statistics_are_constants():
    """track_running_stats=True in eval mode: the layer is an affine map with fixed statistics, exact per sample."""
    m = randomised(ConvInstanceNorm(2, track_running_stats=True))
    m.n.running_mean.uniform_(-1, 1)
    m.n.running_var.uniform_(0.5, 2)
    m.eval()
    check(m, torch.randn(3, 2, 4, 5))


@pytest.mark.parametrize("affine", [True, False])
def test_running_statistics_in_training_are_refused(affine):
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3, affine=affine, track_running_stats=True))
    with pytest.raises(fastdp.UnsupportedLayerError, match="track_running_stats") as err:
        fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    assert "BatchNorm" not in str(err.value)  # (not mistaken for a layer that mixes samples)
    m[1].eval()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    m(torch.randn(2, 2, 5, 5)).sum().backward()
    m[1].train()  # switched back after the engine was attached: refused at the forward
    with pytest.raises(fastdp.UnsupportedLayerError, match="track_running_stats"):
        m(torch.randn(2, 2, 5, 5))
    eng.detach()


class FunctionalRunningStats(nn.Module):
    """``F.instance_norm`` called with running buffers and instance statistics (training), outside nn.InstanceNorm."""

    def __init__(self):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.zeros(3))
        self.register_buffer("rm", torch.zeros(3))
        self.register_buffer("rv", torch.ones(3))

    def forward(self, x):
        return F.instance_norm(x, self.rm, self.rv, self.w, self.b, use_input_stats=True)


def test_functional_running_statistics_update_is_refused():
    m = FunctionalRunningStats()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError, match="running_mean"):
        m(torch.randn(2, 3, 4))
    eng.detach()


def test_instance_norm_without_affine_between_trainable_layers():
    m = nn.Sequential(nn.Conv1d(2, 3, 3, bias=False), nn.InstanceNorm1d(3), nn.Conv1d(3, 2, 1))
    check_exact(m, torch.randn(3, 2, 8))


def test_one_spatial_element_is_refused_as_in_pytorch():
    m = nn.InstanceNorm1d(3, affine=True)
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        m(torch.randn(2, 3, 1))  # PyTorch's message
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        m(torch.randn(2, 3, 1))
    eng.detach()
