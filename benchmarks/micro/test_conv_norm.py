"""Per-sample conv weight-gradient norms (``fastdp/kernels/conv_norm.py``): the reference's direct and ghost norms, the
Triton direct and ghost norms (implicit im2col; where this checkout's ``conv_norm`` module has the dispatcher) and
Opacus' formulation (``F.unfold`` patches, per-sample gradients by einsum)."""
import pytest
import torch
import torch.nn.functional as F

from fastdp.kernels import conv_norm as conv_module
from fastdp.kernels.conv_norm import conv_norm_ref

ONES = (1, 1)


def naive(x, dy):
    patches = F.unfold(x, 3, padding=1)  # [B, c_in * 9, L]
    g = torch.einsum("bpl,bkl->bpk", dy.flatten(2), patches)  # [B, c_out, c_in * 9]
    return g.float().pow(2).sum((1, 2))


@pytest.mark.parametrize("impl", ["reference-direct", "reference-ghost", "triton-direct", "triton-ghost", "naive"])
def test_conv_norm(micro, conv_shape, dtype, impl):
    s = conv_shape
    if impl.startswith("triton") and not hasattr(conv_module, "conv_norm"):
        pytest.skip("no Triton conv norm (fastdp/kernels/conv_norm.py has no conv_norm dispatcher) in this checkout")
    micro.setup("conv_norm", s.name, impl, dtype)
    x = torch.randn(s.B, s.c_in, s.H, s.W, device=micro.device).to(dtype)
    dy = torch.randn(s.B, s.c_out, s.H, s.W, device=micro.device).to(dtype)
    w_shape = (s.c_out, s.c_in, 3, 3)
    if impl == "naive":
        fn = naive
    else:  # the reference's direct norm: the device's default ("unfold" on CUDA, "grouped" elsewhere)
        norm = conv_module.conv_norm if impl.startswith("triton") else conv_norm_ref

        def fn(x, dy, ghost=impl.endswith("ghost")):
            return norm(x, dy, w_shape, ONES, ONES, ONES, 1, ghost)
    micro.assert_close(fn(x, dy), naive(x.double(), dy.double()))
    L, d, p = s.H * s.W, s.c_in * 9, s.c_out
    direct, ghost = 2 * s.B * L * p * d + 2 * s.B * p * d, 2 * s.B * L * L * (p + d) + 2 * s.B * L * L
    micro.time(fn, x, dy, op_flops=min(direct, ghost), impl_flops=ghost if impl.endswith("ghost") else direct,
               op_bytes=s.B * (s.c_in + s.c_out) * L * x.element_size() + 4 * s.B)
