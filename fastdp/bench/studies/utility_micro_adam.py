"""Utility study: DP-MicroAdam vs DP-Adam vs DP-SGD on Fashion-MNIST at a fixed epsilon, constant learning rates.

Every run is ``fastdp.cli.main(["train", ...])`` in-process (SmallCNN, Poisson sampling, flat clipping, PRV
accountant). One JSON line per run goes to ``<out-dir>/micro_adam_<tag>.jsonl`` (tag ``fmnist`` for
Fashion-MNIST, else the dataset name); a run whose config is already in the file is skipped, so an
interrupted study resumes where it stopped. Stages:

* ``lr``: one seed (``--sweep-seed``, not one of the reported seeds) per learning rate in ``--lr-grid``, trained
  on 90% of the training set and scored on the held-out 10% (a fixed random split, ``--val-fraction``); the
  test set is not looked at. The best validation accuracy picks each method's constant lr.
* ``main``: every method x ``--seeds`` at its chosen lr (or ``--lrs``), full training set, test accuracy.
* ``clip``: ``--clip-methods`` x ``--clip-norms`` (max_grad_norm C) x ``--clip-seeds`` at the same lr and epsilon.
  Runs whose config equals a ``main`` run (C = 1, a seed in both lists) are shared, not rerun.
* ``report``: ``micro_adam_<tag>.md`` (mean ± sample std over seeds) and ``micro_adam_<tag>.png``.
* ``all`` (default): the four in order.

Runs use ``--threads 1`` torch thread by default: on a shared 2-core machine two OpenMP threads stall badly
whenever another job runs (one Fashion-MNIST epoch went from 22-30 s to 146 s); one thread takes ~30 s per epoch
and leaves the other core free (two stage processes with disjoint ``--clip-methods`` can share the JSONL).

    python -m fastdp.bench.studies.utility_micro_adam                       # the whole study (~1 h of runs of ~100 s each)
    python -m fastdp.bench.studies.utility_micro_adam --stage clip --clip-methods dpmicroadam --clip-seeds 1   # and 2: the
                                                                  # 3-seed DP-MicroAdam C curve in results/utility/
    python -m fastdp.bench.studies.utility_micro_adam --stage report        # redo the summary from the JSONL
    python -m fastdp.bench.studies.utility_micro_adam --dataset digits --epochs 1 --seeds 0 --out-dir /tmp/u   # quick
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence

import torch

from fastdp.bench.run_env import ROOT, commit, machine, results_dir, save_figure, torch_threads, write_text

DEFAULT_OUT = results_dir("utility")
DEFAULT_DATA = os.environ.get("FASTDP_DATA_DIR", os.path.join(os.path.dirname(ROOT), "shared", "data"))
METHODS = ("dpsgd", "dpadam", "dpmicroadam")
LABELS = {"dpsgd": "DP-SGD (momentum 0.9)", "dpadam": "DP-Adam", "dpmicroadam": "DP-MicroAdam"}
DEFAULT_LR_GRID = {"dpsgd": (0.125, 0.25, 0.5, 1.0), "dpadam": (1e-3, 3e-3, 1e-2, 3e-2), "dpmicroadam": (1e-3, 3e-3, 1e-2)}
DEFAULT_CLIP_NORMS = (0.1, 0.5, 1.0, 2.0, 5.0)
VAL_SPLIT_SEED = 12345  # the permutation that holds out the validation images (fixed; not a training seed)
CONFIG_KEYS = ("dataset", "method", "lr", "max_grad_norm", "seed", "epochs", "batch_size", "target_epsilon", "delta",
               "limit", "eval_split", "val_fraction")


# ------------------------------------------------------------------------------------------------ arguments
def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> List[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    return names


def _method_floats(text: str) -> Dict[str, List[float]]:
    """``dpsgd=0.25,0.5;dpadam=1e-3`` -> {"dpsgd": [0.25, 0.5], "dpadam": [0.001]}."""
    out = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in METHODS or not values.strip():
            raise argparse.ArgumentTypeError(f"expected METHOD=v1,v2;METHOD=..., got {part!r}")
        out[name] = _floats(values)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastdp.bench.studies.utility_micro_adam", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", choices=("lr", "main", "clip", "report", "all"), default="all")
    p.add_argument("--dataset", default="fashion-mnist", help="fastdp train --dataset (digits for a quick check)")
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--out-dir", default=DEFAULT_OUT)
    p.add_argument("--methods", type=_names, default=list(METHODS), help="comma-separated")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) batch size")
    p.add_argument("--epsilon", type=float, default=3.0, help="target epsilon (noise calibrated to it)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="reported seeds (main stage)")
    p.add_argument("--sweep-seed", type=int, default=100, help="seed of the lr sweep (kept apart from --seeds)")
    p.add_argument("--lr-grid", type=_method_floats, default=None,
                   help="lr sweep grid, METHOD=v1,v2;METHOD=... (default: dpsgd 0.125,0.25,0.5,1; dpadam 1e-3,3e-3,1e-2,3e-2; dpmicroadam "
                        "1e-3,3e-3,1e-2)")
    p.add_argument("--lrs", type=_method_floats, default=None,
                   help="fixed lrs METHOD=v;... instead of the sweep's pick (main and clip stages)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="training images held out for the lr sweep")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="C of the lr and main stages")
    p.add_argument("--clip-norms", type=_floats, default=list(DEFAULT_CLIP_NORMS), help="C grid of the clip stage")
    p.add_argument("--clip-methods", type=_names, default=list(METHODS), help="methods of the clip stage")
    p.add_argument("--clip-seeds", type=_ints, default=[0], help="seeds the clip stage runs (the report uses every seed recorded)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images (quick runs)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core box, 2 OpenMP threads stall badly when another job runs)")
    p.add_argument("--quiet", action="store_true", help="hide fastdp train's own output (one line per run instead)")
    return p


# ------------------------------------------------------------------------------------------------ records
def _tag(dataset: str) -> str:
    return "fmnist" if dataset == "fashion-mnist" else dataset.replace("-", "_")


def paths(out_dir: str, dataset: str) -> Dict[str, str]:
    base = os.path.join(out_dir, f"micro_adam_{_tag(dataset)}")
    return {"jsonl": base + ".jsonl", "md": base + ".md", "png": base + ".png"}


def _key(config: dict) -> tuple:
    return tuple((k, round(config[k], 12) if isinstance(config.get(k), float) else config.get(k)) for k in CONFIG_KEYS)


def load_records(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
    return out


# ------------------------------------------------------------------------------------------------ one run
@contextlib.contextmanager
def _validation_split(fraction: float):
    """Inside: ``fastdp train`` trains on a fixed random (1 - fraction) of its training set and scores on the rest."""
    from torch.utils.data import Subset

    import fastdp.cli as cli

    original = cli.load_dataset

    def load(name, data_dir=None, limit=None):
        train, _test, meta = original(name, data_dir=data_dir, limit=limit)
        n = len(train)
        n_val = max(1, round(fraction * n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
        tr, va = Subset(train, perm[n_val:].tolist()), Subset(train, perm[:n_val].tolist())
        return tr, va, dict(meta, train_size=len(tr), test_size=len(va))

    cli.load_dataset = load
    try:
        yield
    finally:
        cli.load_dataset = original


_START_COMMIT: Optional[str] = None


def run_one(config: dict, data_dir: str, quiet: bool) -> dict:
    """One ``fastdp train`` run; returns the record (status ok / diverged / error)."""
    from fastdp import cli

    argv = ["train", "--dataset", config["dataset"], "--method", config["method"], "--lr", repr(config["lr"]),
            "--max-grad-norm", repr(config["max_grad_norm"]), "--seed", str(config["seed"]),
            "--epochs", str(config["epochs"]), "--batch-size", str(config["batch_size"]),
            "--target-epsilon", repr(config["target_epsilon"]), "--delta", repr(config["delta"]), "--no-progress",
            "--reproducible"]  # runs repeat exactly (the seed is in the record: research runs, not a release)
    if config["dataset"] != "digits":
        argv += ["--data-dir", data_dir]
    if config["limit"]:
        argv += ["--limit", str(config["limit"])]
    split = _validation_split(config["val_fraction"]) if config["eval_split"] == "val" else contextlib.nullcontext()
    sink = io.StringIO()
    out = contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext()
    record = {"config": config, "argv": argv}
    start = time.perf_counter()
    try:
        with split, out:
            result = cli.main(argv)
        record.update(status="ok", accuracy=result["test_accuracy"], epsilon=result["epsilon"],
                      noise_multiplier=result["noise_multiplier"], samples_per_second=result["samples_per_second"],
                      train_time_s=result["train_time_s"], steps=result["steps"], samples=result["samples"],
                      accountant=result["accountant"])
    except SystemExit as err:  # fastdp train exits with a message when the loss diverges
        record.update(status="diverged" if "diverged" in str(err.code) else "error", accuracy=None, message=str(err.code))
    except Exception as err:  # noqa: BLE001 - a crash (e.g. a half-edited source file) is reported, not recorded
        record.update(status="error", accuracy=None, message=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    record["wall_s"] = time.perf_counter() - start
    record["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record["torch"] = torch.__version__
    record["machine"] = machine()
    record["fastdp_commit"] = _START_COMMIT
    return record


def run_configs(configs: List[dict], path: str, data_dir: str, quiet: bool, stage: str) -> List[dict]:
    """Run the configs not yet in ``path`` (appending one line each); returns all matching records."""
    done = {_key(r["config"]): r for r in load_records(path) if r["status"] in ("ok", "diverged")}
    todo = [c for c in configs if _key(c) not in done]
    print(f"[{stage}] {len(configs)} configs, {len(configs) - len(todo)} already in {os.path.relpath(path)}, "
          f"{len(todo)} to run", flush=True)
    errors = 0
    for i, config in enumerate(todo, 1):
        desc = (f"{config['method']} lr={config['lr']:g} C={config['max_grad_norm']:g} seed={config['seed']} "
                f"eval={config['eval_split']}")
        print(f"[{stage} {i}/{len(todo)}] {desc}", flush=True)
        record = run_one(config, data_dir, quiet)
        record["stage"] = stage
        if record["status"] == "error":  # not written: rerunning the script retries it
            errors += 1
            print(f"[{stage}] ERROR {desc}: {record['message']}\n{record.get('traceback', '')}", flush=True)
            continue
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        done[_key(config)] = record
        acc = "diverged" if record["accuracy"] is None else f"{record['accuracy']:.4f}"
        print(f"[{stage}] {desc}: accuracy {acc}, epsilon {record.get('epsilon') or float('nan'):.3f}, "
              f"{record['wall_s']:.1f} s", flush=True)
    if errors:
        print(f"[{stage}] {errors} run(s) failed with an error and were not recorded; rerun to retry them", flush=True)
    return [done[_key(c)] for c in configs if _key(c) in done]


def _config(args, method, lr, seed, c, split) -> dict:
    return {"dataset": args.dataset, "method": method, "lr": float(lr), "max_grad_norm": float(c), "seed": int(seed),
            "epochs": args.epochs, "batch_size": args.batch_size, "target_epsilon": float(args.epsilon),
            "delta": float(args.delta), "limit": args.limit, "eval_split": split,
            "val_fraction": float(args.val_fraction) if split == "val" else None}


def _lr_grid(args) -> Dict[str, List[float]]:
    grid = {m: list(DEFAULT_LR_GRID[m]) for m in METHODS}
    grid.update(args.lr_grid or {})
    return grid


def chosen_lrs(args, records: List[dict]) -> Dict[str, float]:
    """lr per method: ``--lrs`` if given, else the sweep's best validation accuracy (mean over sweep seeds)."""
    fixed = args.lrs or {}
    grid = _lr_grid(args)
    out = {}
    for m in sorted(set(args.methods) | set(args.clip_methods), key=METHODS.index):
        if m in fixed:
            out[m] = fixed[m][0]
            continue
        sweep = [_config(args, m, lr, args.sweep_seed, args.max_grad_norm, "val") for lr in grid[m]]
        by_key = {_key(r["config"]): r for r in records}
        scores = {}
        for c in sweep:
            r = by_key.get(_key(c))
            if r is not None:
                scores[c["lr"]] = r["accuracy"] if r["accuracy"] is not None else -1.0
        if len(scores) < len(sweep):
            raise SystemExit(f"no lr for {m}: run --stage lr first (or pass --lrs {m}=VALUE)")
        out[m] = max(scores, key=lambda lr: (scores[lr], -lr))
    return out


