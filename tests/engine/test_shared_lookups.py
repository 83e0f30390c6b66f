"""Embedding lookups: shared by the batch (position tables, relative-position biases, prompt tokens) or one id per
sample (into a layer with parameters). Whether a lookup's rows are samples is decided where it meets the batch: a shared
lookup is taken per sample at its broadcast, at every batch size (also where B equals the sequence length, and B = 1);
a lookup meeting the batch in any other way is refused. Norms and clipped sums equal the torch.func reference, and
neighbouring batches give clipped sums at most 2R apart."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdp
from helpers import check_exact, lm_sum_loss

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier")


class Positions(nn.Module):
    """Token + position embeddings; the position lookup goes through ``op`` before it meets the batch."""

    def __init__(self, op, T=4, d=6):
        super().__init__()
        self.op, self.T = op, T
        self.tok, self.pos, self.head = nn.Embedding(10, d), nn.Embedding(T, d), nn.Linear(d, 10)
        self.proj = nn.Linear(d, d)

    def forward(self, idx):
        B, T = idx.shape
        p = self.pos(torch.arange(T))
        op = self.op
        if op == "[None]":
            p = p[None]
        elif op == "unsqueeze(0)":
            p = p.unsqueeze(0)
        elif op == "view":
            p = (p * 2.0).view(1, T, -1)
        elif op == "tanh[None]":
            p = torch.tanh(p)[None]
        elif op == "t().t()":
            p = p.t().t()[None]
        elif op == "expand":
            p = p.expand(B, -1, -1)
        elif op == "dropout":
            p = F.dropout(p, 0.3, training=False)
        elif op == "[1,T] ids -> Linear":
            p = self.proj(self.pos(torch.arange(T)[None]))
        elif op == "cumsum":
            p = p.cumsum(0)
        return self.head(torch.tanh(self.tok(idx) + p))


POSITION_OPS = ["none", "[None]", "unsqueeze(0)", "view", "tanh[None]", "t().t()", "expand", "dropout",
                "[1,T] ids -> Linear", "cumsum"]


@pytest.mark.parametrize("B", [3, 4, 1])  # B == T == 4: a coincidence that must not change anything
@pytest.mark.parametrize("op", POSITION_OPS)
def test_shared_position_lookup_is_taken_per_sample_at_its_broadcast(op, B):
    torch.manual_seed(0)
    m = Positions(op)
    if op != "[1,T] ids -> Linear":
        m.proj.requires_grad_(False)
    check_exact(m, torch.randint(0, 10, (B, 4)), torch.randint(0, 10, (B, 4)), loss=lm_sum_loss)


class PositionsOnly(nn.Module):
    """Only the position table trains; the head is frozen (nothing else complains about batch sizes)."""

    def __init__(self, T=4, d=3):
        super().__init__()
        self.pos, self.head = nn.Embedding(T, d), nn.Linear(d, 1)
        self.head.requires_grad_(False)

    def forward(self, x):
        return self.head(x + self.pos(torch.arange(x.shape[1])).unsqueeze(0)).sum((1, 2))


@pytest.mark.parametrize("B", [4, 6])
def test_neighbouring_batches_differ_by_at_most_2R(B):
    torch.manual_seed(0)
    m, R = PositionsOnly().double(), 0.01
    x = torch.randn(B, 4, 3, dtype=torch.float64)

    def clipped_sum(w0):
        eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(R), loss_reduction="sum")
        (m(x) * torch.tensor([w0] + [1.0] * (B - 1), dtype=torch.float64)).sum().backward()
        eng.detach()
        assert eng.last_norms.numel() == B
        return eng.summed[m.pos.weight].clone()

    assert (clipped_sum(1e4) - clipped_sum(-1e4)).norm() <= 2 * R + 1e-12  # (4R if the positions were clipped one by one instead of per sample)


class NanoGPT(nn.Module):
    def __init__(self, V=10, T=5, d=6):
        super().__init__()
        self.wte, self.wpe, self.ln, self.head = nn.Embedding(V, d), nn.Embedding(T, d), nn.LayerNorm(d), nn.Linear(d, V)

    def forward(self, idx):
        return self.head(self.ln(self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))))


@pytest.mark.parametrize("B", [1, 2, 5])
def test_nanogpt_positions_are_exact_at_any_batch_size(B):
    check_exact(NanoGPT(), torch.randint(0, 10, (B, 5)), torch.randint(0, 10, (B, 5)), loss=lm_sum_loss)


class T5Bias(nn.Module):
    """T5-style relative-position bias: a [T, T] id lookup, permuted and broadcast over the batch."""

    def __init__(self):
        super().__init__()
        self.rel, self.q = nn.Embedding(7, 2), nn.Linear(4, 4)

    def forward(self, x):
        T = x.shape[1]
        bucket = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).clamp(-3, 3) + 3
        bias = self.rel(bucket).permute(2, 0, 1).unsqueeze(0)
        q = self.q(x).view(x.shape[0], T, 2, 2).transpose(1, 2)
        return (q @ q.transpose(-1, -2) + bias).softmax(-1) @ q


@pytest.mark.parametrize("B", [1, 3, 5])  # T == 5
def test_relative_position_bias_lookup_is_exact(B):
    check_exact(T5Bias(), torch.randn(B, 5, 4))


class IdEmbedding(nn.Module):
    """One id per sample (user / item / label), embedded, then a layer with parameters."""

    def __init__(self, layer):
        super().__init__()
        self.e = nn.Embedding(20, 4)
        self.layer = {"linear": lambda: nn.Linear(4, 3), "layer_norm": lambda: nn.LayerNorm(4),
                      "scale": lambda: nn.Identity()}[layer]()
        self.scale = nn.Parameter(torch.randn(4))
        self.dropout = False

    def forward(self, ids):
        h = self.e(ids)
        if self.dropout:
            h = F.dropout(h, 0.0)
        return self.layer(h * self.scale if isinstance(self.layer, nn.Identity) else h)


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("B", [1, 2, 8])
@pytest.mark.parametrize("layer", ["linear", "layer_norm", "scale"])
def test_id_embedding_into_a_parameter_layer_trains_every_parameter(layer, B, dropout):
    m = IdEmbedding(layer)
    m.dropout = dropout
    if layer != "scale":
        m.scale.requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    check_exact(m, torch.randint(0, 20, (B,)))


class TokensIntoLayer(nn.Module):
    """Token embeddings straight into a LayerNorm / Linear (BLOOM-style), including at batch size 1."""

    def __init__(self):
        super().__init__()
        self.e, self.ln, self.head = nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 10)

    def forward(self, idx):
        return self.head(self.ln(self.e(idx)))


@pytest.mark.parametrize("B", [1, 3])
def test_token_embedding_into_a_layer_is_exact_at_any_batch_size(B):
    m = TokensIntoLayer()
    with torch.no_grad():
        m.ln.weight.normal_()
        m.ln.bias.normal_()
    check_exact(m, torch.randint(0, 10, (B, 6)), torch.randint(0, 10, (B, 6)), loss=lm_sum_loss)


class SharedMisuse(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.pos, self.proj = how, nn.Embedding(4, 3), nn.Linear(3, 3)

    def forward(self, x):  # x [B, 4, 3]
        p = self.pos(torch.arange(4))
        if self.how == "einsum":
            return torch.einsum("btd,sd->bts", x, p).sum((1, 2))
        if self.how == "linear":  # a [T, d] lookup into a layer before any broadcast: where is the batch?
            return (x + self.proj(p)).sum((1, 2))
        if self.how == "alpha_dropout":
            return (x + F.alpha_dropout(p, 0.5, training=True)).sum((1, 2))
        return (x[:, 0] + p[:3]).sum(1)  # rows of the lookup aligned with samples


@pytest.mark.parametrize("how", ["einsum", "linear", "alpha_dropout", "aligned"])
def test_shared_lookup_meeting_the_batch_unbroadcast_is_refused(how):
    m = SharedMisuse(how)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises((fastdp.BatchSizeError, fastdp.UnsupportedLayerError)):
        m(torch.randn(3, 4, 3)).sum().backward()
    eng.detach()


class Double(torch.autograd.Function):
    generate_vmap_rule = True  # (the torch.func reference runs it under vmap)

    @staticmethod
    def forward(x):
        return x * 2

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 2


class LookupThroughFunction(nn.Module):
    """A lookup's output through a custom autograd.Function (whose backward fastdp does not see)."""

    def __init__(self, shared):
        super().__init__()
        self.shared, self.e, self.head = shared, nn.Embedding(10, 3), nn.Linear(3, 2)

    def forward(self, x):  # x [B, 4, 3] (shared positions) or [B] ids (one id per sample)
        if self.shared:
            return self.head(x + Double.apply(self.e(torch.arange(4))[None]))
        return self.head(Double.apply(self.e(x)))


@pytest.mark.parametrize("B", [3, 4])
def test_shared_lookup_through_a_custom_function_is_refused(B):
    m = LookupThroughFunction(shared=True)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises((fastdp.BatchSizeError, fastdp.UnsupportedLayerError)):
        m(torch.randn(B, 4, 3)).sum().backward()
    eng.detach()


def test_per_sample_lookup_through_a_custom_function_is_exact():
    check_exact(LookupThroughFunction(shared=False), torch.randint(0, 10, (4,)))


class PromptTokens(nn.Module):
    """Learned prompt tokens: a shared lookup expanded to the batch and concatenated with the inputs."""

    def __init__(self):
        super().__init__()
        self.prompt, self.l = nn.Embedding(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        pr = self.prompt(torch.arange(3)).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.l(torch.cat([pr, x], 1)).pow(2).sum((1, 2))


@pytest.mark.parametrize("B", [1, 2, 3])
def test_prompt_tokens_expanded_to_the_batch_are_exact_at_every_batch_size(B):
    """expand(B, ...) of a [1, n, d] lookup is the broadcast over the batch, also at B = 1 (not refused there:
    Poisson batches of one are common)."""
    torch.manual_seed(B)
    check_exact(PromptTokens(), torch.randn(B, 5, 4))
