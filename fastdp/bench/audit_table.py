"""The audit table: claimed epsilon against the one-run audit's eps_lower for every method at several epsilons
(white-box Dirac canaries, digits, a small MLP), next to the bound an idealised run of the same statistic would
give (``ideal``: the mean over 10 draws of the bound from simulated scores of a perfect DP-SGD with the same sigma, steps,
sample rate and m, the same guesses: what a correct implementation can show with this statistic; at sample rate 1
the scores are Gaussian with separation sqrt(T) / sigma).

    python -m fastdp.bench.audit_table                                   # all methods at epsilon 1, 4, 8
    python -m fastdp.bench.audit_table --methods dpsgd --epsilons 8 --batch-size 512 --epochs 2   # Poisson, q < 1
    python -m fastdp.bench.audit_table --methods dpsgd --ddp 2 --threads 1   # DDP on 2 gloo ranks (CPU processes)

``--ddp N`` starts N rank processes of the same command (torchrun's variables, gloo) and audits the data-parallel
run (``fastdp.audit``'s ``distributed``); rank 0 prints and writes the files (``..._ddpN``).

Writes ``audit_table_<date>.json`` and ``.md`` (and the report + histogram of the first DP-SGD run) to
``--out-dir`` (default ``benchmarks/results/audit`` in a checkout, else ``./fastdp-results/audit``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from typing import Optional, Sequence

import torch

from fastdp.audit import audit
from fastdp.audit.one_run import audit_scores
from fastdp.audit.report import save_report
from fastdp.audit.training import METHODS, derived_generator
from fastdp.bench.timing import measure
from fastdp.data import load_dataset
from fastdp.models import MLP


def ideal_eps_lower(noise_multiplier: float, steps: int, m: int, *, delta: float, confidence: float, seed: int,
                    draws: int = 10, sample_rate: float = 1.0) -> float:
    """Mean over ``draws`` of the bound from the scores of a perfect DP-SGD with m canaries, each included with
    probability 1/2: an included canary joins each of ``steps`` steps with probability ``sample_rate`` and adds 1
    (R, in units of R), every step adds N(0, sigma^2); the score is the sum over steps (the white-box statistic
    with the data's part removed exactly)."""
    gen = derived_generator(seed, "ideal")
    found = []
    for _ in range(draws):
        included = torch.rand(m, generator=gen) < 0.5
        joins = (torch.rand(m, steps, generator=gen) < sample_rate).sum(1).double()
        noise = torch.randn(m, generator=gen, dtype=torch.float64) * noise_multiplier * math.sqrt(steps)
        scores = noise + joins * included.double()
        found.append(audit_scores(scores, included, delta=delta, confidence=confidence, generator=gen).eps_lower)
    return sum(found) / draws


def default_out_dir() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isdir(os.path.join(root, "benchmarks", "results")):
        return os.path.join(root, "benchmarks", "results", "audit")
    return os.path.join("fastdp-results", "audit")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fastdp.bench.audit_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    p.add_argument("--epsilons", default="1,4,8", help="(default: %(default)s)")
    p.add_argument("--canaries", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10, help="at sample rate 1: steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None, help="expected batch size (default: all, rate 1)")
    p.add_argument("--limit", type=int, default=None, help="first N digits training images (default: all 1437)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ideal-draws", type=int, default=10, help="draws averaged in the ideal column (default: %(default)s)")
    p.add_argument("--accountant", choices=("prv", "rdp"), default="prv", help="(default: %(default)s)")
    p.add_argument("--seeds", type=int, default=1, help="runs per cell, seeds seed..seed+N-1 (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--ddp", type=int, default=None, metavar="N",
                   help="audit DistributedDataParallel training on N gloo ranks (one process each)")
    p.add_argument("--out-dir", default=None)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.ddp and "RANK" not in os.environ:
        return launch_ranks(args.ddp, argv)
    rank = 0
    if args.ddp:
        import torch.distributed as dist

        from fastdp.distributed import init_process_group
        init_process_group(backend="gloo")
        rank = dist.get_rank()
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = args.out_dir or default_out_dir()
    os.makedirs(out_dir, exist_ok=True)
    train, _, meta = load_dataset("digits", limit=args.limit)
    model_fn = lambda: MLP(64, meta["num_classes"], hidden=(args.hidden,))  # noqa: E731
    rows, saved = [], False
    for eps in [float(e) for e in args.epsilons.split(",")]:
        for method in args.methods.split(","):
            for seed in range(args.seed, args.seed + args.seeds):
                row, r = run_cell(model_fn, train, method, eps, seed, args)
                rows.append(row)
                if rank != 0:
                    continue
                print(f"{method:14s} eps {r.epsilon:6.3f}  eps_lower {r.eps_lower:6.3f}"
                      + (f"  ideal {row['ideal_eps_lower']:6.3f}" if row["ideal_eps_lower"] is not None else "")
                      + f"  guessed on {row['guessed_on']}, {row['correct']}/{row['guesses']}  seed {seed}"
                      f"  {row['seconds']:.1f} s", flush=True)
                if method == "dpsgd" and not saved:
                    save_report(r, out_dir, stem=f"dpsgd_eps{eps:g}" + (f"_ddp{args.ddp}" if args.ddp else ""))
                    saved = True
    stamp = datetime.date.today().isoformat()
    info = {"date": stamp, "torch": torch.__version__, "threads": torch.get_num_threads(), "dataset": "digits",
            "model": f"MLP(64, {args.hidden}, 10)", "args": vars(args), "rows": rows}
    if args.ddp:
        torch.distributed.destroy_process_group()
        if rank != 0:
            return info
    base = os.path.join(out_dir, f"audit_table_{stamp}" + (f"_b{args.batch_size}" if args.batch_size else "")
                        + (f"_ddp{args.ddp}" if args.ddp else ""))
    with open(base + ".json", "w") as f:
        json.dump(info, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown_table(rows) + "\n")
    print(markdown_table(rows))
    return info


def run_cell(model_fn, train, method: str, eps: float, seed: int, args):
    """One audit of the table; returns (row dict, AuditResult)."""
    command = (f"python -m fastdp.bench.audit_table --methods {method} --epsilons {eps:g} --canaries {args.canaries} "
               f"--epochs {args.epochs} --seed {seed} --accountant {args.accountant}"
               + (f" --batch-size {args.batch_size}" if args.batch_size else "")
               + (f" --limit {args.limit}" if args.limit else "") + (f" --ddp {args.ddp}" if args.ddp else ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus' PRV at sample rate 1 (log 0), RDP order warnings
        timed = measure(lambda: audit(model_fn, train, canaries=args.canaries, method=method, epochs=args.epochs,
                                      expected_batch_size=args.batch_size, target_epsilon=eps, delta=args.delta,
                                      seed=seed, accountant=args.accountant, command=command), "cpu", 1)
        r = timed.last
    ideal = ideal_eps_lower(r.noise_multiplier, r.steps, r.canaries, delta=args.delta, confidence=r.confidence,
                            seed=seed, draws=args.ideal_draws, sample_rate=r.sample_rate)
    row = {"method": method, "epsilon_target": eps, "seed": seed, "epsilon": r.epsilon, "eps_lower": r.eps_lower,
           "ideal_eps_lower": ideal, "noise_multiplier": r.noise_multiplier, "steps": r.steps,
           "sample_rate": r.sample_rate, "canaries": r.canaries, "guessed_on": int(r.candidates.sum()),
           "k": r.bound.k, "correct": r.bound.v, "guesses": r.bound.r, "max_unreleased": r.max_unreleased,
           "seconds": timed.times_ms[0] / 1e3, "command": command}
    return row, r


def launch_ranks(world: int, argv: Sequence[str]) -> dict:
    """Run this command as ``world`` rank processes (gloo on this machine, a free port); raises if a rank fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, "-m", "fastdp.bench.audit_table", *argv], env={**env, "RANK": str(r)})
             for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"audit ranks exited with {codes}")
    return {"world": world}


def markdown_table(rows) -> str:
    """One line per (method, target epsilon): means over seeds (with the spread where there are several)."""
    cells = {}
    for r in rows:
        cells.setdefault((r["method"], r["epsilon_target"]), []).append(r)

    def stat(values, digits=2):
        t = torch.tensor(values, dtype=torch.float64)
        return f"{float(t.mean()):.{digits}f}" + (f" ± {float(t.std()):.{digits}f}" if t.numel() > 1 else "")

    lines = ["| method | claimed epsilon | eps_lower | ideal eps_lower | sigma | steps | rate | guessed on | runs | "
             "max unreleased |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (method, _), rs in cells.items():
        ideal = stat([r["ideal_eps_lower"] for r in rs])
        r0 = rs[0]
        lines.append(f"| {method} | {r0['epsilon']:.2f} | {stat([r['eps_lower'] for r in rs])} | {ideal} | "
                     f"{r0['noise_multiplier']:.3f} | {r0['steps']} | {r0['sample_rate']:.3g} | "
                     f"{stat([r['guessed_on'] for r in rs], 0)} | {len(rs)} | "
                     f"{max(r['max_unreleased'] or 0 for r in rs):g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
