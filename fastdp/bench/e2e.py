"""End-to-end DP training-step benchmark: non-private, every fastdp method, Opacus 1.6 (hooks, ghost), one process.

Workloads (``benchmarks.workloads``): ViT-S/16 (timm, B=64, 224px), stock HF GPT-2 small (tied weights, T=256,
B=16), WRN-16-4 with GroupNorm (B=256, 32px); ``--tiny`` gives CPU-sized versions. Dtypes: ``fp32`` (real FP32:
TF32 off for matmul and cuDNN) and ``bf16`` (``torch.autocast`` around forward and loss). Synthetic data and
initial weights are fixed by seeds, so every variant starts from the same model and batch (``loss_first`` agrees).

A step is forward + loss, ``loss.backward()``, ``opt.step()``, ``opt.zero_grad(set_to_none=True)`` on one fixed
batch. DP variants use sigma=1, R=1, ``expected_batch_size=B``, ``sample_size=100*B``, a seeded noise generator,
SGD(lr=1e-3) as the base optimizer (DP-MicroAdam: its own). What each variant measures: ``VARIANTS[name].measures``
(also in every row and in the markdown).

Run order, one process, one device: (1) timing of every (workload, dtype, batch size, variant) by
``fastdp.bench.timing``: ``--warmup`` untimed steps, then ``--steps`` steps timed with CUDA events (CPU:
``perf_counter``); median, p20, p80 ms; peak ``torch.cuda.max_memory_allocated`` over the timed steps (weights and
optimizer state included: they stay allocated; the warm-up's one-off allocations, e.g. the Triton autotuner's copies
of the buffers it times on, are not: they are ``peak_mem_warmup_bytes``, the peak with the warm-up included; None on
the CPU); ``first_step_ms``, the wall time of the first warm-up step (what compilation, autotuning and lazy
allocation cost once).
(2) launches: each variant that timed ok is rebuilt, one warm-up step, then one step under ``torch.profiler``:
``cuda_kernels_per_step`` counts the CUDA kernels that ran (memcpy/memset excluded; None on the CPU) and
``aten_ops_per_step`` counts every ``aten::`` op the host dispatched (nested calls included). This pass runs after
all timing because host-bound steps were measured slower after a profiler session in the same process
(``shared/docs/peer-baseline.md``). (3) ``--max-batch``: the largest batch that fits, per variant (doubling from the
timed batch, then bisection to ``--max-batch-resolution``; a probe is one warm-up and one timed step; a probe fits
if it ran without OOM and, with ``--mem-limit-gib``, its peak stayed under the limit). On the CPU there is no
memory accounting: the search is skipped with that reason unless ``--max-batch-cap`` is given, and then only
checks that the steps run.

A failure (missing dependency, unsupported layer, OOM, any exception, time budget) is a row with its status and
message, never a dropped row. The exit status is 1 when a requested measurement failed, unless ``--allow-failures``;
skipped runs and the documented ``EXPECTED_FAILURES`` (e.g. Opacus ghost clipping refusing GPT-2's tied weights) do
not count (``EXIT_STATUS_HELP``, at the end of ``--help``).

Outputs under ``--out-dir``: ``e2e_<date>[_cpu][_tiny].json`` (everything, with device, versions, commit, date),
``.csv`` (one row per measurement), ``.md`` (ratios to non-private, FLOP floor per workload, what each variant
measures, failures) and PNG plots (time and memory ratio per workload/variant; throughput vs batch size when
``--batch-sizes`` ran several). The files are rewritten after every workload and pass, each one atomically
(``fastdp.atomic.atomic_write``): a kill mid-write leaves the previous complete file.

    python -m fastdp.bench.e2e                                   # everything on the GPU (or: fastdp bench)
    python -m fastdp.bench.e2e --device cpu --tiny --steps 2 --warmup 1 --threads 1     # CI smoke run
    python -m fastdp.bench.e2e --variants nonprivate,fastdp,opacus-hooks --max-batch --dtypes bf16
    python -m fastdp.bench.e2e --workloads wrn --batch-sizes wrn=64:128:256:512
    python -m fastdp.bench.e2e --from-json results/RUN/e2e_DATE.json --out-dir results/RUN    # redo md/csv/plots
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import datetime
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastdp
from fastdp.bench import timing, workloads
from fastdp.bench.run_env import atomic_write, git, results_dir, save_figure, write_json, write_text
from fastdp.cpu_memory import retain_freed_memory
from fastdp.kernels._tuning import chosen_tiles
from fastdp.methods import SPARTA, AdaDPIGU, BiTFiT, LastLayer, RandomGroups, RandomSparsification

DTYPES = ("fp32", "bf16")
SAMPLE_SIZE_FACTOR = 100  # sample_size = 100 * B: sample rate 0.01, 100 steps per epoch
SPARTA_CLAIM = "SPARTA fine-tuning at 20% rows should be faster than non-private full fine-tuning"


# ------------------------------------------------------------------------------------------ harness
def time_steps(step, device: torch.device, steps: int, warmup: int) -> dict:
    """``step()`` (returns the detached loss) timed by :func:`fastdp.bench.timing.time_calls`, with the peak memory
    over the timed steps and over all of them (CUDA; None elsewhere)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    warm = timing.warm_up(step, device, warmup)
    peak_warmup = None
    if cuda:
        torch.cuda.synchronize(device)
        peak_warmup = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    timed = timing.measure(step, device, steps)
    return {"times_ms": timed.times_ms, "loss_first": warm.first.item(), "loss_last": timed.last.item(),
            "first_step_ms": warm.first_ms, "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
            "peak_mem_warmup_bytes": max(peak_warmup, torch.cuda.max_memory_allocated(device)) if cuda else None}


def count_launches(step, device: torch.device) -> dict:
    """Profile one ``step()``: CUDA kernels that ran (None off CUDA) and ``aten::`` ops dispatched (nested included)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        step()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    kernels = None
    if cuda:
        kernels = sum(1 for e in events if e.device_type == DeviceType.CUDA
                      and not any(s in e.name.lower() for s in ("memcpy", "memset")))
    aten = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::"))
    return {"cuda_kernels_per_step": kernels, "aten_ops_per_step": aten}


# ------------------------------------------------------------------------------------------ variants
@dataclass
class Prepared:
    """A variant ready to step: ``loss(model, batch)`` returns what ``.backward()`` is called on."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable
    phase: Optional[str] = None


@dataclass(frozen=True)
class Variant:
    """``build(model, workload, loss_fn, batch_size, device) -> Prepared``; ``measures``: what the row times."""

    build: Callable
    measures: str


