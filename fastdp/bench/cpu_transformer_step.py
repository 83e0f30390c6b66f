"""CPU step time of a small transformer LM: non-private vs fastdp vs Opacus, timed in one run.

Workload (issue: fastdp core): d=128, T=64, B=32, 3 blocks, 4 heads, vocab 256, tied embeddings.
A step is forward + backward + optimizer step + zero_grad on a fixed synthetic batch.

    python -m fastdp.bench.cpu_transformer_step [--steps 20] [--threads 2] [--out benchmarks/results/cpu_transformer_step.json]

Every variant runs with glibc keeping freed memory (``fastdp.cpu_memory``; ``--default-malloc`` to compare).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import traceback

import torch

import fastdp
from fastdp.bench.run_env import write_result
from fastdp.bench.timing import Timing, add_cpu_step_args, time_calls
from fastdp.cpu_memory import retain_freed_memory
from fastdp.models import TinyTransformer, lm_loss


def make_variants(model, B, n):
    def nonprivate():
        m = copy.deepcopy(model)
        return m, torch.optim.SGD(m.parameters(), lr=0.01)

    def fastdp_flat():
        m = copy.deepcopy(model)
        opt = fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
                                 expected_batch_size=B, sample_size=n, generator=torch.Generator().manual_seed(0))
        return m, opt

    def opacus(mode):
        def build():
            from opacus import PrivacyEngine
            m = copy.deepcopy(model)
            pe = PrivacyEngine()
            ds = torch.utils.data.TensorDataset(torch.zeros(n, 1))
            dl = torch.utils.data.DataLoader(ds, batch_size=B)
            out = pe.make_private(module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.01), data_loader=dl,
                                  noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
                                  criterion=torch.nn.CrossEntropyLoss(), poisson_sampling=False)
            return out[0], out[1], (out[2] if mode == "ghost" else None)
        return build

    return {"nonprivate": nonprivate, "fastdp": fastdp_flat, "opacus_hooks": opacus("hooks"),
            "opacus_ghost": opacus("ghost")}


def time_variant(build, idx, tgt, steps, warmup) -> list:
    """A fresh copy under the variant ``build`` makes; ms of each of ``steps`` steps after ``warmup``."""
    built = build()
    m, opt = built[0], built[1]
    crit = built[2] if len(built) > 2 else None

    def step():
        logits = m(idx)
        if crit is not None:  # opacus ghost: its criterion wrapper runs both backward passes
            loss = crit(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        else:
            loss = lm_loss(logits, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad()

    return time_calls(step, "cpu", steps, warmup).times_ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cpu_step_args(ap)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--variants", default="nonprivate,fastdp,opacus_hooks,opacus_ghost")
    ap.add_argument("--out", default=None)
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default trim/mmap thresholds (see fastdp.cpu_memory)")
    args = ap.parse_args(argv)
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (two interleaved rounds of steps // 2)")
    torch.set_num_threads(args.threads)
    retained = False if args.default_malloc else retain_freed_memory()  # for every variant alike
    torch.manual_seed(0)
    model = TinyTransformer(vocab=256, d=128, layers=3, heads=4, max_len=args.seq)
    idx = torch.randint(0, 256, (args.batch, args.seq))
    tgt = torch.randint(0, 256, (args.batch, args.seq))
    variants = make_variants(model, args.batch, 50_000)
    rows = []
    order = args.variants.split(",")
    # interleave rounds so drift of the machine hits every variant alike
    samples = {v: [] for v in order}
    errors = {}
    for _ in range(2):
        for v in order:
            if v in errors:
                continue
            try:
                samples[v] += time_variant(variants[v], idx, tgt, args.steps // 2, args.warmup)
            except Exception as err:  # a failure is a row, never a dropped row
                errors[v] = f"{type(err).__name__}: {err}".splitlines()[0][:300]
                traceback.print_exc()
    base = Timing(samples["nonprivate"]).median_ms if samples.get("nonprivate") else None
    for v in order:
        if v in errors:
            rows.append({"variant": v, "error": errors[v]})
            continue
        t = Timing(samples[v]).summary()
        rows.append({"variant": v, "median_ms": t["median_ms"], "p20_ms": t["p20_ms"], "p80_ms": t["p80_ms"],
                     "ratio_to_nonprivate": t["median_ms"] / base if base else None, "steps": t["steps"]})
    result = {"workload": f"TinyTransformer d=128 T={args.seq} B={args.batch} 3 blocks vocab=256 tied, fp32",
              "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads",
              "torch": torch.__version__, "retain_freed_memory": retained, "date": datetime.date.today().isoformat(), "rows": rows}
    print(f"{'variant':<14} {'median ms':>10} {'x nonprivate':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<14} ERROR {r['error']}")
        else:
            print(f"{r['variant']:<14} {r['median_ms']:>10.1f} {r['ratio_to_nonprivate']:>13.3f}")
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
