"""Recurrent models trained with fastdp.DPOptimizer: every step moves the model by exactly minus the clipped sum of
the per-sample gradients (noiseless SGD at lr 1), checked against a per-sample-backward oracle in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastdp
from helpers import assert_close, clip_reference, flat_params, per_sample_grads_loop

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier")


class CharLSTM(nn.Module):
    """Opacus' char-LSTM example shape: Embedding -> LSTM -> Linear over the vocabulary; tokens [B, T]."""

    def __init__(self, vocab=11, embed=6, hidden=8, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx):
        return self.head(self.lstm(self.emb(idx))[0])


class PackedGRUClassifier(nn.Module):
    """Token ids [B, T] of unequal lengths (padding id 0), packed unsorted, bidirectional GRU, head on h_n."""

    def __init__(self, vocab=9, embed=5, hidden=6, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, embed, padding_idx=0)
        self.gru = nn.GRU(embed, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, idx, lengths):
        packed = pack_padded_sequence(self.emb(idx), lengths, batch_first=True, enforce_sorted=False)
        h_n = self.gru(packed)[1]
        return self.head(torch.cat([h_n[0], h_n[1]], 1))


class SeqFirstLM(nn.Module):
    """A sequence-first LM (tokens [T, B]; engine built with batch_first=False): Embedding -> LSTM -> Linear."""

    def __init__(self, vocab=7, embed=4, hidden=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, proj_size=3)
        self.head = nn.Linear(3, vocab)

    def forward(self, idx):
        return self.head(self.lstm(self.emb(idx))[0])


def noiseless_sgd(model, R, B, **kw):
    with pytest.warns(UserWarning):
        return fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                  max_grad_norm=R, expected_batch_size=B, sample_size=100 * B, **kw)


def steps_match_the_oracle(model, batches, sample_loss, batch_loss, R, batch_first=True):
    """Two DP-SGD steps; each moves the parameters by minus (sum_i clip(g_i)) / B from the oracle at that point."""
    opt = noiseless_sgd(model, R, B=batches[0][0][0].shape[0 if batch_first else 1], batch_first=batch_first)
    try:
        for inputs, y in batches:
            B = inputs[0].shape[0 if batch_first else 1]
            sums, norms = clip_reference(per_sample_grads_loop(model, lambda o, i: sample_loss(o, y, i), *inputs,
                                                               batch_size=B), R)
            expected = {n: p.detach() - sums[n] / B for n, p in model.named_parameters()}
            batch_loss(model(*inputs), y).backward()
            assert_close(opt.engine.last_norms, norms, 1e-9, 1e-12 * norms.max().item(), "per-sample norms")
            assert (norms > R).any(), "clipping should be active in this test"
            opt.step()
            opt.zero_grad()
            for n, p in model.named_parameters():
                assert_close(p.detach(), expected[n], 1e-9, 1e-13, n)
    finally:
        opt.detach()


def test_char_lstm_language_model_trains_exactly():
    torch.manual_seed(0)
    model = CharLSTM().double()
    batches = [((torch.randint(0, 11, (4, 7)),), torch.randint(0, 11, (4, 7))) for _ in range(2)]
    steps_match_the_oracle(
        model, batches,
        sample_loss=lambda out, y, i: F.cross_entropy(out[i], y[i], reduction="sum"),
        batch_loss=lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum") / out.shape[0],
        R=0.5)


def test_packed_gru_classifier_trains_exactly():
    torch.manual_seed(1)
    model = PackedGRUClassifier().double()
    lengths = torch.tensor([3, 6, 1, 4, 6])
    idx = torch.randint(1, 9, (5, 6)) * (torch.arange(6)[None] < lengths[:, None])
    batches = [((idx, lengths), torch.randint(0, 3, (5,)))] * 2
    steps_match_the_oracle(
        model, batches,
        sample_loss=lambda out, y, i: F.cross_entropy(out[i:i + 1], y[i:i + 1]),
        batch_loss=lambda out, y: F.cross_entropy(out, y), R=0.1)


def test_sequence_first_language_model_with_batch_first_false():
    torch.manual_seed(2)
    model = SeqFirstLM().double()
    batches = [((torch.randint(0, 7, (6, 3)),), torch.randint(0, 7, (6, 3))) for _ in range(2)]
    steps_match_the_oracle(
        model, batches,
        sample_loss=lambda out, y, i: F.cross_entropy(out[:, i], y[:, i], reduction="sum"),
        batch_loss=lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum") / out.shape[1],
        R=0.5, batch_first=False)


def test_char_lstm_with_noise_learns_and_reports_epsilon():
    """A short noisy run on a repeating sequence: the loss falls and epsilon is accounted (fp32, the default)."""
    torch.manual_seed(0)
    model = CharLSTM(vocab=5, embed=8, hidden=16, layers=1)
    text = torch.arange(5).repeat(40)
    x = torch.stack([text[i:i + 8] for i in range(0, 150, 5)])
    y = torch.stack([text[i + 1:i + 9] for i in range(0, 150, 5)])
    opt = fastdp.DPOptimizer(model, torch.optim.Adam(model.parameters(), lr=0.03), noise_multiplier=0.3,
                             max_grad_norm=1.0, expected_batch_size=len(x), sample_size=4 * len(x), accountant="rdp",
                             generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert 0 < opt.epsilon(1e-5) < float("inf")
    before = flat_params(model)
    assert torch.isfinite(before).all()
    opt.detach()


def test_layer_costs_rnn_bench_runs_at_toy_size():
    """The code path of ``python -m fastdp.bench.layer_costs_rnn`` (not its numbers)."""
    from fastdp.bench.layer_costs_rnn import flop_floor, main
    result = main(["--steps", "2", "--warmup", "1", "--threads", "1", "--batch", "3", "--seq", "4", "--hidden", "8",
                   "--workloads", "lstm,gru_packed"])
    assert [r["workload"] for r in result["rows"]] == ["lstm", "gru_packed"]
    assert all(r["fastdp_ms"] > 0 and r["nonprivate_ms"] > 0 for r in result["rows"])
    assert 1.0 < flop_floor("lstm", 64, 64, 128, 2, 32) < 1.5