def _dp(batch_size: int, device: torch.device) -> dict:
    return dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size,
                sample_size=SAMPLE_SIZE_FACTOR * batch_size, generator=torch.Generator(device=device).manual_seed(0))


def _sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def _nonprivate(model, workload, loss_fn, B, device):
    return Prepared(model, _sgd(model), loss_fn)


def _fastdp(model, workload, loss_fn, B, device):
    return Prepared(model, fastdp.DPOptimizer(model, _sgd(model), **_dp(B, device)), loss_fn)


def _fastdp_per_layer(model, workload, loss_fn, B, device):
    n = sum(1 for p in model.parameters() if p.requires_grad)
    dp = _dp(B, device) | {"max_grad_norm": [1.0 / math.sqrt(n)] * n}
    return Prepared(model, fastdp.DPOptimizer(model, _sgd(model), clipping="per_layer", **dp), loss_fn)


def _method(cls, **kw):
    def build(model, workload, loss_fn, B, device):
        opt = cls(model, _sgd(model), **kw, **_dp(B, device))
        return Prepared(model, opt, loss_fn, opt.phase)
    return build


def _sparta(model, workload, loss_fn, B, device):
    """SPARTA put straight into its sparse phase: warmup_epochs=0, one selection epoch whose released row scores
    are replaced by seeded uniform scores, then the step count moved to the first sparse epoch, where
    ``_begin_epoch`` keeps the top 20% rows per layer (as after a real selection epoch) and resets momentum."""
    opt = SPARTA(model, _sgd(model), sparsity=0.2, warmup_epochs=0, **_dp(B, device))
    gen = torch.Generator(device=device).manual_seed(0)
    for p in opt.eligible:
        opt.scores[p] = torch.rand(p.shape[opt.group_dim[p]], generator=gen, device=device)
    opt.steps_taken = opt.steps_per_epoch * (opt.warmup_epochs + 1)
    opt._begin_epoch(opt.epoch)
    return Prepared(model, opt, loss_fn, opt.phase)


def _adadpigu(model, workload, loss_fn, B, device):
    """AdaDPIGU put straight into its sparse phase: seeded uniform importance instead of one pre-training epoch,
    then the step count moved past pre-training, so the global top-60% coordinate mask with standardisation
    (AdaCliP centre/scale) is installed as after real pre-training."""
    opt = AdaDPIGU(model, _sgd(model), retention=0.6, pretrain_epochs=1, **_dp(B, device))
    gen = torch.Generator(device=device).manual_seed(0)
    for imp in opt._importance.values():
        imp.copy_(torch.rand(imp.shape, generator=gen, device=device))
    opt.steps_taken = opt.steps_per_epoch * opt.pretrain_epochs
    opt._begin_epoch(opt.epoch)
    return Prepared(model, opt, loss_fn, opt.phase)


def _dpmicroadam(model, workload, loss_fn, B, device):
    return Prepared(model, fastdp.DPMicroAdam(model, lr=1e-3, **_dp(B, device)), loss_fn)


def _opacus_forward(workload: str):
    """``forward(model, batch) -> (logits [N, C], target [N], shape or None)`` for Opacus' criterion.

    GPT-2: N = B*T, ``shape = (B, T)`` (ghost mode averages the T token losses per sample), and explicit contiguous
    [B, T] ``position_ids``: HF's default [1, T] ids broadcast over the batch and break Opacus' per-sample hooks on
    ``wpe`` (the same values, so the loss equals the workload's)."""
    if workload == "gpt2":
        def forward(model, batch):
            idx, tgt = batch
            pos = torch.arange(idx.shape[1], device=idx.device).expand_as(idx).contiguous()
            logits = model(input_ids=idx, position_ids=pos, use_cache=False).logits
            return logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), tuple(logits.shape[:2])
    else:
        def forward(model, batch):
            x, y = batch
            return model(x), y, None
    return forward


def _opacus(mode: str):
    def build(model, workload, loss_fn, B, device):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        loader = DataLoader(TensorDataset(torch.zeros(SAMPLE_SIZE_FACTOR * B)), batch_size=B)  # never iterated
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure-RNG and accountant notices
            out = PrivacyEngine().make_private(
                module=model, optimizer=_sgd(model), data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                criterion=nn.CrossEntropyLoss(), grad_sample_mode=mode,
                noise_generator=torch.Generator(device=device).manual_seed(0))
        forward = _opacus_forward(workload)
        if mode == "ghost":
            criterion = out[2]

            def loss(m, batch):  # a DPTensorFastGradientClipping: its backward() runs Opacus' two passes
                logits, target, shape = forward(m, batch)
                return criterion(logits, target, shape=shape)
        else:
            def loss(m, batch):
                logits, target, _ = forward(m, batch)
                return F.cross_entropy(logits, target)
        return Prepared(out[0], out[1], loss)
    return build


_FASTDP_STEP = "one fastdp step (book-keeping: per-sample norms, clip, clipped sum in one backward; noise)"
VARIANTS: Dict[str, Variant] = {
    "nonprivate": Variant(_nonprivate, "plain SGD, no clipping or noise: the reference for every ratio"),
    "fastdp": Variant(_fastdp, f"DPOptimizer, flat clipping over all parameters: {_FASTDP_STEP}"),
    "fastdp-per-layer": Variant(_fastdp_per_layer, "DPOptimizer, clipping='per_layer' (R_k = 1/sqrt(#tensors))"),
    "sparta": Variant(_sparta, "SPARTA in its sparse phase: top 20% rows of every Linear/Conv weight (head excluded) "
                               "train (rows from seeded scores instead of a selection epoch), plus head, biases and "
                               "norms; embeddings/direct parameters frozen. " + SPARTA_CLAIM),
    "rs": Variant(_method(RandomSparsification, final_rate=0.9, epochs=1),
                  "RandomSparsification at its final rate (epochs=1): a random coordinate mask keeps 10% of all "
                  "coordinates (masking before clipping and on the noise)"),
    "adadpigu": Variant(_adadpigu, "AdaDPIGU in its sparse phase: global top-60% coordinate mask with AdaCliP "
                                   "standardisation (importance seeded instead of a pre-training epoch)"),
    "bitfit": Variant(_method(BiTFiT), "BiTFiT: biases (norm biases included) and the head train"),
    "last-layer": Variant(_method(LastLayer), "LastLayer: only the head trains (DP linear probing)"),
    "random-groups": Variant(_method(RandomGroups, sparsity=0.2),
                             "RandomGroups: a random 20% of rows per Linear/Conv weight (head excluded), plus head, "
                             "biases, norms; embeddings/direct parameters frozen"),
    "dpmicroadam": Variant(_dpmicroadam, "DPMicroAdam: the fastdp DP gradient, then MicroAdam (density 0.01, "
                                         "window 10, fp32 error feedback) instead of SGD"),
    "opacus-hooks": Variant(_opacus("hooks"), "Opacus 1.6 make_private(grad_sample_mode='hooks'): per-sample "
                                              "gradients stored (modules without a grad sampler via functorch)"),
    "opacus-ghost": Variant(_opacus("ghost"), "Opacus 1.6 make_private(grad_sample_mode='ghost'): ghost clipping, "
                                              "two backward passes through the wrapped criterion"),
}


