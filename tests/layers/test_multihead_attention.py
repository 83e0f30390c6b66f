"""nn.MultiheadAttention under the engine: every configuration against the fp64 torch.func reference, the native
module's outputs unchanged, one sample moves the model by at most R, and the fused fast paths refused."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fastdp
from helpers import check_exact, dp_sgd, flat_params

E, H = 8, 2


def seq_loss(out, *_):
    """Sum of squares of a [T, B, E] output, averaged over the batch (dim 1)."""
    return out.pow(2).sum() / out.shape[1]


class SelfAttention(nn.Module):
    """x [B, T, E + 1 + T] -> attn(h, h, h) on h = x[..., :E], with the masks of ``mask`` built from each sample's
    extra channels (channel E > 0: a padded key; the last T channels: that sample's float attention mask), so the
    per-sample reference sees each sample's own masks. The returned weights, when asked, join the output per sample.
    """

    def __init__(self, mask="none", batch_first=True, need_weights=False, average=True, is_causal=False, heads=H,
                 **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, heads, batch_first=batch_first, **kw)
        self.mask, self.batch_first = mask, batch_first
        self.need_weights, self.average, self.is_causal = need_weights, average, is_causal

    def masks(self, x):
        xb = x if self.batch_first else x.transpose(0, 1)  # [B, T, *]
        B, T = xb.shape[:2]
        pad = xb[..., E] > 0
        pad[:, 0] = False  # every query sees at least one key
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        if self.mask == "kpm_bool":
            return {"key_padding_mask": pad}
        if self.mask == "kpm_float":
            return {"key_padding_mask": torch.zeros(B, T, dtype=x.dtype).masked_fill(pad, float("-inf"))}
        if self.mask == "attn_bool":
            return {"attn_mask": causal}
        if self.mask == "attn_float":
            return {"attn_mask": torch.cos(torch.arange(T * T, dtype=x.dtype)).view(T, T)}
        if self.mask == "attn_3d":  # [B * H, T, T], sample-major as the op reads it
            return {"attn_mask": xb[..., E + 1:E + 1 + T].detach().repeat_interleave(self.attn.num_heads, 0)}
        if self.mask == "both":
            return {"attn_mask": causal, "key_padding_mask": pad}
        return {}

    def forward(self, x):
        h = x[..., :E]
        out, w = self.attn(h, h, h, need_weights=self.need_weights, average_attn_weights=self.average,
                           is_causal=self.is_causal, **self.masks(x))
        if w is not None:  # [B, ...] weights: their path into the loss is checked too
            per_sample = w.flatten(1).pow(2).sum(1)
            out = out + (per_sample[:, None, None] if self.batch_first else per_sample[None, :, None])
        return out


def inputs(B, T, batch_first=True):
    x = torch.randn(B, T, E + 1 + T)
    return x if batch_first else x.transpose(0, 1).contiguous()


class CrossAttention(nn.Module):
    """query x [.., Tq, E] attends to a memory computed from x (key is value), or to separate key and value."""

    def __init__(self, kdim=None, vdim=None, key_is_value=True, **kw):
        super().__init__()
        self.mem = nn.Linear(E, kdim or E)
        self.val = None if key_is_value else nn.Linear(E, vdim or E)
        self.attn = nn.MultiheadAttention(E, H, batch_first=True, kdim=kdim, vdim=vdim, **kw)
        self.key_is_value = key_is_value

    def forward(self, x):
        m = torch.tanh(self.mem(x[:, :3]))
        v = m if self.key_is_value else torch.tanh(self.val(x[:, :3]))
        return self.attn(x, m, v, need_weights=False)[0]


CONFIGS = [
    dict(),
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True),
    dict(add_bias_kv=True, add_zero_attn=True, bias=False),
    dict(need_weights=True),
    dict(need_weights=True, average=False),
    dict(kdim=5, vdim=6),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("mask", ["none", "kpm_bool", "attn_float", "both"])
def test_self_attention_matches_reference(cfg, mask):
    torch.manual_seed(0)
    B, T = 3, 4
    cfg = dict(cfg)
    if "kdim" in cfg:  # separate projections: key / value of other widths
        model = CrossAttention(kdim=cfg["kdim"], vdim=cfg["vdim"], key_is_value=False)
        check_exact(model, torch.randn(B, T, E))
        return
    check_exact(SelfAttention(mask, **cfg), inputs(B, T))


@pytest.mark.parametrize("mask", ["kpm_float", "attn_bool", "attn_3d"])
def test_mask_kinds_match_reference(mask):
    torch.manual_seed(1)
    B, T = 2, 5
    check_exact(SelfAttention(mask, need_weights=mask == "attn_3d"), inputs(B, T))


@pytest.mark.parametrize("need_weights", [False, True])
def test_is_causal_matches_reference(need_weights):
    torch.manual_seed(2)
    B, T = 3, 4
    check_exact(SelfAttention("attn_bool", is_causal=True, need_weights=need_weights), inputs(B, T))


@pytest.mark.parametrize("key_is_value", [True, False])
def test_cross_attention_with_packed_weight_matches_reference(key_is_value):
    torch.manual_seed(3)
    check_exact(CrossAttention(key_is_value=key_is_value, add_bias_kv=True), torch.randn(3, 5, E))


def test_sequence_first_attention_matches_reference():
    torch.manual_seed(4)
    model = SelfAttention("kpm_bool", batch_first=False, add_bias_kv=True, need_weights=True)
    check_exact(model, inputs(3, 4, batch_first=False), loss=seq_loss, batch_first=False)


@pytest.mark.parametrize("cfg", [dict(), dict(add_bias_kv=True, add_zero_attn=True), dict(need_weights=True)])
def test_outputs_equal_the_native_module(cfg):
    torch.manual_seed(5)
    B, T = 3, 4
    model = SelfAttention("both", **cfg).double()
    x = inputs(B, T).double()
    native = model(x)
    keys = list(model.state_dict())
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0))
    try:
        out = model(x)
        out.sum().backward()
    finally:
        eng.detach()
    torch.testing.assert_close(out, native, rtol=1e-12, atol=1e-12)
    assert list(model.state_dict()) == keys  # the module's own state dict: nothing swapped


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 4), T=st.integers(1, 5), heads=st.sampled_from([1, 2, 4]), bias_kv=st.booleans(),
       zero_attn=st.booleans(), R=st.floats(1e-3, 1.0))
def test_one_sample_moves_the_model_by_at_most_R(B, T, heads, bias_kv, zero_attn, R):
    torch.manual_seed(B * 31 + T)
    wrapped = SelfAttention(heads=heads, add_bias_kv=bias_kv, add_zero_attn=zero_attn).double()
    x = inputs(B, T).double() * 3
    check_exact(wrapped, x, R=R)
    opt = dp_sgd(wrapped, R, B=1)
    before = flat_params(wrapped)
    (wrapped(x[:1]) ** 2).sum().backward()
    opt.step()
    opt.zero_grad()
    assert (flat_params(wrapped) - before).norm() <= R * (1 + 1e-9)
    opt.detach()


def test_fast_paths_are_not_taken_in_training_and_refused_with_a_tap():
    torch.manual_seed(6)
    layer = nn.TransformerEncoderLayer(E, H, 16, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    x = torch.randn(3, 4, E)
    pad = torch.zeros(3, 4, dtype=torch.bool)
    pad[0, -1] = True
    eng = fastdp.GradSampleEngine(enc, fastdp.FlatClip(1.0))
    seen = []
    orig = torch._transformer_encoder_layer_fwd

    def spy(*a, **k):
        seen.append(1)
        return orig(*a, **k)

    torch._transformer_encoder_layer_fwd = spy
    try:
        enc(x, src_key_padding_mask=pad).sum().backward()
    finally:
        torch._transformer_encoder_layer_fwd = orig
    assert not seen and eng.last_norms is not None and eng.last_norms.shape == (3,)
    # called with a tap (as a fast path would be), the fused op is refused naming the module
    attn = enc.layers[0].self_attn
    tap = eng.hooks._tap(attn.in_proj_weight, attn, "in_proj_weight")
    eng.hooks.batch_size = 3
    with pytest.raises(fastdp.UnsupportedLayerError, match="fast path"):
        torch._native_multi_head_attention(x, x, x, E, H, tap, attn.in_proj_bias, attn.out_proj.weight,
                                           attn.out_proj.bias)
    eng.detach()


def test_unbatched_and_static_kv_inputs_are_refused_naming_the_module():
    torch.manual_seed(7)

    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x):
            return self.attn(x[0], x[0], x[0])[0]

    m = Unbatched()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError, match="'attn' .MultiheadAttention.*unbatched"):
        m(torch.randn(2, 3, E))
    eng.detach()

    class Static(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, batch_first=True)

        def forward(self, x):
            a = self.attn
            q = x.transpose(0, 1)
            return F.multi_head_attention_forward(
                q, q, q, E, H, a.in_proj_weight, a.in_proj_bias, None, None, False, 0.0, a.out_proj.weight,
                a.out_proj.bias, static_k=torch.zeros(x.shape[0] * H, x.shape[1], E // H))[0]

    m = Static()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError, match="static_k"):
        m(torch.randn(2, 3, E))
    eng.detach()


def test_attention_dropout_trains_within_the_bound():
    """Dropout on the attention weights acts on activations: each sample still moves the model by at most R."""
    torch.manual_seed(8)
    model = SelfAttention(dropout=0.5).double()
    x = inputs(4, 3).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dp_sgd(model, 0.1, B=4)
    before = flat_params(model)
    model(x[:1]).pow(2).sum().backward()
    opt.step()
    assert (flat_params(model) - before).norm() <= 0.1 * (1 + 1e-9)
    opt.detach()
