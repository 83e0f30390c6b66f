"""Ghost norm and ghost cross term (``fastdp/kernels/ghost_norm.py``) vs materialised per-sample gradients."""
import pytest
import torch

from fastdp.kernels.ghost_norm import ghost_dot, ghost_dot_ref, ghost_norm, ghost_norm_ref

IMPLS = ["reference", "triton", "naive"]


def per_sample_grads(x, dy):
    """[B, p, d] per-sample weight gradients in the input dtype (what Opacus' hooks form)."""
    return torch.bmm(dy.transpose(1, 2), x)


def naive_norm(x, dy):
    return per_sample_grads(x, dy).float().pow(2).sum((1, 2))


def naive_dot(x_a, dy_a, x_b, dy_b):
    return (per_sample_grads(x_a, dy_a).float() * per_sample_grads(x_b, dy_b).float()).sum((1, 2))


@pytest.mark.parametrize("impl", IMPLS)
def test_ghost_norm(micro, linear_shape, linear_inputs, dtype, impl):
    s, (x, dy) = linear_shape, linear_inputs
    micro.setup("ghost_norm", s.name, impl, dtype)
    fn = {"reference": ghost_norm_ref, "triton": ghost_norm, "naive": naive_norm}[impl]
    truth = per_sample_grads(x.double(), dy.double()).pow(2).sum((1, 2))
    micro.assert_close(fn(x, dy), truth)
    e = x.element_size()
    flops = 2 * s.B * s.T ** 2 * (s.d + s.p) + 2 * s.B * s.T ** 2
    naive_flops = 2 * s.B * s.T * s.p * s.d + 2 * s.B * s.p * s.d
    micro.time(fn, x, dy, op_flops=flops, op_bytes=s.B * s.T * (s.d + s.p) * e + 4 * s.B,
               impl_flops=naive_flops if impl == "naive" else flops)


@pytest.mark.parametrize("impl", IMPLS)
def test_ghost_dot(micro, linear_shape, linear_inputs, dtype, impl):
    """Cross term of a weight used twice (tied layers): the second use correlated with the first, as in a model."""
    s, (x_a, dy_a) = linear_shape, linear_inputs
    micro.setup("ghost_dot", s.name, impl, dtype)
    x_b = (0.6 * x_a.float() + 0.8 * torch.randn_like(x_a, dtype=torch.float32)).to(dtype)
    dy_b = (0.6 * dy_a.float() + 0.8 * torch.randn_like(dy_a, dtype=torch.float32)).to(dtype)
    fn = {"reference": ghost_dot_ref, "triton": ghost_dot, "naive": naive_dot}[impl]
    truth = (per_sample_grads(x_a.double(), dy_a.double()) * per_sample_grads(x_b.double(), dy_b.double())).sum((1, 2))
    micro.assert_close(fn(x_a, dy_a, x_b, dy_b), truth, normwise=True)
    e = x_a.element_size()
    flops = 2 * s.B * s.T ** 2 * (s.d + s.p) + 2 * s.B * s.T ** 2
    naive_flops = 2 * (2 * s.B * s.T * s.p * s.d) + 2 * s.B * s.p * s.d
    micro.time(fn, x_a, dy_a, x_b, dy_b, op_flops=flops, op_bytes=2 * s.B * s.T * (s.d + s.p) * e + 4 * s.B,
               impl_flops=naive_flops if impl == "naive" else flops)
