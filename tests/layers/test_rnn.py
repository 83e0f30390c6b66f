"""nn.RNN / nn.LSTM / nn.GRU: outputs, input and initial-state gradients equal PyTorch's native op; per-sample norms and
clipped sums equal a per-sample-backward oracle in float64 (torch.func cannot vmap these modules); each sample moves
the model by at most R; what is not supported is refused with the cause named."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastdp
from fastdp.grad_sample import NormRule
from fastdp.tap import BatchSizeError, UnsupportedLayerError
from helpers import LAYER_TOLERANCES, assert_close, clip_reference, dp_sgd, flat_params, per_sample_grads_loop

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier")

MODULES = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn_tanh": nn.RNN, "rnn_relu": nn.RNN}


def make_rnn(kind, d_in=3, hidden=4, **kw):
    if kind == "rnn_relu":
        kw["nonlinearity"] = "relu"
    return MODULES[kind](d_in, hidden, **kw)


class Recurrent(nn.Module):
    """A recurrent module on x in its own layout ([B, T, in], or [T, B, in] when seq-first: the engine is then built
    with batch_first=False), padded or packed at ``lengths``; initial states given in the module's layout
    [layers * directions, B, H] when passed. Returns [B, *]: the output (padded) and the final states."""

    def __init__(self, rnn, enforce_sorted=True):
        super().__init__()
        self.rnn, self.enforce_sorted = rnn, enforce_sorted

    def forward(self, x, lengths=None, h0=None, c0=None):
        rnn = self.rnn
        T = x.shape[1 if rnn.batch_first else 0]
        hx = None if h0 is None else ((h0, c0) if isinstance(rnn, nn.LSTM) else h0)
        inp = x
        if lengths is not None:
            inp = pack_padded_sequence(x, lengths, batch_first=rnn.batch_first, enforce_sorted=self.enforce_sorted)
        out, hidden = rnn(inp, hx)
        if lengths is not None:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        elif not rnn.batch_first:
            out = out.transpose(0, 1)
        states = hidden if isinstance(hidden, tuple) else (hidden,)
        return torch.cat([out.flatten(1)] + [s.transpose(0, 1).flatten(1) for s in states], 1)


def batch_input(rnn, B, T, d, dtype=torch.float32):
    """A random input in the module's layout."""
    return torch.randn(B, T, d, dtype=dtype) if rnn.batch_first else torch.randn(T, B, d, dtype=dtype)


def sq_sample(out, i):
    return out[i].pow(2).sum()


def sq_mean(out):
    return out.pow(2).sum() / out.shape[0]


def initial_states(model, B, dtype):
    rnn = model.rnn
    n = rnn.num_layers * (2 if rnn.bidirectional else 1)
    h_out = rnn.proj_size or rnn.hidden_size
    h0 = torch.randn(n, B, h_out, dtype=dtype)
    return [h0, torch.randn(n, B, rnn.hidden_size, dtype=dtype)] if isinstance(rnn, nn.LSTM) else [h0]


def check_rnn(model, x, lengths=None, *, given_hx=False, dtype=torch.float64, Rs=(1e-2, 1e6), seed=None):
    """Engine vs native and vs the per-sample oracle: outputs, gradients of x and of the initial states, per-sample
    norms, clipped sums (clipping active and inactive); autograd never writes .grad."""
    model, x = model.to(dtype), x.to(dtype)
    rtol, atol = LAYER_TOLERANCES[dtype]
    extra = [lengths]
    if given_hx:
        extra += initial_states(model, x.shape[0 if model.rnn.batch_first else 1], dtype)
    ref_g = per_sample_grads_loop(model, sq_sample, x, *extra, seed=seed)
    native = copy.deepcopy(model)
    for R in Rs:
        inputs_n = [t.clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                    for t in [x, *extra]]
        inputs_e = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                    else t for t in inputs_n]
        if seed is not None:
            torch.manual_seed(seed)
        out_n = native(*inputs_n)
        sq_mean(out_n).backward()
        eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(R), batch_first=model.rnn.batch_first)
        try:
            if seed is not None:
                torch.manual_seed(seed)
            out_e = model(*inputs_e)
            assert_close(out_e, out_n.detach(), rtol, atol * out_n.abs().max().item(), "output")
            sq_mean(out_e).backward()
        finally:
            eng.detach()
        for a, b in zip(inputs_e, inputs_n):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                assert_close(a.grad, b.grad, rtol, atol * b.grad.abs().max().item(), "input gradient")
        sums, norms = clip_reference(ref_g, R)
        assert_close(eng.last_norms, norms, rtol, atol * norms.max().item(), "per-sample norms")
        named = dict(model.named_parameters())
        assert set(eng.param_names[p] for p in eng.summed) == set(sums), "a trainable parameter was skipped"
        for n, v in sums.items():
            assert_close(eng.summed[named[n]], v, rtol, atol * max(v.abs().max().item(), 1e-30), n)
        assert all(p.grad is None for p in model.parameters()), "autograd must not write .grad"


