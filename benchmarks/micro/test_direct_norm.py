"""Direct per-sample norm (``fastdp/kernels/direct_norm.py``) vs Opacus' einsum of per-sample gradients."""
import pytest
import torch

from fastdp.kernels.direct_norm import direct_norm, direct_norm_ref


def naive(x, dy):
    """Per-sample gradients [B, p, d] by einsum in the input dtype, then their squared norms."""
    return torch.einsum("btp,btd->bpd", dy, x).float().pow(2).sum((1, 2))


@pytest.mark.parametrize("impl", ["reference", "triton", "naive"])
def test_direct_norm(micro, linear_shape, linear_inputs, dtype, impl):
    s, (x, dy) = linear_shape, linear_inputs
    micro.setup("direct_norm", s.name, impl, dtype)
    fn = {"reference": direct_norm_ref, "triton": direct_norm, "naive": naive}[impl]
    truth = torch.bmm(dy.double().transpose(1, 2), x.double()).pow(2).sum((1, 2))
    micro.assert_close(fn(x, dy), truth)
    micro.time(fn, x, dy, op_flops=2 * s.B * s.T * s.p * s.d + 2 * s.B * s.p * s.d,
               op_bytes=s.B * s.T * (s.d + s.p) * x.element_size() + 4 * s.B)
