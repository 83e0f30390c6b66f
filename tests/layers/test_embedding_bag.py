"""nn.EmbeddingBag (sum, mean, max; 2-D input, or 1-D ids packed with offsets; per_sample_weights; padding_idx): the
sample is the bag. Against torch.func per-sample gradients (2-D input) or a loop over bags run one at a time."""
import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import fastdp
from helpers import assert_close, assert_engine_matches_reference, check_exact, dp_sgd, flat_params, sq_loss

V, D = 13, 4

# torch.func's reference runs embedding_bag through its (slow, exact) batching fallback and says so
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


class Bag2d(nn.Module):
    """EmbeddingBag on [B, L] ids, then a linear head."""

    def __init__(self, **kw):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(V, D, **kw), nn.Linear(D, 3)

    def forward(self, ids):
        return self.head(self.bag(ids))


@pytest.mark.parametrize("padding_idx", [None, 0, -1])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_2d_input(mode, padding_idx):
    ids = torch.randint(0, V, (5, 6))
    ids[1] = 0  # a bag of padding only (when padding_idx=0)
    ids[2, :3] = V - 1
    check_exact(Bag2d(mode=mode, padding_idx=padding_idx), ids)


def test_2d_input_fp32():
    m = Bag2d(mode="mean")
    ids = torch.randint(0, V, (6, 5))
    for R in (1e-2, 1e6):
        assert_engine_matches_reference(m, sq_loss, ids, max_grad_norm=R, rtol=2e-5, atol=2e-6, every_param=True)


class WeightedBag(nn.Module):
    """Sum mode with per_sample_weights computed by a trainable layer: x [B, L, 2] holds (id, feature) pairs."""

    def __init__(self, padding_idx=None):
        super().__init__()
        self.bag = nn.EmbeddingBag(V, D, mode="sum", padding_idx=padding_idx)
        self.score = nn.Linear(1, 1)

    def forward(self, x):
        ids, feat = x[..., 0].long(), x[..., 1:]
        return self.bag(ids, per_sample_weights=torch.tanh(self.score(feat)).squeeze(-1))


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_per_sample_weights_with_their_own_gradient(padding_idx):
    ids = torch.randint(0, V, (4, 5))
    ids[0, :2] = 2
    x = torch.stack([ids.double(), torch.randn(4, 5, dtype=torch.float64)], -1)
    check_exact(WeightedBag(padding_idx), x)


class PackedBag(nn.Module):
    """EmbeddingBag on 1-D ids packed with offsets (``model(ids, offsets)``), constant per_sample_weights optional."""

    def __init__(self, tied=False, **kw):
        super().__init__()
        self.bag = nn.EmbeddingBag(V, D, **kw)
        self.head = None if tied else nn.Linear(D, 3)

    def forward(self, ids, offsets, psw=None):
        h = self.bag(ids, offsets, per_sample_weights=psw)
        return h @ self.bag.weight.t() if self.head is None else self.head(h)


def per_bag_reference(model, bags, weights, include_last_offset, R):
    """({name: sum_b c_b g_b}, [B] norms): each bag run alone through a copy of the model (float64)."""
    clean = copy.deepcopy(model)
    grads = []
    for b, ids in enumerate(bags):
        clean.zero_grad()
        offsets = torch.tensor([0, len(ids)] if include_last_offset else [0])
        psw = None if weights is None else weights[b]
        clean(ids, offsets, psw).pow(2).sum().backward()
        grads.append({n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                      for n, p in clean.named_parameters()})
    norms = torch.stack([torch.cat([g.flatten() for g in gb.values()]).norm() for gb in grads])
    c = (R / (norms + 1e-6)).clamp(max=1.0)
    return {n: sum(c[b] * grads[b][n] for b in range(len(bags))) for n in grads[0]}, norms


def pack(bags, include_last_offset):
    lengths = torch.tensor([len(b) for b in bags])
    starts = torch.cumsum(lengths, 0) - lengths
    offsets = torch.cat([starts, lengths.sum().view(1)]) if include_last_offset else starts
    return torch.cat(bags) if bags else torch.zeros(0, dtype=torch.long), offsets


def check_packed(model, bags, weights=None, include_last_offset=False):
    model = model.double()
    ids, offsets = pack(bags, include_last_offset)
    psw = torch.cat(weights) if weights is not None else None
    for R in (1e-2, 1e6):
        ref, norms = per_bag_reference(model, bags, weights, include_last_offset, R)
        eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(R))
        try:
            sq_loss(model(ids, offsets, psw)).backward()
        finally:
            eng.detach()
        assert_close(eng.last_norms, norms, 1e-9, 1e-12 * norms.max().item(), "norms")
        named = dict(model.named_parameters())
        assert set(eng.param_names[p] for p in eng.summed) == set(ref)
        for n, v in ref.items():
            assert_close(eng.summed[named[n]], v, 1e-9, 1e-12 * max(v.abs().max().item(), 1e-30), n)


def bags_of(lengths, ids_from=0):
    return [torch.randint(ids_from, V, (n,)) for n in lengths]