# (module, its options, initial states given): each option on its own and in combination, both layouts
CONFIGS = [
    ("lstm", dict(batch_first=True), False),
    ("lstm", dict(batch_first=False), True),
    ("gru", dict(batch_first=True), True),
    ("gru", dict(batch_first=False), False),
    ("rnn_tanh", dict(batch_first=True), False),
    ("rnn_relu", dict(batch_first=False), True),
    ("lstm", dict(num_layers=2, bidirectional=True, batch_first=True), True),
    ("lstm", dict(proj_size=2, bidirectional=True, batch_first=False), True),
    ("lstm", dict(num_layers=2, proj_size=3, bias=False, batch_first=True), False),
    ("gru", dict(num_layers=3, bidirectional=True, batch_first=False), True),
    ("gru", dict(bias=False, bidirectional=True, batch_first=True), False),
    ("rnn_tanh", dict(num_layers=2, bidirectional=True, bias=False, batch_first=False), True),
    ("rnn_relu", dict(num_layers=2, batch_first=True), True),
]


@pytest.mark.parametrize("kind,kw,given_hx", CONFIGS, ids=lambda v: str(v))
def test_padded_sequences_match_native_and_the_oracle(kind, kw, given_hx):
    model = Recurrent(make_rnn(kind, **kw))
    check_rnn(model, batch_input(model.rnn, 5, 6, 3), given_hx=given_hx)


