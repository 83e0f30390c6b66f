"""Conv clip-and-accumulate (``fastdp/kernels/conv_clip_accumulate.py``) into an fp32 weight buffer: the reference (scaled
dY, PyTorch's weight-gradient convolution), the Triton kernel (implicit im2col, fp32 per-sample partials times
C_i, batch split over programs with atomics) and Opacus' order (``F.unfold`` patches, per-sample gradients by
einsum, then the weighted sum)."""
import pytest
import torch
import torch.nn.functional as F

from fastdp.kernels.conv_clip_accumulate import conv_clip_accumulate, conv_clip_accumulate_ref

ONES = (1, 1)


def naive(x, dy, c, out):
    patches = F.unfold(x, 3, padding=1)  # [B, c_in * 9, L]
    g = torch.einsum("bpl,bkl->bpk", dy.flatten(2), patches)  # [B, c_out, c_in * 9] per-sample gradients
    return out.add_(torch.einsum("b,bpk->pk", c.to(g.dtype), g).view(out.shape).to(out.dtype))


@pytest.mark.parametrize("impl", ["reference", "triton", "naive"])
def test_conv_clip_accumulate(micro, conv_shape, dtype, impl):
    s = conv_shape
    micro.setup("conv_clip_accumulate", s.name, impl, dtype)
    x = torch.randn(s.B, s.c_in, s.H, s.W, device=micro.device).to(dtype)
    dy = torch.randn(s.B, s.c_out, s.H, s.W, device=micro.device).to(dtype)
    c = torch.rand(s.B, device=micro.device) + 0.1
    w_shape = (s.c_out, s.c_in, 3, 3)
    out = torch.zeros(w_shape, device=micro.device)
    if impl == "naive":
        fn = naive
    else:
        f = conv_clip_accumulate if impl == "triton" else conv_clip_accumulate_ref

        def fn(x, dy, c, out):
            return f(x, dy, c, w_shape, ONES, ONES, ONES, 1, out)
    truth = naive(x.double(), dy.double(), c.double(), torch.zeros(w_shape, dtype=torch.float64, device=micro.device))
    micro.assert_close(fn(x, dy, c, out.clone()), truth, normwise=True)
    L, d, p = s.H * s.W, s.c_in * 9, s.c_out
    micro.time(fn, x, dy, c, out, op_flops=2 * s.B * L * p * d,
               op_bytes=s.B * (s.c_in + s.c_out) * L * x.element_size() + 4 * s.B + 8 * p * d)
