"""HF ``gradient_checkpointing_enable()`` (``torch.utils.checkpoint`` around each GPT-2 block, non-reentrant by default,
and with ``gradient_checkpointing_kwargs={"use_reentrant": True}``) under the engine: the clipped sums equal the
torch.func reference of the same model without checkpointing (flat and per-layer clipping, tied embedding / head,
shared position lookups); dropout inside the checkpointed blocks sees the forward's masks again."""
import pytest
import torch
from torch import nn

import fastdp
from fastdp.model_hooks import ModelHooks
from helpers import assert_close, assert_runs_match, clipped_sum_reference, engine_run, lm_sum_loss, per_sample_grads

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier", "ignore::FutureWarning",
                                        "ignore:There is a performance drop")

VOCAB = 41


def gpt2(seed=0, pdrop=0.0, attn="eager"):
    """GPT2LMHeadModel, n_layer=2, n_embd=32, fp64, in training mode (HF checkpoints only then)."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                                  resid_pdrop=pdrop, embd_pdrop=pdrop, attn_pdrop=pdrop)
    model = transformers.GPT2LMHeadModel(cfg).double().train()
    model.config._attn_implementation = attn
    return model


class Logits(nn.Module):  # the reference's view of the model: input ids -> logits (torch.func calls it)
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, idx):
        return self.lm(input_ids=idx, use_cache=False).logits


def batch(B=3, T=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, VOCAB, (B, T), generator=g)


def logits(model, idx):
    return model(input_ids=idx, use_cache=False).logits


def assert_sums(engine, model, ref):
    named = dict(model.named_parameters())  # (tied weights: the first name, as the reference has it)
    assert set(engine.summed) == set(named[n] for n in ref), "a trainable parameter was skipped"
    for n, v in ref.items():
        assert_close(engine.summed[named[n]], v, 1e-9, 1e-12 * v.abs().max().item(), n)


def checkpointing_kwargs(reentrant):
    return {"use_reentrant": True} if reentrant else None


@pytest.mark.parametrize("attn, reentrant", [("eager", False), ("sdpa", False), ("eager", True), ("sdpa", True)])
def test_gradient_checkpointing_enable_is_exact(monkeypatch, attn, reentrant):
    replays = []  # each block's recomputation runs as a replay of the forward's taps
    original_replay = ModelHooks.replay
    monkeypatch.setattr(ModelHooks, "replay",
                        lambda self, b, reentrant=None: replays.append(b) or original_replay(self, b, reentrant))
    model, (idx, tgt) = gpt2(attn=attn), batch()
    ref, norms = clipped_sum_reference(Logits(model), lm_sum_loss, idx, tgt, max_grad_norm=0.5)
    ref = {n[len("lm."):]: v for n, v in ref.items()}
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(reentrant))
    assert model.transformer.h[0].gradient_checkpointing and model.is_gradient_checkpointing
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(0.5))
    lm_sum_loss(logits(model, idx), tgt).backward()
    eng.detach()
    assert eng.num_backward == 1
    assert (norms > 0.5).any()
    assert_close(eng.last_norms, norms, 1e-9, 1e-12 * norms.max().item(), "per-sample norms")
    assert_sums(eng, model, ref)
    assert all(p.grad is None for p in model.parameters())
    assert replays == [3, 3]  # (batch size 3, two blocks)


@pytest.mark.parametrize("reentrant", [False, True])
def test_per_layer_clipping_with_gradient_checkpointing_is_exact(reentrant):
    model, (idx, tgt) = gpt2(seed=2), batch(seed=3)
    names = [n for n, _ in model.named_parameters()]
    R = [0.05 * (1 + i % 3) for i in range(len(names))]
    g = per_sample_grads(Logits(model), lm_sum_loss, idx, tgt)
    ref = {}
    for (n, v), r in zip(g.items(), R):
        c = (r / (v.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1.0)
        ref[n[len("lm."):]] = torch.einsum("b,b...->...", c, v)
    model.activation_checkpointing_enable(checkpointing_kwargs(reentrant))
    with pytest.warns(UserWarning):  # noise_multiplier=0
        opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                 max_grad_norm=R, expected_batch_size=3, sample_size=300, clipping="per_layer",
                                 fused_per_layer=True)
    lm_sum_loss(logits(model, idx), tgt).backward()
    assert opt.engine.last_fused == sum(1 for p in model.parameters() if p.dim() > 1)  # clipped inside backward
    assert_sums(opt.engine, model, ref)
    opt.detach()


@pytest.mark.parametrize("reentrant", [False, True])
def test_dropout_in_checkpointed_blocks_matches_the_run_without_checkpointing(reentrant):
    idx, tgt = batch(seed=4)
    runs = []
    for enable in (False, True):
        model = gpt2(seed=5, pdrop=0.3)
        if enable:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs(reentrant))
        eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(0.5))
        torch.manual_seed(6)
        out = logits(model, idx)
        lm_sum_loss(out, tgt).backward()
        eng.detach()
        runs.append(engine_run(out, eng, model))
    assert_runs_match(*runs, what="logits")
