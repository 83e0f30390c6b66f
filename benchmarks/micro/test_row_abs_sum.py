"""Row-group absolute sums of clipped per-sample gradients (``fastdp/kernels/row_abs_sum.py``, SPARTA's selection release)
vs materialised per-sample gradients ``abs().sum()``."""
import pytest
import torch

from fastdp.kernels.row_abs_sum import row_abs_sum, row_abs_sum_ref


def naive(x, dy, scale):
    g = torch.bmm(dy.transpose(1, 2), x).float()  # [B, p, d]
    return (g.abs().sum(2) * scale.view(-1, 1)).sum(0)


@pytest.mark.parametrize("impl", ["reference", "triton", "naive"])
def test_row_abs_sum(micro, linear_shape, linear_inputs, dtype, impl):
    s, (x, dy) = linear_shape, linear_inputs
    micro.setup("row_abs_sum", s.name, impl, dtype)
    scale = torch.rand(s.B, device=x.device) + 0.1
    fn = {"reference": row_abs_sum_ref, "triton": row_abs_sum, "naive": naive}[impl]
    truth = torch.einsum("b,bpd->p", scale.double(), torch.bmm(dy.double().transpose(1, 2), x.double()).abs())
    micro.assert_close(fn(x, dy, scale), truth)
    micro.time(fn, x, dy, scale, op_flops=2 * s.B * s.T * s.p * s.d + 3 * s.B * s.p * s.d,
               op_bytes=s.B * s.T * (s.d + s.p) * x.element_size() + 4 * s.B + 4 * s.p)
