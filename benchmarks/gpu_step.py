"""Step time and peak memory of non-private training vs fastdp on the peer-baseline workloads (one GPU).

For each workload (``benchmarks.workloads``: ViT-S/16 B=64, stock HF GPT-2 T=256 B=16, WRN-16-4-GN B=256)
x dtype (fp32: real FP32, TF32 off for matmul and cuDNN; bf16: ``torch.autocast`` around forward and loss)
x variant (``nonprivate``: plain SGD; ``fastdp``: ``DPOptimizer`` flat clipping, sigma=1, R=1, seeded
generator), a fresh copy of the same initial model is warmed up, then ``--steps`` steps are timed. A step is
forward + loss, ``loss.backward()``, ``opt.step()``, ``opt.zero_grad()`` on one fixed synthetic batch.

Timing: CUDA events around every step (CPU: ``time.perf_counter``), median / p20 / p80 ms; peak memory is
``torch.cuda.max_memory_allocated`` after resetting the peak once the model is on the device (includes the
weights, the warm-up steps and optimizer state). Every failure (exception, OOM, missing dependency) is a row.

``floor_ratio`` per workload: the FLOP floor of exact per-sample clipping over non-private training. Per
Linear / HF Conv1D / Conv / Embedding (as a one-hot matmul) use with B samples, T positions per sample,
input width d and output width p (per conv group): non-private 6BTpd, DP floor 6BTpd + min(2BTpd, 2BT^2(p+d))
(per-sample gradients or ghost norms, whichever is cheaper). Attention (2*2*B*heads*T^2*head_dim forward,
x3 for forward+backward) is counted on both sides unchanged; elementwise ops are ignored.
``floor_ratio_no_embedding`` leaves embedding lookups out of both sides (they are not matmuls in practice).

    python -m benchmarks.gpu_step [--workloads vit,gpt2,wrn] [--dtypes fp32,bf16] [--variants nonprivate,fastdp]
    python -m benchmarks.gpu_step --device cpu --tiny --steps 3 --warmup 1     # CI smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import torch
from torch import nn

import fastdp
from benchmarks import workloads

VARIANTS = ("nonprivate", "fastdp")
DTYPES = ("fp32", "bf16")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------ harness
def time_steps(step, device: torch.device, steps: int, warmup: int) -> dict:
    """Run ``step()`` (returns the detached loss) ``warmup`` times untimed, then ``steps`` times timed."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    loss_first = None
    for i in range(warmup):
        loss = step()
        if i == 0:
            loss_first = loss.item()
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for start, end in events:
            start.record()
            loss = step()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            loss = step()
            times.append(1e3 * (time.perf_counter() - t0))
    return {"times_ms": times, "loss_first": loss_first, "loss_last": loss.item(),
            "peak_mem_bytes": torch.cuda.max_memory_allocated(device) if cuda else None}


def _pct(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def make_optimizer(variant: str, model: nn.Module, batch_size: int, device: torch.device):
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
    if variant == "nonprivate":
        return sgd
    if variant == "fastdp":
        return fastdp.DPOptimizer(model, sgd, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size,
                                  sample_size=100 * batch_size, generator=torch.Generator(device=device).manual_seed(0))
    raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def run_variant(base_model, make_batch, loss_fn, variant, dtype, batch_size, device, steps, warmup) -> dict:
    row = {"variant": variant, "dtype": dtype, "batch_size": batch_size, "status": "ok"}
    model = opt = batch = None
    try:
        model = copy.deepcopy(base_model).to(device).train()
        batch = make_batch(batch_size, device)
        opt = make_optimizer(variant, model, batch_size, device)
        amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == "bf16" else contextlib.nullcontext

        def step():
            with amp():
                loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

        res = time_steps(step, device, steps, warmup)
        t = res.pop("times_ms")
        med = _pct(t, 0.5)
        row.update(median_ms=med, p20_ms=_pct(t, 0.2), p80_ms=_pct(t, 0.8), samples_per_s=1e3 * batch_size / med,
                   steps=len(t), warmup=warmup, **res)
    except Exception as err:  # a failure is a row, never a dropped row
        traceback.print_exc()
        oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err)
        row.update(status="oom" if oom else "error", error=f"{type(err).__name__}: {err}"[:2000],
                   traceback=traceback.format_exc()[-4000:])
    finally:
        model = opt = batch = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------ FLOP floor
def flop_floor(model: nn.Module, batch, loss_fn, batch_size: int) -> dict:
    """Walk one fp32 forward with hooks; FLOPs of non-private training and of the exact-clipping floor."""
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


# ------------------------------------------------------------------------------------------ report
def _version(mod):
    try:
        return __import__(mod).__version__
    except Exception:
        return None


def _git(*cmd):
    try:
        env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")  # read-only: never refresh the index
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10, env=env)
    except Exception:
        return None


def environment(device: torch.device) -> dict:
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("diff", "--quiet", "HEAD", "--")
    if device.type == "cuda":
        name = f"{torch.cuda.get_device_name(device)} (torch.version.cuda {torch.version.cuda})"
    else:
        name = f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    return {"device": name, "python": platform.python_version(),
            "versions": {m: _version(m) for m in ("torch", "triton", "transformers", "timm", "opacus", "fastdp")},
            "date": datetime.date.today().isoformat(),
            "git_commit": head.stdout.strip() if head is not None and head.returncode == 0 else None,
            "git_dirty": dirty.returncode == 1 if dirty is not None and dirty.returncode in (0, 1) else None}


