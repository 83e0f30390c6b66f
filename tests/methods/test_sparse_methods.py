"""Sparse DP methods: phases, mask sizes and schedules, masked coordinates never move, selection sensitivity,
accounting of every phase, determinism."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastdp
from fastdp.methods import SPARTA, BiTFiT, LastLayer, RandomGroups, RandomSparsification
from fastdp.methods.baselines import keep_rows
from fastdp.models import SmallCNN
from helpers import tiny_hf_gpt2

B, N = 8, 40  # expected batch, dataset size: 5 steps per epoch


def model():
    torch.manual_seed(0)
    return SmallCNN(1, 3, width=8, image_size=8)


def dp(**kw):
    return dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B, sample_size=N,
                generator=torch.Generator().manual_seed(0), **kw)


def sgd(m, momentum=0.0):
    return torch.optim.SGD(m.parameters(), lr=0.5, momentum=momentum)


def train(m, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(B, 1, 8, 8, generator=g), torch.randint(0, 3, (B,), generator=g)
        F.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()


def snapshot(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def moved(m, before):
    return {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}


def check_accounting(opt, steps):
    assert opt.steps_taken == steps
    assert opt.epsilon(1e-5) == pytest.approx(fastdp.get_epsilon(
        noise_multiplier=opt.noise_multiplier, sample_rate=opt.sample_rate, steps=steps, delta=1e-5), rel=1e-9)


def test_bitfit_trains_biases_and_head_only_and_stores_no_weight_activations(monkeypatch):
    m = model()
    opt = BiTFiT(m, sgd(m), **dp())
    from fastdp.grad_sample import ConvGrad, LinearGrad
    made = []
    for cls in (LinearGrad, ConvGrad):
        orig = cls.set
        monkeypatch.setattr(cls, "set", lambda self, *a, _o=orig: made.append(self.param) or _o(self, *a))
    before = snapshot(m)
    train(m, opt, 3)
    head = "head.weight"
    assert moved(m, before) == {n for n in before if n.endswith("bias") or n == head}
    assert made == [m.head.weight] * 3  # the head weight only: frozen conv weights record nothing
    check_accounting(opt, 3)


def test_last_layer_trains_the_head_only():
    m = model()
    opt = LastLayer(m, sgd(m), **dp())
    before = snapshot(m)
    train(m, opt, 2)
    assert moved(m, before) == {"head.weight", "head.bias"}


def test_random_groups_masks_rows_at_the_sparsity():
    m = model()
    opt = RandomGroups(m, sgd(m), sparsity=0.25, seed=3, **dp())
    before = snapshot(m)
    train(m, opt, 3)
    masks = opt.masks
    assert set(masks) == {"conv1.weight", "conv2.weight"}
    for n, mask in masks.items():
        rows = mask.flatten(1).all(1)
        assert rows.sum() == keep_rows(mask.shape[0], 0.25) and (mask.flatten(1).any(1) == rows).all()
        p = dict(m.named_parameters())[n]
        assert torch.equal(p[~mask], before[n][~mask]) and not torch.equal(p[mask], before[n][mask])
    assert {"head.weight", "gn1.weight", "conv1.bias"} <= moved(m, before)
    m2 = model()
    again = RandomGroups(m2, sgd(m2), sparsity=0.25, seed=3, **dp())
    assert all(torch.equal(again.masks[n], masks[n]) for n in masks)


def test_sparta_phases_selection_and_sparse_training():
    m = model()
    opt = SPARTA(m, sgd(m, momentum=0.0), sparsity=0.5, warmup_epochs=1, **dp())
    before = snapshot(m)
    assert opt.phase == "warmup"
    train(m, opt, 5)  # warm-up epoch: eligible weights frozen
    assert not {"conv1.weight", "conv2.weight"} & moved(m, before)
    assert opt.phase == "selection"
    during = snapshot(m)
    train(m, opt, 5, seed=2)  # selection epoch: scores released, nothing moves
    assert moved(m, during) == set()
    assert opt.phase == "sparse"
    for p in opt.eligible:
        s = opt.scores[p]
        assert torch.isfinite(s).all()
        kept = opt.selected[p]
        assert kept.numel() == keep_rows(p.shape[0], 0.5)
        assert set(kept.tolist()) == set(torch.topk(s.clamp(min=0), kept.numel()).indices.tolist())
    sparse_start = snapshot(m)
    train(m, opt, 5, seed=3)
    for n, mask in opt.masks.items():
        p = dict(m.named_parameters())[n]
        assert torch.equal(p[~mask], sparse_start[n][~mask]) and not torch.equal(p[mask], sparse_start[n][mask])
    check_accounting(opt, 15)


def test_sparta_resets_momentum_of_masked_tensors():
    m = model()
    opt = SPARTA(m, sgd(m, momentum=0.9), sparsity=0.5, warmup_epochs=0, **dp())
    for p in m.parameters():  # optimizer state carried from earlier training
        opt.original_optimizer.state[p]["momentum_buffer"] = torch.ones_like(p)
    train(m, opt, 5)  # the selection epoch
    assert opt.phase == "sparse"
    assert all(p not in opt.original_optimizer.state for p in opt.eligible)
    assert m.head.weight in opt.original_optimizer.state


@pytest.mark.parametrize("selection", ["per-sample", "aggregate"])
def test_selection_release_has_sensitivity_R(selection):
    """The per-coordinate release (before it is summed per row, with its noise: post-processing) changes by at
    most R when one sample is removed from the batch."""
    torch.manual_seed(0)
    base = model()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    R = 0.3

    def release(xs, ys):
        m = copy.deepcopy(base)
        opt = SPARTA(m, sgd(m), warmup_epochs=0, selection=selection, **{**dp(), "max_grad_norm": R,
                                                                         "noise_multiplier": 0.0})
        opt.engine.loss_reduction = "sum"
        if selection == "per-sample":
            opt.row_stats.coords = set(opt.eligible)  # the per-coordinate sums the row scores reduce
        F.cross_entropy(m(xs), ys, reduction="sum").backward()
        if selection == "per-sample":
            vec = [opt.row_stats.sums[p] for p in opt.eligible]
        else:
            vec = [opt.engine.buffer.views[p].abs() for p in opt.eligible]
        return torch.cat([v.flatten() for v in vec])

    full = release(x, y)
    for k in range(6):
        keep = [i for i in range(6) if i != k]
        assert (full - release(x[keep], y[keep])).norm() <= R * (1 + 1e-6)


def test_random_sparsification_schedule_and_mask_sizes():
    m = model()
    opt = RandomSparsification(m, sgd(m), final_rate=0.8, refresh_per_epoch=2, epochs=3, seed=7, **dp())
    d = sum(p.numel() for p in m.parameters())
    seen = []
    for step in range(15):
        masks = opt.masks
        masked = sum((~v).sum().item() for v in masks.values())
        e, j = opt.epoch, min(1, (step % 5) * 2 // 5)
        assert masked == int(opt.rate(e, j) * d)
        assert opt.rate(e, j) == pytest.approx(min(0.8 * (e * 2 + j) / 5, 0.8))
        seen.append(torch.cat([v.flatten() for v in masks.values()]).clone())
        train(m, opt, 1, seed=step)
    changes = sum(not torch.equal(a, b) for a, b in zip(seen[:-1], seen[1:]))
    assert changes == 5  # redrawn at steps 3, 5, 8, 10, 13 (rates 0.16, 0.32, 0.48, 0.64, 0.8)
    check_accounting(opt, 15)


def test_random_sparsification_masked_coordinates():
    m = model()
    opt = RandomSparsification(m, sgd(m, momentum=0.0), final_rate=0.5, epochs=1, **dp())
    masks = {n: v.clone() for n, v in opt.masks.items()}
    before = snapshot(m)
    train(m, opt, 1)
    for n, mask in masks.items():
        p = dict(m.named_parameters())[n]
        assert torch.equal(p[~mask], before[n][~mask])
    # with momentum the heavy ball keeps moving masked coordinates (the paper's choice)
    m2 = model()
    opt2 = RandomSparsification(m2, sgd(m2, momentum=0.9), final_rate=0.5, refresh_per_epoch=5, epochs=1, **dp())
    train(m2, opt2, 1)
    mask = {n: v.clone() for n, v in opt2.masks.items()}
    b2 = snapshot(m2)
    train(m2, opt2, 1)
    assert any(not torch.equal(dict(m2.named_parameters())[n][~v], b2[n][~v]) for n, v in mask.items())


def test_random_sparsification_checkpoint_stores_no_mask_and_resumes():
    m = model()
    opt = RandomSparsification(m, sgd(m), final_rate=0.6, epochs=3, seed=1, **dp())
    train(m, opt, 7)
    sd = opt.state_dict()
    assert sd["fastdp"]["method"] == {}
    m2 = copy.deepcopy(m)
    opt2 = RandomSparsification(m2, sgd(m2), final_rate=0.6, epochs=3, seed=1, **dp())
    opt2.load_state_dict(sd)
    assert all(torch.equal(opt.masks[n], opt2.masks[n]) for n in opt.masks)


def test_ranked_random_sparsification_masks_smallest_z():
    m = model()
    opt = RandomSparsification(m, sgd(m), final_rate=0.5, epochs=2, ranked=True, **dp())
    train(m, opt, 5)
    assert opt.epoch == 1
    z = torch.cat([t.flatten() for t in opt.z]).abs()
    keep = torch.cat([v.flatten() for v in opt.masks.values()])
    assert z[~keep].max() <= z[keep].min()


def test_methods_are_deterministic_under_a_seed():
    def run():
        m = model()
        opt = SPARTA(m, sgd(m), sparsity=0.5, warmup_epochs=0, **dp())
        train(m, opt, 8)
        return snapshot(m)

    a, b = run(), run()
    assert all(torch.equal(a[n], b[n]) for n in a)


def tiny_gpt2():
    m = tiny_hf_gpt2(vocab=29)

    def step(opt, seed):
        idx = torch.randint(0, 29, (B, 9), generator=torch.Generator().manual_seed(seed))
        logits = m(idx).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, 29), idx[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()

    return m, step


@pytest.mark.parametrize("method", ["sparta", "random-groups", "bitfit"])
def test_methods_on_hf_gpt2_conv1d_group_output_columns(method):
    """GPT-2's Conv1D weights ([d_in, d_out]) are row groups by output neuron, i.e. by column; masked columns
    never move; BiTFiT trains the Conv1D biases with the weights frozen."""
    m, step = tiny_gpt2()
    conv1d = {n for n, mod in m.named_modules() if type(mod).__name__ == "Conv1D"}
    if method == "sparta":
        opt = SPARTA(m, sgd(m), sparsity=0.25, warmup_epochs=0, **dp())
        assert {n.rsplit(".", 1)[0] for n, p in m.named_parameters() if p in opt.group_dim} >= conv1d
    elif method == "random-groups":
        opt = RandomGroups(m, sgd(m), sparsity=0.25, **dp())
    else:
        opt = BiTFiT(m, sgd(m), **dp())
    for s in range(5 if method == "sparta" else 0):  # SPARTA's selection epoch
        step(opt, s)
    before = snapshot(m)
    for s in range(2):
        step(opt, 10 + s)
    after = moved(m, before)
    named = dict(m.named_parameters())
    if method == "bitfit":
        assert {f"{c}.bias" for c in conv1d} <= after and not {f"{c}.weight" for c in conv1d} & after
        return
    assert opt.phase == "sparse"
    for c in conv1d:
        n = f"{c}.weight"
        mask = opt.masks[n]
        cols = mask.all(0)
        assert (mask == cols.expand_as(mask)).all() and cols.sum() == keep_rows(mask.shape[1], 0.25)
        p = named[n]
        assert torch.equal(p[~mask], before[n][~mask]) and not torch.equal(p[mask], before[n][mask])
        assert n in after


def test_column_masked_conv1d_clipped_sum_matches_reference():
    """A column mask on an HF Conv1D weight restricts dY to the kept output columns (no per-sample tiles) and the
    clipped sum equals the masked torch.func reference."""
    from fastdp.grad_sample import LinearGrad
    from fastdp.masks import Mask
    from helpers import assert_close, per_sample_grads

    m, _ = tiny_gpt2()
    idx = torch.randint(0, 29, (4, 9))

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x).logits

    wrapped = Logits(m)

    def loss_fn(out, y):
        return F.cross_entropy(out[:, :-1].reshape(-1, 29), y[:, 1:].reshape(-1))

    named = dict(wrapped.named_parameters())
    target = "inner.transformer.h.0.mlp.c_fc.weight"
    cols = torch.tensor([1, 5, 6, 40, 63])
    mask = Mask.from_rows(named[target], cols, dim=1)
    g = per_sample_grads(wrapped, loss_fn, idx, idx)
    g[target] = g[target] * mask.dense
    norms = torch.cat([v.flatten(1) for v in g.values()], 1).norm(dim=1)
    c = (0.1 / (norms + 1e-6)).clamp(max=1.0)
    eng = fastdp.GradSampleEngine(wrapped, fastdp.FlatClip(0.1))
    eng.set_mask(named[target], mask)
    seen = []
    orig = eng._apply_mask
    eng._apply_mask = lambda gr: seen.append(orig(gr)) or seen[-1]
    loss_fn(wrapped(idx), idx).backward()
    eng.detach()
    w = next(s for s in seen if s.param is named[target])
    assert isinstance(w, LinearGrad) and w.rows.tolist() == cols.tolist()
    assert_close(eng.last_norms, norms, 1e-9, 1e-12, "norms")
    for n, v in g.items():
        assert_close(eng.summed[named[n]], torch.einsum("b,b...->...", c, v), 1e-9, 1e-12, n)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_selection_row_scores_reduce_the_per_coordinate_release(backend, monkeypatch):
    """SPARTA's per-row release equals the per-coordinate sums of |clipped per-sample gradients| summed per output
    neuron (rows of Linear/conv weights, columns of HF Conv1D weights), without per-sample gradients for Linear."""
    from fastdp.grad_sample import LinearGrad

    monkeypatch.setenv("FASTDP_BACKEND", backend)
    m = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5), torch.nn.Tanh(),
                            torch.nn.Linear(5, 3))
    opt = SPARTA(m, sgd(m), warmup_epochs=0, **dp())
    opt.row_stats.coords = set(opt.eligible)
    x, y = torch.randn(B, 4, 6), torch.randint(0, 3, (B, 4))
    calls = []
    orig = LinearGrad.materialize
    monkeypatch.setattr(LinearGrad, "materialize", lambda self: calls.append(self.param) or orig(self))
    F.cross_entropy(m(x).reshape(-1, 3), y.reshape(-1)).backward()
    assert len(calls) == len(opt.eligible)  # only for the per-coordinate check above, not for the row scores
    for p in opt.eligible:
        rows = opt.row_stats.sums[p].sum(1)
        assert torch.allclose(opt.row_stats.row_sums[p], rows, rtol=1e-5, atol=1e-7)


def _global_topk_run(m, opt, make_batch, steps):
    for t in range(steps):
        x, y = make_batch(t)
        F.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sparta_global_topk_freezes_a_layer_given_no_row(seed):
    """topk="global" may keep no row of a layer (here the 4-neuron first layer against 64): that layer is frozen for
    the sparse phase (no gradient, no noise, does not move) instead of failing at the first sparse step."""
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 64), torch.nn.ReLU(),
                            torch.nn.Linear(64, 10))
    opt = SPARTA(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), sparsity=0.2, warmup_epochs=0,
                 topk="global", **{**dp(), "expected_batch_size": 8, "sample_size": 32})
    g = torch.Generator().manual_seed(seed)
    batch = lambda t: (torch.randn(8, 2, generator=g), torch.randint(0, 10, (8,), generator=g))  # noqa: E731
    _global_topk_run(m, opt, batch, 4)  # the selection epoch
    assert opt.phase == "sparse"
    kept = {opt.param_name[p]: r.numel() for p, r in opt.selected.items()}
    assert sum(kept.values()) == keep_rows(68, 0.2)
    before = snapshot(m)
    _global_topk_run(m, opt, batch, 3)
    masks = opt.masks
    for p in opt.eligible:
        n = opt.param_name[p]
        assert masks[n].flatten(1).any(1).sum() == kept[n]
        assert torch.equal(p[~masks[n]], before[n][~masks[n]])
        if kept[n] == 0:
            assert not p.requires_grad and p.grad is None
    assert {"4.weight", "0.bias", "2.bias"} <= moved(m, before)
    check_accounting(opt, 7)
    if seed == 0:
        assert kept["0.weight"] == 0  # seed 0: global top-k keeps no row of the 4-neuron first layer (MLP 2-4-64-10, sparsity 0.2)


def test_sparta_global_topk_freezes_a_conv_layer_given_no_row():
    m = model()
    opt = SPARTA(m, sgd(m, momentum=0.9), sparsity=0.3, warmup_epochs=0, topk="global", **dp())
    train(m, opt, 4)
    opt.scores[m.conv1.weight].fill_(-1e3)  # released scores that leave conv1 no row (clamped at 0: never ranked)
    opt.scores[m.conv2.weight].add_(1e3)
    train(m, opt, 1, seed=4)
    assert opt.phase == "sparse" and opt.selected[m.conv1.weight].numel() == 0
    before = snapshot(m)
    train(m, opt, 3, seed=5)
    assert not m.conv1.weight.requires_grad and not opt.masks["conv1.weight"].any()
    assert "conv1.weight" not in moved(m, before)
    assert {"conv2.weight", "conv1.bias", "head.weight"} <= moved(m, before)
    check_accounting(opt, 8)


@pytest.mark.parametrize("method", ["rs", "rs-ranked", "adadpigu", "sparta-per-sample", "sparta-aggregate"])
def test_empty_poisson_batch_on_a_conv_model(method):
    """An empty Poisson batch releases noise only, with coordinate masks (RS, AdaDPIGU's sparse phase) and in
    SPARTA's selection epoch (per-sample |g| sums), on a conv model."""
    from fastdp.methods import AdaDPIGU

    m = model()
    if method.startswith("rs"):
        opt = RandomSparsification(m, sgd(m), final_rate=0.5, epochs=2, ranked=method == "rs-ranked", **dp())
        warm = 5 if method == "rs-ranked" else 0  # ranked: from the second epoch
    elif method == "adadpigu":
        opt, warm = AdaDPIGU(m, sgd(m), retention=0.5, pretrain_epochs=1, **dp()), 5
    else:
        opt, warm = SPARTA(m, sgd(m), warmup_epochs=0, selection=method.split("-", 1)[1], **dp()), 0
    train(m, opt, warm)
    phase = getattr(opt, "phase", None)
    assert phase in ("sparse", "selection")
    for _ in range(2):
        x, y = torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)
        F.cross_entropy(m(x), y, reduction="sum").backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    check_accounting(opt, warm + 2)


