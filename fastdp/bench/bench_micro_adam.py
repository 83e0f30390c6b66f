"""MicroAdam vs torch.optim.Adam: step time against the memory-traffic floor, optimizer-state bytes, and each
MicroAdam kernel (Triton) against its PyTorch reference.

    python -m fastdp.bench.bench_micro_adam                         # CPU: 1 thread, GPT-2 at quarter width
    python -m fastdp.bench.bench_micro_adam --device cuda           # GPU: GPT-2 small
    python -m fastdp.bench.bench_micro_adam --device cpu --tiny     # smoke run (CI)

Parameters (``--shapes``): ``gpt2`` the 148 tensors of stock HF GPT-2 small (124M, the tied embedding counted
once); ``quarter`` the same 148 tensors at a quarter of the width, vocabulary and positions (7.8M: the CPU
default); ``tiny`` five small tensors. fp32, random gradients (1e-3 N(0, 1)), set once.
Step time: the optimizers' ``step()`` calls interleaved round-robin (each round steps every optimizer once, so a
load change on a shared machine hits them alike), each call timed by ``fastdp.bench.timing.measure`` (CUDA events;
CPU: perf_counter); median and minimum over ``--steps`` rounds after ``--warmup``. ``ratio_vs_adam_foreach``:
median over Adam foreach's median (``min_ratio``: minimum over minimum; ``cpu_ratio``: the same with each call's
thread CPU time, ``time.thread_time``, which leaves out the time a call waits for a core on a shared machine).
Floor: the bytes one step must move (``step_bytes``: Adam reads p, g, m, v and writes p, m, v: 28 B/param;
MicroAdam reads g and the error feedback, writes the error feedback, reads and writes p, reads the window's
density x window sparse entries and writes one row) over the bandwidth of a large ``copy_`` measured in the same
run (read + write bytes / time): ``floor_ms``, and ``time_over_floor`` = median / floor.
On the CPU each MicroAdam is timed twice: its fused step compiled (``fastdp.kernels.microadam_cpu``, numba; the
default) and as vectorised PyTorch ops (``*_torch``, ``FASTDP_BACKEND=reference``); ``impl`` says which ran.
State bytes: the optimizer's state tensors after the first step (Adam: exp_avg, exp_avg_sq; MicroAdam: ring
indices and values, error feedback); scratch (MicroAdam's working buffers) is reported separately.
Results: ``benchmarks/results/micro_adam_<device>_<date>.json`` and ``.md`` (machine, date, commit), or ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

from fastdp.bench.run_env import kernel_backend, results_dir, torch_threads, write_result, write_text
from fastdp.bench.timing import measure, percentile, time_calls
from fastdp.kernels.ef_quant import block_minmax, ef_dequant_add, ef_dequant_add_ref, ef_quant, ef_quant_ref
from fastdp.kernels.microadam_update import microadam_update, microadam_update_ref
from fastdp.kernels.topk_gather import gather_zero, gather_zero_ref
from fastdp.micro_adam import MicroAdam


def gpt2_shapes(width: int = 768, vocab: int = 50257, positions: int = 1024, layers: int = 12):
    """The parameter shapes of HF ``GPT2LMHeadModel`` in ``parameters()`` order (tied lm_head counted once)."""
    w = width
    block = [(w,), (w,), (w, 3 * w), (3 * w,), (w, w), (w,), (w,), (w,), (w, 4 * w), (4 * w,), (4 * w, w), (w,)]
    return [(vocab, w), (positions, w)] + block * layers + [(w,), (w,)]


SHAPES = {
    "gpt2": lambda: gpt2_shapes(),
    "quarter": lambda: gpt2_shapes(768 // 4, math.ceil(50257 / 4), 1024 // 4),
    "tiny": lambda: [(500, 64), (64, 64), (64,), (64, 256), (256, 64)],
}


def timer(fn, device, steps, warmup):
    """Median ms of ``steps`` calls after ``warmup`` (:func:`fastdp.bench.timing.time_calls`)."""
    return time_calls(fn, device, steps, warmup).median_ms


FRUGAL = dict(ef_bits=4, topk="block", density=0.01, window=10)


def optimizers(device, unfused: bool = False):
    """name -> (constructor over a parameter list, MicroAdam settings for the floor or None for Adam,
    ``FASTDP_BACKEND`` while it steps or None). On the CPU each MicroAdam runs twice: its fused step compiled
    (numba, the default when numba is installed) and as vectorised PyTorch ops (``_torch``)."""
    cuda = device.type == "cuda"
    out = {"adam_foreach": (lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True), None, None)}
    if cuda:
        out["adam_fused"] = (lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True), None, None)
    variants = {"microadam_dp_default": {}, "microadam_frugal": FRUGAL}  # DP-MicroAdam's defaults; the 0.9 B layout
    for name, kw in variants.items():
        out[name] = (lambda ps, kw=kw: MicroAdam(ps, lr=1e-3, **kw), kw, None)
        if not cuda:
            out[name + "_torch"] = (lambda ps, kw=kw: MicroAdam(ps, lr=1e-3, **kw), kw, "reference")
        if unfused:
            out[name + "_unfused"] = (lambda ps, kw=kw: MicroAdam(ps, lr=1e-3, fused=False, **kw), kw, None)
    return out


def _with_backend(fn, backend):
    """``fn`` run with ``FASTDP_BACKEND=backend`` (None: as it is)."""
    if backend is None:
        return fn

    def run():
        with kernel_backend(backend):
            return fn()
    return run


def step_bytes(shapes, micro: dict = None) -> float:
    """Bytes one fp32 step must move (module docstring); ``micro``: MicroAdam's settings, None for Adam."""
    if micro is None:
        return 28.0 * sum(math.prod(s) for s in shapes)
    opt = MicroAdam([torch.nn.Parameter(torch.zeros(1))], **micro)
    total = 0.0
    for s in shapes:
        d = math.prod(s)
        n = opt._layout(d)[0]
        entry = (2 + 2) if opt.topk == "block" else (4 + 4)  # index + value bytes
        ef = 2 * (0.5 * d + 8 * math.ceil(d / opt.quant_block_size)) if opt.ef_bits == 4 else 8 * d
        total += 4 * d + ef + 8 * d + opt.window * n * entry + n * entry  # g, EF read+write, p r/w, window, new row
    return total