@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_packed_bags_of_unequal_length(mode, include_last_offset):
    bags = bags_of([3, 1, 0, 5, 2])  # (an empty bag: its output is zero)
    bags[3][1:3] = bags[3][0]  # a repeated id
    check_packed(PackedBag(mode=mode, include_last_offset=include_last_offset), bags,
                 include_last_offset=include_last_offset)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_packed_bags_with_padding(mode):
    bags = bags_of([4, 2, 3])
    bags[1][:] = 0  # only padding
    bags[2][0] = 0
    check_packed(PackedBag(mode=mode, padding_idx=0), bags)


def test_packed_per_sample_weights():
    bags = bags_of([2, 4, 1])
    weights = [torch.randn(len(b), dtype=torch.float64) for b in bags]
    check_packed(PackedBag(mode="sum", padding_idx=1), bags, weights)


@pytest.mark.parametrize("mode", ["sum", "max"])
def test_tied_bag_and_output_layer(mode):
    """The table used twice (bag lookup and output projection): the cross term is exact."""
    check_packed(PackedBag(tied=True, mode=mode), bags_of([3, 2, 4]))


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(0, 4), min_size=1, max_size=5), mode=st.sampled_from(["sum", "mean", "max"]),
       padding_idx=st.sampled_from([None, 0]), include_last_offset=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_generated_bags(lengths, mode, padding_idx, include_last_offset, seed):
    torch.manual_seed(seed)
    model = PackedBag(mode=mode, padding_idx=padding_idx, include_last_offset=include_last_offset)
    check_packed(model, [torch.randint(0, 4, (n,)) for n in lengths], include_last_offset=include_last_offset)


def test_each_bag_moves_the_model_by_at_most_R():
    torch.manual_seed(2)
    m = PackedBag(mode="mean").double()
    R = 1e-3
    for bag in bags_of([5, 1, 3]):
        opt = dp_sgd(m, R)
        before = flat_params(m)
        m(bag, torch.tensor([0])).pow(2).sum().backward()  # one sample: 5 ids, one bag
        opt.step()
        opt.zero_grad()
        opt.detach()
        assert 0 < (flat_params(m) - before).norm().item() <= R * (1 + 1e-9)


class DenseAndBag(nn.Module):
    """A dense feature [B, F] first, then packed ids and offsets: the batch size comes from the dense input."""

    def __init__(self):
        super().__init__()
        self.dense, self.bag = nn.Linear(2, D), nn.EmbeddingBag(V, D, mode="sum")

    def forward(self, feat, ids, offsets):
        return self.dense(feat) * self.bag(ids, offsets)


def test_batch_size_from_another_input():
    torch.manual_seed(4)
    m = DenseAndBag().double()
    bags = bags_of([2, 3, 1])
    feat = torch.randn(3, 2, dtype=torch.float64)
    ids, offsets = pack(bags, False)
    clean, grads = copy.deepcopy(m), []
    for b in range(3):
        clean.zero_grad()
        clean(feat[b:b + 1], bags[b], torch.tensor([0])).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in clean.parameters()]))
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1e6))
    sq_loss(m(feat, ids, offsets)).backward()
    eng.detach()
    assert_close(eng.last_norms, torch.stack(grads).norm(dim=1), 1e-9, 1e-12, "norms")
    with pytest.raises(fastdp.BatchSizeError, match="packs 3 bags"):
        eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
        try:
            m(torch.randn(4, 2, dtype=torch.float64), ids, offsets)  # 4 dense rows, 3 bags
        finally:
            eng.detach()


class TokenLayerBeforeBag(nn.Module):
    """A trainable layer applied to each packed id before the bag: its rows are ids, not samples."""

    def __init__(self):
        super().__init__()
        self.score, self.bag = nn.Linear(1, 1), nn.EmbeddingBag(V, D, mode="sum")

    def forward(self, ids, offsets):
        psw = self.score(ids.double().unsqueeze(1)).squeeze(1)
        return self.bag(ids, offsets, per_sample_weights=psw)


def test_per_id_layer_on_packed_ids_is_refused():
    m = TokenLayerBeforeBag().double()
    ids, offsets = pack(bags_of([2, 3]), False)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.BatchSizeError):
        sq_loss(m(ids, offsets)).backward()
    eng.detach()


@pytest.mark.parametrize("offsets,last", [([0, 2, 1], False), ([1, 3], False), ([0, 2, 4], True), ([0, 9], False)])
def test_offsets_that_do_not_split_the_ids_are_refused(offsets, last):
    m = PackedBag(mode="sum", include_last_offset=last)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError, match="offsets"):
        m(torch.randint(0, V, (5,)), torch.tensor(offsets))
    eng.detach()


@pytest.mark.parametrize("kw,match", [(dict(max_norm=1.0), "max_norm"), (dict(scale_grad_by_freq=True), "scale_grad"),
                                      (dict(sparse=True), "sparse")], ids=str)
def test_batch_mixing_options_are_refused(kw, match):
    m = Bag2d(mode="sum", **kw)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError, match=match):
        m(torch.randint(0, V, (3, 4)))
    eng.detach()
