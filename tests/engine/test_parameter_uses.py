"""How a forward may use a parameter. Exact (equal to the torch.func reference): a parameter combined with other views
of itself in one op (``w + w.t()``), weight standardisation, casts against a batched tensor, reads under ``no_grad``
(a constant), activation checkpointing (reentrant or not). Refused with an error naming the cause: a parameter passed
into a custom ``autograd.Function``, a random op on a parameter (DropConnect)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fastdp
from helpers import assert_close, check_exact, clipped_sum_reference, sq_loss

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier")


class TwoViews(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(4, 4) if how == "w + w.t()" else torch.randn(3, 4))

    def forward(self, x):
        w = self.w
        if self.how == "w + w.t()":
            w = w + w.t()
        elif self.how == "cat(sin, cos)":
            w = torch.cat([w.sin(), w.cos()])
        elif self.how == "centered":
            w = w - w.mean(1, keepdim=True)
        elif self.how == "standardised":
            v, mu = torch.var_mean(w, dim=1, keepdim=True, unbiased=False)
            w = (w - mu) / torch.sqrt(v + 1e-5)
        return F.linear(x, w)


@pytest.mark.parametrize("how", ["w + w.t()", "cat(sin, cos)", "centered", "standardised"])
def test_a_parameter_combined_with_another_view_of_itself_is_exact(how):
    check_exact(TwoViews(how), torch.randn(5, 4))


class StdConv2d(nn.Conv2d):
    def forward(self, x):
        v, mu = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        return F.conv2d(x, (self.weight - mu) / torch.sqrt(v + 1e-5), self.bias, self.stride, self.padding)


def test_weight_standardised_conv_is_exact():
    m = nn.Sequential(StdConv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))
    check_exact(m, torch.randn(5, 3, 5, 5), torch.randint(0, 3, (5,)), loss=lambda o, t: F.cross_entropy(o, t))


class MyLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x.mm(w.t())

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g.mm(w), g.t().mm(x)


def test_parameter_into_a_custom_autograd_function_is_refused():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.head = nn.Parameter(torch.randn(3, 4)), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(MyLinearFn.apply(x, self.w))

    m = Custom()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError, match="autograd.Function MyLinearFn"):
        m(torch.randn(4, 4)).sum().backward()
    eng.detach()


def test_a_parameter_used_under_no_grad_in_forward_is_a_constant():
    class NoGradScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            with torch.no_grad():
                s = self.lin.weight.norm()
            return F.linear(x, self.lin.weight / s, self.lin.bias)

    check_exact(NoGradScale(), torch.randn(5, 4))


def test_random_op_on_a_parameter_is_refused():
    class DropConnect(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return F.linear(x, F.dropout(self.lin.weight, 0.5, training=True))

    m = DropConnect()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError, match="random"):
        m(torch.randn(2, 4))
    eng.detach()


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.use_reentrant = None  # None: no checkpointing

    def forward(self, x):
        f = lambda t: torch.tanh(self.a(t))  # noqa: E731
        return self.b(f(x) if self.use_reentrant is None else checkpoint(f, x, use_reentrant=self.use_reentrant))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_is_exact(use_reentrant):
    """(tests/engine/test_activation_checkpointing.py has the full story.)"""
    m, x = Checkpointed().double(), torch.randn(5, 4, dtype=torch.float64)
    ref, norms = clipped_sum_reference(m, sq_loss, x, max_grad_norm=1e-2)  # (torch.func refuses checkpointing)
    m.use_reentrant = use_reentrant
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1e-2))
    sq_loss(m(x.requires_grad_(use_reentrant))).backward()  # (a reentrant region needs an input requiring grad)
    assert_close(eng.last_norms, norms, 1e-9, 1e-12 * norms.max().item())
    for n, p in m.named_parameters():
        assert_close(eng.summed[p], ref[n], 1e-9, 1e-12 * ref[n].abs().max().item(), n)
    eng.detach()


class Casts(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.scale, self.l = how, nn.Parameter(torch.randn(4)), nn.Linear(4, 4)

    def forward(self, x):
        h = self.l(x)
        if self.how == "p.to(h)":
            return h * self.scale.to(h)
        if self.how == "p.type_as(h)":
            return h * self.scale.type_as(h)
        return h.type_as(self.scale) * self.scale  # x.type_as(p): reads the dtype only


@pytest.mark.parametrize("how", ["p.to(h)", "p.type_as(h)", "h.type_as(p)"])
def test_parameter_casts_against_a_batched_tensor_are_exact(how):
    check_exact(Casts(how), torch.randn(5, 4))
