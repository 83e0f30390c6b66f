"""Independent references for the tests: explicit per-sample gradients by torch.func on a hook-free copy."""
from __future__ import annotations

import copy

import torch
from torch.func import functional_call, grad, vmap


def per_sample_grads(model, loss_fn, *batch, batch_dim=0):
    """{name: [B, *shape]} gradients of each sample's own loss (loss_fn on a batch of one), float64 if model is.

    ``batch_dim``: the sample dim of the model input (1 for a sequence-first model); the other batch tensors
    (targets) lead with the samples."""
    clean = copy.deepcopy(model)
    params = {n: p.detach() for n, p in clean.named_parameters() if p.requires_grad}
    buffers = {n: b for n, b in clean.named_buffers()}
    frozen = {n: p.detach() for n, p in clean.named_parameters() if not p.requires_grad}

    def one(p, *sample):
        sample = [s.unsqueeze(batch_dim if i == 0 else 0) for i, s in enumerate(sample)]
        out = functional_call(clean, {**p, **frozen, **buffers}, (sample[0],))
        return loss_fn(out, *sample[1:])

    in_dims = (None, batch_dim) + (0,) * (len(batch) - 1)
    return vmap(grad(one), in_dims=in_dims, randomness="same")(params, *batch)


def clipped_sum_reference(model, loss_fn, *batch, max_grad_norm, clipping="flat", gamma=0.01, batch_dim=0):
    """({name: sum_i c_i g_i}, [B] flat norms) with Opacus' clip factor min(1, R / (||g|| + 1e-6))."""
    g = per_sample_grads(model, loss_fn, *batch, batch_dim=batch_dim)
    flat = torch.cat([v.flatten(1) for v in g.values()], 1)
    norms = flat.norm(dim=1)
    if clipping == "flat":
        c = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    elif clipping == "automatic":
        c = max_grad_norm / (norms + gamma)
    else:
        raise ValueError(clipping)
    return {n: torch.einsum("b,b...->...", c, v) for n, v in g.items()}, norms


def assert_close(actual, expected, rtol, atol, name=""):
    """Verbose comparison: where the values differ and any NaN/inf mismatch."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() == torch.isfinite(expected).all(), f"{name}: NaN/inf mismatch"
    err = (actual - expected).abs()
    tol = atol + rtol * expected.abs()
    if not (err <= tol).all():
        i = torch.argmax(err - tol)
        raise AssertionError(f"{name}: max |diff| {err.max().item():.3e} (rel {(err.max() / expected.abs().max().clamp(min=1e-30)).item():.3e}) "
                             f"at flat index {i.item()}: actual {actual.flatten()[i].item():.6e} expected {expected.flatten()[i].item():.6e}")


def check_bf16_autocast(model, idx, tgt, loss_fn, device_type, max_grad_norm=0.3, rtol=3e-2):
    """Engine under bf16 autocast vs the fp32 torch.func reference: norms in fp32, sum within bf16 tolerance."""
    import fastdp

    ref, norms = clipped_sum_reference(model, loss_fn, idx, tgt, max_grad_norm=max_grad_norm)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(max_grad_norm))
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss = loss_fn(model(idx), tgt)
    loss.backward()
    eng.detach()
    assert eng.last_norms.dtype == torch.float32
    assert_close(eng.last_norms, norms, rtol, 1e-3, "norms")
    named = dict(model.named_parameters())
    num = sum((eng.summed[named[n]].double() - v.double()).pow(2).sum() for n, v in ref.items()).sqrt()
    den = sum(v.double().pow(2).sum() for v in ref.values()).sqrt()
    assert num / den < rtol, f"relative error {num / den:.3e}"


def count_launches(monkeypatch, module: str, *kernels: str) -> list:
    """Wrap Triton kernels of ``fastdp.kernels.<module>``: each launch appends the kernel's name to the list."""
    import importlib

    from fastdp.kernels._tuning import REGISTRY
    mod = importlib.import_module(f"fastdp.kernels.{module}")
    calls = []
    for name in kernels:
        orig = getattr(mod, name)
        counting = type("K", (), {"__getitem__": lambda s, grid, n=name, o=orig: (calls.append(n), o[grid])[1]})()
        monkeypatch.setattr(mod, name, counting)
        for tiles in REGISTRY.values():  # kernels launched through their tile registry (fastdp/kernels/_tuning.py)
            if tiles.fn is orig:
                monkeypatch.setattr(tiles, "fn", counting)
    return calls