# ------------------------------------------------------------------------------------------------ report
def _mean_std(values: Sequence[float]):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _fmt(values: Sequence[float], pct=True) -> str:
    m, s = _mean_std(values)
    if m is None:
        return "diverged"
    k = 100.0 if pct else 1.0
    n_div = sum(v is None for v in values)
    extra = f" ({n_div} diverged)" if n_div else ""
    return f"{k * m:.2f} ± {k * s:.2f}{extra}" if len(values) > 1 else f"{k * m:.2f}{extra}"


def summarise(args, records: List[dict]) -> dict:
    """The numbers of the report: sweep table, main (per method) and clip (per method and C)."""
    grid = _lr_grid(args)
    by_key = {_key(r["config"]): r for r in records}
    try:
        lrs = chosen_lrs(args, records)
    except SystemExit:
        lrs = {}
    sweep = {m: {lr: by_key.get(_key(_config(args, m, lr, args.sweep_seed, args.max_grad_norm, "val")))
                 for lr in grid[m]} for m in args.methods if m not in (args.lrs or {})}
    main_rows, clip_rows = {}, {}
    for m in args.methods:
        if m in lrs:
            rs = [by_key.get(_key(_config(args, m, lrs[m], s, args.max_grad_norm, "test"))) for s in args.seeds]
            main_rows[m] = [r for r in rs if r is not None]
    for m in args.clip_methods:  # every seed recorded for the config, not only --clip-seeds
        if m in lrs:
            for c in args.clip_norms:
                want = _key(_config(args, m, lrs[m], 0, c, "test"))
                rs = sorted((r for k, r in by_key.items() if _key(dict(r["config"], seed=0)) == want),
                            key=lambda r: r["config"]["seed"])
                if rs:
                    clip_rows.setdefault(m, {})[c] = rs
        if m in clip_rows:  # one seed set per method (the seeds every C has), so a row compares like with like
            row = clip_rows[m]
            common = set.intersection(*({r["config"]["seed"] for r in rs} for rs in row.values()))
            if common:
                clip_rows[m] = {c: [r for r in rs if r["config"]["seed"] in common] for c, rs in row.items()}
    return {"lrs": lrs, "sweep": sweep, "main": main_rows, "clip": clip_rows}


