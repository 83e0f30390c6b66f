"""Privacy invariants of the engine, measured (audit findings 1, 2, 3, 5, 6, 7, 9).

Each sample's contribution to a step has norm <= R: with noise 0 and lr 1 one sample moves the model by at most R,
and neighbouring batches give clipped sums at most 2R apart. The engine's per-sample norms and clipped sums equal
explicit torch.func per-sample gradients (``helpers.clipped_sum_reference``), or the model is refused.
"""
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import fastdp
from helpers import assert_close, assert_engine_matches_reference, clipped_sum_reference

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier")


def sq_loss(out, *_):
    return out.pow(2).sum() / out.shape[0]


def lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum") / out.shape[0]


def check_exact(model, x, *extra, loss=sq_loss, R=1e-2):
    """Engine norms and clipped sums equal the torch.func reference (clipping active); every parameter trained."""
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    assert_engine_matches_reference(model, loss, x, *extra, max_grad_norm=R, rtol=1e-9, atol=1e-12, every_param=True)


def dp_sgd(model, R, B=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                  max_grad_norm=R, expected_batch_size=B, sample_size=100 * B, loss_reduction="sum")


def flat_params(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


# ---------------------------------------------------------------- finding 1: the batch dim of every layer input
class Folded(nn.Module):
    """A trainable layer applied to frames / segments folded into the batch dim."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.layer = {"conv2d": lambda: nn.Conv2d(3, 2, 3, padding=1), "conv1d": lambda: nn.Conv1d(3, 2, 3),
                      "group_norm": lambda: nn.GroupNorm(1, 3), "layer_norm": lambda: nn.LayerNorm(3),
                      "rms_norm": lambda: nn.RMSNorm(3), "embedding": lambda: nn.Embedding(10, 3)}[kind]()

    def forward(self, x):  # x: [B, 2, ...]: two frames per sample
        B = x.shape[0]
        if self.kind == "embedding":
            return self.layer(x.flatten(0, 1)).reshape(B, -1).pow(2).sum(1)
        return self.layer(x.flatten(0, 1) * 5).reshape(B, -1).pow(2).sum(1) * 100


@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "group_norm", "layer_norm", "rms_norm", "embedding"])
def test_frames_folded_into_the_batch_dim_are_refused(kind):
    shapes = {"conv2d": (1, 2, 3, 5, 5), "conv1d": (1, 2, 3, 6), "group_norm": (1, 2, 3, 4),
              "layer_norm": (1, 2, 4, 3), "rms_norm": (1, 2, 3)}
    m = Folded(kind).double()
    x = torch.randint(0, 10, (1, 2, 4)) if kind == "embedding" else torch.randn(*shapes[kind], dtype=torch.float64)
    opt = dp_sgd(m, R=0.1)
    before = flat_params(m)
    with pytest.raises(fastdp.BatchSizeError, match="batch size 1"):
        m(x).sum().backward()
        opt.step()  # (before the fix: one sample moved the model by several R)
    assert torch.equal(flat_params(m), before)
    opt.detach()


def test_frame_model_with_the_batch_kept_moves_by_at_most_R():
    class Frames(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.gn = nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)

        def forward(self, x):  # [B, T, 3, H, W]: frames as channels of one sample
            return self.gn(self.c(x[:, 0] + x[:, 1])).pow(2).sum((1, 2, 3)) * 100

    m = Frames().double()
    opt = dp_sgd(m, R=0.1)
    before = flat_params(m)
    m(torch.randn(1, 2, 3, 5, 5, dtype=torch.float64) * 5).sum().backward()
    opt.step()
    assert (flat_params(m) - before).norm() <= 0.1 + 1e-12


# ---------------------------------------------- finding 3: only backward passes computing parameter gradients count
def test_input_gradient_pass_is_not_a_micro_batch():
    """FGSM: torch.autograd.grad(loss, x) never touches .grad in PyTorch; it must not add to the step."""
    m, R = mlp(), 0.1
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
    m, R = mlp(), 0.1
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
    assert (flat_params(m) - before).norm() <= R + 1e-12  # (before the fix: 2R)
    opt.detach()


def test_input_gradient_then_parameter_backward_on_one_retained_graph():
    """autograd.grad(loss, x, retain_graph=True) then loss.backward(): one micro-batch, clipped once."""
    m, R = mlp(), 0.1
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
    m, R = mlp(), 0.1
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
    assert (flat_params(m) - before).norm() <= R + 1e-12  # (before the fix: 2R)
    opt.zero_grad()
    out = m(x)  # the supported way: one backward of the summed losses
    (F.cross_entropy(out, y) + 0.5 * F.cross_entropy(out, y)).backward()
    before = flat_params(m)
    opt.step()
    assert (flat_params(m) - before).norm() <= R + 1e-12
    opt.detach()


def test_gradient_accumulation_over_micro_batches_still_adds():
    m, R = mlp(), 0.05
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
    m = mlp()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(fastdp.UnsupportedLayerError, match="create_graph"):
        torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    eng.detach()


def test_autograd_grad_with_respect_to_parameters_is_refused():
    """Parameters are not in the graph under the engine: PyTorch refuses, nothing is recorded."""
    m = mlp()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(RuntimeError, match="not have been used in the graph"):
        torch.autograd.grad(m(torch.randn(3, 4, dtype=torch.float64)).pow(2).sum(), list(m.parameters()))
    assert eng.num_backward == 0
    eng.detach()


# ------------------------------------ findings 2 and 5: lookups shared by the batch, lookups meeting a parameter
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
    check_exact(m, torch.randint(0, 10, (B, 4)), torch.randint(0, 10, (B, 4)), loss=lm_loss)


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

    assert (clipped_sum(1e4) - clipped_sum(-1e4)).norm() <= 2 * R + 1e-12  # (before the fix: 4R)


class NanoGPT(nn.Module):
    def __init__(self, V=10, T=5, d=6):
        super().__init__()
        self.wte, self.wpe, self.ln, self.head = nn.Embedding(V, d), nn.Embedding(T, d), nn.LayerNorm(d), nn.Linear(d, V)

    def forward(self, idx):
        return self.head(self.ln(self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))))


@pytest.mark.parametrize("B", [1, 2, 5])
def test_nanogpt_positions_at_any_batch_size(B):
    check_exact(NanoGPT(), torch.randint(0, 10, (B, 5)), torch.randint(0, 10, (B, 5)), loss=lm_loss)


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
def test_relative_position_bias_lookup(B):
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
def test_token_embedding_into_a_layer_at_any_batch_size(B):
    m = TokensIntoLayer()
    with torch.no_grad():
        m.ln.weight.normal_()
        m.ln.bias.normal_()
    check_exact(m, torch.randint(0, 10, (B, 6)), torch.randint(0, 10, (B, 6)), loss=lm_loss)


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


# ---------------------------------------------------- finding 6: two views of one parameter in one op
class TwoViews(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.w = nn.Parameter(torch.randn(4, 4) if how == "w + w.t()" else torch.randn(3, 4))

    def forward(self, x):
        w = self.w
        if self.how == "w + w.t()":
            w = w + w.t()
        elif self.how == "cat(sin, cos)":
            w = torch.cat([w.sin(), w.cos()])
        elif self.how == "centered":
            w = w - w.mean(1, keepdim=True)
        elif self.how == "standardised":
            v, mu = torch.var_mean(w, dim=1, keepdim=True, unbiased=False)
            w = (w - mu) / torch.sqrt(v + 1e-5)
        return F.linear(x, w)


@pytest.mark.parametrize("how", ["w + w.t()", "cat(sin, cos)", "centered", "standardised"])
def test_a_parameter_combined_with_another_view_of_itself(how):
    check_exact(TwoViews(how), torch.randn(5, 4))


class StdConv2d(nn.Conv2d):
    def forward(self, x):
        v, mu = torch.var_mean(self.weight, dim=[1, 2, 3], keepdim=True, unbiased=False)
        return F.conv2d(x, (self.weight - mu) / torch.sqrt(v + 1e-5), self.bias, self.stride, self.padding)


def test_weight_standardised_conv():
    m = nn.Sequential(StdConv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))
    check_exact(m, torch.randn(5, 3, 5, 5), torch.randint(0, 3, (5,)), loss=lambda o, t: F.cross_entropy(o, t))


# ---------------------------------------- finding 7: custom autograd.Function, no_grad, random ops on parameters
class MyLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x.mm(w.t())

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        return g.mm(w), g.t().mm(x)


def test_parameter_into_a_custom_autograd_function_is_refused():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.head = nn.Parameter(torch.randn(3, 4)), nn.Linear(3, 2)

        def forward(self, x):
            return self.head(MyLinearFn.apply(x, self.w))

    m = Custom()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError, match="autograd.Function MyLinearFn"):
        m(torch.randn(4, 4)).sum().backward()
    eng.detach()


def test_a_parameter_used_under_no_grad_in_forward_is_a_constant():
    class NoGradScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            with torch.no_grad():
                s = self.lin.weight.norm()
            return F.linear(x, self.lin.weight / s, self.lin.bias)

    check_exact(NoGradScale(), torch.randn(5, 4))


def test_random_op_on_a_parameter_is_refused():
    class DropConnect(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return F.linear(x, F.dropout(self.lin.weight, 0.5, training=True))

    m = DropConnect()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError, match="random"):
        m(torch.randn(2, 4))
    eng.detach()


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_is_refused_with_a_clear_error(use_reentrant):
    class Ck(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=use_reentrant))

    m = Ck()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError, match="checkpointing"):
        m(torch.randn(5, 4, requires_grad=True)).sum().backward()
    eng.detach()


# ------------------------------------------------------------------------------------ finding 9: smaller ones
class ViTish(nn.Module):
    """A 0-d tensor as the first argument of the model's forward: the batch size comes from the next one."""

    def __init__(self):
        super().__init__()
        self.proj, self.cls, self.head = nn.Linear(3, 4), nn.Parameter(torch.randn(1, 1, 4)), nn.Linear(4, 2)

    def forward(self, temperature, x):
        h = self.proj(x)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1)
        return self.head(h[:, 0]) / temperature