def _f(x, fmt):
    return "" if x is None else format(x, fmt)


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"# fastdp step benchmark: {env['device']}, {env['date']}, commit {env['git_commit']}"
             f"{' (dirty)' if env['git_dirty'] else ''}", "",
             "| workload | dtype | variant | B | median ms | p20 ms | p80 ms | samples/s | time × nonprivate | "
             "peak MiB | mem × nonprivate | floor_ratio | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem = r.get("peak_mem_bytes")
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**: `{r.get('error', '').splitlines()[0][:200]}`"
        lines.append(f"| {r['workload']} | {r['dtype']} | {r['variant']} | {r['batch_size']} | {_f(r.get('median_ms'), '.2f')} | "
                     f"{_f(r.get('p20_ms'), '.2f')} | {_f(r.get('p80_ms'), '.2f')} | {_f(r.get('samples_per_s'), '.1f')} | "
                     f"{_f(r.get('time_ratio'), '.3f')} | {_f(mem and mem / 2**20, '.0f')} | {_f(r.get('mem_ratio'), '.3f')} | "
                     f"{_f(r.get('floor_ratio'), '.3f')} | {status} |")
    lines += ["", "floor_ratio: FLOP floor of exact per-sample clipping / non-private (see the module docstring)."]
    for w, fl in result["floor"].items():
        if "floor_ratio" in fl:
            lines.append(f"- {w}: floor_ratio {fl['floor_ratio']:.4f} (without embedding lookups "
                         f"{fl['floor_ratio_no_embedding']:.4f}); {fl['gflop_nonprivate']:.1f} GFLOP/step non-private, "
                         f"{fl['gflop_attention']:.1f} of it attention")
        else:
            lines.append(f"- {w}: {fl.get('error')}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main
def _csv(s, allowed, what):
    items = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or s!r}; choose from {', '.join(allowed)}")
    return items


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default=",".join(workloads.WORKLOADS))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", default="", help="per-workload batch sizes, e.g. 'gpt2=8,wrn=128'")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="CPU-sized models (smoke runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--commit", default=None, help="record this commit (for runs from a copy without .git)")
    args = ap.parse_args(argv)
    names = _csv(args.workloads, workloads.WORKLOADS, "workloads")
    dtypes = _csv(args.dtypes, DTYPES, "dtypes")
    variants = _csv(args.variants, VARIANTS, "variants")
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be >= 1")
    batch_sizes = dict(workloads.TINY_BATCH if args.tiny else workloads.DEFAULT_BATCH)
    for kv in filter(None, args.batch.split(",")):
        k, v = kv.split("=")
        batch_sizes[k.strip()] = int(v)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":  # real fp32: no TF32 anywhere (the bf16 rows use autocast)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
    env = environment(device)
    if args.commit:
        env["git_commit"], env["git_dirty"] = args.commit, None
    result = {"benchmark": "gpu_step", "env": env, "config": vars(args) | {"batch_sizes": batch_sizes},
              "floor": {}, "rows": []}
    for name in names:
        B = batch_sizes[name]
        try:
            base, make_batch, loss_fn = workloads.build(name, tiny=args.tiny)
        except Exception as err:
            status = "skipped" if isinstance(err, workloads.WorkloadUnavailable) else "error"
            msg = f"{type(err).__name__}: {err}"
            print(f"[{name}] {status}: {msg}", file=sys.stderr)
            result["floor"][name] = {"error": msg}
            result["rows"] += [{"workload": name, "dtype": dt, "variant": v, "batch_size": B, "status": status, "error": msg}
                               for dt in dtypes for v in variants]
            continue
        try:
            m = copy.deepcopy(base).to(device)
            fl = flop_floor(m, make_batch(B, device), loss_fn, B)
        except Exception as err:
            traceback.print_exc()
            fl = {"error": f"{type(err).__name__}: {err}"[:2000]}
        m = None
        result["floor"][name] = fl
        for dt in dtypes:
            rows = []
            for v in variants:
                print(f"[{name} {dt} {v}] B={B} ...", file=sys.stderr, flush=True)
                row = {"workload": name, **run_variant(base, make_batch, loss_fn, v, dt, B, device, args.steps, args.warmup)}
                row["floor_ratio"] = fl.get("floor_ratio")
                print(f"    {row['status']}: " + (f"median {row['median_ms']:.2f} ms" if row["status"] == "ok" else row["error"][:300]),
                      file=sys.stderr, flush=True)
                rows.append(row)
            ref = next((r for r in rows if r["variant"] == "nonprivate" and r["status"] == "ok"), None)
            for r in rows:
                if ref is not None and r["status"] == "ok":
                    r["time_ratio"] = r["median_ms"] / ref["median_ms"]
                    if r["peak_mem_bytes"] is not None:
                        r["mem_ratio"] = r["peak_mem_bytes"] / ref["peak_mem_bytes"]
            result["rows"] += rows
        base = make_batch = loss_fn = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    md = markdown(result)
    os.makedirs(args.out_dir, exist_ok=True)
    # a CPU or tiny run gets its own name so it never overwrites the day's GPU results
    suffix = "" if device.type == "cuda" and not args.tiny else f"_{device.type}{'_tiny' if args.tiny else ''}"
    stem = os.path.join(args.out_dir, f"gpu_step_{result['env']['date']}{suffix}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(md)
    result["paths"] = [stem + ".json", stem + ".md"]
    print(md)
    return result


if __name__ == "__main__":
    main()