def write_report(args, records: List[dict], out: Dict[str, str]) -> dict:
    s = summarise(args, records)
    used = {id(r): r for r in [r for row in s["sweep"].values() for r in row.values() if r is not None]
            + [r for rs in s["main"].values() for r in rs] + [r for row in s["clip"].values() for rs in row.values() for r in rs]}
    used = list(used.values())
    total_wall = sum(r["wall_s"] for r in used)
    one = next((r for r in used if r["status"] == "ok"), None)
    commits = sorted({str(r.get("fastdp_commit")) for r in used})
    threads = sorted({r["machine"]["torch_threads"] for r in used})
    lines = [f"# DP-MicroAdam vs DP-Adam vs DP-SGD on {args.dataset}, epsilon {args.epsilon:g}", "",
             f"`python -m fastdp.bench.studies.utility_micro_adam` (`fastdp/bench/studies/utility_micro_adam.py`); raw runs: "
             f"`{os.path.basename(out['jsonl'])}` (one JSON line per run).", "",
             "## Setup", "",
             f"* `fastdp train`: SmallCNN (two conv + GroupNorm blocks), Poisson sampling, expected batch "
             f"{args.batch_size}, {args.epochs} epochs, flat per-sample clipping, noise calibrated to "
             f"(epsilon={args.epsilon:g}, delta={args.delta:g}) with the PRV accountant, constant learning rate"
             + (f", first {args.limit} training images" if args.limit else "") + ".",
             "* DP-SGD: SGD with momentum 0.9. DP-Adam: torch Adam (betas 0.9/0.999, eps 1e-8). DP-MicroAdam: "
             "`fastdp.MicroAdam` with the DP-MicroAdam paper's defaults (density 0.01, window 10, fp32 error feedback, "
             "per-tensor top-k) under `fastdp.DPOptimizer`.",
             f"* Learning rates: one seed ({args.sweep_seed}, not a reported seed) per grid value, trained on "
             f"{100 * (1 - args.val_fraction):.0f}% of the training set and scored on the held-out "
             f"{100 * args.val_fraction:.0f}% (fixed random split); the best validation accuracy picks the lr. "
             "The test set is used only for the reported numbers. (Calibrated to the smaller sweep training set, the "
             "sweep's noise multiplier is a little larger than the reported runs'.)",
             "* Mean ± sample standard deviation (n-1) over seeds; accuracy in %.",
             f"* Sum of the wall times of the {len(used)} runs in this report: {total_wall / 60:.1f} min"
             + (f"; torch {one['torch']}, {one['machine']['cpu']} ({one['machine']['cpu_count']} cores, "
                f"torch threads per run: {'/'.join(map(str, threads))}), fastdp commit(s) {', '.join(commits)}" if one else "")
             + ".", ""]
    if s["sweep"]:
        lines += ["## Learning-rate sweep (validation accuracy, seed %d)" % args.sweep_seed, "",
                  "| method | lr | val accuracy | chosen |", "|---|---|---|---|"]
        for m, row in s["sweep"].items():
            for lr, r in row.items():
                acc = "not run" if r is None else ("diverged" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}")
                lines.append(f"| {LABELS[m]} | {lr:g} | {acc} | {'**yes**' if s['lrs'].get(m) == lr else ''} |")
        lines.append("")
    if args.lrs:
        lines += ["Fixed learning rates (--lrs): " + ", ".join(f"{m} {v[0]:g}" for m, v in args.lrs.items()), ""]
    if s["main"]:
        lines += [f"## Test accuracy, C = {args.max_grad_norm:g}, seeds {', '.join(map(str, args.seeds))}", "",
                  "| method | lr | test accuracy % (mean ± std) | per seed | epsilon | noise multiplier | wall s / run |",
                  "|---|---|---|---|---|---|---|"]
        for m, rs in s["main"].items():
            accs = [r["accuracy"] for r in rs]
            per = ", ".join("div." if a is None else f"{100 * a:.2f}" for a in accs)
            eps = max((r["epsilon"] for r in rs if r.get("epsilon") is not None), default=float("nan"))
            sig = next((r["noise_multiplier"] for r in rs if r.get("noise_multiplier") is not None), float("nan"))
            wall = statistics.fmean(r["wall_s"] for r in rs)
            lines.append(f"| {LABELS[m]} | {s['lrs'][m]:g} | {_fmt(accs)} (n={len(rs)}) | {per} | {eps:.3f} | "
                         f"{sig:.4f} | {wall:.0f} |")
        lines.append("")
    if s["clip"]:
        norms = args.clip_norms
        seeds = sorted({r["config"]["seed"] for row in s["clip"].values() for rs in row.values() for r in rs})
        lines += [f"## Sensitivity to the clipping norm C (lr fixed at the chosen value, epsilon {args.epsilon:g})", "",
                  f"Test accuracy %, seeds recorded: {', '.join(map(str, seeds))}. Each row uses the seeds that every C of "
                  "that row has: mean ± std where that is several seeds (n in brackets), else the single run.", "",
                  "| method | " + " | ".join(f"C={c:g}" for c in norms) + " | max - min |",
                  "|---|" + "---|" * (len(norms) + 1)]
        for m, row in s["clip"].items():
            means = [_mean_std([r["accuracy"] for r in row[c]])[0] if c in row else None for c in norms]
            cells = [(_fmt([r["accuracy"] for r in row[c]]) + (f" (n={len(row[c])})" if len(row[c]) > 1 else ""))
                     if c in row else "not run" for c in norms]
            ok = [v for v in means if v is not None]
            spread = f"{100 * (max(ok) - min(ok)):.2f}" if len(ok) > 1 else ""
            lines.append(f"| {LABELS[m]} (lr {s['lrs'][m]:g}) | " + " | ".join(cells) + f" | {spread} |")
        lines += ["", "How to read it: with flat clipping, once every per-sample gradient norm exceeds C the privatised "
                  "gradient (clipped sum + N(0, sigma^2 C^2)) is C times the same draw at C = 1 (same seed, same sigma), so "
                  "an optimizer invariant to the gradient's scale (Adam, MicroAdam; eps = 1e-8 aside) takes the same steps "
                  "for every such C, whereas SGD at a fixed lr takes steps proportional to C.", ""]
    lines += ["![accuracy per method and vs the clipping norm](" + os.path.basename(out["png"]) + ")", ""]
    write_text("\n".join(lines), out["md"])
    _plot(args, s, out["png"])
    return s


