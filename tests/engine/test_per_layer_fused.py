"""Per-layer clipping fused into backward: each parameter is clipped and accumulated as soon as its gradient is
complete (its activations freed there), with the same result as clipping at the end of backward."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdp
from fastdp.engine import NonFiniteNormError
from fastdp.models import MLP, SmallCNN, TinyTransformer
from helpers import assert_close, per_sample_grads, tiny_hf_gpt2


def ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def thresholds(model, scale=0.05):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [scale * (1 + (i % 3)) for i in range(len(named))]


def make(model, fused=True, sigma=0.0, B=6, R=None):
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.warns(UserWarning):  # noise_multiplier=0 warns
        return fastdp.DPOptimizer(model, sgd, noise_multiplier=sigma, max_grad_norm=R or thresholds(model),
                                  expected_batch_size=B, sample_size=100 * B, clipping="per_layer",
                                  fused_per_layer=fused)


def per_layer_reference(model, loss_fn, x, y, R):
    """{name: sum_i c_i g_i} with one threshold per parameter, from torch.func per-sample gradients."""
    g = per_sample_grads(model, loss_fn, x, y)
    out = {}
    for (n, v), r in zip(g.items(), R):
        c = (r / (v.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1.0)
        out[n] = torch.einsum("b,b...->...", c, v)
    return out


def n_clipped_in_backward(model):
    """Parameters clipped inside backward: all but the small explicit ones (biases, norm affines: 1-D here), which
    are batched at the end of backward."""
    return sum(1 for p in model.parameters() if p.dim() > 1)


def summed_by_name(model, opt):
    named = dict(model.named_parameters())
    return {n: opt.engine.summed[p].clone() for n, p in named.items() if p in opt.engine.summed}


def cases():
    torch.manual_seed(0)
    tiny = TinyTransformer(vocab=17, d=16, layers=2, heads=2, max_len=8).double()  # tied embedding / head
    cnn = SmallCNN(in_channels=1, num_classes=5, width=4, image_size=8).double()
    return [
        ("mlp", MLP(5, 3, hidden=(7, 4)).double(), torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))),
        ("cnn", cnn, torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))),
        ("tied-transformer", tiny, torch.randint(0, 17, (6, 8)), torch.randint(0, 17, (6, 8))),
    ]


@pytest.mark.parametrize("name,model,x,y", cases(), ids=[c[0] for c in cases()])
def test_fused_per_layer_matches_reference_and_end_of_backward(name, model, x, y):
    R = thresholds(model)
    ref = per_layer_reference(model, ce, x, y, R)
    results = {}
    for fused in (True, False):
        opt = make(model, fused=fused, R=R)
        assert opt.engine.fused_per_layer is fused
        ce(model(x), y).backward()
        results[fused] = summed_by_name(model, opt)
        assert opt.engine.last_fused == (n_clipped_in_backward(model) if fused else 0)
        assert len(opt.engine.last_factors) == len(results[fused])
        opt.detach()
    assert set(results[True]) == set(ref)
    for n, v in ref.items():
        assert_close(results[True][n], v, 1e-9, 1e-12, n)
        assert_close(results[True][n], results[False][n], 1e-12, 1e-14, n)


def test_fused_clips_each_parameter_during_backward_and_frees_its_activations():
    """When backward reaches the first layer's input, every weight has been clipped and its activations freed; only
    the biases' small [B, numel] per-sample gradients are held, for one batched clip at the end of backward."""
    torch.manual_seed(1)
    model = MLP(5, 3, hidden=(7, 4))
    x, y = torch.randn(6, 5, requires_grad=True), torch.randint(0, 3, (6,))
    seen = {}
    for fused in (True, False):
        opt = make(model, fused=fused)
        live = []
        submit = opt.engine.submit

        def counting_submit(grad, use=None, submit=submit, engine=opt.engine, live=live):
            submit(grad, use)
            live.append(sum(len(v) for v in engine._ready.values()))

        opt.engine.submit = counting_submit
        xi = x.detach().clone().requires_grad_()
        xi.register_hook(lambda g, e=opt.engine, f=fused: seen.__setitem__(f, (len(e._ready), len(e.pass_.sq))))
        ce(model(xi), y).backward()
        seen[(fused, "peak")] = max(live)
        opt.detach()
    n_params, n_weights = len(list(model.parameters())), n_clipped_in_backward(model)
    assert seen[True] == (n_params - n_weights, n_weights)  # weights clipped before backward ended
    assert seen[False] == (n_params, 0)  # all waiting for the end of backward
    assert seen[(True, "peak")] == n_params - n_weights  # held after each submit: biases only
    assert seen[(False, "peak")] == n_params


