"""nn.TransformerEncoder / nn.TransformerDecoder models (embedding in front, Linear, LayerNorm, dropout inside) in
both layouts against the fp64 torch.func reference, and trained within the clip bound."""
import pytest
import torch
from torch import nn

import fastdp
from helpers import check_exact, flat_params

V, D, H, C = 11, 8, 2, 3


class EncoderClassifier(nn.Module):
    """ids [B, T] ([T, B] with batch_first=False) -> embedding + positions -> TransformerEncoder -> mean -> Linear."""

    def __init__(self, batch_first=True, norm_first=False, layers=2, dropout=0.0):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(6, D) * 0.1)
        layer = nn.TransformerEncoderLayer(D, H, 16, dropout=dropout, batch_first=batch_first, norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(D, C)

    def forward(self, ids):
        T = ids.shape[1 if self.batch_first else 0]
        pos = self.pos[:T]
        h = self.emb(ids) + (pos[None] if self.batch_first else pos[:, None])
        pad = (ids == 0) if self.batch_first else (ids == 0).t()
        pad[:, 0] = False
        h = self.enc(h, src_key_padding_mask=pad)
        return self.head(h.mean(1 if self.batch_first else 0))


class Seq2Seq(nn.Module):
    """A decoder over target ids with causal self-attention and cross-attention to an encoded memory."""

    def __init__(self, batch_first=True, norm_first=False):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(V, D)
        self.src = nn.Linear(D, D)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 16, dropout=0.0, batch_first=batch_first,
                                                                    norm_first=norm_first), 1,
                                         enable_nested_tensor=False)
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(D, H, 16, dropout=0.0, batch_first=batch_first,
                                                                    norm_first=norm_first), 2)
        self.head = nn.Linear(D, C)

    def forward(self, ids):
        t = 1 if self.batch_first else 0
        tgt = self.emb(ids)
        memory = self.enc(torch.tanh(self.src(tgt.narrow(t, 0, 3))))  # a shorter source
        T = ids.shape[t]
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=tgt.dtype)
        out = self.dec(tgt, memory, tgt_mask=mask, tgt_is_causal=True)
        return self.head(out.mean(t))


def _ids(B, T, batch_first):
    g = torch.Generator().manual_seed(B * 7 + T)
    ids = torch.randint(0, V, (B, T), generator=g)
    return ids if batch_first else ids.t().contiguous()


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_classifier_with_embedding_matches_reference(batch_first, norm_first):
    torch.manual_seed(0)
    check_exact(EncoderClassifier(batch_first, norm_first), _ids(3, 5, batch_first), batch_first=batch_first)


@pytest.mark.parametrize("batch_first,norm_first", [(True, False), (False, True)])
def test_decoder_matches_reference(batch_first, norm_first):
    torch.manual_seed(1)
    check_exact(Seq2Seq(batch_first, norm_first), _ids(3, 4, batch_first), batch_first=batch_first)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.filterwarnings("ignore:noise_multiplier")
def test_encoder_with_dropout_moves_the_model_by_at_most_R(batch_first):
    torch.manual_seed(2)
    model = EncoderClassifier(batch_first, dropout=0.3).double()
    opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                             max_grad_norm=0.05, expected_batch_size=1, sample_size=100, loss_reduction="sum",
                             batch_first=batch_first)
    before = flat_params(model)
    ids = _ids(1, 5, batch_first)
    model(ids).pow(2).sum().backward()
    opt.step()
    assert (flat_params(model) - before).norm() <= 0.05 * (1 + 1e-9)
    opt.detach()


def test_sequence_first_encoder_without_the_option_is_refused_naming_batch_first():
    model = EncoderClassifier(batch_first=False)
    with pytest.raises(fastdp.UnsupportedLayerError, match="batch_first=False.*DPOptimizer"):
        fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0))
