"""AdaDPIGU (DP-valid form): importance from released gradients, global top-k mask, standardised clipping,
AdaCliP statistics from released gradients, progressive unfreezing, accounting, checkpoints."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdp.accounting import epsilon_of, make_accountant
from fastdp.methods.adadpigu import AdaDPIGU, global_topk_masks, retained_count
from fastdp.models import MLP
from helpers import assert_close, per_sample_grads

no_noise_warning = pytest.mark.filterwarnings("ignore:noise_multiplier=0")


def ce_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def make(model, *, lr=0.5, momentum=0.0, sigma=1.0, R=0.5, B=8, n=80, steps_per_epoch=2, pretrain_epochs=1,
         retention=0.5, seed=0, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return AdaDPIGU(model, opt, retention=retention, pretrain_epochs=pretrain_epochs, noise_multiplier=sigma,
                    max_grad_norm=R, expected_batch_size=B, sample_size=n, steps_per_epoch=steps_per_epoch,
                    generator=torch.Generator().manual_seed(seed), **kw)


def batches(k, in_features=5, classes=3, size=6, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, in_features, generator=g, dtype=dtype), torch.randint(0, classes, (size,), generator=g))
            for _ in range(k)]


def one_step(opt, model, x, y, loss=F.cross_entropy):
    """Forward, backward, step; returns the released gradients (clones of p.grad) by name."""
    loss(model(x), y).backward()
    opt.step()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    return grads


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return MLP(5, 3, hidden=(4,)).to(dtype)  # d = 5*4 + 4 + 4*3 + 3 = 39


def flat(d):
    return torch.cat([v.flatten() for v in d.values()])


# (a) -------------------------------------------------------------------------------------------------------
def test_pretrain_has_no_mask_and_importance_sums_released_abs_gradients():
    model = mlp()
    opt = make(model, pretrain_epochs=2, steps_per_epoch=3)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in batches(6):
        assert opt.phase == "pretrain" and opt.masks == {} and not opt.engine.masks
        for n, g in one_step(opt, model, x, y).items():
            total[n] += g.abs()
    for n, v in total.items():
        assert torch.equal(opt.importance[n], v), n
    assert opt.phase == "sparse"


# (b) -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("retention", [0.3, 0.6, 1.0])
def test_mask_after_pretraining_keeps_the_top_ceil_r_d_coordinates(retention):
    model = mlp()
    opt = make(model, retention=retention, unfreeze_epochs=0)
    for x, y in batches(2):
        one_step(opt, model, x, y)
    assert opt.phase == "sparse"
    names = [n for n, _ in model.named_parameters()]
    d = sum(p.numel() for p in model.parameters())
    mask = torch.cat([opt.masks[n].flatten() for n in names])
    imp = torch.cat([opt.importance[n].flatten() for n in names])
    assert int(mask.sum()) == math.ceil(retention * d)
    if retention < 1:
        assert imp[mask].min() >= imp[~mask].max()
    # the engine clips with these masks, standardised by the initial a = 0, b = 1
    for p in model.parameters():
        m = opt.engine.masks[p]
        assert torch.equal(m.dense, opt.masks[opt.param_name[p]]) and m.standardizes
        assert not m.center.any() and torch.equal(m.scale, torch.ones_like(m.scale))


def test_global_topk_is_global_with_ties_broken_by_position():
    scores = [torch.tensor([[1.0, 3.0], [2.0, 2.0]]), torch.tensor([2.0, 5.0, 0.0])]
    got = global_topk_masks(scores, 4)  # 5, 3, then two of the three 2.0s: the first two in order
    assert got[0].tolist() == [[False, True], [True, True]] and got[1].tolist() == [False, True, False]
    got = global_topk_masks(scores, 5)
    assert got[0].tolist() == [[False, True], [True, True]] and got[1].tolist() == [True, True, False]
    assert sum(int(m.sum()) for m in global_topk_masks(scores, 0)) == 0
    assert sum(int(m.sum()) for m in global_topk_masks(scores, 7)) == 7
    assert retained_count(0.07, 100) == 7 and retained_count(0.61, 10) == 7 and retained_count(1.0, 39) == 39


# (c) -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_masked_coordinates_never_move_in_the_sparse_phase(momentum):
    """With momentum, the pre-training state is dropped at the switch, so masked coordinates stay put too."""
    model = mlp()
    opt = make(model, momentum=momentum, sigma=2.0, unfreeze_step=0.1, unfreeze_epochs=1)
    data = batches(7)
    for x, y in data[:2]:
        one_step(opt, model, x, y)
    for x, y in data[2:]:
        masks = {n: m.clone() for n, m in opt.masks.items()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = one_step(opt, model, x, y)
        for n, p in model.named_parameters():
            m = masks[n]
            assert not grads[n][~m].any(), n
            assert torch.equal(p.detach()[~m], before[n][~m]), n
            assert (p.detach()[m] != before[n][m]).all(), n


# (d) -------------------------------------------------------------------------------------------------------
@no_noise_warning
@pytest.mark.parametrize("reduction, clipping", [("mean", "flat"), ("sum", "flat"), ("mean", "automatic")])
def test_sparse_step_matches_reference(reduction, clipping):
    """sigma = 0: the released gradient is M * (b * sum_i clip(M * (g_i - a) / b) / B + a) with a, b of the step.

    Actual batch 6, expected batch 8; a != 0 and b != 1 after two sparse steps."""
    model = mlp(torch.float64)
    R, B, gamma = 0.5, 8, 0.01
    opt = make(model, sigma=0.0, R=R, B=B, betas=(0.5, 0.5), unfreeze_epochs=0, loss_reduction=reduction,
               clipping=clipping, gamma=gamma)
    loss = F.cross_entropy if reduction == "mean" else ce_sum
    data = batches(5, dtype=torch.float64)
    for x, y in data[:4]:
        one_step(opt, model, x, y, loss)
    assert opt.phase == "sparse"
    stats = {n: {k: v.clone() for k, v in s.items()} for n, s in opt.statistics.items()}
    masks = {n: m.clone() for n, m in opt.masks.items()}
    assert all(s["a"][masks[n]].abs().min() > 0 and (s["b"][masks[n]] != 1).all() for n, s in stats.items())
    x, y = data[4]
    g = per_sample_grads(model, F.cross_entropy, x, y)
    w = {n: masks[n] * (v - stats[n]["a"]) / stats[n]["b"] for n, v in g.items()}
    norms = torch.cat([v.flatten(1) for v in w.values()], 1).norm(dim=1)
    c = (R / (norms + 1e-6)).clamp(max=1.0) if clipping == "flat" else R / (norms + gamma)
    expected = {n: masks[n] * (stats[n]["b"] * torch.einsum("b,b...->...", c, v) / B + stats[n]["a"])
                for n, v in w.items()}
    got = one_step(opt, model, x, y, loss)
    assert_close(opt.engine.last_norms, norms, 1e-10, 1e-12, "norms")
    for n, v in expected.items():
        assert_close(got[n], v, 1e-10, 1e-13, n)


# (e) -------------------------------------------------------------------------------------------------------
def test_adaclip_statistics_follow_the_update_from_released_gradients():
    model = mlp(torch.float64)
    sigma, R, B, (b1, b2), bounds = 1.3, 0.5, 8, (0.8, 0.7), (0.5, 1e4)
    opt = make(model, sigma=sigma, R=R, B=B, betas=(b1, b2), bounds=bounds, pretrain_noise_multiplier=0.7)
    data = batches(6, dtype=torch.float64)
    for x, y in data[:2]:
        one_step(opt, model, x, y)
    for x, y in data[2:]:
        old = {n: {k: v.clone() for k, v in s.items()} for n, s in opt.statistics.items()}
        masks = {n: m.clone() for n, m in opt.masks.items()}
        grads = one_step(opt, model, x, y)
        for n, st in opt.statistics.items():
            a, s, b, m, g = old[n]["a"], old[n]["s"], old[n]["b"], masks[n], grads[n]
            a_new = torch.where(m, b1 * a + (1 - b1) * g, a)
            s_new = torch.where(m, b2 * s + (1 - b2) * ((g - a) ** 2 - b ** 2 * sigma ** 2 * R ** 2 / B ** 2), s)
            assert_close(st["a"], a_new, 1e-12, 1e-15, n + ".a")
            assert_close(st["s"], s_new, 1e-12, 1e-15, n + ".s")
            assert_close(st["b"], s_new.clamp(*bounds).sqrt(), 1e-12, 1e-15, n + ".b")
    assert any((st["s"] < bounds[0]).any() for st in opt.statistics.values())  # the clamp was exercised


# (f) -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unfreeze_to, fractions", [(None, [0.5, 0.6, 0.7, 0.7]), (0.65, [0.5, 0.6, 0.65, 0.65])])
def test_progressive_unfreezing_adds_the_most_important_masked_coordinates(unfreeze_to, fractions):
    torch.manual_seed(0)
    model = nn.Linear(9, 10)  # d = 100
    opt = make(model, retention=0.5, unfreeze_step=0.1, unfreeze_epochs=2, unfreeze_to=unfreeze_to)
    data = batches(2 + 2 * len(fractions), in_features=9, classes=10)
    for x, y in data[:2]:
        one_step(opt, model, x, y)
    imp = flat(opt.importance)
    prev = None
    for e, r in enumerate(fractions):
        mask = flat(opt.masks)
        assert opt.retained_fraction == pytest.approx(r) and int(mask.sum()) == round(r * 100), e
        assert imp[mask].min() >= imp[~mask].max()
        if prev is not None:
            assert (mask >= prev).all()  # only adds
            added = mask & ~prev
            if added.any():
                assert imp[added].min() >= imp[~mask].max()  # the most important of the masked ones
        prev = mask
        for x, y in data[2 + 2 * e:4 + 2 * e]:
            one_step(opt, model, x, y)
    assert torch.equal(flat(opt.importance), imp)  # importance is frozen after pre-training


# (g) -------------------------------------------------------------------------------------------------------
def test_accounting_composes_the_two_sigmas():
    model = mlp()
    opt = make(model, sigma=1.0, pretrain_noise_multiplier=2.0, pretrain_epochs=2, steps_per_epoch=3,
               accountant="rdp")
    ref = make_accountant("rdp")
    for t, (x, y) in enumerate(batches(10)):
        assert opt.noise_multiplier == (2.0 if t < 6 else 1.0)
        ref.step(noise_multiplier=2.0 if t < 6 else 1.0, sample_rate=0.1)
        one_step(opt, model, x, y)
    assert opt.accountant.history == [(2.0, 0.1, 6), (1.0, 0.1, 4)]
    assert opt.epsilon(1e-5) == epsilon_of(ref, 1e-5)
    one_sigma = make_accountant("rdp")
    one_sigma.history = [(1.0, 0.1, 10)]
    assert opt.epsilon(1e-5) < epsilon_of(one_sigma, 1e-5)


# (h) -------------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_continues_identically():
    data = batches(9)
    model = mlp()
    opt = make(model, momentum=0.9, unfreeze_step=0.1, unfreeze_epochs=2, seed=3)
    for x, y in data[:5]:  # into the second sparse epoch (one growth done, one to come)
        one_step(opt, model, x, y)
    sd, model_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())

    model2 = mlp(seed=7)
    model2.load_state_dict(model_sd)
    opt2 = make(model2, momentum=0.9, unfreeze_step=0.1, unfreeze_epochs=2, seed=99)
    opt2.load_state_dict(sd)
    assert opt2.phase == "sparse" and opt2.retained_fraction == opt.retained_fraction
    for x, y in data[5:]:  # crosses an epoch boundary (the mask grows)
        g1, g2 = one_step(opt, model, x, y), one_step(opt2, model2, x, y)
        for n in g1:
            assert torch.equal(g1[n], g2[n]), n
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), n
        assert torch.equal(opt.masks[n], opt2.masks[n]) and torch.equal(opt.importance[n], opt2.importance[n])
        for k in "asb":
            assert torch.equal(opt.statistics[n][k], opt2.statistics[n][k]), (n, k)
    assert opt.accountant.history == opt2.accountant.history


# (i) -------------------------------------------------------------------------------------------------------
def test_deterministic_under_a_seeded_generator():
    def run(seed):
        model = mlp()
        opt = make(model, seed=seed, unfreeze_step=0.1, unfreeze_epochs=1)
        for x, y in batches(6):
            one_step(opt, model, x, y)
        return flat(dict(model.named_parameters())).detach(), flat(opt.importance), flat(opt.masks)

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(u, v) for u, v in zip(first, again))
    assert not torch.equal(first[0], other[0])


def test_rejected_configurations():
    model = mlp()
    with pytest.raises(ValueError, match="per-layer"):
        make(model, clipping="per_layer", R=[0.25] * 4)
    with pytest.raises(ValueError, match="pretrain_noise_multiplier"):
        AdaDPIGU(model, torch.optim.SGD(model.parameters(), lr=0.1), pretrain_epochs=1, pretrain_noise_multiplier=1.0,
                 target_epsilon=3.0, target_delta=1e-5, epochs=3, expected_batch_size=8, sample_size=80)
    for kw in ({"retention": 0.0}, {"pretrain_epochs": 0}, {"unfreeze_to": 0.4}, {"betas": (1.0, 0.9)},
               {"bounds": (0.0, 1.0)}):
        with pytest.raises(ValueError):
            make(model, **kw)