def copy_bandwidth(device, nbytes: int = 1 << 28, reps: int = 5) -> float:
    """GB/s (read + write) of ``copy_`` between two fp32 buffers of ``nbytes`` / 2 each (the best of ``reps``)."""
    src = torch.ones(nbytes // 8, device=device)
    dst = torch.empty_like(src)
    best = min(measure(lambda: dst.copy_(src), device, reps).times_ms)
    return 2 * src.numel() * 4 / best / 1e6


def bench_optimizers(shapes, device, steps, warmup, unfused=False, bandwidth=None):
    """Every optimizer on its own copy of the parameters, stepped round-robin (module docstring)."""
    rows, live = [], {}
    n_params = sum(math.prod(s) for s in shapes)
    for name, (make, micro, backend) in optimizers(device, unfused).items():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        try:
            opt = make(params)
            step = _with_backend(opt.step, backend)
            step()
            live[name] = (opt, micro, step)
        except Exception as err:  # a failure is a row
            rows.append({"optimizer": name, "error": f"{type(err).__name__}: {err}"[:300]})
    times, cpu = {name: [] for name in live}, {name: [] for name in live}
    for i in range(warmup + steps):
        for name, (opt, _, step) in live.items():
            try:
                c0 = time.thread_time()
                t = measure(step, device, 1).times_ms[0]
                c = 1e3 * (time.thread_time() - c0)
            except Exception as err:
                rows.append({"optimizer": name, "error": f"{type(err).__name__}: {err}"[:300]})
                continue
            if i >= warmup:
                times[name].append(t)
                cpu[name].append(c)
    for name, (opt, micro, _) in live.items():
        ts = sorted(times[name])
        if not ts:
            continue
        state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                    if torch.is_tensor(v) and v.dim() > 0)
        row = {"optimizer": name, "step_ms": percentile(ts, 0.5),
               "min_ms": ts[0], "state_bytes_per_param": state / n_params,
               "scratch_bytes": opt.scratch_bytes() if hasattr(opt, "scratch_bytes") else 0, "params": n_params,
               "tensors": len(shapes), "step_bytes": step_bytes(shapes, micro),
               "cpu_median_ms": percentile(cpu[name], 0.5) if device.type == "cpu" else None,
               "impl": ",".join(sorted({getattr(c, "last_impl", "?") for cs in getattr(opt, "_chunks", {}).values()
                                        for c in cs})) or None}
        if bandwidth:
            row["floor_ms"] = row["step_bytes"] / bandwidth / 1e6
            row["time_over_floor"] = row["step_ms"] / row["floor_ms"]
        rows.append(row)
    base = next((r for r in rows if r["optimizer"] == "adam_foreach" and "step_ms" in r), None)
    for r in rows:
        if base is not None and "step_ms" in r:
            r["ratio_vs_adam_foreach"] = r["step_ms"] / base["step_ms"]
            r["min_ratio_vs_adam_foreach"] = r["min_ms"] / base["min_ms"]
            if r.get("cpu_median_ms"):
                r["cpu_ratio_vs_adam_foreach"] = r["cpu_median_ms"] / base["cpu_median_ms"]
    return rows


