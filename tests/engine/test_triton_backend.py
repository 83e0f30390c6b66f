"""The engine with FASTDP_BACKEND=triton: its Linear norms and clipped sums come from the Triton kernels
(through the interpreter on the CPU) and still match the torch.func reference."""
import pytest
import torch
import torch.nn.functional as F

import fastdp
from fastdp.grad_sample import NormRule
from fastdp.models import MLP, TinyTransformer, lm_loss
from helpers import assert_close, clipped_sum_reference, count_launches

pytestmark = pytest.mark.interpreter


def assert_engine_matches_reference(m, loss, x, y, atol_by_model=False):
    """Engine (flat clipping, R = 0.2) vs the torch.func reference: norms to 1e-5 and clipped sums to 1e-4 relative;
    the sums' absolute tolerance is 1e-5 of each parameter's largest entry, or of the model's (``atol_by_model``:
    for parameters whose gradient is ~0, e.g. conv biases before GroupNorm)."""
    ref, norms = clipped_sum_reference(m, loss, x, y, max_grad_norm=0.2)
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(0.2))
    loss(m(x), y).backward()
    eng.detach()
    assert_close(eng.last_norms, norms, 1e-5, 1e-6 * norms.max().item(), "norms")
    named = dict(m.named_parameters())
    model_max = max(v.abs().max().item() for v in ref.values())
    for n, v in ref.items():
        assert_close(eng.summed[named[n]], v, 1e-4, 1e-5 * (model_max if atol_by_model else v.abs().max().item()), n)


@pytest.mark.parametrize("mode", ["ghost", "direct"])
@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_engine_parity_with_triton_kernels(name, mode, monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    monkeypatch.setattr(NormRule, "mode", mode)
    calls = count_launches(monkeypatch, "ghost_norm", "_ghost_dot_kernel")
    tied = count_launches(monkeypatch, "embedding_norm", "_embedding_linear_dot_kernel")
    torch.manual_seed(0)
    if name == "mlp":
        m, x, y, loss = MLP(12, 3, hidden=(9,)), torch.randn(5, 12), torch.randint(0, 3, (5,)), F.cross_entropy
    else:
        m = TinyTransformer(vocab=19, d=16, layers=1, heads=2, max_len=8)
        x, y, loss = torch.randint(0, 19, (3, 7)), torch.randint(0, 19, (3, 7)), lm_loss
    assert_engine_matches_reference(m, loss, x, y)
    assert (len(calls) > 0) == (mode == "ghost")  # the ghost kernel did the ghost norms
    assert len(tied) == (1 if name == "transformer" else 0)  # the tied embedding x head cross term


@pytest.mark.parametrize("mode", ["direct", "ghost"])
def test_engine_conv_norms_with_the_implicit_im2col_kernels(mode, monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    monkeypatch.setattr(NormRule, "mode", mode)
    from fastdp.models import SmallCNN
    calls = count_launches(monkeypatch, "conv_norm", f"_conv_{mode}_norm_kernel")
    sums = count_launches(monkeypatch, "conv_clip_accumulate", "_conv_clip_accumulate_kernel")
    torch.manual_seed(0)
    m = SmallCNN(in_channels=1, num_classes=4, width=4, image_size=8)
    x, y = torch.randn(3, 1, 8, 8), torch.randint(0, 4, (3,))
    assert_engine_matches_reference(m, F.cross_entropy, x, y, atol_by_model=True)  # conv biases before GroupNorm
    n_conv = sum(isinstance(mod, torch.nn.Conv2d) for mod in m.modules())
    assert len(calls) == len(sums) == n_conv > 0  # every conv weight's norm and clipped sum came from the kernels


def test_engine_embedding_norms_and_sums_with_the_kernels(monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    calls = count_launches(monkeypatch, "embedding_norm", "_embedding_dot_kernel", "_embedding_accumulate_kernel")
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(13, 6, padding_idx=0), torch.nn.Flatten(), torch.nn.Linear(6 * 5, 3))
    x, y = torch.randint(0, 13, (4, 5)), torch.randint(0, 3, (4,))
    assert_engine_matches_reference(m, F.cross_entropy, x, y)
    assert sorted(set(calls)) == ["_embedding_accumulate_kernel", "_embedding_dot_kernel"]


class NormStack(torch.nn.Module):
    """LayerNorm over [B, T, d], GroupNorm over [B, C, L] and RMSNorm, each with its affine parameters."""

    def __init__(self):
        super().__init__()
        self.ln, self.gn, self.rms = torch.nn.LayerNorm(6), torch.nn.GroupNorm(2, 4), torch.nn.RMSNorm(6)
        self.head = torch.nn.Linear(6 * 4, 3)

    def forward(self, x):  # x [B, 4, 6]
        return self.head(self.gn(self.rms(self.ln(x))).flatten(1))  # (GN last: a row norm after it would cancel its weight)


def test_engine_norm_layer_gradients_with_the_kernel(monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    calls = count_launches(monkeypatch, "norm_affine_grad", "_norm_affine_grad_kernel")
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5,))
    assert_engine_matches_reference(NormStack(), F.cross_entropy, x, y)
    assert len(calls) == 3  # one launch per norm layer


@pytest.mark.filterwarnings("ignore:noise_multiplier=0")
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_clip_factors_take_one_launch_per_rule_call(clipping, monkeypatch):
    """Flat clipping: one factor launch per step; per-layer: one per weight clipped on its own (biases and norm
    affines share one batched computation in PyTorch), instead of four PyTorch ops each."""
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    calls = count_launches(monkeypatch, "clip_factor", "_clip_factor_kernel")
    torch.manual_seed(0)
    m = TinyTransformer(vocab=19, d=16, layers=1, heads=2, max_len=8)
    x, y = torch.randint(0, 19, (3, 7)), torch.randint(0, 19, (3, 7))
    R = 0.2 if clipping == "flat" else [0.2] * len(list(m.parameters()))
    opt = fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=R,
                             expected_batch_size=3, sample_size=30, clipping=clipping)
    lm_loss(m(x), y).backward()
    opt.step()
    weights = 6  # tied tok/head, pos, qkv, proj, fc1, fc2
    assert len(calls) == (1 if clipping == "flat" else weights)
    if clipping == "per_layer":  # and the factors are the rule's
        sq = opt.engine._last[0]
        assert torch.isfinite(sq).all() and all((c <= 1).all() for c in opt.engine.last_factors.values())
