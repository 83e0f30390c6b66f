"""Masks before clipping: norms of masked per-sample gradients, clipped sums on the mask, noise on the mask only."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdp
from fastdp.grad_sample import NormRule
from fastdp.masks import Mask
from fastdp.models import SmallCNN, TinyTransformer, lm_loss
from helpers import assert_close, count_launches, per_sample_grads


def masked_reference(model, loss_fn, masks, x, y, R):
    """torch.func per-sample gradients, masked, then flat-clipped and summed."""
    g = per_sample_grads(model, loss_fn, x, y)
    named = dict(model.named_parameters())
    g = {n: v * masks[named[n]].dense if named[n] in masks else v for n, v in g.items()}
    norms = torch.cat([v.flatten(1) for v in g.values()], 1).norm(dim=1)
    c = (R / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", c, v) for n, v in g.items()}, norms


def random_masks(model, kind, density=0.3):
    torch.manual_seed(5)
    masks = {}
    for n, p in model.named_parameters():
        if kind == "rows" and p.dim() > 1:
            rows = torch.randperm(p.shape[0])[:max(1, int(density * p.shape[0]))]
            masks[p] = Mask.from_rows(p, rows)
        elif kind == "coords":
            masks[p] = Mask.from_coords(torch.rand(p.shape) < density)
    return masks


@pytest.mark.parametrize("kind", ["rows", "coords"])
@pytest.mark.parametrize("mode", ["ghost", "direct"])
@pytest.mark.parametrize("model_name", ["cnn", "transformer"])
def test_masked_clipped_sum_matches_reference(kind, mode, model_name, monkeypatch):
    monkeypatch.setattr(NormRule, "mode", mode)
    if model_name == "cnn":
        model = SmallCNN(1, 4, width=8, image_size=8).double()
        x, y, loss = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (6,)), F.cross_entropy
    else:
        model = TinyTransformer(vocab=23, d=16, layers=1, heads=2, max_len=8).double()
        x, y, loss = torch.randint(0, 23, (4, 7)), torch.randint(0, 23, (4, 7)), lm_loss
    masks = random_masks(model, kind)
    ref, norms = masked_reference(model, loss, masks, x, y, 0.05)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(0.05))
    for p, m in masks.items():
        eng.set_mask(p, m)
    loss(model(x), y).backward()
    eng.detach()
    assert_close(eng.last_norms, norms, 1e-9, 1e-12, "norms")
    named = dict(model.named_parameters())
    for n, v in ref.items():
        assert_close(eng.summed[named[n]], v, 1e-9, 1e-12 * max(1.0, v.abs().max().item()), n)


def test_row_masks_keep_ghost_norms_on_the_selected_rows():
    """A row mask on a Linear layer restricts the output gradient to the selected rows (no per-sample tiles)."""
    m = nn.Linear(6, 10)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    eng.set_mask(m.weight, Mask.from_rows(m.weight, [1, 4, 7]))
    seen = []
    orig = eng._apply_mask
    eng._apply_mask = lambda g: seen.append(orig(g)) or seen[-1]
    m(torch.randn(3, 5, 6)).sum().backward()
    w = next(g for g in seen if g.param is m.weight)
    assert type(w).__name__ == "LinearGrad" and w.rows.tolist() == [1, 4, 7]
    eng.detach()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
@pytest.mark.parametrize("standardise", [False, True])
def test_coordinate_masks_on_linear_layers_form_no_per_sample_gradients(backend, standardise, monkeypatch):
    """Coordinate masks (RS) and standardisation (AdaDPIGU) on Linear weights: masked direct norm + one GEMM."""
    from fastdp.grad_sample import LinearGrad, MaskedLinearGrad

    monkeypatch.setenv("FASTDP_BACKEND", backend)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 4))
    x, y = torch.randn(5, 3, 7), torch.randint(0, 4, (5, 3))

    def loss_fn(out, y):
        return F.cross_entropy(out.reshape(-1, 4), y.reshape(-1))

    masks = {}
    for p in model.parameters():
        m = torch.rand(p.shape) < 0.4
        if standardise:
            masks[p] = Mask.from_coords(m, center=0.01 * torch.randn(p.shape), scale=torch.rand(p.shape) + 0.5)
        else:
            masks[p] = Mask.from_coords(m)
    # reference: explicit per-sample gradients, standardised ((g - a) / b, the engine's convention), masked
    g = per_sample_grads(model, loss_fn, x, y)
    named = dict(model.named_parameters())
    w = {}
    for n, v in g.items():
        mk = masks[named[n]]
        w[n] = ((v - mk.center) / mk.scale if standardise else v) * mk.dense
    norms = torch.cat([v.flatten(1) for v in w.values()], 1).norm(dim=1)
    c = (0.3 / (norms + 1e-6)).clamp(max=1.0)
    monkeypatch.setattr(LinearGrad, "materialize", lambda self: pytest.fail("per-sample gradients materialised"))
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(0.3))
    for p, m in masks.items():
        eng.set_mask(p, m)
    seen = []
    orig = eng._apply_mask
    eng._apply_mask = lambda gr: seen.append(orig(gr)) or seen[-1]
    loss_fn(model(x), y).backward()
    eng.detach()
    assert sum(isinstance(s, MaskedLinearGrad) for s in seen) == 2  # both weights
    assert_close(eng.last_norms, norms, 1e-5, 1e-7, "norms")
    for n, v in w.items():
        assert_close(eng.summed[named[n]], torch.einsum("b,b...->...", c, v), 1e-4, 1e-6, n)


@pytest.mark.parametrize("kind", ["rows", "coords"])
def test_masked_coordinates_never_move(kind):
    torch.manual_seed(0)
    model = SmallCNN(1, 3, width=8, image_size=8)
    masks = random_masks(model, kind, density=0.5)
    opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.0), noise_multiplier=2.0,
                             max_grad_norm=1.0, expected_batch_size=8, sample_size=80,
                             generator=torch.Generator().manual_seed(0))
    for p, m in masks.items():
        opt.engine.set_mask(p, m)
    before = {p: p.detach().clone() for p in model.parameters()}
    for _ in range(3):
        F.cross_entropy(model(torch.randn(8, 1, 8, 8)), torch.randint(0, 3, (8,))).backward()
        opt.step()
        opt.zero_grad()
    for p, m in masks.items():
        assert torch.equal(p[~m.dense], before[p][~m.dense])
        assert not torch.equal(p[m.dense], before[p][m.dense])  # and the mask trains (noise at least)


@pytest.mark.parametrize("model_name", ["linear", "conv"])
def test_empty_row_mask_gives_zero_gradient_and_no_error(model_name):
    """No row kept (e.g. a global top-k over layers): an all-False mask, the parameter gets exactly zero gradient
    and noise, where the row-restricted kernels failed on zero rows."""
    torch.manual_seed(0)
    if model_name == "conv":
        model, x = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(64, 3)), torch.randn(2, 1, 6, 6)
    else:
        model, x = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)), torch.randn(2, 6)
    p = model[0].weight
    mask = Mask.from_rows(p, torch.tensor([], dtype=torch.long))
    assert not mask.dense.any() and mask.density == 0.0
    opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                             max_grad_norm=1.0, expected_batch_size=2, sample_size=4,
                             generator=torch.Generator().manual_seed(0))
    opt.engine.set_mask(p, mask)
    before = p.detach().clone()
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    opt.step()
    assert torch.equal(p.grad, torch.zeros_like(p)) and torch.equal(p, before)
    assert model[2].weight.grad.abs().sum() > 0


def test_bad_masks():
    p = nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError):
        Mask.from_rows(p, [5])
    with pytest.raises(TypeError):
        Mask.from_coords(torch.ones(4, 3))
    m = nn.Linear(3, 4)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(ValueError):
        eng.set_mask(m.weight, Mask.from_coords(torch.ones(3, 4, dtype=torch.bool)))
    with pytest.raises(KeyError):
        eng.set_mask(p, Mask.from_coords(torch.ones(4, 3, dtype=torch.bool)))
    eng.detach()


def test_standardised_masks_on_tied_weights():
    """AdaDPIGU-style ``M (g - a) / b`` on a tied embedding / LM head: the uses are summed before standardising."""
    torch.manual_seed(7)
    model = TinyTransformer(vocab=19, d=16, layers=1, heads=2, max_len=8).double()
    x, y = torch.randint(0, 19, (4, 7)), torch.randint(0, 19, (4, 7))
    masks = {p: Mask.from_coords(torch.rand(p.shape) < 0.5, center=0.01 * torch.randn(p.shape, dtype=torch.float64),
                                 scale=torch.rand(p.shape, dtype=torch.float64) + 0.5) for p in model.parameters()}
    g = per_sample_grads(model, lm_loss, x, y)
    named = dict(model.named_parameters())
    w = {n: (v - masks[named[n]].center) / masks[named[n]].scale * masks[named[n]].dense for n, v in g.items()}
    norms = torch.cat([v.flatten(1) for v in w.values()], 1).norm(dim=1)
    c = (0.2 / (norms + 1e-6)).clamp(max=1.0)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(0.2))
    for p, m in masks.items():
        eng.set_mask(p, m)
    lm_loss(model(x), y).backward()
    eng.detach()
    assert_close(eng.last_norms, norms, 1e-9, 1e-12, "norms")
    for n, v in w.items():
        assert_close(eng.summed[named[n]], torch.einsum("b,b...->...", c, v), 1e-9, 1e-12, n)


@pytest.mark.interpreter
@pytest.mark.parametrize("kind", ["rows", "coords"])
def test_masked_noise_kernel_path_in_the_optimizer(kind, monkeypatch):
    """With the Philox masked-noise kernel (forced; interpreter on the CPU): noise only on kept coordinates, exactly
    zero elsewhere, std sigma * R / B on the kept ones, reproducible from the generator and across a checkpoint."""
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 60), nn.Tanh(), nn.Linear(60, 30))
    masks = random_masks(model, kind, density=0.5)
    x = torch.randn(4, 40)

    def make(seed=3):
        opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=2.0,
                                 max_grad_norm=1e-3, expected_batch_size=4, sample_size=40,
                                 generator=torch.Generator().manual_seed(seed))
        for p, m in masks.items():
            opt.engine.set_mask(p, m)
        return opt

    def noisy_grads(opt, detach=True):
        model(x).sum().backward()
        opt.pre_step()
        grads = opt.clipped_sums()
        opt.add_noise(grads)
        out = {p: v.clone() for p, v in grads.views.items()}
        opt.engine.reset()
        if detach:  # the next optimizer built on the same model attaches its own engine
            opt.detach()
        return out

    opt = make()
    calls = count_launches(monkeypatch, "masked_noise", "_masked_noise_kernel")
    g1 = noisy_grads(opt)
    assert len(calls) == 1  # one launch over the whole flat buffer
    kept = torch.cat([masks[p].dense.flatten() if p in masks else torch.ones(p.numel(), dtype=torch.bool)
                      for p in g1])
    vals = torch.cat([v.flatten() for v in g1.values()])
    assert (vals[~kept] == 0).all()  # masked coordinates: exactly zero (no noise, no gradient)
    std = vals[kept].std().item()  # R tiny: the kept values are noise, std sigma * R = 2e-3 (scaling by 1/B later)
    assert abs(std / 2e-3 - 1) < 0.1
    # reproducible from the generator; a different seed differs
    assert all(torch.equal(a, b) for a, b in zip(g1.values(), noisy_grads(make()).values()))
    assert not all(torch.equal(a, b) for a, b in zip(g1.values(), noisy_grads(make(seed=4)).values()))
    # resumed from a checkpoint: the next step's noise equals the uninterrupted run's
    a = make()
    noisy_grads(a, detach=False)
    state = a.state_dict()
    expected = noisy_grads(a)
    b = make(seed=99)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected.values(), noisy_grads(b).values()))


def test_set_mask_between_backward_and_step_is_refused():
    """Masks act on the clipped sums at backward and on the noise at step: changing one in between could release
    coordinates the old mask kept without noise (the masked-noise path). Refused; after step() it is fine."""
    import warnings

    m = torch.nn.Linear(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                                 expected_batch_size=4, sample_size=40)
    opt.engine.set_mask(m.weight, Mask.from_rows(m.weight, [0, 1, 2]))
    m(torch.randn(4, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="between backward"):
        opt.engine.set_mask(m.weight, Mask.from_rows(m.weight, [3, 4]))
    opt.step()
    opt.zero_grad()
    opt.engine.set_mask(m.weight, Mask.from_rows(m.weight, [3, 4]))


def test_row_selector_and_standardisation_shapes():
    w = torch.randn(6, 4)
    sel = torch.tensor([False, False, False, True, False, True])
    assert torch.equal(Mask.from_rows(w, sel).rows, torch.tensor([3, 5]))  # (was [0, 1]: the bools as indices)
    with pytest.raises(ValueError, match="row selector"):
        Mask.from_rows(w, sel[:4])
    bad = Mask.from_coords(torch.ones(6, 4, dtype=torch.bool), torch.zeros(4), torch.ones(6, 4))
    with pytest.raises(ValueError, match="center of shape"):
        bad.check(w)
