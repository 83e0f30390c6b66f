"""MicroAdam vs torch.optim.Adam: step time and optimizer-state bytes on GPT-2-small-sized parameters,
and each MicroAdam kernel (Triton) against its PyTorch reference.

    python -m fastdp.bench.bench_micro_adam [--device cuda] [--steps 10] [--out benchmarks/results/micro_adam_<date>.json]
    python -m fastdp.bench.bench_micro_adam --device cpu --tiny          # smoke run (CI)

Parameters: the 148 tensors of stock HF GPT-2 small (124M, fp32; the tied embedding counted once) with random
gradients. Step time: ``optimizer.step()`` timed by ``fastdp.bench.timing`` (CUDA events; CPU: perf_counter),
median after warm-up.
State bytes: the optimizer's state tensors after the first step (Adam: exp_avg, exp_avg_sq; MicroAdam: ring
indices and values, error feedback); MicroAdam's shared scratch (fp32 working gradient and moment buffers
sized to the largest tensor) is reported separately.
"""
from __future__ import annotations

import argparse
import datetime

import torch

from fastdp.bench.run_env import write_result
from fastdp.bench.timing import time_calls
from fastdp.kernels.ef_quant import block_minmax, ef_dequant_add, ef_dequant_add_ref, ef_quant, ef_quant_ref
from fastdp.kernels.microadam_update import microadam_update, microadam_update_ref
from fastdp.kernels.topk_gather import gather_zero, gather_zero_ref
from fastdp.micro_adam import MicroAdam


def gpt2_shapes(tiny: bool):
    if tiny:
        return [(500, 64), (64, 64), (64,), (64, 256), (256, 64)]
    from transformers import GPT2Config, GPT2LMHeadModel
    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config())
    return [tuple(p.shape) for p in model.parameters()]  # parameters() dedups the tied weight


def timer(fn, device, steps, warmup):
    """Median ms of ``steps`` calls after ``warmup`` (:func:`fastdp.bench.timing.time_calls`)."""
    return time_calls(fn, device, steps, warmup).median_ms


def optimizers(device):
    cuda = device.type == "cuda"
    out = {"adam_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True)}
    if cuda:
        out["adam_fused"] = lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True)
    out["microadam_dp_default"] = lambda ps: MicroAdam(ps, lr=1e-3)  # ef 32, per-tensor top-k, fp32 ring
    out["microadam_frugal"] = lambda ps: MicroAdam(ps, lr=1e-3, ef_bits=4, topk="block")
    return out


def bench_optimizers(shapes, device, steps, warmup):
    rows = []
    n_params = sum(torch.Size(s).numel() for s in shapes)
    for name, make in optimizers(device).items():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt = make(params)
        try:
            ms = timer(opt.step, device, steps, warmup)
            state = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
                        if torch.is_tensor(v) and v.dim() > 0)
            scratch = sum(t.numel() * t.element_size() for ws in getattr(opt, "_workspace", {}).values() for t in ws)
            rows.append({"optimizer": name, "step_ms": ms, "state_bytes_per_param": state / n_params,
                         "scratch_bytes": scratch, "params": n_params})
        except Exception as err:  # a failure is a row
            rows.append({"optimizer": name, "error": f"{type(err).__name__}: {err}"[:300]})
        del opt, params
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_kernels(device, n, steps, warmup):
    """Each kernel on an n-element tensor: Triton vs reference, and GB/s moved by the Triton kernel."""
    import os
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
    old = os.environ.get("FASTDP_BACKEND")
    try:
        for name, (tri, ref, nbytes) in cases.items():
            row = {"kernel": name, "n": n}
            for label, fn, backend in (("triton_ms", tri, "triton"), ("reference_ms", ref, "reference")):
                os.environ["FASTDP_BACKEND"] = backend
                try:
                    row[label] = timer(fn, device, steps, warmup)
                except Exception as err:
                    row[label + "_error"] = f"{type(err).__name__}: {err}"[:200]
            if "triton_ms" in row:
                row["triton_GBps"] = nbytes / row["triton_ms"] / 1e6
            rows.append(row)
    finally:
        if old is None:
            os.environ.pop("FASTDP_BACKEND", None)
        else:
            os.environ["FASTDP_BACKEND"] = old
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--kernel-n", type=int, default=None, help="elements for the kernel benchmarks")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shapes = gpt2_shapes(args.tiny)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "optimizers": bench_optimizers(shapes, device, args.steps, args.warmup)}
    if device.type == "cuda" or args.tiny:
        n = args.kernel_n or (38_597_376 if device.type == "cuda" else 10_000)  # GPT-2's embedding table
        result["kernels"] = bench_kernels(device, n, args.steps, args.warmup)
    for r in result["optimizers"]:
        print(r)
    for r in result.get("kernels", []):
        print(r)
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