class FixedFirst(nn.Module):
    def __init__(self, inner, t):
        super().__init__()
        self.inner, self.t = inner, t

    def forward(self, x):
        return self.inner(self.t, x)


def test_zero_dim_first_argument():
    m = ViTish().double()
    t, x = torch.tensor(2.0, dtype=torch.float64), torch.randn(4, 5, 3, dtype=torch.float64)
    ref, norms = clipped_sum_reference(FixedFirst(m, t), sq_loss, x, max_grad_norm=1e-2)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1e-2))
    sq_loss(m(t, x)).backward()  # (before the fix: "cat with batched inputs is not supported for parameter 'cls'")
    eng.detach()
    assert eng.batch_size == 4
    assert_close(eng.last_norms, norms, 1e-9, 1e-14, "norms")
    for n, p in m.named_parameters():
        assert_close(eng.summed[p], ref["inner." + n], 1e-9, 1e-14, n)


def test_second_engine_on_an_attached_model_names_detach():
    m = nn.Linear(4, 2)
    opt1 = dp_sgd(m, 1.0, B=4)
    opt2 = dp_sgd(m, 1.0, B=4)
    with pytest.raises(RuntimeError, match=r"detach\(\)"):
        m(torch.randn(4, 4))
    assert all(not isinstance(p, fastdp.tap.ParamTap) for p in m._parameters.values())  # slots restored
    opt1.detach()
    m(torch.randn(4, 4)).sum().backward()  # the new one works once the old one is detached
    assert opt2.engine.num_backward == 1
    opt2.detach()


