"""``fastdp.fix`` (BatchNorm -> GroupNorm, Opacus' rule) and ``fastdp.validate`` (every refused parameter with its
reason, before training; a dry run that changes nothing)."""
import math

import pytest
import torch
from torch import nn

import fastdp
from helpers import check_exact


def bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 48, 3), nn.BatchNorm2d(48), nn.ReLU(), nn.Conv2d(48, 8, 3),
                         nn.BatchNorm2d(8, affine=False), nn.Flatten(), nn.Linear(72, 10), nn.BatchNorm1d(10))


def test_fix_replaces_batchnorm_with_groupnorm_by_opacus_rule():
    model, report = fastdp.fix(bn_cnn())
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert [(g.num_groups, g.num_channels, g.affine) for g in norms] == [
        (math.gcd(32, 48), 48, True), (8, 8, False), (math.gcd(32, 10), 10, True)]
    assert [n for n, _, _ in report.replaced] == ["1", "4", "7"] and "GroupNorm(16, 48" in str(report)
    again, report2 = fastdp.fix(model)
    assert again is model and not report2 and str(report2) == "nothing to fix"
    bn, rep = fastdp.fix(nn.BatchNorm1d(6))
    assert isinstance(bn, nn.GroupNorm) and bn.num_groups == 2 and rep.replaced[0][0] == ""


def test_fixed_model_trains_exactly():
    model, _ = fastdp.fix(bn_cnn())
    model[4] = nn.Identity()  # (a GroupNorm without affine right after makes the first one's gradient ~0: rounding)
    check_exact(model, torch.randn(3, 3, 7, 7))


def test_model_fixed_by_opacus_trains_under_fastdp():
    from opacus.validators import ModuleValidator
    model = ModuleValidator.fix(bn_cnn())
    # Opacus keeps the BatchNorm without affine parameters: in training mode it still mixes the samples through
    # batch statistics, so fastdp refuses it (and fastdp.fix replaces it)
    assert isinstance(model[4], nn.BatchNorm2d)
    with pytest.raises(fastdp.UnsupportedLayerError, match="'4' .BatchNorm2d"):
        fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0))
    model[4] = nn.Identity()
    check_exact(model, torch.randn(3, 3, 7, 7))


def test_validate_lists_module_type_refusals_without_input():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LSTM(4, 3), nn.Bilinear(3, 3, 2))
    found = fastdp.validate(model)
    by_param = {r.parameter: r for r in found}
    assert set(by_param) >= {"1.weight", "1.bias", "2.weight_ih_l0", "3.weight", "3.bias"}
    assert "GroupNorm" in by_param["1.weight"].reason and by_param["1.weight"].module == "1"
    assert "batch_first=False" in by_param["2.weight_ih_l0"].reason
    assert "no fastdp layer handler" in by_param["3.weight"].reason
    assert not any(r.parameter.startswith("0.") for r in found)
    assert fastdp.validate(nn.Sequential(nn.Linear(4, 4)), torch.randn(2, 4)) == []


class Mixed(nn.Module):
    """A supported Linear, an op on a parameter that no handler takes, and a Linear fed a [T, B, d] input."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.kernel = nn.Parameter(torch.randn(4, 4))
        self.tail = nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc(x)
        h = torch.einsum("bi,ij->bj", h, self.kernel)  # an op on a parameter that no handler takes
        return self.tail(h.unsqueeze(0).expand(3, -1, -1))  # leads with 3, not the batch


def test_validate_dry_run_lists_every_refusal_and_changes_nothing():
    torch.manual_seed(1)
    model = Mixed()
    x = torch.randn(5, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    found = fastdp.validate(model, x)
    assert [r.parameter for r in found] == ["kernel", "tail.weight", "tail.bias"]
    assert "einsum" in found[0].reason and "batch size 5" in found[1].reason
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not hasattr(model, "_fdp") and not model._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(fastdp.UnsupportedLayerError, match="kernel.*\n.*tail.weight"):
        fastdp.validate(model, x, raise_errors=True)


def test_validate_with_batch_first_false_and_keyword_inputs():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2)

        def forward(self, src):
            return self.attn(src, src, src)[0]

    model = Seq()
    assert fastdp.validate(model, {"src": torch.randn(3, 2, 4)}, batch_first=False) == []
    found = fastdp.validate(model, {"src": torch.randn(3, 2, 4)})
    assert found and all("batch_first=False" in r.reason for r in found)


def test_transformer_encoder_refusal_names_attention_not_the_embedding(monkeypatch):
    """With the attention handler removed, the refusal names multi-head attention and its module."""
    from fastdp import tap
    monkeypatch.delitem(tap.OP_HANDLERS, torch.nn.functional.multi_head_attention_forward)

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1,
                                             enable_nested_tensor=False)

        def forward(self, ids):
            return self.enc(self.emb(ids))

    found = fastdp.validate(Enc(), torch.randint(0, 10, (4, 5)))
    assert found and "multi_head_attention_forward" in found[0].reason
    assert found[0].module == "enc.layers.0.self_attn" and "not one row of ids" not in found[0].reason