def _plot(args, s: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(s["main"])
    if methods:
        stats = [_mean_std([r["accuracy"] for r in s["main"][m]]) for m in methods]
        means = [100 * (v[0] if v[0] is not None else math.nan) for v in stats]
        stds = [100 * (v[1] if v[1] is not None else 0.0) for v in stats]
        ax1.bar(range(len(methods)), means, yerr=stds, capsize=6, color=["C0", "C1", "C2"][:len(methods)])
        for i, m in enumerate(methods):
            for r in s["main"][m]:
                if r["accuracy"] is not None:
                    ax1.plot(i, 100 * r["accuracy"], "k.", ms=5)
        ax1.set_xticks(range(len(methods)), [f"{LABELS[m]}\nlr {s['lrs'][m]:g}" for m in methods], fontsize=8)
        finite = [v for v in means if not math.isnan(v)]
        if finite:
            ax1.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title(f"C={args.max_grad_norm:g}, mean ± std over {len(args.seeds)} seed(s)", fontsize=9)
    for i, (m, row) in enumerate(s["clip"].items()):
        cs = sorted(row)
        st = [_mean_std([r["accuracy"] for r in row[c]]) for c in cs]
        ys = [100 * v[0] if v[0] is not None else math.nan for v in st]
        es = [100 * v[1] if v[1] is not None else 0.0 for v in st]
        ax2.errorbar(cs, ys, yerr=es, marker="o", capsize=4, color=f"C{METHODS.index(m)}",
                     label=f"{LABELS[m]} (lr {s['lrs'][m]:g})")
    ax2.set_xscale("log")
    norms = sorted({c for row in s["clip"].values() for c in row})
    if norms:
        ax2.set_xticks(norms, [f"{c:g}" for c in norms])
        ax2.minorticks_off()
    ax2.set_xlabel("clipping norm C (max_grad_norm)")
    ax2.set_ylabel("test accuracy (%)")
    n_seeds = sorted({len(rs) for row in s["clip"].values() for rs in row.values()})
    ax2.set_title(f"accuracy vs C, lr fixed, {'/'.join(map(str, n_seeds)) or 0} seed(s) per point", fontsize=9)
    if s["clip"]:
        ax2.legend(fontsize=8)
    fig.suptitle(f"{args.dataset}, epsilon {args.epsilon:g}, delta {args.delta:g}, {args.epochs} epochs, "
                 f"batch {args.batch_size}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    with torch_threads(args.threads):
        return _main(args)


def _main(args) -> dict:
    global _START_COMMIT
    import fastdp.cli  # noqa: F401 - imported now, with the code of the commit recorded here
    _START_COMMIT = _START_COMMIT or commit()
    out = paths(args.out_dir, args.dataset)
    os.makedirs(args.out_dir, exist_ok=True)
    stages = ("lr", "main", "clip", "report") if args.stage == "all" else (args.stage,)
    start = time.perf_counter()
    if "lr" in stages:
        grid = _lr_grid(args)
        todo = [m for m in sorted(set(args.methods) | set(args.clip_methods), key=METHODS.index) if m not in (args.lrs or {})]
        configs = [_config(args, m, lr, args.sweep_seed, args.max_grad_norm, "val") for m in todo for lr in grid[m]]
        run_configs(configs, out["jsonl"], args.data_dir, args.quiet, "lr")
    lrs = None
    if "main" in stages or "clip" in stages:
        lrs = chosen_lrs(args, load_records(out["jsonl"]))
        print("learning rates: " + ", ".join(f"{m} {v:g}" for m, v in lrs.items()), flush=True)
    if "main" in stages:
        configs = [_config(args, m, lrs[m], s, args.max_grad_norm, "test") for m in args.methods for s in args.seeds]
        run_configs(configs, out["jsonl"], args.data_dir, args.quiet, "main")
    if "clip" in stages:
        configs = [_config(args, m, lrs[m], s, c, "test") for m in args.clip_methods for c in args.clip_norms
                   for s in args.clip_seeds]
        run_configs(configs, out["jsonl"], args.data_dir, args.quiet, "clip")
    summary = None
    if "report" in stages:
        records = [r for r in load_records(out["jsonl"]) if r["config"]["dataset"] == args.dataset]
        summary = write_report(args, records, out)
        print(f"wrote {out['md']} and {out['png']}", flush=True)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return {"paths": out, "summary": summary}


if __name__ == "__main__":
    main(sys.argv[1:])
