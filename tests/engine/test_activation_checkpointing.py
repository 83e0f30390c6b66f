"""Activation checkpointing (``torch.utils.checkpoint``, ``use_reentrant=False`` and ``True``) under the engine: the
recomputation in backward runs through the layers with the forward's taps, and the clipped sums equal the torch.func
reference of the same model without checkpointing (flat and per-layer clipping, micro-batches, regions around blocks,
nested regions, a region around the whole model, selective checkpointing, a shared position lookup inside a region, a
tied weight used inside and outside a reentrant region). Dropout inside a region sees the forward's masks again.
Refused with a clear error: a retained graph backpropagated twice, a backward through the recomputed graph, a
reentrant region nested in another."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import fastdp
from fastdp.checkpointing import CheckpointReplayError
from fastdp.model_hooks import ModelHooks
from helpers import assert_close, assert_runs_match, clipped_sum_reference, dp_sgd, engine_run, flat_params, lm_sum_loss, per_sample_grads

pytestmark = pytest.mark.filterwarnings("ignore:noise_multiplier")

MODES = ("blocks", "outer", "nested", "root", "selective")
# use_reentrant=True: one region per block, one around the lookup and blocks, that one with non-reentrant block regions
# inside, one around the token lookup and blocks (the tied head outside), one around the whole model, and a
# non-reentrant outer region with reentrant block regions inside
REENTRANT_MODES = ("re_blocks", "re_outer", "re_mixed", "re_tied", "re_root", "re_in_outer")


def keep_matmuls(ctx, op, *args, **kwargs):
    """Selective checkpointing policy: matmul outputs are saved, everything else recomputed."""
    saved = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


class Block(nn.Module):
    """Pre-norm transformer block: causal attention (explicit softmax), MLP, and a scale used directly."""

    def __init__(self, d, heads, p_drop):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))  # the generic broadcast path (LayerScale)
        self.drop = nn.Dropout(p_drop)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        a = (self.drop(s.softmax(-1)) @ v).transpose(1, 2).reshape(B, T, d)
        x = x + self.drop(self.proj(a))
        return x + self.gamma * self.out(F.gelu(self.fc(self.ln2(x))))


class CheckpointedLM(nn.Module):
    """Tied embedding / head LM whose blocks run under ``torch.utils.checkpoint`` as ``mode`` says: "none",
    "blocks" (one region per block), "outer" (one region around the position lookup and all blocks), "nested" (the
    outer region with one region per block inside), "selective" (one region per block, matmul outputs saved: selective
    activation checkpointing). ("root": the caller checkpoints the whole model.)"""

    def __init__(self, vocab=13, d=8, heads=2, layers=2, max_len=6, p_drop=0.0):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, p_drop) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        self.mode = "none"

    def body(self, x, inner):
        x = x + self.pos(torch.arange(x.shape[1]))  # a lookup shared by the batch, broadcast by the add
        for b in self.blocks:
            if not inner:
                x = b(x)
            elif self.mode == "selective":
                ctx = functools.partial(create_selective_checkpoint_contexts, keep_matmuls)
                x = checkpoint(b, x, use_reentrant=False, context_fn=ctx)
            else:
                x = checkpoint(b, x, use_reentrant=self.mode in ("re_blocks", "re_in_outer"))
        return x

    def forward(self, idx):
        if self.mode == "re_tied":  # (a reentrant region needs an input that requires grad: a zero added)
            zero = torch.zeros((), dtype=self.ln.weight.dtype, requires_grad=True)
            x = checkpoint(lambda z, i: self.body(self.tok(i) + z, False), zero, idx, use_reentrant=True)
            return self.head(self.ln(x))
        x = self.tok(idx)
        if self.mode in ("none", "root", "re_root"):
            x = self.body(x, False)
        elif self.mode in ("blocks", "selective", "re_blocks"):
            x = self.body(x, True)
        else:
            x = checkpoint(self.body, x, self.mode in ("nested", "re_mixed", "re_in_outer"),
                           use_reentrant=self.mode in ("re_outer", "re_mixed"))
        return self.head(self.ln(x))


def lm(seed=0, **kw):
    torch.manual_seed(seed)
    return CheckpointedLM(**kw).double()


def batch(B=4, T=6, vocab=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, vocab, (B, T), generator=g)


def run(model, idx, mode):
    """The model's output with checkpointing as ``mode`` says."""
    model.mode = mode
    if mode == "re_root":  # (a reentrant region needs an input that requires grad: a zero added)
        zero = torch.zeros((), dtype=torch.float64, requires_grad=True)
        return checkpoint(lambda z: model(idx) + z, zero, use_reentrant=True)
    return checkpoint(model, idx, use_reentrant=False) if mode == "root" else model(idx)


