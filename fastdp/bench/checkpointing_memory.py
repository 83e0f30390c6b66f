"""Peak CPU memory of one training step with and without activation checkpointing (GPT-2-shaped model, long sequences).

Workload: HF ``GPT2LMHeadModel`` (tied embedding / head, ``--attn`` attention, ``--dropout`` 0.1), fp32, a fixed
synthetic batch of ``--batch`` sequences of ``--seq`` tokens. A step is forward + backward + optimizer step +
zero_grad. Variants: non-private SGD, fastdp with flat clipping, fastdp with per-layer clipping fused in backward;
each without and with ``model.gradient_checkpointing_enable()`` (non-reentrant ``torch.utils.checkpoint`` around
every block).

Measure: each variant runs in a fresh subprocess that builds the model, runs one warm-up step, resets the process's
peak resident set size (``/proc/self/clear_refs``), runs the measured step, and reports its peak RSS (``VmHWM``) minus
the RSS just before it (model, optimizer state and batch already resident): the memory the step itself needed at its
peak. glibc is set to serve every block of 64 KiB or more with its own mapping and to give freed memory back at once
(``retain_freed_memory(64 KiB)``), so the RSS follows the live tensors instead of what the allocator keeps cached.
Linux only. The variants also report the loss and a checksum of the parameters after the step: with and without
checkpointing they compute the same step (same seed for the data, dropout and noise).

    python -m fastdp.bench.checkpointing_memory [--layers 6 --d 384 --heads 6 --vocab 8192 --seq 1024 --batch 2]
        [--attn sdpa|eager] [--dropout 0.1] [--threads 2] [--variants ...]
        [--out benchmarks/results/checkpointing_memory.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import warnings

import torch

from fastdp.bench import timing
from fastdp.bench.run_env import torch_threads, write_result

VARIANTS = ("nonprivate", "nonprivate_ckpt", "flat", "flat_ckpt", "per_layer", "per_layer_ckpt")
_MARK = "CHECKPOINTING_MEMORY_RESULT "


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def build(args, variant: str):
    """(model, optimizer) of ``variant`` on the workload of ``args`` (seeded: every variant has the same model)."""
    import transformers

    import fastdp
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.d, n_layer=args.layers,
                                  n_head=args.heads, resid_pdrop=args.dropout, embd_pdrop=args.dropout,
                                  attn_pdrop=args.dropout, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    model.config._attn_implementation = args.attn
    if variant.endswith("_ckpt"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # (deprecated alias of activation_checkpointing_enable)
            model.gradient_checkpointing_enable()
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
    if variant.startswith("nonprivate"):
        return model, sgd
    clipping = "per_layer" if variant.startswith("per_layer") else "flat"
    n_params = sum(1 for _ in model.parameters())
    opt = fastdp.DPOptimizer(model, sgd, noise_multiplier=1.0, max_grad_norm=[1.0] * n_params if clipping ==
                             "per_layer" else 1.0, expected_batch_size=args.batch, sample_size=100 * args.batch,
                             clipping=clipping, generator=torch.Generator().manual_seed(1))
    return model, opt


def measure(args, variant: str, pin_malloc: bool = True) -> dict:
    """One variant, in this process: warm-up step, then the measured step's peak RSS over its starting RSS.

    ``pin_malloc``: set glibc's thresholds first (it changes the whole process's allocator: a fresh process only)."""
    from fastdp.cpu_memory import retain_freed_memory
    # every block >= 64 KiB mapped on its own, freed memory returned at once
    pinned = retain_freed_memory(1 << 16) if pin_malloc else False
    model, opt = build(args, variant)
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)

    def step():
        out = model(input_ids=idx, labels=idx, use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        return float(out.loss.detach())

    torch.manual_seed(3)
    step()  # warm-up: optimizer state, fastdp's flat buffer, first-touch allocations
    torch.manual_seed(4)
    before = _proc_status_kib("VmRSS")
    _reset_peak_rss()
    timed = timing.measure(step, "cpu", 1)  # (the shared harness: one timed call)
    loss, seconds = timed.last, timed.times_ms[0] / 1e3
    peak = _proc_status_kib("VmHWM")
    checksum = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    return {"variant": variant, "step_peak_mib": (peak - before) / 1024, "rss_before_mib": before / 1024,
            "peak_rss_mib": peak / 1024, "step_s": seconds, "loss": loss, "param_abs_sum": checksum,
            "mmap_threshold_pinned": pinned}


def _run_child(argv, variant: str, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "fastdp.bench.checkpointing_memory", *argv, "--child", variant]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"variant": variant, "error": f"exit {proc.returncode}: " + " | ".join(tail)[:400]}


def _table(rows) -> str:
    lines = [f"{'variant':<16} {'step peak MiB':>14} {'step s':>8} {'loss':>9} {'param |sum|':>16}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<16} ERROR {r['error']}")
        else:
            lines.append(f"{r['variant']:<16} {r['step_peak_mib']:>14.1f} {r['step_s']:>8.2f} {r['loss']:>9.5f} "
                         f"{r['param_abs_sum']:>16.6f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    ap.add_argument("--dropout", type=float, default=0.1, help="GPT-2's three dropout rates")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per variant")
    ap.add_argument("--out", default=None)
    ap.add_argument("--in-process", action="store_true",
                    help="smoke runs: every variant in this process, glibc not pinned (the numbers then include what "
                         "earlier variants left in the heap)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        torch.set_num_threads(args.threads)
        print(_MARK + json.dumps(measure(args, args.child)), flush=True)
        return None
    if not sys.platform.startswith("linux"):
        raise SystemExit("needs Linux (/proc/self/status VmHWM, /proc/self/clear_refs)")
    order = args.variants.split(",")
    unknown = [v for v in order if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {VARIANTS}")
    child_argv = [f"--{k}={getattr(args, k)}"
                  for k in ("layers", "d", "heads", "vocab", "seq", "batch", "attn", "dropout", "threads")]
    if args.in_process:
        with torch_threads(args.threads):
            rows = [measure(args, v, pin_malloc=False) for v in order]
    else:
        rows = [_run_child(child_argv, v, args.timeout) for v in order]
    by = {r["variant"]: r for r in rows if "error" not in r}
    for base in ("nonprivate", "flat", "per_layer"):
        if base in by and base + "_ckpt" in by:  # (None where the step needed no new memory: in-process runs)
            peak = by[base]["step_peak_mib"]
            by[base + "_ckpt"]["peak_ratio_to_no_ckpt"] = by[base + "_ckpt"]["step_peak_mib"] / peak if peak > 0 else None
    result = {"workload": f"HF GPT2LMHeadModel layers={args.layers} d={args.d} heads={args.heads} vocab={args.vocab} "
                          f"T={args.seq} B={args.batch} attn={args.attn}, fp32, dropout {args.dropout}",
              "measure": "peak RSS (VmHWM) of the measured step minus RSS before it, " + (
                  "all variants in one process (smoke run)" if args.in_process else
                  "fresh process per variant, glibc mmap/trim thresholds pinned at 64 KiB"),
              "threads": args.threads, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "rows": rows}
    print(_table(rows))
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