@pytest.mark.parametrize("method", ["sparta", "adadpigu", "rs"])
def test_make_private_methods_count_epochs_in_loader_batches(method):
    """make_private passes steps_per_epoch=len(data_loader): N=22, B=5 gives 5 batches per epoch, where
    round(N / expected B) = round(22 / 4) = 6."""
    from torch.utils.data import DataLoader, TensorDataset

    from fastdp.methods import AdaDPIGU

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    loader = DataLoader(TensorDataset(torch.randn(22, 3), torch.randint(0, 2, (22,))), batch_size=5)
    cls, kw = {"sparta": (SPARTA, dict(warmup_epochs=1)), "adadpigu": (AdaDPIGU, dict(pretrain_epochs=1)),
               "rs": (RandomSparsification, dict(final_rate=0.5))}[method]
    _, opt, dl = fastdp.make_private(module=m, optimizer=sgd(m), data_loader=loader, noise_multiplier=1.0,
                                     max_grad_norm=1.0, optimizer_class=cls, epochs=3, **kw)
    assert len(dl) == len(loader) == 5 and opt.expected_batch_size == 4 and round(22 / 4) == 6
    assert opt.steps_per_epoch == 5
    first = {"sparta": "warmup", "adadpigu": "pretrain", "rs": "sparse"}[method]
    then = {"sparta": "selection", "adadpigu": "sparse", "rs": "sparse"}[method]
    masks = None
    for t in range(5):
        assert opt.phase == first and opt.epoch == 0
        masks = {n: v.clone() for n, v in opt.masks.items()}
        F.cross_entropy(m(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
        opt.step()
        opt.zero_grad()
    assert opt.phase == then and opt.epoch == 1
    if method == "rs":  # the cooling schedule's second mask
        assert sum(int((~v).sum()) for v in opt.masks.values()) > sum(int((~v).sum()) for v in masks.values())


def test_make_private_steps_per_epoch_on_the_digits_split():
    """digits' training split (N=1437) at B=21: 69 loader batches, round(N / B) = 68."""
    from torch.utils.data import DataLoader, TensorDataset

    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    loader = DataLoader(TensorDataset(torch.zeros(1437, 2)), batch_size=21)
    _, opt, dl = fastdp.make_private(module=m, optimizer=sgd(m), data_loader=loader, noise_multiplier=1.0,
                                     max_grad_norm=1.0, optimizer_class=SPARTA)
    assert opt.steps_per_epoch == len(dl) == 69 != round(1437 / opt.expected_batch_size)
    _, opt, _ = fastdp.make_private(module=m, optimizer=sgd(m), data_loader=loader, noise_multiplier=1.0,
                                    max_grad_norm=1.0, optimizer_class=BiTFiT, steps_per_epoch=10)
    assert opt.steps_per_epoch == 10
    with pytest.raises(ValueError, match="steps_per_epoch"):
        BiTFiT(m, sgd(m), steps_per_epoch=0, **dp())