def reference(model, idx, tgt, R):
    """torch.func per-sample gradients of the same model without checkpointing (torch.func refuses saved-tensor
    hooks), clipped flat at R: ({name: clipped sum}, [B] norms)."""
    model.mode = "none"
    return clipped_sum_reference(model, lm_sum_loss, idx, tgt, max_grad_norm=R)


def assert_sums(engine, model, ref, rtol=1e-9):
    named = dict(model.named_parameters())  # (tied weights: the first name, as torch.func's reference has it)
    assert set(engine.summed) == set(named[n] for n in ref), "a trainable parameter was skipped"
    for n, v in ref.items():
        assert_close(engine.summed[named[n]], v, rtol, 1e-12 * v.abs().max().item(), n)


@pytest.mark.parametrize("mode", MODES + REENTRANT_MODES)
def test_checkpointed_regions_give_the_exact_clipped_sums(mode):
    model, (idx, tgt) = lm(), batch()
    ref, norms = reference(model, idx, tgt, R=0.05)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(0.05))
    lm_sum_loss(run(model, idx, mode), tgt).backward()
    eng.detach()
    assert (norms > 0.05).any()  # clipping is active
    assert_close(eng.last_norms, norms, 1e-9, 1e-12 * norms.max().item(), "per-sample norms")
    assert_sums(eng, model, ref)
    assert all(p.grad is None for p in model.parameters())  # nothing reached .grad outside the engine
    assert all(n == 0 for n in eng._pending._counts.values())  # every use opened in forward arrived once


@pytest.mark.parametrize("mode, regions", [("blocks", 2), ("outer", 1), ("root", 1)])
def test_each_region_is_recomputed_through_the_layers_with_the_forward_taps(monkeypatch, mode, regions):
    """The recomputation runs inside ``ModelHooks.replay`` once per region and backward pass; the uses it opens are
    not counted."""
    replays, opened = [], []
    original_replay = ModelHooks.replay

    def counting_replay(self, batch_size):
        replays.append(batch_size)
        return original_replay(self, batch_size)

    monkeypatch.setattr(ModelHooks, "replay", counting_replay)
    model, (idx, tgt) = lm(), batch(B=3)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0))
    original_open = eng.open_use
    eng.open_use = lambda tap: opened.append(type(original_open(tap)).__name__) or original_open(tap)
    lm_sum_loss(run(model, idx, mode), tgt).backward()
    eng.detach()
    assert replays == [3] * regions
    assert "RecomputedUse" in opened and "PendingUse" in opened


@pytest.mark.parametrize("mode, regions", [("re_blocks", 2), ("re_outer", 1), ("re_root", 1)])
def test_a_reentrant_region_is_recomputed_with_counted_uses_in_the_outer_pass(monkeypatch, mode, regions):
    """A reentrant region's forward records no use; its recomputation runs inside ``ModelHooks.replay`` (at the
    forward's batch size) and opens ``ReentrantUse``s, its only uses, counted. Their gradients arrive in the nested
    backward passes checkpoint runs, and join the outer pass: one pass, finalised once."""
    replays, opened, tasks = [], [], set()
    original_replay = ModelHooks.replay

    def counting_replay(self, batch_size, reentrant=None):
        replays.append(batch_size)
        return original_replay(self, batch_size, reentrant)

    monkeypatch.setattr(ModelHooks, "replay", counting_replay)
    model, (idx, tgt) = lm(), batch(B=3)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0))
    original_open, original_submit = eng.open_use, eng.submit
    eng.open_use = lambda tap: opened.append(type(original_open(tap)).__name__) or original_open(tap)
    eng.submit = lambda g, use=None: tasks.add(torch._C._current_graph_task_id()) or original_submit(g, use)
    out = run(model, idx, mode)
    assert "ReentrantUse" not in opened and all(n == 1 for p, n in eng._pending._counts.items()
                                                 if p is model.blocks[0].fc.weight)  # held until recomputed
    lm_sum_loss(out, tgt).backward()
    eng.detach()
    assert replays == [3] * regions
    assert "ReentrantUse" in opened and "RecomputedUse" not in opened
    assert len(tasks) == regions + (mode != "re_root")  # the nested passes (and the outer one)
    assert eng.num_backward == 1 and eng.num_samples == 3
    assert all(n == 0 for n in eng._pending._counts.values())