def tiny_hf_gpt2(vocab: int, seed: int = 0):
    """A 2-layer fp64 HF GPT-2 LM (tied embedding / head, no dropout, eager attention); skips without transformers."""
    import pytest
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    model.config._attn_implementation = "eager"
    return model


def assert_engine_matches_reference(model, loss, x, *extra, max_grad_norm, rtol, atol, every_param=False,
                                    batch_first=True):
    """One backward through a fresh ``GradSampleEngine`` (flat clipping at ``max_grad_norm``): its per-sample norms
    and clipped sums equal ``clipped_sum_reference``'s (``atol`` relative to each tensor's largest entry); with
    ``every_param``, every parameter of the reference was accumulated (none silently skipped). ``batch_first=False``:
    a sequence-first model (samples in dim 1 of ``x``)."""
    import fastdp
    ref, norms = clipped_sum_reference(model, loss, x, *extra, max_grad_norm=max_grad_norm,
                                       batch_dim=0 if batch_first else 1)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(max_grad_norm), batch_first=batch_first)
    try:
        loss(model(x), *extra).backward()
    finally:
        eng.detach()
    assert_close(eng.last_norms, norms, rtol, atol * norms.abs().max().item(), "per-sample norms")
    if every_param:
        assert set(eng.param_names[p] for p in eng.summed) == set(ref), "a trainable parameter was skipped"
    named = dict(model.named_parameters())
    for n, v in ref.items():
        assert_close(eng.summed[named[n]], v, rtol, atol * max(v.abs().max().item(), 1e-30), n)


def engine_run(out, eng, model) -> tuple:
    """(output, per-sample norms, clipped sum per parameter name) of one detached engine's backward."""
    return out.detach(), eng.last_norms, {n: eng.summed[p] for n, p in model.named_parameters()}


def assert_runs_match(run0: tuple, run1: tuple, what: str = "output"):
    """Two ``engine_run`` results agree: outputs to 1e-12, norms and clipped sums to 1e-9 (fp64 runs)."""
    (o0, n0, s0), (o1, n1, s1) = run0, run1
    assert_close(o1, o0, 1e-12, 1e-14, what)
    assert_close(n1, n0, 1e-9, 1e-12 * n0.max().item(), "per-sample norms")
    for n in s0:
        assert_close(s1[n], s0[n], 1e-9, 1e-12 * s0[n].abs().max().item(), n)


# ------------------------------------------------------- shared by the engine invariants (tests/engine/)
def sq_loss(out, *_):
    """Sum of squares of the output, averaged over the batch (a 0-dim output: itself)."""
    return out.pow(2).sum() / out.shape[0] if out.dim() else out


# (rtol, atol) per dtype of the layer checks; atol is relative to the largest reference value
LAYER_TOLERANCES = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-5, 2e-6)}


def check_layer(model, x, *extra, dtype=torch.float64, R=None, loss=sq_loss, every_param=False):
    """Engine vs reference (``assert_engine_matches_reference`` at ``LAYER_TOLERANCES[dtype]``), with clipping
    active (R below most norms) and inactive (R huge), or at ``R`` alone; autograd never writes ``.grad``."""
    model = model.to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    rtol, atol = LAYER_TOLERANCES[dtype]
    for max_norm in ([R] if R else [1e-2, 1e6]):
        assert_engine_matches_reference(model, loss, x, *extra, max_grad_norm=max_norm, rtol=rtol, atol=atol,
                                        every_param=every_param)
        assert all(p.grad is None for p in model.parameters()), "autograd must not write .grad"