# Failures that are documented limits of the measured code or a missing optional package, not defects of the run:
# (variant or None for any, text in the error, why). Such rows keep their status and error, carry
# ``expected_failure`` (the why) and do not make the run's exit status non-zero.
EXPECTED_FAILURES = [
    ("opacus-ghost", "Parameter tying is not supported with Ghost Clipping",
     "opacus-ghost on tied weights (GPT-2's embedding and head): Opacus 1.6 ghost clipping refuses them"),
] + [(None, f"No module named '{pkg}'", f"{pkg} is not installed") for pkg in ("opacus", "timm", "transformers")]


def _mark_expected(entry: dict) -> None:
    """Set ``entry["expected_failure"]`` (a row or largest-batch entry) if it is an error of :data:`EXPECTED_FAILURES`."""
    if entry["status"] != "error":
        return
    for variant, text, why in EXPECTED_FAILURES:
        if variant in (None, entry["variant"]) and text in (entry.get("error") or ""):
            entry["expected_failure"] = why
            return


def trained_fraction(model: nn.Module, opt) -> float:
    """Fraction of the model's (unique) parameter coordinates that can change in this step (masks included)."""
    masks = getattr(getattr(opt, "engine", None), "masks", {})
    params = list({id(p): p for p in model.parameters()}.values())
    trained = sum(int(masks[p].dense.sum()) if p in masks else p.numel() for p in params if p.requires_grad)
    return trained / max(1, sum(p.numel() for p in params))


def _empty_cache(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(base_model, make_batch, loss_fn, variant, dtype, batch_size, device, steps, warmup, *,
                workload: str = "", launches: bool = False) -> dict:
    """One fresh copy of ``base_model`` under ``variant``: timed steps (or, ``launches=True``, one warm-up step then
    :func:`count_launches`). Returns a row; an exception becomes a row with status "oom" or "error"."""
    row = {"workload": workload, "dtype": dtype, "variant": variant, "batch_size": batch_size, "status": "ok"}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus, at every backward
            row.update(_measure(base_model, make_batch, loss_fn, variant, dtype, batch_size, device, steps, warmup,
                                workload, launches))
    except Exception as err:  # a failure is a row, never a dropped row (the traceback is kept in the JSON)
        oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err)
        row.update(status="oom" if oom else "error", error=f"{type(err).__name__}: {err}"[:2000],
                   traceback=traceback.format_exc()[-4000:])
        _mark_expected(row)
    _empty_cache(device)  # _measure's frame (model, optimizer state, activations) is gone by now
    return row


def _measure(base_model, make_batch, loss_fn, variant, dtype, batch_size, device, steps, warmup, workload,
             launches) -> dict:
    prep = VARIANTS[variant].build(copy.deepcopy(base_model).to(device).train(), workload, loss_fn, batch_size, device)
    batch = make_batch(batch_size, device)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext
    model, opt, loss_of = prep.model, prep.optimizer, prep.loss

    def step():
        with amp():
            loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if launches:
        step()
        return count_launches(step, device)
    res = time_steps(step, device, steps, warmup)
    t = timing.Timing(res.pop("times_ms")).summary()
    return dict(median_ms=t["median_ms"], p20_ms=t["p20_ms"], p80_ms=t["p80_ms"],
                samples_per_s=1e3 * batch_size / t["median_ms"], steps=t["steps"], warmup=warmup, **res,
                phase=prep.phase or getattr(opt, "phase", None), trained_fraction=trained_fraction(model, opt))


# ------------------------------------------------------------------------------------------ largest batch
def search_max_batch(run_at: Callable[[int], dict], start: int, cap: int, *, mem_limit_bytes: Optional[int] = None,
                     resolution: float = 0.1, known: Optional[dict] = None) -> dict:
    """Largest batch size in [1, cap] whose step fits, assuming fitting is monotone in the batch size.

    ``run_at(B)`` returns a row (see :func:`run_variant`); B fits if its status is "ok" and, with
    ``mem_limit_bytes``, its peak with the warm-up included (``peak_mem_warmup_bytes``, else ``peak_mem_bytes``) is at
    most the limit. Doubling from ``start`` up to ``cap``, then
    bisection until the first failing size is within ``resolution * max_batch`` (at least 1) of the largest fit.
    A status other than ok/oom stops the search with that error. ``known``: rows already measured, by batch size.
    Returns {max_batch (None if B=1 fails), first_fail, status ("ok", "capped", "none fits", "error"), probes}.
    """
    probes, known = [], dict(known or {})

    def fits(b):
        row = known.pop(b, None) or run_at(b)
        peak = row.get("peak_mem_warmup_bytes") or row.get("peak_mem_bytes")  # the first step must fit too
        over = mem_limit_bytes is not None and peak is not None and peak > mem_limit_bytes
        probes.append({"batch_size": b, "status": row["status"], "peak_mem_bytes": peak, "over_limit": over,
                       "median_ms": row.get("median_ms"), "error": row.get("error")})
        if row["status"] not in ("ok", "oom"):
            raise _SearchError(row.get("error") or row["status"])
        return row["status"] == "ok" and not over

    lo, hi = 0, None  # largest known fit, smallest known failure
    try:
        b = min(start, cap)
        while hi is None:
            if fits(b):
                lo = b
                if b >= cap:
                    break
                b = min(2 * b, cap)
            else:
                hi = b
        while hi is not None and hi - lo > max(1, int(resolution * lo)):
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
    except _SearchError as err:
        return {"max_batch": lo or None, "first_fail": hi, "status": "error", "error": str(err), "probes": probes}
    status = "capped" if hi is None else ("none fits" if lo == 0 else "ok")
    return {"max_batch": lo or None, "first_fail": hi, "status": status, "probes": probes}