def test_step_with_fused_per_layer_bounds_each_sample_and_layer():
    torch.manual_seed(2)
    model = SmallCNN(in_channels=1, num_classes=5, width=4, image_size=8).double()
    R = thresholds(model, 0.01)
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    g = per_sample_grads(model, ce, x, y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = make(model, R=R)
    ce(model(x), y).backward()
    for (n, p), r in zip(model.named_parameters(), R):
        norms = g[n].flatten(1).norm(dim=1)
        assert (opt.engine.last_factors[p] * norms <= r).all(), n
    opt.step()
    for (n, p), r in zip(model.named_parameters(), R):  # lr 1, sigma 0: each layer moves by at most R_k
        assert (before[n] - p.detach()).norm() <= r + 1e-12, n
    assert math.isclose(opt.noise_std(), 0.0)


def test_unused_graph_and_retained_graph():
    """Uses recorded by a forward that never runs backward stop counting when its graph is freed; while it is
    alive, those parameters are clipped at the end of backward instead (same result). A retained graph run backward
    again is refused."""
    torch.manual_seed(3)
    model = MLP(5, 3, hidden=(7,)).double()
    R = thresholds(model)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    ref = per_layer_reference(model, ce, x, y, R)
    opt = make(model, R=R)
    model(torch.randn(4, 5, dtype=torch.float64)).sum()  # evaluated with grad on, graph dropped at once
    kept = model(torch.randn(4, 5, dtype=torch.float64))  # graph kept alive across the training backward
    ce(model(x), y).backward()
    assert opt.engine.last_fused == 0 and opt.engine.num_backward == 1  # nothing fused: uses still pending
    for n, p in model.named_parameters():
        assert_close(opt.engine.summed[p], ref[n], 1e-9, 1e-12, n)
    del kept
    opt.zero_grad()
    ce(model(x), y).backward()  # now every use arrives: fused
    assert opt.engine.last_fused == n_clipped_in_backward(model)
    assert len(opt.engine.last_factors) == len(list(model.parameters()))
    for n, p in model.named_parameters():
        assert_close(opt.engine.summed[p], ref[n], 1e-9, 1e-12, n)
    # a retained graph run backward twice would clip the same samples twice (contribution 2R): refused; the first
    # pass's sums are kept
    opt.zero_grad()
    loss = ce(model(x), y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="clipped twice"):
        loss.backward()
    assert opt.engine.num_backward == 1
    for n, p in model.named_parameters():
        assert_close(opt.engine.summed[p], ref[n], 1e-9, 1e-12, n)


class FailingNet(nn.Module):
    """Two linear layers; with ``fail`` set, backward raises between them (after the second is accumulated)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.fail = nn.Linear(5, 7), nn.Linear(7, 3), False

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        if self.fail:
            h.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("boom")))
        return self.l2(h)


def test_failed_backward_after_partial_accumulation():
    torch.manual_seed(4)
    model = FailingNet().double()
    R = thresholds(model)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    ref = per_layer_reference(model, ce, x, y, R)
    opt = make(model, R=R)

    def failing_backward():
        model.fail = True
        with pytest.raises(RuntimeError, match="boom"):
            ce(model(x), y).backward()
        model.fail = False
        assert opt.engine.pass_.sq  # the second layer was accumulated before the failure

    # first micro-batch fails after the last layer was accumulated: dropped, the next pass starts clean
    failing_backward()
    ce(model(x), y).backward()
    for n, p in model.named_parameters():
        assert_close(opt.engine.summed[p], ref[n], 1e-9, 1e-12, n)
    # a failure on top of an earlier micro-batch cannot be undone: step refuses until zero_grad
    failing_backward()
    ce(model(x), y).backward()
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.step()
    opt.zero_grad()
    ce(model(x), y).backward()
    for n, p in model.named_parameters():
        assert_close(opt.engine.summed[p], ref[n], 1e-9, 1e-12, n)
    opt.step()


def test_non_finite_norm_with_fused_per_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = make(model)
    x = torch.randn(5, 3)
    x[2] = float("inf")
    with pytest.raises(NonFiniteNormError, match="samples"):
        model(x).sum().backward()
    opt.zero_grad()
    model(torch.randn(5, 3)).sum().backward()
    assert all(torch.isfinite(v).all() for v in opt.engine.summed.values())
    opt.step()


def test_fused_per_layer_needs_a_per_layer_rule():
    with pytest.raises(ValueError, match="per-parameter"):
        fastdp.GradSampleEngine(nn.Linear(2, 2), fastdp.FlatClip(1.0), fused_per_layer=True)
    model = nn.Linear(2, 2)
    opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0,
                             expected_batch_size=4, sample_size=40)
    assert opt.engine.fused_per_layer is False  # flat clipping must wait for every layer


def test_fused_per_layer_on_hf_gpt2_with_tied_and_shared_position_embeddings():
    model = tiny_hf_gpt2(vocab=37, seed=5)
    idx = torch.randint(0, 37, (4, 9))
    results = {}
    for fused in (True, False):
        opt = make(model, fused=fused, B=4)
        out = model(idx).logits
        ce(out[:, :-1], idx[:, 1:]).backward()
        results[fused] = summed_by_name(model, opt)
        assert len(opt.engine.last_factors) == len(results[fused])
        assert opt.engine.last_fused == (n_clipped_in_backward(model) if fused else 0)
        opt.detach()
    for name, v in results[False].items():
        assert_close(results[True][name], v, 1e-12, 1e-14, name)


class ScaledInput(nn.Module):
    """An elementwise parameter above the small-parameter size (explicit per-sample gradients via broadcasting)
    next to a small one."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(n, dtype=torch.float64))
        self.shift = nn.Parameter(0.1 * torch.randn(3, dtype=torch.float64))
        self.head = nn.Linear(n, 3).double()

    def forward(self, x):
        return self.head(x * self.scale) + self.shift


def test_large_explicit_gradients_are_clipped_in_backward_small_ones_batched():
    from fastdp.small_params import SMALL_NUMEL

    torch.manual_seed(4)
    model = ScaledInput(SMALL_NUMEL + 5)
    x, y = torch.randn(3, SMALL_NUMEL + 5, dtype=torch.float64), torch.randint(0, 3, (3,))
    R = thresholds(model)
    ref = per_layer_reference(model, ce, x, y, R)
    opt = make(model, R=R, B=3)
    ce(model(x), y).backward()
    # scale (large, explicit) and head.weight clipped inside backward; head.bias and shift batched at the end
    assert opt.engine.last_fused == 2
    for n, p in model.named_parameters():
        assert_close(opt.engine.summed[p], ref[n], 1e-9, 1e-12, n)


@pytest.mark.interpreter
@pytest.mark.parametrize("name", ["mlp", "cnn", "tied-transformer"])
def test_fused_per_layer_with_the_triton_kernels(name, monkeypatch):
    """fp32 models, every kernel forced (interpreter on the CPU): the per-layer clipped sums formed inside backward
    by the norm, factor and clip-accumulate kernels match torch.func's per-sample gradients."""
    from helpers import count_launches
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    sums = count_launches(monkeypatch, "clip_accumulate", "_clip_accumulate_kernel")
    sums += count_launches(monkeypatch, "conv_clip_accumulate", "_conv_clip_accumulate_kernel")
    factors = count_launches(monkeypatch, "clip_factor", "_clip_factor_kernel")
    _, model, x, y = next(c for c in cases() if c[0] == name)
    model = model.float()
    x = x.float() if x.is_floating_point() else x
    R = thresholds(model)
    ref = per_layer_reference(model, ce, x, y, R)
    opt = make(model, R=R)
    ce(model(x), y).backward()
    got = summed_by_name(model, opt)
    assert opt.engine.last_fused == n_clipped_in_backward(model)
    assert len(factors) == n_clipped_in_backward(model) and len(sums) > 0
    model_max = max(v.abs().max().item() for v in ref.values())  # (conv biases before GroupNorm: gradients ~0)
    for n, v in ref.items():
        assert_close(got[n], v, 1e-4, 1e-5 * model_max, n)
    opt.detach()
