"""Masked + standardised direct norm (``fastdp/kernels/masked_direct_norm.py``, RS / AdaDPIGU) vs materialised per-sample
gradients, standardised and masked in PyTorch."""
import pytest
import torch

from fastdp.kernels.masked_direct_norm import masked_direct_norm, masked_direct_norm_ref


def naive(x, dy, mask, center, scale):
    """Per-sample gradients [B, p, d] by einsum, then ``(g - a) / b * M`` and squared norms."""
    g = torch.einsum("btp,btd->bpd", dy, x).float()
    return ((g - center) / scale * mask).pow(2).sum((1, 2))


@pytest.mark.parametrize("impl", ["reference", "triton", "naive"])
def test_masked_direct_norm(micro, linear_shape, linear_inputs, dtype, impl):
    s, (x, dy) = linear_shape, linear_inputs
    micro.setup("masked_direct_norm", s.name, impl, dtype)
    gen = torch.Generator(device=x.device).manual_seed(1)
    mask = torch.rand(s.p, s.d, device=x.device, generator=gen) < 0.1  # RS keeps 10% at r* = 0.9
    center = 0.01 * torch.randn(s.p, s.d, device=x.device, generator=gen)
    scale = torch.rand(s.p, s.d, device=x.device, generator=gen) + 0.5
    fn = {"reference": masked_direct_norm_ref, "triton": masked_direct_norm, "naive": naive}[impl]
    g = torch.bmm(dy.double().transpose(1, 2), x.double())
    truth = ((g - center.double()) / scale.double() * mask.double()).pow(2).sum((1, 2))
    micro.assert_close(fn(x, dy, mask, center, scale), truth)
    micro.time(fn, x, dy, mask, center, scale, op_flops=2 * s.B * s.T * s.p * s.d + 5 * s.B * s.p * s.d,
               op_bytes=s.B * s.T * (s.d + s.p) * x.element_size() + 9 * s.p * s.d + 4 * s.B)