@pytest.mark.parametrize("mode", ["blocks", "re_blocks", "re_tied"])
def test_per_layer_clipping_fused_in_backward_is_exact(mode):
    """re_tied: the tied head / token weight is used outside a reentrant region (its gradient arrives first) and
    inside (its use is opened only by the recomputation, later): it is clipped once both have arrived."""
    model, (idx, tgt) = lm(seed=2), batch(seed=3)
    named = [n for n, p in model.named_parameters()]
    R = [0.02 * (1 + i % 3) for i in range(len(named))]
    model.mode = "none"
    g = per_sample_grads(model, lm_sum_loss, idx, tgt)
    ref = {}
    for (n, v), r in zip(g.items(), R):
        c = (r / (v.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1.0)
        ref[n] = torch.einsum("b,b...->...", c, v)
    with pytest.warns(UserWarning):  # noise_multiplier=0
        opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                 max_grad_norm=R, expected_batch_size=4, sample_size=400, clipping="per_layer",
                                 fused_per_layer=True)
    lm_sum_loss(run(model, idx, mode), tgt).backward()
    assert opt.engine.last_fused == sum(1 for p in model.parameters() if p.dim() > 1)  # clipped inside backward
    assert_sums(opt.engine, model, ref)
    opt.detach()


@pytest.mark.parametrize("mode", ["nested", "re_mixed"])
def test_micro_batches_accumulate_exactly(mode):
    model, (i1, t1), (i2, t2) = lm(seed=4), batch(B=3, seed=5), batch(B=2, seed=6)
    r1, _ = reference(model, i1, t1, R=0.05)
    r2, _ = reference(model, i2, t2, R=0.05)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(0.05))
    for idx, tgt in ((i1, t1), (i2, t2)):
        lm_sum_loss(run(model, idx, mode), tgt).backward()
    eng.detach()
    assert eng.num_backward == 2 and eng.num_samples == 5
    assert_sums(eng, model, {n: r1[n] + r2[n] for n in r1})


@pytest.mark.parametrize("mode", ["blocks", "re_blocks", "re_tied"])
def test_one_sample_moves_the_model_by_at_most_R(mode):
    """Neighbouring batches (one sample removed) give steps at most R apart (noiseless SGD at lr 1, sum loss)."""
    R = 1e-3
    idx, tgt = batch(B=4, seed=7)
    steps = []
    for rows in (slice(0, 4), slice(0, 3)):
        model = lm(seed=8)
        before = flat_params(model)
        opt = dp_sgd(model, R, B=4)
        F.cross_entropy(run(model, idx[rows], mode).flatten(0, 1), tgt[rows].flatten(), reduction="sum").backward()
        assert (opt.engine.last_norms > R).all()
        opt.step()
        opt.detach()
        steps.append(flat_params(model) - before)
    assert (steps[0] - steps[1]).norm() <= R * (1 + 1e-9)
    assert steps[1].norm() > 0


