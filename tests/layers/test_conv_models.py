"""Composite convolutional models: a 3-D conv net and a U-Net-like encoder/decoder with transposed convolutions,
skip connections and InstanceNorm; engine vs the torch.func reference, and the clip bound through a DP-SGD step."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import assert_engine_matches_reference, check_bf16_autocast, check_exact, dp_sgd, flat_params


class Conv3dNet(nn.Module):
    """Volumes [B, 1, D, H, W] -> classes: Conv3d, GroupNorm, strided Conv3d, InstanceNorm3d, pooling, Linear."""

    def __init__(self, classes=3):
        super().__init__()
        self.c1 = nn.Conv3d(1, 4, 3, padding=1, bias=False)
        self.g1 = nn.GroupNorm(2, 4)
        self.c2 = nn.Conv3d(4, 6, 3, stride=2, padding=1, groups=2, bias=False)
        self.n2 = nn.InstanceNorm3d(6, affine=True)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        h = F.relu(self.g1(self.c1(x)))
        h = torch.tanh(self.n2(self.c2(h)))
        return self.head(h.mean((2, 3, 4)))


class TinyUNet(nn.Module):
    """Images [B, 2, H, W] -> per-pixel outputs [B, 3, H, W]: two strided encoder stages, two transposed-conv decoder
    stages with skip connections (concatenated), InstanceNorm2d in the encoder and GroupNorm in the decoder."""

    def __init__(self, c=4):
        super().__init__()
        self.e1 = nn.Conv2d(2, c, 3, padding=1)
        self.e2 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False)
        self.n2 = nn.InstanceNorm2d(2 * c, affine=True)
        self.e3 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        self.u3 = nn.ConvTranspose2d(2 * c, 2 * c, 2, stride=2)
        self.d2 = nn.Conv2d(4 * c, 2 * c, 3, padding=1, bias=False)
        self.g2 = nn.GroupNorm(2, 2 * c)
        self.u2 = nn.ConvTranspose2d(2 * c, c, 3, stride=2, padding=1, output_padding=1)
        self.out = nn.Conv2d(2 * c, 3, 1)

    def forward(self, x):
        s1 = F.relu(self.e1(x))
        s2 = F.relu(self.n2(self.e2(s1)))
        b = F.relu(self.e3(s2))
        h = torch.cat([self.u3(b), s2], 1)
        h = F.relu(self.g2(self.d2(h)))
        h = torch.cat([self.u2(h), s1], 1)
        return self.out(h)


def randomised_affines(m):
    torch.manual_seed(5)
    for mod in m.modules():
        if isinstance(mod, (nn.GroupNorm, nn.InstanceNorm3d, nn.InstanceNorm2d)):
            nn.init.normal_(mod.weight)
            nn.init.normal_(mod.bias)
    return m


def test_conv3d_net_matches_reference():
    x, y = torch.randn(3, 1, 5, 6, 4), torch.randint(0, 3, (3,))
    check_exact(randomised_affines(Conv3dNet()), x, y, loss=F.cross_entropy)


def test_unet_matches_reference():
    check_exact(randomised_affines(TinyUNet()), torch.randn(3, 2, 8, 8))


def test_unet_fp32():
    m = randomised_affines(TinyUNet())
    x = torch.randn(4, 2, 8, 8)
    loss = lambda out, *_: out.pow(2).sum() / out.shape[0]  # noqa: E731
    assert_engine_matches_reference(m, loss, x, max_grad_norm=0.1, rtol=1e-4, atol=1e-5, every_param=True)


@pytest.mark.parametrize("model,shape", [(Conv3dNet, (1, 1, 4, 4, 4)), (TinyUNet, (1, 2, 8, 8))], ids=["3d", "unet"])
def test_one_sample_moves_the_model_by_at_most_R(model, shape):
    torch.manual_seed(6)
    m = randomised_affines(model()).double()
    R = 1e-3
    for _ in range(2):
        opt = dp_sgd(m, R)
        before = flat_params(m)
        m(torch.randn(*shape, dtype=torch.float64)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        opt.detach()
        assert 0 < (flat_params(m) - before).norm().item() <= R * (1 + 1e-9)


@pytest.mark.parametrize("model,shape", [(Conv3dNet, (3, 1, 4, 5, 4)), (TinyUNet, (3, 2, 8, 8))], ids=["3d", "unet"])
def test_bf16_autocast(model, shape):
    """bf16 autocast: norms in fp32 within bf16 tolerance of the fp32 reference."""
    m = randomised_affines(model())
    loss = lambda out, *_: out.float().pow(2).sum() / out.shape[0]  # noqa: E731
    check_bf16_autocast(m, torch.randn(*shape), torch.zeros(shape[0]), loss, "cpu", max_grad_norm=0.05)
