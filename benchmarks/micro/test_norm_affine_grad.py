"""Per-sample affine gradients of LayerNorm / GroupNorm (``fastdp/kernels/norm_affine_grad.py``) vs autograd's per-sample
gradients through ``torch.func`` (naive: what a generic per-sample engine would run)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastdp.kernels.norm_affine_grad import norm_affine_grad, norm_affine_grad_ref


def stats(s, x):
    if s.kind == "layer":
        _, mean, rstd = torch.native_layer_norm(x.float(), s.arg, None, None, 1e-5)
    else:
        N, C = x.shape[:2]
        _, mean, rstd = torch.native_group_norm(x.float(), None, None, N, C, x[0, 0].numel(), s.arg, 1e-5)
    return mean, rstd


def naive(s):
    """torch.func per-sample gradients of the affine parameters of the same layer (recomputes the forward)."""
    def out(w, b, xi, dyi):
        xi = xi.unsqueeze(0).float()
        y = F.layer_norm(xi, s.arg, w, b, 1e-5) if s.kind == "layer" else F.group_norm(xi, s.arg, w, b, 1e-5)
        return (y * dyi.unsqueeze(0).float()).sum()

    per_sample = torch.func.vmap(torch.func.grad(out, argnums=(0, 1)), in_dims=(None, None, 0, 0))

    def fn(x, dy, mean, rstd):
        F_ = math.prod(s.arg) if s.kind == "layer" else s.shape[1]
        w = torch.ones(s.arg if s.kind == "layer" else (F_,), device=x.device)
        return per_sample(w, torch.zeros_like(w), x, dy)
    return fn


@pytest.mark.parametrize("impl", ["reference", "triton", "naive"])
def test_norm_affine_grad(micro, norm_shape, dtype, impl):
    s = norm_shape
    micro.setup("norm_affine_grad", s.name, impl, dtype)
    x = (torch.randn(s.shape, device=micro.device) * 2 + 0.5).to(dtype)
    dy = torch.randn(s.shape, device=micro.device).to(dtype)
    mean, rstd = stats(s, x)
    if impl == "naive":
        fn, args = naive(s), (x, dy, mean, rstd)
    else:
        f = norm_affine_grad if impl == "triton" else norm_affine_grad_ref
        fn, args = (lambda x, dy, m, r: f(x, dy, m, r, s.kind, s.arg)), (x, dy, mean, rstd)
    truth = norm_affine_grad_ref(x.double(), dy.double(), mean.double(), rstd.double(), s.kind, s.arg)
    gw, gb = fn(*args)
    micro.assert_close(gw.reshape(truth[0].shape), truth[0], normwise=True)  # sums of signed terms: some near 0
    micro.assert_close(gb.reshape(truth[1].shape), truth[1], normwise=True)
    B, F_ = s.shape[0], truth[1][0].numel()
    micro.time(fn, *args, op_bytes=2 * x.numel() * x.element_size() + 8 * B * F_ + 8 * mean.numel())