@pytest.mark.parametrize("mode", ["blocks", "outer", "re_blocks", "re_outer"])
def test_dropout_inside_a_region_sees_the_forward_masks_again(mode):
    """checkpoint restores the RNG state for the recomputation: with dropout, the output and the clipped sums are
    those of the same model run without checkpointing from the same seed."""
    results = []
    idx, tgt = batch(seed=9)
    for m in ("none", mode):
        model = lm(seed=10, p_drop=0.5)
        eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(0.05))
        torch.manual_seed(11)
        out = run(model, idx, m)
        lm_sum_loss(out, tgt).backward()
        eng.detach()
        results.append(engine_run(out, eng, model))
    assert_runs_match(*results)


@pytest.mark.parametrize("mode", ["blocks", "re_blocks", "re_root"])
def test_a_retained_graph_backpropagated_twice_is_still_refused(mode):
    """(A reentrant region recomputes again in the second pass: its new uses come from a forward already clipped.)"""
    model, (idx, tgt) = lm(), batch()
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0))
    loss = lm_sum_loss(run(model, idx, mode), tgt)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="already clipped|already backpropagated"):
        loss.backward()
    eng.detach()


def test_a_backward_through_the_recomputed_graph_is_refused():
    """A backward pass inside a checkpointed region makes checkpoint recompute the region (in the forward already),
    and without early stop the recomputation runs that backward again on the recomputed graph: the uses that graph
    opened are not counted, and a gradient through them is refused (it would be a second copy)."""
    class BackwardInside(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def region(self, t):
            h = torch.tanh(self.a(t))
            h.sum().backward(retain_graph=True)
            return h

        def forward(self, x):
            return self.b(checkpoint(self.region, x, use_reentrant=False))

    m = BackwardInside()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(RuntimeError, match="parameter 'a.weight' received a gradient through the graph that "
                                           "activation checkpointing recomputed"):
        with torch.utils.checkpoint.set_checkpoint_early_stop(False):
            m(torch.randn(5, 4)).sum().backward()
    eng.detach()


def test_nested_reentrant_regions_are_refused_with_the_way_out():
    class Nested(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            inner = lambda t: torch.tanh(self.a(t))  # noqa: E731
            return self.b(checkpoint(lambda t: checkpoint(inner, t, use_reentrant=True), x, use_reentrant=True))

    m = Nested()
    eng = fastdp.GradSampleEngine(m, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError, match=r"parameter 'a.weight'.*nested inside another reentrant "
                                                           r"region.*Use use_reentrant=False"):
        m(torch.randn(5, 4, requires_grad=True))
    eng.detach()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_through_a_reentrant_region_is_refused():
    """With every parameter inside the region, the outer pass runs no layer of fastdp: the region's node refuses it."""
    model, (idx, tgt) = lm(), batch()
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0))
    with pytest.raises(fastdp.UnsupportedLayerError, match="create_graph=True.*reentrant activation checkpoint"):
        lm_sum_loss(run(model, idx, "re_root"), tgt).backward(create_graph=True)
    assert eng.num_backward == 0
    eng.detach()


def test_a_custom_function_that_recomputes_the_model_in_backward_is_refused():
    """Outside torch.utils.checkpoint, a forward of the model inside backward is refused before any gradient."""
    model, (idx, _) = lm(), batch()

    class RecomputeInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            return h.clone()

        @staticmethod
        def backward(ctx, g):
            with torch.enable_grad():
                model(idx).sum().backward()
            return g

    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0))
    h = torch.randn(4, 6, 13, dtype=torch.float64, requires_grad=True)
    with pytest.raises(fastdp.UnsupportedLayerError, match="inside a backward pass.*torch.utils.checkpoint"):
        RecomputeInBackward.apply(h).sum().backward()
    assert eng.num_backward == 0 and eng.summed == {}
    eng.detach()


def test_a_checkpoint_hook_of_unknown_shape_fails_closed():
    """fastdp reads torch.utils.checkpoint's frame from its saved-tensor hook; a hook of that module it does not know
    (another PyTorch version) is refused rather than left to a recomputation without the layers."""
    def pack(x):
        return x

    pack.__module__ = "torch.utils.checkpoint"
    model, (idx, _) = lm(), batch()
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(1.0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        with pytest.raises(CheckpointReplayError, match="saved-tensor hook fastdp does not know"):
            model(idx)
    eng.detach()