@pytest.mark.parametrize("kind,kw", [("lstm", dict(bidirectional=True, proj_size=2)), ("gru", dict(num_layers=2)),
                                     ("rnn_tanh", dict(bidirectional=True)), ("lstm", dict(num_layers=2))],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("given_hx", [False, True])
def test_packed_sequences_of_unequal_lengths(kind, kw, enforce_sorted, given_hx):
    """Each sample's per-sample gradient covers its own length only; unsorted batches are put back in order."""
    model = Recurrent(make_rnn(kind, batch_first=True, **kw), enforce_sorted=enforce_sorted)
    lengths = torch.tensor([6, 5, 5, 2, 1]) if enforce_sorted else torch.tensor([2, 6, 1, 5, 3])
    x = torch.randn(5, 6, 3)
    x[torch.arange(6)[None, :] >= lengths[:, None]] = 1e3  # padding must not matter
    check_rnn(model, x, lengths, given_hx=given_hx)


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(sorted(MODULES)), layers=st.integers(1, 2), bidirectional=st.booleans(),
       batch_first=st.booleans(), proj=st.booleans(), bias=st.booleans(), B=st.integers(1, 4), T=st.integers(1, 4),
       d_in=st.integers(1, 4), hidden=st.integers(1, 4), packed=st.sampled_from([None, "sorted", "unsorted"]),
       given_hx=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_generated_shapes(kind, layers, bidirectional, batch_first, proj, bias, B, T, d_in, hidden, packed,
                          given_hx, seed):
    torch.manual_seed(seed)
    kw = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    if proj and kind == "lstm" and hidden > 1:
        kw["proj_size"] = hidden - 1
    model = Recurrent(make_rnn(kind, d_in, hidden, **kw), enforce_sorted=packed == "sorted")
    lengths = None
    if packed:
        lengths = torch.randint(1, T + 1, (B,))
        if packed == "sorted":
            lengths = lengths.sort(descending=True).values
    check_rnn(model, batch_input(model.rnn, B, T, d_in), lengths, given_hx=given_hx, Rs=(1e-2,))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_fp32(kind):
    model = Recurrent(make_rnn(kind, 5, 7, num_layers=2, bidirectional=True, batch_first=True))
    check_rnn(model, torch.randn(4, 9, 5), dtype=torch.float32, Rs=(1e-2,))


def test_ghost_and_direct_norms_agree_with_the_oracle(monkeypatch):
    """LinearGrad over the stacked time steps: ghost (T^2 per sample) and direct (per-sample [gates, H] tiles)."""
    for mode in ("ghost", "direct"):
        monkeypatch.setattr(NormRule, "mode", mode)
        torch.manual_seed(0)
        model = Recurrent(make_rnn("lstm", 3, 4, bidirectional=True, proj_size=2, batch_first=True), enforce_sorted=False)
        check_rnn(model, torch.randn(3, 5, 3), torch.tensor([5, 2, 4]), Rs=(1e-2,))


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_dropout_between_layers_draws_the_native_masks(kind):
    """Training-mode dropout between layers: on the CPU the masks equal the native op's at the same seed, so outputs
    and per-sample gradients match (the oracle reseeds before every forward)."""
    model = Recurrent(make_rnn(kind, 3, 4, num_layers=3, dropout=0.4, bidirectional=True, batch_first=True))
    model.train()
    check_rnn(model, torch.randn(4, 5, 3), seed=123)
    check_rnn(model, torch.randn(4, 5, 3), torch.tensor([5, 4, 3, 1]), seed=7)


def test_frozen_weights_train_the_rest():
    rnn = make_rnn("lstm", num_layers=2, bidirectional=True, batch_first=True)
    for name in ("weight_hh_l0", "bias_ih_l1_reverse", "weight_ih_l1"):
        getattr(rnn, name).requires_grad_(False)
    check_rnn(Recurrent(rnn), torch.randn(4, 5, 3), given_hx=True)


@pytest.mark.parametrize("packed", [False, True])
def test_one_sample_moves_the_model_by_at_most_R(packed):
    torch.manual_seed(3)
    model = Recurrent(make_rnn("lstm", 3, 6, num_layers=2, bidirectional=True, batch_first=True)).double()
    R = 1e-3
    opt = dp_sgd(model, R)
    x = 10 * torch.randn(1, 7, 3, dtype=torch.float64)
    before = flat_params(model)
    out = model(x, torch.tensor([4]) if packed else None)
    out.pow(2).sum().backward()
    assert opt.engine.last_norms.item() > 10 * R  # clipping is active
    opt.step()
    assert (flat_params(model) - before).norm() <= R * (1 + 1e-9)
    opt.detach()


def test_per_layer_clipping_inside_backward_matches_the_oracle():
    torch.manual_seed(0)
    model = Recurrent(make_rnn("gru", 3, 5, num_layers=2, bidirectional=True, batch_first=True), enforce_sorted=False).double()
    x, lengths = torch.randn(4, 6, 3, dtype=torch.float64), torch.tensor([3, 6, 1, 4])
    names = [n for n, p in model.named_parameters()]
    R = [0.01 * (1 + i % 3) for i in range(len(names))]
    ref = per_sample_grads_loop(model, sq_sample, x, lengths)
    with pytest.warns(UserWarning):
        opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                 max_grad_norm=R, expected_batch_size=4, sample_size=400, clipping="per_layer")
    sq_mean(model(x, lengths)).backward()
    assert opt.engine.last_fused == sum(1 for p in model.parameters() if p.dim() > 1)  # weights clipped in backward
    named = dict(model.named_parameters())
    for (n, g), r in zip(ref.items(), R):
        c = (r / (g.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1.0)
        assert_close(opt.engine.summed[named[n]], torch.einsum("b,b...->...", c, g), 1e-9, 1e-14, n)
    opt.detach()


def test_retained_graph_replay_is_refused():
    model = Recurrent(make_rnn("lstm", batch_first=True)).double()
    opt = dp_sgd(model, 0.1, B=3)
    out = model(torch.randn(3, 4, 3, dtype=torch.float64))
    out.pow(2).sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="clipped twice"):
        out.sum().backward()
    opt.detach()


def test_input_gradient_pass_records_nothing():
    model = Recurrent(make_rnn("gru", batch_first=True)).double()
    opt = dp_sgd(model, 0.1, B=3)
    x = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.grad(model(x).pow(2).sum(), x)
    assert opt.engine.num_backward == 0
    model(x.detach()).pow(2).sum().backward()
    assert opt.engine.num_backward == 1 and opt.engine.num_samples == 3
    opt.detach()


def test_bf16_autocast_matches_the_fp32_oracle_to_bf16_tolerance():
    """Matmuls in bf16 (norms from those operands, fp32 accumulation), gates and cell state in fp32."""
    torch.manual_seed(0)
    model = Recurrent(make_rnn("lstm", 8, 16, num_layers=2, bidirectional=True, batch_first=True),
                      enforce_sorted=False).float()
    x, lengths = torch.randn(4, 6, 8), torch.tensor([6, 2, 5, 3])
    R = 0.05
    sums, norms = clip_reference(per_sample_grads_loop(model, sq_sample, x, lengths), R)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(R))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, lengths)
    assert out.dtype == torch.float32
    sq_mean(out).backward()
    eng.detach()
    assert_close(eng.last_norms, norms, 3e-2, 1e-3, "norms")
    named = dict(model.named_parameters())
    num = sum((eng.summed[named[n]].double() - v.double()).pow(2).sum() for n, v in sums.items()).sqrt()
    den = sum(v.double().pow(2).sum() for v in sums.values()).sqrt()
    assert num / den < 3e-2, f"relative error {num / den:.3e}"


