"""Step time and peak memory of non-private training vs fastdp flat clipping: ``benchmarks.e2e`` restricted to the
variants ``nonprivate`` and ``fastdp``, kept under its old name and options for the runs recorded in
``results/h100_2026-11-26_v*`` (the harness, the FLOP floor and the report live in ``fastdp/bench/e2e.py``).

Writes ``gpu_step_<date>[_cpu][_tiny].json`` and ``.md`` under ``--out-dir``; no launch counting, plots or
largest-batch search (use ``python -m fastdp.bench.e2e`` / ``fastdp bench`` for those).

    python -m fastdp.bench.gpu_step [--workloads vit,gpt2,wrn] [--dtypes fp32,bf16] [--variants nonprivate,fastdp]
    python -m fastdp.bench.gpu_step --device cpu --tiny --steps 3 --warmup 1     # CI smoke run
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from fastdp.bench import workloads
from fastdp.bench.e2e import (
    DTYPES,
    Config,
    _csv_arg,
    environment,
    exit_status,
    flop_floor,
    markdown,
    output_stem,
    run_suite,
    run_variant,
    setup_device,
    time_steps,
)
from fastdp.bench.run_env import results_dir, write_json, write_text

VARIANTS = ("nonprivate", "fastdp")
# the harness used to live here: re-exported for code that imports it from gpu_step
__all__ = ["DTYPES", "VARIANTS", "environment", "flop_floor", "main", "markdown", "run_variant", "time_steps"]


def main(argv=None) -> dict:
    """Run the two variants; returns the result dict with ``paths`` = [json, md] and ``exit_status`` (as ``fastdp
    bench``'s: 1 when a requested row failed, unless ``--allow-failures``)."""
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
    ap.add_argument("--out-dir", default=results_dir())
    ap.add_argument("--commit", default=None, help="record this commit (for runs from a copy without .git)")
    ap.add_argument("--allow-failures", action="store_true", help="exit status 0 even when a requested row failed")
    args = ap.parse_args(argv)
    names = _csv_arg(args.workloads, workloads.WORKLOADS, "workloads")
    if args.steps < 1 or args.warmup < 1:
        raise SystemExit("--steps and --warmup must be >= 1")
    batch_sizes = dict(workloads.TINY_BATCH if args.tiny else workloads.DEFAULT_BATCH)
    for kv in filter(None, args.batch.split(",")):
        k, v = kv.split("=")
        batch_sizes[k.strip()] = int(v)
    cfg = Config(workloads=names, dtypes=_csv_arg(args.dtypes, DTYPES, "dtypes"),
                 variants=_csv_arg(args.variants, VARIANTS, "variants"),
                 batch_sizes={w: [batch_sizes[w]] for w in names}, device=torch.device(args.device), tiny=args.tiny,
                 steps=args.steps, warmup=args.warmup, launches=False)
    setup_device(cfg.device, args.threads)
    env = environment(cfg.device)
    if args.commit:
        env["git_commit"], env["git_dirty"] = args.commit, None
    result = run_suite(cfg, env)
    result["benchmark"] = "gpu_step"
    md = markdown(result)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = output_stem(args.out_dir, "gpu_step", env, cfg.device, args.tiny)
    write_json(result, stem + ".json")
    write_text(md, stem + ".md")
    result["paths"] = [stem + ".json", stem + ".md"]
    print(md)
    result["exit_status"] = exit_status(result, args.allow_failures, "fastdp.bench.gpu_step")
    return result


if __name__ == "__main__":
    sys.exit(main()["exit_status"])