class _SearchError(Exception):
    pass


# ------------------------------------------------------------------------------------------ FLOP floor
def flop_floor(model: nn.Module, batch, loss_fn, batch_size: int) -> dict:
    """Walk one fp32 forward with hooks; FLOPs of non-private training and of the exact-clipping floor.

    Per Linear / HF Conv1D / Conv / Embedding (as a one-hot matmul) use with B samples, T positions per sample,
    input width d and output width p (per conv group): non-private 6BTpd, DP floor 6BTpd + min(2BTpd, 2BT^2(p+d))
    (per-sample gradients or ghost norms, whichever is cheaper). Attention (2*2*B*heads*T^2*head_dim forward, x3
    for forward+backward) is counted on both sides unchanged; elementwise ops are ignored.
    ``floor_ratio_no_embedding`` leaves embedding lookups out of both sides (they are not matmuls in practice).
    """
    B = batch_size
    uses = []  # (kind, groups, T, d, p)
    attn = [0.0]

    def linear(mod, args, out):
        d = mod.in_features
        uses.append(("linear", 1, args[0].numel() / (B * d), d, mod.out_features))

    def hf_conv1d(mod, args, out):  # transformers.pytorch_utils.Conv1D: x @ W with W [d_in, d_out]
        d, p = mod.weight.shape
        uses.append(("linear", 1, args[0].numel() / (B * d), d, p))

    def conv(mod, args, out):
        g = mod.groups
        k = 1
        for s in mod.kernel_size:
            k *= s
        T = out[0, 0].numel() * out.shape[0] / B  # output positions per sample
        uses.append(("conv", g, T, mod.in_channels * k // g, mod.out_channels // g))

    def embedding(mod, args, out):
        idx = args[0]
        T = idx.numel() / idx.shape[0] if idx.dim() >= 2 else idx.numel() / B  # [1, T] ids shared by the batch
        uses.append(("embedding", 1, T, mod.num_embeddings, mod.embedding_dim))

    def attention(mod, args, kwargs, out):
        x = next(a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor))
        T = x.shape[-2]
        attn[0] += 3 * 2 * 2 * B * mod.num_heads * T * T * mod.head_dim

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear))
        elif type(m).__name__ == "Conv1D" and hasattr(m, "nf"):
            handles.append(m.register_forward_hook(hf_conv1d))
        elif isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            handles.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Embedding):
            handles.append(m.register_forward_hook(embedding))
        elif isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "head_dim", None), int):
            handles.append(m.register_forward_hook(attention, with_kwargs=True))
    try:
        with torch.no_grad():
            loss_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    tot = {True: [attn[0], attn[0]], False: [attn[0], attn[0]]}  # with embeddings?: [non-private, DP floor]
    for kind, g, T, d, p in uses:
        base = g * 6 * B * T * p * d
        extra = g * min(2 * B * T * p * d, 2 * B * T * T * (p + d))
        for with_emb in (True, False):
            if with_emb or kind != "embedding":
                tot[with_emb][0] += base
                tot[with_emb][1] += base + extra
    return {"floor_ratio": tot[True][1] / tot[True][0], "floor_ratio_no_embedding": tot[False][1] / tot[False][0],
            "gflop_nonprivate": tot[True][0] / 1e9, "gflop_dp_floor": tot[True][1] / 1e9,
            "gflop_attention": attn[0] / 1e9, "matmul_layer_uses": len(uses)}


# ------------------------------------------------------------------------------------------ environment
def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    """Device name, Python and package versions, today's date, the repo's git commit (and whether it is dirty)."""
    head = git("rev-parse", "--short", "HEAD")
    dirty = git("diff", "--quiet", "HEAD", "--")
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} (torch.version.cuda {torch.version.cuda})"
    else:
        name = f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
        if retain_freed_memory():  # idempotent: says whether setup_device's allocator setting applies here
            name += ", freed memory retained (fastdp.cpu_memory)"
    return {"device": name, "python": platform.python_version(),
            "versions": {m: _version(m) for m in ("torch", "triton", "opacus", "transformers", "timm", "fastdp")},
            "date": datetime.date.today().isoformat(),
            "kernels": {k: os.environ.get(k, "unset") for k in ("FASTDP_BACKEND", "FASTDP_AUTOTUNE")},
            "git_commit": head.stdout.strip() if head is not None and head.returncode == 0 else None,
            "git_dirty": dirty.returncode == 1 if dirty is not None and dirty.returncode in (0, 1) else None}


# ------------------------------------------------------------------------------------------ the suite
@dataclass
class Config:
    """What to run (see ``main``'s options); ``batch_sizes``: workload -> batch sizes (the first is the default)."""

    workloads: List[str]
    dtypes: List[str]
    variants: List[str]
    batch_sizes: Dict[str, List[int]]
    device: torch.device
    tiny: bool = False
    steps: int = 20
    warmup: int = 5
    launches: bool = True
    max_batch: bool = False
    max_batch_variants: Optional[List[str]] = None
    max_batch_dtypes: Optional[List[str]] = None
    max_batch_cap: Optional[int] = None
    max_batch_resolution: float = 0.1
    mem_limit_bytes: Optional[int] = None
    time_budget_s: Optional[float] = None


def _add_ratios(rows: List[dict]) -> None:
    """time_ratio / mem_ratio against the non-private row of the same (workload, dtype, batch size)."""
    ref = {(r["workload"], r["dtype"], r["batch_size"]): r for r in rows if r["variant"] == "nonprivate"
           and r["status"] == "ok"}
    for r in rows:
        base = ref.get((r["workload"], r["dtype"], r["batch_size"]))
        if base is None or r["status"] != "ok":
            continue
        r["time_ratio"] = r["median_ms"] / base["median_ms"]
        if r.get("peak_mem_bytes") is not None and base.get("peak_mem_bytes"):
            r["mem_ratio"] = r["peak_mem_bytes"] / base["peak_mem_bytes"]
        if r["variant"] == "sparta":
            r["claim"], r["claim_holds"] = SPARTA_CLAIM, r["time_ratio"] < 1.0