class CellLoop(nn.Module):
    """An nn.LSTMCell / GRUCell / RNNCell run over the time steps of x [B, T, in] in a Python loop."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        state, outs = None, []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outs, 1)


@pytest.mark.parametrize("cell", [lambda: nn.LSTMCell(3, 4), lambda: nn.GRUCell(3, 4),
                                  lambda: nn.RNNCell(3, 4, nonlinearity="relu"), lambda: nn.GRUCell(3, 4, bias=False)],
                         ids=["lstm_cell", "gru_cell", "rnn_relu_cell", "gru_cell_no_bias"])
def test_cells_in_a_loop_match_native_and_the_oracle(cell):
    """Each cell call is one use of its weights (the engine's cross terms join the T uses)."""
    model = CellLoop(cell()).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    sums, norms = clip_reference(per_sample_grads_loop(model, sq_sample, x), 1e-2)
    native = copy.deepcopy(model)(x)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(1e-2))
    out = model(x)
    sq_mean(out).backward()
    eng.detach()
    assert_close(out, native, 1e-9, 1e-12, "output")
    assert_close(eng.last_norms, norms, 1e-9, 1e-12, "per-sample norms")
    named = dict(model.named_parameters())
    for n, v in sums.items():
        assert_close(eng.summed[named[n]], v, 1e-9, 1e-12 * v.abs().max().item(), n)


# ------------------------------------------------------------------ refusals
class RawPackedLSTM(nn.Module):
    """Calls the packed op itself (not through nn.LSTM.forward): the samples' order is unknown."""

    def __init__(self):
        super().__init__()
        self.w_ih, self.w_hh = nn.Parameter(torch.randn(16, 3)), nn.Parameter(torch.randn(16, 4))

    def forward(self, x):
        p = pack_padded_sequence(x, torch.tensor([3, 1]), batch_first=True, enforce_sorted=False)
        h = torch.zeros(1, 2, 4)
        return torch.lstm(p.data, p.batch_sizes, (h, h), [self.w_ih, self.w_hh], False, 1, 0.0, True, False)[0]


class LearnedInitialState(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(3, 4, batch_first=True)
        self.h0 = nn.Parameter(torch.zeros(1, 1, 4))

    def forward(self, x):
        return self.gru(x, self.h0.expand(1, x.shape[0], 4).contiguous())[0]


class TimeMajorIntoBatchFirst(nn.Module):
    """A batch-first LSTM fed a time-major view of the model input: its dim 0 is not the batch."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)

    def forward(self, x):
        return self.lstm(x.transpose(0, 1))[0]


@pytest.mark.parametrize("model,x,err,match", [
    (RawPackedLSTM(), torch.randn(2, 3, 3), UnsupportedLayerError, "outside nn.RNN/nn.LSTM/nn.GRU.forward"),
    (LearnedInitialState(), torch.randn(2, 3, 3), UnsupportedLayerError, "initial state"),
    (TimeMajorIntoBatchFirst(), torch.randn(2, 5, 3), BatchSizeError, r"dim 0 of the input \(batch_first=True\)"),
], ids=["packed-op-outside-the-module", "parameter-as-initial-state", "time-major-input-to-a-batch-first-module"])
def test_unsupported_uses_are_refused_naming_the_cause(model, x, err, match):
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0))
    try:
        with pytest.raises(err, match=match):
            model(x)
    finally:
        eng.detach()


def test_cross_entropy_on_the_final_state_only():
    """A classifier reading only h_n: steps reached by backward through h_n alone still give exact gradients."""
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(3, 5, num_layers=2, batch_first=True), nn.Linear(5, 4)

        def forward(self, x):
            return self.head(self.lstm(x)[1][0][-1])

    torch.manual_seed(0)
    model = Classifier().double()
    x, y = torch.randn(5, 6, 3, dtype=torch.float64), torch.randint(0, 4, (5,))
    ref = per_sample_grads_loop(model, lambda o, i: F.cross_entropy(o[i:i + 1], y[i:i + 1]), x)
    sums, norms = clip_reference(ref, 0.05)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(0.05))
    F.cross_entropy(model(x), y).backward()
    eng.detach()
    assert_close(eng.last_norms, norms, 1e-9, 1e-12, "norms")
    named = dict(model.named_parameters())
    for n, v in sums.items():
        assert_close(eng.summed[named[n]], v, 1e-9, 1e-12 * v.abs().max().item(), n)
