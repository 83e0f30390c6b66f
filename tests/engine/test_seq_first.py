"""Sequence-first models (``batch_first=False``): the samples are dim 1 of the model input and of every [T, B, ...]
layer input; per-sample gradients equal the torch.func reference, each sample moves the model by at most R, and
what cannot be told apart is refused with a message naming the option."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastdp
from helpers import check_exact, flat_params

V, D = 9, 6


def seq_loss(out, *_):
    """Sum of squares of a [T, B, ...] output, averaged over the batch (dim 1)."""
    return out.pow(2).sum() / out.shape[1]


class SeqFirstTagger(nn.Module):
    """ids [T, B] -> embedding + learned positions [T, 1, D] + a shared position lookup -> LayerNorm -> Linear ->
    scale [D] -> PReLU (one slope) -> RMSNorm -> Linear: [T, B, 2]."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(5, 1, D) * 0.1)
        self.pos_table = nn.Embedding(5, D)
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)
        self.scale = nn.Parameter(torch.ones(D) + 0.1 * torch.randn(D))
        self.act = nn.PReLU()
        self.rms = nn.RMSNorm(D)
        self.out = nn.Linear(D, 2)

    def forward(self, ids):
        T = ids.shape[0]
        h = self.emb(ids) + self.pos[:T] + self.pos_table(torch.arange(T))[:, None]
        h = self.act(self.fc(self.norm(h)) * self.scale)
        return self.out(self.rms(h))


class SeqFirstClassifier(nn.Module):
    """[T, B, D] features -> Linear -> mean over time -> [B, D] -> Linear + bias parameter -> [B, 3]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)
        self.shift = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)).mean(0)) + self.shift


class SeqFirstConv(nn.Module):
    """[T, B, D] -> Linear -> [B, D, T] -> Conv1d + GroupNorm (channel-first: samples in dim 0) -> [T, B, D]."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.conv = nn.Conv1d(D, D, 3, padding=1)
        self.gn = nn.GroupNorm(2, D)

    def forward(self, x):
        h = self.fc(x).permute(1, 2, 0)
        return self.gn(self.conv(h)).permute(2, 0, 1)


@pytest.mark.parametrize("T,B", [(4, 3), (3, 3)])
def test_sequence_first_layers_match_reference(T, B):
    torch.manual_seed(0)
    ids = torch.randint(0, V, (T, B))
    check_exact(SeqFirstTagger(), ids, loss=seq_loss, batch_first=False)


def test_pooled_head_and_channel_first_layers_in_a_sequence_first_model():
    torch.manual_seed(1)
    check_exact(SeqFirstClassifier(), torch.randn(5, 4, D), batch_first=False)
    check_exact(SeqFirstConv(), torch.randn(5, 4, D), loss=seq_loss, batch_first=False)


def test_sequence_first_lstm_model_matches_reference():
    pytest.importorskip("fastdp.layers.rnn")

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, D)
            self.lstm = nn.LSTM(D, 5)  # batch_first=False: [T, B, D]
            self.out = nn.Linear(5, 2)

        def forward(self, ids):
            return self.out(self.lstm(self.emb(ids))[0])

    torch.manual_seed(2)
    model = Tagger().double()
    ids = torch.randint(0, V, (4, 3))
    R = 1e-2
    grads = []  # reference: each sample's own gradient by a plain backward (torch.func cannot vmap nn.LSTM here)
    for i in range(ids.shape[1]):
        model.zero_grad()
        seq_loss(model(ids[:, i:i + 1])).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    g = torch.stack(grads)
    model.zero_grad()
    c = (R / (g.norm(dim=1) + 1e-6)).clamp(max=1.0)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(R), batch_first=False)
    seq_loss(model(ids)).backward()
    eng.detach()
    torch.testing.assert_close(eng.last_norms, g.norm(dim=1), rtol=1e-9, atol=1e-12)
    summed = torch.cat([eng.summed[p].flatten() for p in model.parameters()])
    torch.testing.assert_close(summed, (c[:, None] * g).sum(0), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("R", [1e-3, 0.1])
def test_one_sample_moves_a_sequence_first_model_by_at_most_R(R):
    torch.manual_seed(3)
    model = SeqFirstTagger().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                 max_grad_norm=R, expected_batch_size=1, sample_size=100, loss_reduction="sum",
                                 batch_first=False)
    before = flat_params(model)
    seq_loss(model(torch.randint(1, V, (4, 1)))).backward()
    opt.step()
    assert (flat_params(model) - before).norm() <= R * (1 + 1e-9)
    opt.detach()


def test_make_private_and_methods_pass_batch_first():
    from torch.utils.data import DataLoader, TensorDataset

    from fastdp.methods import BiTFiT
    torch.manual_seed(4)
    model = SeqFirstClassifier()
    data = TensorDataset(torch.randn(20, 5, D), torch.randint(0, 3, (20,)))
    loader = DataLoader(data, batch_size=5)
    model, opt, _ = fastdp.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                        data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                        batch_first=False)
    assert opt.engine.batch_first is False
    x = torch.randn(5, 4, D)  # [T, B, D]
    F.cross_entropy(model(x), torch.randint(0, 3, (4,))).backward()
    assert opt.engine.last_norms.shape == (4,)
    opt.step()
    opt.detach()
    bitfit = BiTFiT(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                    expected_batch_size=4, sample_size=20, batch_first=False)
    assert bitfit.engine.batch_first is False
    bitfit.detach()


@pytest.mark.parametrize("make", [lambda: nn.LSTM(D, 4), lambda: nn.MultiheadAttention(D, 2),
                                  lambda: nn.TransformerEncoderLayer(D, 2, 8)])
def test_sequence_first_module_without_the_option_is_refused_at_attach(make):
    model = nn.Sequential(nn.Linear(D, D), make())
    with pytest.raises(fastdp.UnsupportedLayerError, match="batch_first=False: it takes sequence-first.*pass "
                                                           "batch_first=False"):
        fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0))
    model[1].requires_grad_(False)  # frozen: no parameter to clip there, nothing refused
    fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0)).detach()


def test_layer_input_without_the_samples_in_dim_1_is_refused():
    class BatchFirstInside(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(D, D)

        def forward(self, x):
            return self.fc(x.transpose(0, 1))  # [B, T, D] in a sequence-first model

    model = BatchFirstInside()
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0), batch_first=False)
    with pytest.raises(fastdp.BatchSizeError, match="dim 1 of size 5.*sample dim"):
        model(torch.randn(5, 3, D))
    eng.detach()


def test_ambiguous_two_dim_broadcast_is_refused():
    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x.sum(-1) + self.bias  # [T, B] with T == B: [T, B] or [B, d]?

    model = Scores()
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0), batch_first=False)
    with pytest.raises(fastdp.BatchSizeError, match="cannot tell"):
        model(torch.randn(3, 3, D))
    out = model(torch.randn(4, 3, D))  # T != B: dim 1 holds the samples
    out.pow(2).sum().backward()
    assert eng.last_norms.shape == (3,)
    eng.detach()


def test_forward_without_a_two_dim_input_and_bad_option_are_refused():
    model = nn.Linear(D, 2)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0), batch_first=False)
    with pytest.raises(fastdp.BatchSizeError, match="dim 1"):
        model(torch.randn(D))
    eng.detach()
    with pytest.raises(TypeError, match="batch_first"):
        fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0), batch_first="no")