class Casts(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.scale, self.l = how, nn.Parameter(torch.randn(4)), nn.Linear(4, 4)

    def forward(self, x):
        h = self.l(x)
        if self.how == "p.to(h)":
            return h * self.scale.to(h)
        if self.how == "p.type_as(h)":
            return h * self.scale.type_as(h)
        return h.type_as(self.scale) * self.scale  # x.type_as(p): reads the dtype only


@pytest.mark.parametrize("how", ["p.to(h)", "p.type_as(h)", "h.type_as(p)"])
def test_casts_against_a_batched_tensor(how):
    check_exact(Casts(how), torch.randn(5, 4))


def test_torch_save_of_an_attached_model_loads_a_plain_model():
    m = mlp()
    opt = dp_sgd(m, 1.0, B=2)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None for p in loaded.parameters())  # trains plainly
    m(torch.randn(2, 4, dtype=torch.float64)).sum().backward()  # the original is still private
    assert opt.engine.num_backward == 1 and all(p.grad is None for p in m.parameters())
    opt.detach()


@pytest.mark.parametrize("wrap", ["userdict", "dataclass", "nested"])
def test_batch_size_is_found_in_mappings_and_dataclasses(wrap):
    """A model called with an HF BatchEncoding-like mapping or a dataclass: the batch size is still found, so folded
    frames are refused (before, no batch size was found and every layer check was skipped: 2.85 R for one sample)."""
    import collections
    import dataclasses

    @dataclasses.dataclass
    class Batch:
        pixels: torch.Tensor

    inner = Folded("conv2d").double()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, batch):
            return self.inner(batch["pixels"] if isinstance(batch, collections.abc.Mapping) else batch.pixels)

    x = torch.randn(1, 2, 3, 5, 5, dtype=torch.float64)
    batch = {"userdict": lambda: collections.UserDict(pixels=x), "dataclass": lambda: Batch(x),
             "nested": lambda: [collections.UserDict(pixels=x)]}[wrap]()
    m = Wrapped()
    if wrap == "nested":
        m.forward = lambda b: Wrapped.forward(m, b[0])  # (instance attribute: the hooks still run)
    opt = dp_sgd(m, R=0.1)
    with pytest.raises(fastdp.BatchSizeError, match="batch size 1"):
        m(batch).sum().backward()
    opt.detach()


def test_a_forward_without_a_batched_tensor_is_refused():
    class Opaque:
        def __init__(self, x):
            self.x = x

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, o):
            return self.l(o.x)

    m = M().double()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.BatchSizeError, match="no tensor argument"):
        m(Opaque(torch.randn(4, 3, dtype=torch.float64)))
    with torch.no_grad():  # evaluation is not checked
        m(Opaque(torch.randn(4, 3, dtype=torch.float64)))
    eng.detach()


def test_one_forward_two_backward_passes_are_refused():
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
    """expand(B, ...) of a [1, n, d] lookup is the broadcast over the batch, also at B = 1 (it was refused there:
    Poisson batches of one are common)."""
    torch.manual_seed(B)
    check_exact(PromptTokens(), torch.randn(B, 5, 4))
