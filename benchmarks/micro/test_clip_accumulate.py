"""Clip-and-accumulate (``fastdp/kernels/clip_accumulate.py``) into an fp32 [p, d] gradient buffer vs Opacus' order:
per-sample gradients, scaled by their clip factors, summed."""
import pytest
import torch

from fastdp.kernels.clip_accumulate import clip_accumulate, clip_accumulate_ref


def naive(x, dy, scale, out):
    g = torch.bmm(dy.transpose(1, 2), x).float()  # [B, p, d] per-sample gradients
    return out.add_((g * scale.view(-1, 1, 1)).sum(0))


@pytest.mark.parametrize("impl", ["reference", "triton", "naive"])
def test_clip_accumulate(micro, linear_shape, linear_inputs, dtype, impl):
    s, (x, dy) = linear_shape, linear_inputs
    micro.setup("clip_accumulate", s.name, impl, dtype)
    scale = torch.rand(s.B, device=x.device) + 0.1
    fn = {"reference": clip_accumulate_ref, "triton": clip_accumulate, "naive": naive}[impl]
    truth = torch.einsum("b,btp,btd->pd", scale.double(), dy.double(), x.double())
    out = torch.zeros(s.p, s.d, device=x.device)
    micro.assert_close(fn(x, dy, scale, out), truth, normwise=True)
    micro.time(fn, x, dy, scale, out, op_flops=2 * s.B * s.T * s.p * s.d + s.B * s.T * min(s.p, s.d),
               op_bytes=s.B * s.T * (s.d + s.p) * x.element_size() + 4 * s.B + 8 * s.p * s.d)