def run_suite(cfg: Config, env: dict, checkpoint: Callable[[dict], None] = lambda result: None) -> dict:
    """Timing, then launches, then the largest-batch search (see module docstring); ``checkpoint(result)`` runs
    after every workload of every pass. Returns {benchmark, env, config, floor, rows, max_batch}."""
    device = cfg.device
    started = time.monotonic()
    result = {"benchmark": "e2e", "env": env, "config": _jsonable(vars(cfg)), "floor": {}, "rows": [], "max_batch": [],
              "variants": {v: VARIANTS[v].measures for v in cfg.variants}}

    def over_budget():
        if cfg.time_budget_s is not None and time.monotonic() - started > cfg.time_budget_s:
            return f"skipped: time budget (--time-budget {cfg.time_budget_s:g} s) spent before this run"
        return None

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    built = {}
    for name in cfg.workloads:  # pass 1: timing
        sizes = cfg.batch_sizes[name]
        try:
            built[name] = workloads.build(name, tiny=cfg.tiny)
        except Exception as err:
            status = "skipped" if isinstance(err, workloads.WorkloadUnavailable) else "error"
            msg = f"{type(err).__name__}: {err}"
            log(f"[{name}] {status}: {msg}")
            result["floor"][name] = {"error": msg}
            rows = [{"workload": name, "dtype": dt, "variant": v, "batch_size": B, "status": status, "error": msg,
                     "measures": VARIANTS[v].measures} for dt in cfg.dtypes for B in sizes for v in cfg.variants]
            for row in rows:
                _mark_expected(row)
            result["rows"] += rows
            checkpoint(result)
            continue
        base, make_batch, loss_fn = built[name]
        try:
            result["floor"][name] = flop_floor(copy.deepcopy(base).to(device), make_batch(sizes[0], device), loss_fn,
                                               sizes[0])
        except Exception as err:
            traceback.print_exc()
            result["floor"][name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        _empty_cache(device)
        for dt in cfg.dtypes:
            for B in sizes:
                for v in cfg.variants:
                    skip = over_budget()
                    if skip:
                        row = {"workload": name, "dtype": dt, "variant": v, "batch_size": B, "status": "skipped",
                               "error": skip}
                    else:
                        log(f"[{name} {dt} {v}] B={B} ...")
                        row = run_variant(base, make_batch, loss_fn, v, dt, B, device, cfg.steps, cfg.warmup,
                                          workload=name)
                    row["floor_ratio"] = result["floor"][name].get("floor_ratio")
                    row["measures"] = VARIANTS[v].measures
                    log(f"    {row['status']}: " + (f"median {row['median_ms']:.2f} ms" if row["status"] == "ok"
                                                     else row["error"][:300]))
                    result["rows"].append(row)
        _add_ratios(result["rows"])
        result["autotuned_tiles"] = chosen_tiles()  # the autotuner's pick per kernel and shape (CUDA), else {}
        checkpoint(result)

    if cfg.launches:  # pass 2: kernels / aten ops per step, after all timing
        for name in built:
            base, make_batch, loss_fn = built[name]
            for r in result["rows"]:
                if r["workload"] != name or r["status"] != "ok":
                    continue
                skip = over_budget()
                if skip:
                    r["launches_error"] = skip
                    continue
                log(f"[{name} {r['dtype']} {r['variant']}] B={r['batch_size']}: counting launches ...")
                got = run_variant(base, make_batch, loss_fn, r["variant"], r["dtype"], r["batch_size"], device, 1, 1,
                                  workload=name, launches=True)
                if got["status"] == "ok":
                    r["cuda_kernels_per_step"] = got["cuda_kernels_per_step"]
                    r["aten_ops_per_step"] = got["aten_ops_per_step"]
                else:
                    r["launches_error"] = got["error"]
            checkpoint(result)

    if cfg.max_batch:  # pass 3: the largest batch that fits
        for name in built:
            _max_batch_for(name, built[name], cfg, result, over_budget, log)
            checkpoint(result)
    return result


def _max_batch_for(name, built, cfg: Config, result: dict, over_budget, log) -> None:
    base, make_batch, loss_fn = built
    device = cfg.device
    start = cfg.batch_sizes[name][0]
    for dt in cfg.max_batch_dtypes or cfg.dtypes:
        for v in cfg.max_batch_variants or cfg.variants:
            entry = {"workload": name, "dtype": dt, "variant": v, "start": start}
            skip = over_budget()
            if device.type != "cuda" and cfg.max_batch_cap is None:
                entry.update(status="skipped", error=f"skipped on {device.type}: no device memory accounting "
                             "(torch.cuda.max_memory_allocated); give --max-batch-cap to run the search with "
                             "'fits = the step ran'")
            elif skip:
                entry.update(status="skipped", error=skip)
            else:
                cap = cfg.max_batch_cap or 32 * start
                known = {r["batch_size"]: r for r in result["rows"] if (r["workload"], r["dtype"], r["variant"])
                         == (name, dt, v) and "median_ms" in r}

                def run_at(b, dt=dt, v=v):
                    log(f"[{name} {dt} {v}] max-batch probe B={b} ...")
                    return run_variant(base, make_batch, loss_fn, v, dt, b, device, 1, 1, workload=name)

                entry.update(cap=cap, **search_max_batch(run_at, start, cap, mem_limit_bytes=cfg.mem_limit_bytes,
                                                         resolution=cfg.max_batch_resolution, known=known))
                _mark_expected(entry)
                log(f"    max batch {entry['max_batch']} ({entry['status']})")
            result["max_batch"].append(entry)
            for r in result["rows"]:
                if (r["workload"], r["dtype"], r["variant"]) == (name, dt, v):
                    r["max_batch"] = entry.get("max_batch")


def _jsonable(d: dict) -> dict:
    return {k: (str(v) if isinstance(v, torch.device) else v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------ outputs
CSV_COLUMNS = ["workload", "dtype", "variant", "batch_size", "status", "median_ms", "p20_ms", "p80_ms",
               "samples_per_s", "time_ratio", "first_step_ms", "peak_mem_bytes", "peak_mem_warmup_bytes",
               "mem_ratio", "floor_ratio", "cuda_kernels_per_step", "aten_ops_per_step", "trained_fraction", "phase",
               "max_batch", "claim_holds", "steps", "warmup", "loss_first", "loss_last", "error", "launches_error",
               "expected_failure", "measures", "device", "date", "git_commit", "torch", "triton", "opacus"]


def write_csv(result: dict, path: str) -> None:
    """One line per row of ``result["rows"]``, columns ``CSV_COLUMNS`` (environment repeated on every line)."""
    env = result["env"]
    extra = {"device": env["device"], "date": env["date"], "git_commit": env["git_commit"],
             **{k: env["versions"].get(k) for k in ("torch", "triton", "opacus")}}
    with atomic_write(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in result["rows"]:
            w.writerow({**r, **extra})


def _f(x, fmt):
    return "" if x is None else format(x, fmt)


def _first_line(msg, n=200):
    return (msg or "").strip().splitlines()[0][:n] if (msg or "").strip() else ""


def markdown(result: dict) -> str:
    """The tables: every row with ratios to non-private, FLOP floors, variants, SPARTA's claim, largest batches."""
    env = result["env"]
    v = env["versions"]
    title = {"e2e": "fastdp end-to-end step benchmark"}.get(result["benchmark"], f"fastdp {result['benchmark']}")
    lines = [f"# {title}: {env['device']}, {env['date']}, commit {env['git_commit']}"
             f"{' (dirty)' if env['git_dirty'] else ''}", "",
             f"torch {v.get('torch')}, triton {v.get('triton')}, opacus {v.get('opacus')}, transformers "
             f"{v.get('transformers')}, timm {v.get('timm')}. Median of {result['config']['steps']} timed steps after "
             f"{result['config']['warmup']} warm-up steps; ratios against non-private at the same workload, dtype and "
             "batch size.", ""]
    if result["config"]["steps"] < 20:
        lines += ["**Fewer than 20 timed steps: a smoke run of the code path, not a measurement.**", ""]
    lines += ["| workload | dtype | variant | B | median ms | p20 ms | p80 ms | samples/s | time × nonprivate | peak MiB | "
              "mem × nonprivate | floor | CUDA kernels/step | aten ops/step | trained | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem = r.get("peak_mem_bytes")
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**: `{_first_line(r.get('error'))}`"
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['variant']} | {r['batch_size']} | "
                     f"{_f(r.get('median_ms'), '.2f')} | {_f(r.get('p20_ms'), '.2f')} | {_f(r.get('p80_ms'), '.2f')} | "
                     f"{_f(r.get('samples_per_s'), '.1f')} | {_f(r.get('time_ratio'), '.3f')} | "
                     f"{_f(mem and mem / 2**20, '.0f')} | {_f(r.get('mem_ratio'), '.3f')} | "
                     f"{_f(r.get('floor_ratio'), '.3f')} | {_f(r.get('cuda_kernels_per_step'), 'd')} | "
                     f"{_f(r.get('aten_ops_per_step'), 'd')} | {_f(r.get('trained_fraction'), '.3f')} | {status} |")
    lines += ["", "Columns: peak MiB = `torch.cuda.max_memory_allocated` (empty on the CPU); CUDA kernels/step = kernels "
              "that ran during one profiled step (memcpy/memset excluded; empty off CUDA); aten ops/step = `aten::` "
              "ops dispatched by the host in that step, nested calls included; trained = fraction of the model's "
              "coordinates that can change in a step; floor = FLOP floor of exact per-sample clipping / non-private.",
              "", "## FLOP floor per workload", ""]
    for w, fl in result["floor"].items():
        if "floor_ratio" in fl:
            lines.append(f"- {w}: floor_ratio {fl['floor_ratio']:.4f} (without embedding lookups "
                         f"{fl['floor_ratio_no_embedding']:.4f}); {fl['gflop_nonprivate']:.1f} GFLOP/step non-private, "
                         f"{fl['gflop_attention']:.1f} of it attention")
        else:
            lines.append(f"- {w}: {_first_line(fl.get('error'), 300)}")
    lines += ["", "## What each variant measures", ""]
    lines += [f"- `{name}`: {what}" for name, what in result.get("variants", {}).items()]
    sparta = [r for r in result["rows"] if r["variant"] == "sparta"]
    if sparta:
        lines += ["", f"## Claim: {SPARTA_CLAIM}", ""]
        for r in sparta:
            verdict = ("holds" if r["claim_holds"] else "does not hold") if "claim_holds" in r else \
                f"not measured ({r['status']}: {_first_line(r.get('error'), 150) or 'no non-private reference'})"
            ratio = f", time × nonprivate {r['time_ratio']:.3f}" if "time_ratio" in r else ""
            lines.append(f"- {r['workload']} {r['dtype']} B={r['batch_size']}: {verdict}{ratio}")
    if result.get("max_batch"):
        lines += ["", "## Largest batch that fits", "",
                  "| workload | dtype | variant | start | max batch | first failing | status | probes |", "|---|---|---|---|---|---|---|---|"]
        for e in result["max_batch"]:
            status = e["status"] if e["status"] in ("ok", "capped") else f"**{e['status']}**: `{_first_line(e.get('error'))}`"
            lines.append(f"| {e['workload']} | {e['dtype']} | {e['variant']} | {e['start']} | {_f(e.get('max_batch'), 'd')} | "
                         f"{_f(e.get('first_fail'), 'd')} | {status} | {len(e.get('probes', []))} |")
    failed = [r for r in result["rows"] if r["status"] != "ok" or r.get("launches_error")]
    if failed:
        lines += ["", "## Failures and skips (full messages in the JSON)", ""]
        for r in failed:
            msg = r.get("error") if r["status"] != "ok" else f"launch count: {r['launches_error']}"
            expected = f" (expected: {r['expected_failure']})" if r.get("expected_failure") else ""
            lines.append(f"- {r['workload']} {r['dtype']} {r['variant']} B={r['batch_size']}: {r['status']}{expected}: "
                         f"{_first_line(msg, 500)}")
    return "\n".join(lines) + "\n"


def plots(result: dict, stem: str) -> Dict[str, str]:
    """PNG plots next to ``stem``; returns {plot: path, or "skipped: reason"}."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        return {k: f"skipped: matplotlib is not importable ({err})" for k in ("time_ratio", "mem_ratio", "throughput")}
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    default_b = {w: sizes[0] for w, sizes in result["config"]["batch_sizes"].items()}
    names = [w for w in result["config"]["workloads"] if any(r["workload"] == w for r in rows)]
    out = {}
    for key, label in (("time_ratio", "step time / non-private"), ("mem_ratio", "peak memory / non-private")):
        if not any(r.get(key) is not None for r in rows):
            out[key] = f"skipped: no {key} in this run" + (" (no memory accounting on the CPU)" if key == "mem_ratio" else "")
            continue
        variants = [v for v in result["config"]["variants"] if v != "nonprivate"]
        dtypes = result["config"]["dtypes"]
        fig, axes = plt.subplots(1, len(names), figsize=(5 + 0.5 * len(variants) * len(names), 4.5), squeeze=False)
        for ax, w in zip(axes[0], names):
            width = 0.8 / len(dtypes)
            for j, dt in enumerate(dtypes):
                vals = []
                for v in variants:
                    r = next((r for r in rows if (r["workload"], r["dtype"], r["variant"], r["batch_size"])
                              == (w, dt, v, default_b[w])), None)
                    vals.append(math.nan if r is None or r.get(key) is None else r[key])
                xs = [i + (j - (len(dtypes) - 1) / 2) * width for i in range(len(variants))]
                ax.bar(xs, vals, width, label=dt)
                for x, v, val in zip(xs, variants, vals):
                    if math.isnan(val):
                        r = next((r for r in result["rows"] if (r["workload"], r["dtype"], r["variant"],
                                                                 r["batch_size"]) == (w, dt, v, default_b[w])), None)
                        ax.text(x, 1.0, "n/a" if r is None or r["status"] == "ok" else r["status"], ha="center",
                                va="bottom", fontsize=7, rotation=90)
            ax.axhline(1.0, color="k", lw=0.8)
            floor = result["floor"].get(w, {}).get("floor_ratio")
            if key == "time_ratio" and floor:
                ax.axhline(floor, color="tab:red", ls="--", lw=0.8, label=f"FLOP floor {floor:.2f}")
            ax.set_xticks(range(len(variants)))
            ax.set_xticklabels(variants, rotation=60, ha="right", fontsize=8)
            ax.set_title(f"{w}, B={default_b[w]}")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        fig.suptitle(f"{result['env']['device']}, {result['env']['date']}", fontsize=9)
        fig.tight_layout()
        out[key] = f"{stem}_{key}.png"
        save_figure(fig, out[key], dpi=110)
        plt.close(fig)
    multi = [w for w in names if len(result["config"]["batch_sizes"][w]) > 1]
    if not multi:
        out["throughput"] = "skipped: one batch size per workload (give --batch-sizes W=B1:B2:... for this plot)"
        return out
    fig, axes = plt.subplots(1, len(multi), figsize=(5.5 * len(multi), 4.5), squeeze=False)
    for ax, w in zip(axes[0], multi):
        for i, v in enumerate(result["config"]["variants"]):  # one colour per variant, one line style per dtype
            for dt, ls in zip(result["config"]["dtypes"], ("-", "--")):
                pts = sorted((r["batch_size"], r["samples_per_s"]) for r in rows
                             if (r["workload"], r["dtype"], r["variant"]) == (w, dt, v))
                if pts:
                    ax.plot(*zip(*pts), ls, color=f"C{i % 10}", marker="o", label=f"{v} {dt}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("samples / s")
        ax.set_title(w)
        ax.legend(fontsize=6)
    fig.suptitle(f"{result['env']['device']}, {result['env']['date']}", fontsize=9)
    fig.tight_layout()
    out["throughput"] = f"{stem}_throughput.png"
    save_figure(fig, out["throughput"], dpi=110)
    plt.close(fig)
    return out


def write_outputs(result: dict, stem: str, *, with_plots: bool) -> List[str]:
    """``stem``.json / .csv / .md (and, ``with_plots``, the PNGs); returns the paths written."""
    if with_plots:
        result["plots"] = plots(result, stem)
    write_json(result, stem + ".json")  # each file whole or not at all: a kill keeps the previous one
    write_csv(result, stem + ".csv")
    write_text(markdown(result), stem + ".md")
    pngs = [p for p in result.get("plots", {}).values() if p.endswith(".png")]
    return [stem + ".json", stem + ".csv", stem + ".md"] + pngs


# ------------------------------------------------------------------------------------------ exit status
def failures(result: dict) -> List[str]:
    """One line per requested measurement that failed: a row with status error or oom, a launch count or a
    largest-batch search that raised; those with ``expected_failure`` and skipped runs are not failures."""
    out = []
    for r in result["rows"]:
        where = f"{r['workload']} {r['dtype']} {r['variant']} B={r['batch_size']}"
        if r["status"] in ("error", "oom") and not r.get("expected_failure"):
            out.append(f"{where}: {r['status']}: {_first_line(r.get('error'), 300)}")
        elif r.get("launches_error") and not r["launches_error"].startswith("skipped"):
            out.append(f"{where}: launch count: {_first_line(r['launches_error'], 300)}")
    for e in result.get("max_batch", []):
        if e["status"] == "error" and not e.get("expected_failure"):
            out.append(f"{e['workload']} {e['dtype']} {e['variant']} largest batch: {_first_line(e.get('error'), 300)}")
    return out


def exit_status(result: dict, allow_failures: bool = False, prog: str = "fastdp bench") -> int:
    """List the failures (then expected failures and skips) on stderr; 1 if any failed, unless ``allow_failures``."""
    failed = failures(result)
    expected = [r for r in result["rows"] + result.get("max_batch", []) if r.get("expected_failure")]
    skipped = sum(r["status"] == "skipped" for r in result["rows"])
    for line in failed:
        print(f"{prog}: FAILED {line}", file=sys.stderr)
    for r in expected:
        print(f"{prog}: expected failure, not counted: {r['workload']} {r['dtype']} {r['variant']}: "
              f"{r['expected_failure']}", file=sys.stderr)
    if skipped:
        print(f"{prog}: {skipped} run(s) skipped (see the rows' error)", file=sys.stderr)
    if failed:
        print(f"{prog}: {len(failed)} requested measurement(s) failed; the rows are written"
              + (" (--allow-failures: exit status 0)" if allow_failures else ""), file=sys.stderr)
    return 1 if failed and not allow_failures else 0


# ------------------------------------------------------------------------------------------ main
def _csv_arg(s, allowed, what):
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or s!r}; choose from {', '.join(allowed)}")
    return items


def _batch_arg(s, what, sep):
    """'gpt2=8,wrn=128' (sep=None) or 'gpt2=8:16,wrn=128' (sep=':') -> {workload: [sizes]}."""
    out = {}
    for kv in filter(None, (x.strip() for x in s.split(","))):
        try:
            k, v = kv.split("=")
            sizes = [int(b) for b in (v.split(sep) if sep else [v])]
        except ValueError:
            raise SystemExit(f"--{what}: expected WORKLOAD=B{'[:B...]' if sep else ''}, got {kv!r}") from None
        if k.strip() not in workloads.WORKLOADS or min(sizes) < 1:
            raise SystemExit(f"--{what}: bad entry {kv!r} (workloads: {', '.join(workloads.WORKLOADS)}; sizes >= 1)")
        out[k.strip()] = sizes
    return out


EXIT_STATUS_HELP = (
    "Exit status: 1 when a requested measurement failed (a row with status error or oom, a launch count or a "
    "largest-batch search that raised), 0 otherwise or with --allow-failures; the rows are written either way and "
    "each failure is listed on stderr. Not failures: skipped runs (--time-budget spent, a workload whose package is "
    "missing) and expected failures, whose rows say why in expected_failure: "
    + "; ".join(why for _, _, why in EXPECTED_FAILURES) + ".")


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0], epilog=EXIT_STATUS_HELP,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--workloads", default=",".join(workloads.WORKLOADS), help="comma-separated")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (the median needs >= 20 for a measurement)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--batch", default="", help="per-workload batch size, e.g. 'gpt2=8,wrn=128'")
    ap.add_argument("--batch-sizes", default="", help="several per workload, e.g. 'wrn=64:128:256' (throughput plot)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized models (smoke runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--no-launches", dest="launches", action="store_false",
                    help="skip the profiled pass (CUDA kernels and aten ops per step)")
    ap.add_argument("--max-batch", action="store_true", help="search the largest batch that fits per variant")
    ap.add_argument("--max-batch-variants", default="", help="comma-separated (default: --variants)")
    ap.add_argument("--max-batch-dtypes", default="", help="comma-separated (default: --dtypes)")
    ap.add_argument("--max-batch-cap", type=int, default=None, help="largest size probed (default 32x the batch)")
    ap.add_argument("--max-batch-resolution", type=float, default=0.1,
                    help="stop bisecting when first failure - max batch <= this fraction of the max batch")
    ap.add_argument("--mem-limit-gib", type=float, default=None,
                    help="a probe fits only if its peak memory is at most this (simulates a smaller device)")
    ap.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="runs that would start after this many seconds become 'skipped' rows")
    ap.add_argument("--out-dir", default=results_dir())
    ap.add_argument("--commit", default=None, help="record this commit (for runs from a copy without .git)")
    ap.add_argument("--from-json", default=None, metavar="PATH",
                    help="run nothing: rewrite the CSV, markdown and plots of a saved e2e JSON into --out-dir")
    ap.add_argument("--allow-failures", action="store_true",
                    help="exit status 0 even when a requested measurement failed (exploratory runs; see below)")
    return ap


def setup_device(device: torch.device, threads: Optional[int]) -> None:
    """CPU threads and freed memory kept in the process for every variant (``fastdp.cpu_memory``: no page faults
    per step); on CUDA real fp32 (no TF32 anywhere; the bf16 rows use autocast) and no cuDNN autotuning."""
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cpu":
        retain_freed_memory()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False


def output_stem(out_dir: str, name: str, env: dict, device: torch.device, tiny: bool) -> str:
    """``out_dir/name_<date>`` (+ ``_cpu``/``_tiny``: a smoke run never overwrites the day's GPU results)."""
    suffix = "" if device.type == "cuda" and not tiny else f"_{device.type}{'_tiny' if tiny else ''}"
    return os.path.join(out_dir, f"{name}_{env['date']}{suffix}")


def _upgrade_legacy(result: dict) -> dict:
    """Results written by the earlier ``gpu_step`` harness (comma-separated lists, one batch size per workload,
    no ``trained`` or launch columns) in this harness's layout, so ``--from-json`` renders them too."""
    cfg = result["config"]
    for key in ("workloads", "dtypes", "variants"):
        if isinstance(cfg.get(key), str):
            cfg[key] = [v for v in cfg[key].split(",") if v]
    cfg["batch_sizes"] = {w: b if isinstance(b, list) else [b] for w, b in cfg.get("batch_sizes", {}).items()}
    return result


def main(argv=None, prog: Optional[str] = None) -> dict:
    """Run the suite from command-line arguments; returns the result dict with ``paths`` (files written) and
    ``exit_status`` (:data:`EXIT_STATUS_HELP`; what ``python -m fastdp.bench.e2e`` and ``fastdp bench`` exit with)."""
    args = build_parser(prog).parse_args(argv)
    if args.from_json:  # e.g. plots for a GPU run made where matplotlib was not installed
        with open(args.from_json) as f:
            result = _upgrade_legacy(json.load(f))
        os.makedirs(args.out_dir, exist_ok=True)
        stem = os.path.join(args.out_dir, os.path.basename(args.from_json).removesuffix(".json"))
        result["paths"] = write_outputs(result, stem, with_plots=True)
        print("wrote " + ", ".join(result["paths"]))
        result["exit_status"] = 0  # nothing was run
        return result
    variants = _csv_arg(args.variants, VARIANTS, "variants")
    names = _csv_arg(args.workloads, workloads.WORKLOADS, "workloads")
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be >= 1")
    defaults = workloads.TINY_BATCH if args.tiny else workloads.DEFAULT_BATCH
    sizes = {w: [b] for w, b in defaults.items()} | {w: [b[0]] for w, b in _batch_arg(args.batch, "batch", None).items()}
    sizes |= _batch_arg(args.batch_sizes, "batch-sizes", ":")
    cfg = Config(workloads=names, dtypes=_csv_arg(args.dtypes, DTYPES, "dtypes"), variants=variants,
                 batch_sizes={w: sizes[w] for w in names}, device=torch.device(args.device), tiny=args.tiny,
                 steps=args.steps, warmup=args.warmup, launches=args.launches, max_batch=args.max_batch,
                 max_batch_variants=_csv_arg(args.max_batch_variants, VARIANTS, "max-batch-variants")
                 if args.max_batch_variants else None,
                 max_batch_dtypes=_csv_arg(args.max_batch_dtypes, DTYPES, "max-batch-dtypes")
                 if args.max_batch_dtypes else None,
                 max_batch_cap=args.max_batch_cap, max_batch_resolution=args.max_batch_resolution,
                 mem_limit_bytes=None if args.mem_limit_gib is None else int(args.mem_limit_gib * 2**30),
                 time_budget_s=args.time_budget)
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available; `--device cpu --tiny` runs the code path on the CPU")
    setup_device(cfg.device, args.threads)
    env = environment(cfg.device)
    if args.commit:
        env["git_commit"], env["git_dirty"] = args.commit, None
    os.makedirs(args.out_dir, exist_ok=True)
    stem = output_stem(args.out_dir, "e2e", env, cfg.device, args.tiny)
    result = run_suite(cfg, env, checkpoint=lambda res: write_outputs(res, stem, with_plots=False))
    result["paths"] = write_outputs(result, stem, with_plots=True)
    print(markdown(result))
    print("wrote " + ", ".join(result["paths"]))
    result["exit_status"] = exit_status(result, args.allow_failures, prog or "fastdp.bench.e2e")
    return result


if __name__ == "__main__":
    sys.exit(main()["exit_status"])
