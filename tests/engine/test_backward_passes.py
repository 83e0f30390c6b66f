"""Which backward passes count: only those that compute the parameters' gradients. An input-gradient pass
(adversarial examples, saliency) leaves the step untouched; separate forwards and backwards are micro-batches whose
clipped sums add; a second backward through a retained graph (the same samples clipped twice), ``create_graph=True``
and ``torch.autograd.grad`` with respect to the parameters are refused. One sample moves the model by at most R."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdp
from helpers import assert_close, clipped_sum_reference, dp_sgd, flat_params, small_mlp

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier")


def test_input_gradient_pass_is_not_a_micro_batch():
    """FGSM: torch.autograd.grad(loss, x) never touches .grad in PyTorch; it must not add to the step."""
    m, R = small_mlp(), 0.1
    x, y = torch.randn(6, 4, dtype=torch.float64) * 5, torch.randint(0, 3, (6,))
    opt = dp_sgd(m, R, B=6)
    xr = x.clone().requires_grad_()
    gx, = torch.autograd.grad(F.cross_entropy(m(xr), y, reduction="sum"), xr)
    assert opt.engine.num_backward == 0 and opt.engine.num_samples == 0
    x_adv = (x + 0.1 * gx.sign()).detach()
    F.cross_entropy(m(x_adv), y, reduction="sum").backward()
    assert opt.engine.num_backward == 1 and opt.engine.num_samples == 6
    ref, _ = clipped_sum_reference(m, lambda o, t: F.cross_entropy(o, t, reduction="sum"), x_adv, y, max_grad_norm=R)
    named = dict(m.named_parameters())
    for n, v in ref.items():
        assert_close(opt.engine.summed[named[n]], v, 1e-9, 1e-14, n)
    opt.detach()


@pytest.mark.parametrize("how", ["autograd.grad", "backward(inputs=[x])"])
def test_one_sample_with_an_input_gradient_pass_moves_by_at_most_R(how):
    m, R = small_mlp(), 0.1
    x, y = torch.randn(1, 4, dtype=torch.float64) * 10, torch.randint(0, 3, (1,))
    opt = dp_sgd(m, R)
    xr = x.clone().requires_grad_()
    if how == "autograd.grad":
        gx, = torch.autograd.grad(F.cross_entropy(m(xr), y), xr)
    else:
        F.cross_entropy(m(xr), y).backward(inputs=[xr])
        gx = xr.grad
    F.cross_entropy(m((x + 0.1 * gx.sign()).detach()), y).backward()
    before = flat_params(m)
    opt.step()
    assert (flat_params(m) - before).norm() <= R + 1e-12  # (2R if the input-gradient pass counted as a micro-batch)
    opt.detach()


def test_input_gradient_then_parameter_backward_on_one_retained_graph_clips_once():
    """autograd.grad(loss, x, retain_graph=True) then loss.backward(): one micro-batch, clipped once."""
    m, R = small_mlp(), 0.1
    x, y = torch.randn(1, 4, dtype=torch.float64, requires_grad=True) * 10, torch.randint(0, 3, (1,))
    opt = dp_sgd(m, R)
    loss = F.cross_entropy(m(x), y)
    torch.autograd.grad(loss, x, retain_graph=True)
    loss.backward()
    assert opt.engine.num_backward == 1
    before = flat_params(m)
    opt.step()
    assert (flat_params(m) - before).norm() <= R + 1e-12
    opt.detach()


def test_retained_graph_replay_is_refused():
    m, R = small_mlp(), 0.1
    x, y = torch.randn(1, 4, dtype=torch.float64) * 10, torch.randint(0, 3, (1,))
    opt = dp_sgd(m, R)
    out = m(x)
    l1, l2 = F.cross_entropy(out, y), 0.5 * F.cross_entropy(out, y)
    l1.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="clipped twice"):
        l2.backward()
    assert opt.engine.num_backward == 1
    before = flat_params(m)
    opt.step()
    assert (flat_params(m) - before).norm() <= R + 1e-12  # (2R if the replay clipped the same sample again)
    opt.zero_grad()
    out = m(x)  # the supported way: one backward of the summed losses
    (F.cross_entropy(out, y) + 0.5 * F.cross_entropy(out, y)).backward()
    before = flat_params(m)
    opt.step()
    assert (flat_params(m) - before).norm() <= R + 1e-12
    opt.detach()


def test_micro_batches_add_their_clipped_sums():
    m, R = small_mlp(), 0.05
    loss = lambda o, t: F.cross_entropy(o, t, reduction="sum")  # noqa: E731
    x1, y1 = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    x2, y2 = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    ref1, _ = clipped_sum_reference(m, loss, x1, y1, max_grad_norm=R)
    ref2, _ = clipped_sum_reference(m, loss, x2, y2, max_grad_norm=R)
    opt = dp_sgd(m, R, B=8)
    loss(m(x1), y1).backward()
    loss(m(x2), y2).backward()
    assert opt.engine.num_backward == 2 and opt.engine.num_samples == 8
    named = dict(m.named_parameters())
    for n in ref1:
        assert_close(opt.engine.summed[named[n]], ref1[n] + ref2[n], 1e-9, 1e-14, n)
    opt.detach()


def test_create_graph_is_refused():
    """A gradient penalty's second-order terms would be silently missing: refused."""
    m = small_mlp()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(fastdp.UnsupportedLayerError, match="create_graph"):
        torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    eng.detach()


def test_autograd_grad_with_respect_to_parameters_is_refused():
    """Parameters are not in the graph under the engine: PyTorch refuses, nothing is recorded."""
    m = small_mlp()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(m(torch.randn(3, 4, dtype=torch.float64)).pow(2).sum(), list(m.parameters()))
    assert eng.num_backward == 0
    eng.detach()


def test_two_backward_passes_through_one_forward_are_refused():
    """Two heads on one forward, each loss backpropagated on its own (retain_graph): the second pass reaches other
    parameters than the first, but the same samples; each would be clipped once per pass (sqrt(2) R for one
    sample). Refused; a sum of the losses in one backward, and micro-batches of separate forwards, are fine."""
    torch.manual_seed(0)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk, self.h1, self.h2 = nn.Linear(4, 4), nn.Linear(4, 1), nn.Linear(4, 1)
            self.trunk.requires_grad_(False)

        def forward(self, x):
            h = self.trunk(x)
            return self.h1(h), self.h2(h)

    m = TwoHeads().double()
    opt = dp_sgd(m, R=0.1)
    a, b = m(torch.randn(1, 4, dtype=torch.float64) * 100)
    a.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already clipped in an earlier backward"):
        b.sum().backward()
    opt.zero_grad()
    before = flat_params(m)
    a, b = m(torch.randn(1, 4, dtype=torch.float64) * 100)
    (a.sum() + b.sum()).backward()
    opt.step()
    assert (flat_params(m) - before).norm() <= 0.1 * (1 + 1e-9)
    opt.zero_grad()
    for _ in range(2):  # two micro-batches: two forwards
        a, b = m(torch.randn(1, 4, dtype=torch.float64))
        (a.sum() + b.sum()).backward()
    assert opt.engine.num_backward == 2
    opt.detach()
