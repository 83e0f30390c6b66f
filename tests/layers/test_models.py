"""Composite models: engine clipped sums against torch.func, and against Opacus where Opacus supports the model."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdp
from fastdp.models import MLP, SmallCNN, TinyTransformer, lm_loss
from helpers import assert_close, check_bf16_autocast, clipped_sum_reference


def ce(out, y):
    return F.cross_entropy(out, y)


def run_engine(model, loss, x, y, R, clipping="flat"):
    rule = fastdp.FlatClip(R) if clipping == "flat" else fastdp.AutomaticClip(R)
    eng = fastdp.GradSampleEngine(model, rule)
    try:
        loss(model(x), y).backward()
    finally:
        eng.detach()
    return eng


def compare(model, loss, x, y, R, dtype=torch.float64, clipping="flat", rtol=1e-9):
    model = model.to(dtype)
    if x.is_floating_point():
        x = x.to(dtype)
    ref, norms = clipped_sum_reference(model, loss, x, y, max_grad_norm=R, clipping=clipping)
    eng = run_engine(model, loss, x, y, R, clipping)
    assert_close(eng.last_norms, norms, rtol, rtol * norms.max().item(), "norms")
    named = dict(model.named_parameters())
    for n, v in ref.items():
        assert_close(eng.summed[named[n]], v, rtol, rtol * v.abs().max().item(), n)
    return eng


@pytest.mark.parametrize("R", [0.05, 1e6])
def test_mlp(R):
    compare(MLP(12, 3, hidden=(9, 7)), ce, torch.randn(10, 12), torch.randint(0, 3, (10,)), R)


@pytest.mark.parametrize("clipping", ["flat", "automatic"])
def test_cnn_groupnorm(clipping):
    compare(SmallCNN(1, 4, width=8, image_size=8), ce, torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,)), 0.1,
            clipping=clipping)


def test_tiny_transformer_tied_embeddings():
    m = TinyTransformer(vocab=31, d=16, layers=2, heads=2, max_len=12)
    assert m.head.weight is m.tok.weight
    idx = torch.randint(0, 31, (4, 9))
    compare(m, lm_loss, idx, torch.randint(0, 31, (4, 9)), 0.3)


def test_frozen_parts_cost_nothing_and_never_move():
    m = TinyTransformer(vocab=31, d=16, layers=2, heads=2, max_len=12)
    for p in list(m.tok.parameters()) + list(m.blocks[0].parameters()):
        p.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    idx, tgt = torch.randint(0, 31, (4, 9)), torch.randint(0, 31, (4, 9))
    eng = compare(m, lm_loss, idx, tgt, 0.3)
    frozen = [p for p in m.parameters() if not p.requires_grad]
    assert frozen and all(p not in eng.summed for p in frozen)
    opt = fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=1.0), noise_multiplier=1.0, max_grad_norm=0.3,
                             expected_batch_size=4, sample_size=100)
    lm_loss(m(idx), tgt).backward()
    opt.step()
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n


def test_fp32_composite():
    compare(SmallCNN(1, 4, width=8, image_size=8), ce, torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,)), 0.1,
            dtype=torch.float32, rtol=2e-5)


def test_hf_gpt2_tied_and_shared_positions():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    m = transformers.GPT2LMHeadModel(cfg)
    m.config._attn_implementation = "eager"
    assert m.lm_head.weight is m.transformer.wte.weight

    class Wrapped(nn.Module):  # logits only, so torch.func can call it
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, idx):
            return self.lm(input_ids=idx, use_cache=False).logits

    idx = torch.randint(0, 37, (3, 10))
    compare(Wrapped(m), lm_loss, idx, torch.randint(0, 37, (3, 10)), 0.5)


def test_against_opacus_hooks():
    """Same update as Opacus' hooks mode with noise 0 (flat clipping, mean loss)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer as OpacusDPOptimizer

    torch.manual_seed(1)
    base = SmallCNN(1, 5, width=8, image_size=8)
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 5, (12,))
    import copy
    m_op, m_fd = copy.deepcopy(base), copy.deepcopy(base)
    gsm = GradSampleModule(m_op)
    op = OpacusDPOptimizer(torch.optim.SGD(gsm.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=0.2,
                           expected_batch_size=12)
    ce(gsm(x), y).backward()
    op.step()
    with pytest.warns(UserWarning, match="NOT"):
        fd = fastdp.DPOptimizer(m_fd, torch.optim.SGD(m_fd.parameters(), lr=1.0), noise_multiplier=0.0,
                                max_grad_norm=0.2, expected_batch_size=12, sample_size=120)
    ce(m_fd(x), y).backward()
    fd.step()
    for (n, a), b in zip(m_fd.named_parameters(), m_op.parameters()):
        assert_close(a.detach(), b.detach(), 1e-5, 1e-6, n)


def test_bf16_autocast_close_to_fp32():
    """Under bf16 autocast the clipped sum stays within bf16 tolerance of the fp32 reference."""
    m = TinyTransformer(vocab=31, d=32, layers=2, heads=2, max_len=12)
    check_bf16_autocast(m, torch.randint(0, 31, (4, 9)), torch.randint(0, 31, (4, 9)), lm_loss, "cpu")