def lm_sum_loss(out, y):
    """Token cross-entropy summed over each sample's tokens, averaged over the batch."""
    import torch.nn.functional as F
    return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum") / out.shape[0]


def check_exact(model, x, *extra, loss=sq_loss, R=1e-2, batch_first=True):
    """Engine norms and clipped sums equal the torch.func reference (clipping active); every parameter trained.
    ``batch_first=False``: a sequence-first model, samples in dim 1 of ``x`` (``loss`` must then find the batch size
    where the model's output keeps it)."""
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    assert_engine_matches_reference(model, loss, x, *extra, max_grad_norm=R, rtol=1e-9, atol=1e-12, every_param=True,
                                    batch_first=batch_first)


def dp_sgd(model, R, B=1):
    """A noiseless ``DPOptimizer`` over SGD at lr 1 (loss_reduction="sum"): a step moves the model by exactly minus
    the clipped sum, so one sample moves it by at most R."""
    import warnings

    import fastdp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0,
                                  max_grad_norm=R, expected_batch_size=B, sample_size=100 * B, loss_reduction="sum")


def flat_params(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def small_mlp():
    """Linear(4, 8) - Tanh - Linear(8, 3) in float64, seeded."""
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()


# ------------------------------------------------------- models torch.func cannot vmap (recurrent layers)
def per_sample_grads_loop(model, sample_loss, *inputs, seed=None, batch_size=None):
    """{name: [B, *shape]} per-sample gradients by one backward per sample on a hook-free copy: sample i's gradient is
    that of its own loss term ``sample_loss(model(*inputs), i)`` in a full-batch forward (exact for models whose
    samples do not interact, e.g. nn.LSTM, which torch.func's vmap does not support). ``seed``: torch.manual_seed
    before each forward, so random ops (dropout) draw the same masks as a forward run after the same seeding.
    ``batch_size``: the number of samples (default: the output's dim 0)."""
    clean = copy.deepcopy(model)
    named = [(n, p) for n, p in clean.named_parameters() if p.requires_grad]
    grads = {n: [] for n, _ in named}
    i = 0
    while True:
        if seed is not None:
            torch.manual_seed(seed)
        out = clean(*inputs)
        if i >= (out.shape[0] if batch_size is None else batch_size):
            return {n: torch.stack(v) for n, v in grads.items()}
        g = torch.autograd.grad(sample_loss(out, i), [p for _, p in named], allow_unused=True)
        for (n, p), gi in zip(named, g):
            grads[n].append(torch.zeros_like(p) if gi is None else gi)
        i += 1


def clip_reference(per_sample, max_grad_norm):
    """({name: sum_i c_i g_i}, [B] flat norms) of explicit per-sample gradients, c_i = min(1, R / (||g_i|| + 1e-6))."""
    flat = torch.cat([v.flatten(1) for v in per_sample.values()], 1)
    norms = flat.norm(dim=1)
    c = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return {n: torch.einsum("b,b...->...", c, v) for n, v in per_sample.items()}, norms


def launch_ranks(script: str, args, world: int, timeout: float, env=None) -> list:
    """Start ``world`` processes of ``python script *args`` the way torchrun starts ranks (RANK, LOCAL_RANK,
    WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT in the environment, one OpenMP thread each, plus ``env``); wait at
    most ``timeout`` seconds for all of them (then kill them and fail). Returns [(returncode, stderr)] by rank."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [subprocess.Popen([sys.executable, script, *map(str, args)],
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(world)]
    results, deadline = [], time.monotonic() + timeout
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"the {world} ranks of {os.path.basename(script)} {' '.join(map(str, args))} did "
                                 f"not finish within {timeout} s") from None
        results.append((p.returncode, err))
    return results