def bench_kernels(device, n, steps, warmup):
    """Each kernel on an n-element tensor: Triton vs reference, and GB/s moved by the Triton kernel."""
    rows = []
    x = torch.randn(n, device=device)
    lo, hi = block_minmax(x, 100_000)
    codes = ef_quant_ref(x, lo, hi, 100_000)
    k = n // 100
    idx = torch.topk(x.abs(), k, sorted=False).indices.to(torch.int32)
    vals = torch.empty(k, device=device)
    ring_idx = torch.stack([torch.randperm(n, device=device)[:k] for _ in range(10)]).to(torch.int32)
    ring_val = torch.randn(10, k, device=device)
    w = torch.rand(10, device=device)
    ws = torch.zeros(2, n, device=device)
    p = torch.randn(n, device=device)
    cases = {  # name: (triton call, reference call, bytes moved by one call)
        "ef_quant": (lambda: ef_quant(x, lo, hi, 100_000), lambda: ef_quant_ref(x, lo, hi, 100_000), 4 * n + n // 2),
        "ef_dequant_add": (lambda: ef_dequant_add(x, codes, lo, hi, 100_000),
                           lambda: ef_dequant_add_ref(x, codes, lo, hi, 100_000), 8 * n + n // 2),
        "gather_zero": (lambda: gather_zero(x, idx, vals), lambda: gather_zero_ref(x, idx, vals), 16 * k),
        "microadam_update": (
            lambda: microadam_update(p, ring_idx, ring_val, w, w, lr=1e-9, eps=1e-8, c1=1., c2=1., decay=1.,
                                     workspace=ws),
            lambda: microadam_update_ref(p, ring_idx, ring_val, w, w, lr=1e-9, eps=1e-8, c1=1., c2=1., decay=1.),
            10 * k * 16 + 8 * n + 8 * n),
    }
    for name, (tri, ref, nbytes) in cases.items():
        row = {"kernel": name, "n": n}
        for label, fn, backend in (("triton_ms", tri, "triton"), ("reference_ms", ref, "reference")):
            try:
                with kernel_backend(backend):
                    row[label] = timer(fn, device, steps, warmup)
            except Exception as err:
                row[label + "_error"] = f"{type(err).__name__}: {err}"[:200]
        if "triton_ms" in row:
            row["triton_GBps"] = nbytes / row["triton_ms"] / 1e6
        rows.append(row)
    return rows


def markdown(result: dict) -> str:
    """The result as a markdown table (what ``benchmarks/results/micro_adam_*.md`` holds)."""
    m = result.get("machine", {})
    lines = [f"# MicroAdam step vs Adam ({result['device']}, {result['date']})", "",
             f"`python -m fastdp.bench.bench_micro_adam {' '.join(result['argv'])}`: shapes `{result['shapes']}` "
             f"({result['optimizers'][0].get('tensors', '?')} tensors), {result['threads']} thread(s), "
             f"{result['steps']} interleaved rounds; machine: {m.get('cpu')}, {m.get('platform')}, torch "
             f"{result['torch']}, commit {result.get('commit')}; copy bandwidth {result.get('bandwidth_GBps', 0):.1f} "
             f"GB/s (read + write); load average at start {result.get('loadavg')}.", "",
             "| optimizer | fused step | median ms | min ms | x Adam foreach (median / min / CPU time) | floor ms | "
             "x floor | state B/param |", "|---|---|---|---|---|---|---|---|"]
    for r in result["optimizers"]:
        if "error" in r:
            lines.append(f"| {r['optimizer']} | error: {r['error']} | | | | | | |")
            continue
        lines.append(f"| {r['optimizer']} | {r.get('impl') or '-'} | {r['step_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{r.get('ratio_vs_adam_foreach', float('nan')):.2f} / "
                     f"{r.get('min_ratio_vs_adam_foreach', float('nan')):.2f} / "
                     f"{r.get('cpu_ratio_vs_adam_foreach') or float('nan'):.2f} | {r.get('floor_ms', float('nan')):.1f} | "
                     f"{r.get('time_over_floor', float('nan')):.2f} | {r['state_bytes_per_param']:.3f} |")
    return "\n".join(lines) + "\n"


def repeat_in_processes(args, argv: list) -> dict:
    """``--processes N``: the benchmark in N fresh processes, one after the other; per optimizer the median step
    time over runs and the median, min and max of the runs' ratios to Adam foreach."""
    import subprocess
    import tempfile
    rest, skip = [], False
    for a in argv:  # the same arguments without --processes / --out
        if skip:
            skip = False
        elif a in ("--processes", "--out"):
            skip = True
        elif not a.startswith(("--processes=", "--out=")):
            rest.append(a)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.processes):
            out = os.path.join(tmp, f"run{k}.json")
            subprocess.run([sys.executable, "-m", "fastdp.bench.bench_micro_adam", *rest, "--out", out], check=True)
            with open(out) as f:
                runs.append(json.load(f))
    result = {k: v for k, v in runs[0].items() if k != "optimizers"}
    result["argv"], result["processes"] = argv, args.processes
    result["runs"] = [r["optimizers"] for r in runs]
    rows = []
    for name in [r["optimizer"] for r in runs[0]["optimizers"] if "step_ms" in r]:
        per = [next((r for r in run["optimizers"] if r["optimizer"] == name and "step_ms" in r), None) for run in runs]
        per = [r for r in per if r is not None]
        ratios = sorted(r["ratio_vs_adam_foreach"] for r in per if "ratio_vs_adam_foreach" in r)
        rows.append({"optimizer": name, "impl": per[0].get("impl"), "runs": len(per),
                     "step_ms_median": percentile(sorted(r["step_ms"] for r in per), 0.5),
                     "step_ms_runs": [r["step_ms"] for r in per], "ratio_runs": [r.get("ratio_vs_adam_foreach")
                                                                                  for r in per],
                     "ratio_median": percentile(ratios, 0.5) if ratios else None,
                     "ratio_min": ratios[0] if ratios else None, "ratio_max": ratios[-1] if ratios else None,
                     "time_over_floor_median": percentile(sorted(r["time_over_floor"] for r in per
                                                                 if "time_over_floor" in r), 0.5),
                     "state_bytes_per_param": per[0]["state_bytes_per_param"]})
    result["summary"] = rows
    lines = [f"# MicroAdam step vs Adam over {args.processes} processes ({result['device']}, {result['date']})", "",
             f"`python -m fastdp.bench.bench_micro_adam {' '.join(argv)}`: each process runs the interleaved "
             f"benchmark ({result['steps']} rounds, {result['threads']} thread(s), shapes `{result['shapes']}`); "
             f"machine: {result.get('machine', {}).get('cpu')}, torch {result['torch']}, commit "
             f"{result.get('commit')}.", "",
             "| optimizer | fused step | median ms over runs | x Adam foreach: median (min - max) over runs | "
             "per run | x floor (median) | state B/param |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        runs_txt = ", ".join(f"{x:.2f}" for x in r["ratio_runs"] if x is not None)
        lines.append(f"| {r['optimizer']} | {r['impl'] or '-'} | {r['step_ms_median']:.1f} | "
                     f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f} - {r['ratio_max']:.2f}) | {runs_txt} | "
                     f"{r['time_over_floor_median']:.2f} | {r['state_bytes_per_param']:.3f} |")
        print(f"{r['optimizer']:28s} {r['impl'] or '-':6s} median {r['step_ms_median']:8.2f} ms  x Adam foreach "
              f"{r['ratio_median']:.2f} ({r['ratio_min']:.2f} - {r['ratio_max']:.2f}) over {r['runs']} processes")
    out = args.out or results_dir(f"micro_adam_{'cpu' if result['device'] == 'cpu' else 'cuda'}_{result['date']}"
                                  f"_x{args.processes}.json")
    write_result(result, out)
    write_text("\n".join(lines) + "\n", os.path.splitext(out)[0] + ".md")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and the kernel benchmarks (smoke run)")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default=None,
                    help="default: gpt2 on CUDA, quarter on the CPU (tiny with --tiny)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (CPU runs; 0: leave as is)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--unfused", action="store_true", help="also time MicroAdam(fused=False)")
    ap.add_argument("--kernel-n", type=int, default=None, help="elements for the kernel benchmarks")
    ap.add_argument("--out", default=None, help="JSON path (a .md beside it); default benchmarks/results/...")
    ap.add_argument("--processes", type=int, default=1,
                    help="repeat the whole measurement in this many fresh processes and report every run's ratios "
                         "(a process's memory layout moves Adam foreach's step time by up to 2x on a small VM)")
    args = ap.parse_args(argv)
    if args.processes > 1:
        return repeat_in_processes(args, list(sys.argv[1:] if argv is None else argv))
    device = torch.device(args.device)
    shapes_name = args.shapes or ("tiny" if args.tiny else "gpt2" if device.type == "cuda" else "quarter")
    shapes = SHAPES[shapes_name]()
    with torch_threads(args.threads if device.type == "cpu" else 0):
        bw = copy_bandwidth(device, nbytes=1 << 20 if args.tiny else 1 << 28)
        result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "torch": torch.__version__, "date": datetime.date.today().isoformat(), "shapes": shapes_name,
                  "threads": torch.get_num_threads(), "steps": args.steps,
                  "argv": list(sys.argv[1:] if argv is None else argv),
                  "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None, "bandwidth_GBps": bw,
                  "optimizers": bench_optimizers(shapes, device, args.steps, args.warmup, args.unfused, bw)}
        if device.type == "cuda" or args.tiny:
            n = args.kernel_n or (38_597_376 if device.type == "cuda" else 10_000)  # GPT-2's embedding table
            result["kernels"] = bench_kernels(device, n, args.steps, args.warmup)
    for r in result["optimizers"]:
        ratio = r.get("ratio_vs_adam_foreach")
        print(f"{r['optimizer']:28s} {r.get('impl') or '-':6s} " + (f"error {r['error']}" if "error" in r else
              f"median {r['step_ms']:8.2f} ms  min {r['min_ms']:8.2f} ms  x Adam foreach {ratio:5.2f} "
              f"(min {r['min_ratio_vs_adam_foreach']:.2f}, CPU time {r.get('cpu_ratio_vs_adam_foreach') or float('nan'):.2f})"
              f"  x floor {r.get('time_over_floor', float('nan')):5.2f}  "
              f"state {r['state_bytes_per_param']:.3f} B/param"))
    for r in result.get("kernels", []):
        print(r)
    out = args.out
    if out is None and not args.tiny:
        out = results_dir(f"micro_adam_{'cpu' if device.type == 'cpu' else 'cuda'}_{result['date']}.json")
    write_result(result, out)
    if out:
        write_text(markdown(result), os.path.splitext(out)[0] + ".md")
    return result


if __name__ == "__main__":
    main()
