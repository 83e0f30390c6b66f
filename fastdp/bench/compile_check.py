"""Compile the engine's Triton kernels for a GPU on a machine without one: resources and instructions per tile.

Each kernel is launched through its dispatcher on small CPU tensors with its launch intercepted: the arguments go
through Triton's own binder (the same dtype, alignment and divisibility specialisation as a real launch) and are
compiled for the target (default sm_90, the H100) by the Triton wheel's bundled ptxas. Per kernel, tile candidate
(``fastdp/kernels/_tuning.py``) and dtype it records: compile time (with a fresh Triton cache), registers per thread, spilled bytes (local memory),
shared memory, whether 16-bit ``tl.dot`` became Hopper tensor-core instructions (``wgmma`` in the PTX) and whether
the loads are software-pipelined (``cp.async`` in the PTX). It proves the kernels compile for the GPU and shows which
tiles cannot run well (spills, shared memory over the limit); it measures nothing about speed.

    python -m fastdp.bench.compile_check [--arch 90] [--kernels ghost_dot,clip_accumulate] [--dtypes fp32,bf16]
                                       [--default-only] [--out benchmarks/results/compile_sm90_<date>.json]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch

from fastdp.bench.run_env import kernel_backend, write_result

SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376}  # bytes of shared memory per block (opt-in maximum)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _Launch(Exception):
    """Raised instead of a kernel launch: carries the JIT function and its arguments."""

    def __init__(self, fn, args, kwargs):
        super().__init__(fn.__name__)
        self.fn, self.args, self.kwargs = fn, args, kwargs


@contextlib.contextmanager
def _intercept():
    """Triton kernels selected on CPU tensors (no interpreter) and their launches raised as ``_Launch``."""
    from triton.runtime.jit import JITFunction

    from fastdp.kernels import _backend
    saved = JITFunction.run, _backend.backend_for

    def run(self, *args, grid, warmup, **kwargs):
        raise _Launch(self, args, kwargs)

    JITFunction.run = run
    _backend.backend_for = lambda t: "triton"
    try:
        with kernel_backend("triton"):
            yield
    finally:
        JITFunction.run, _backend.backend_for = saved


def captured_launch(call: Callable[[], object]) -> _Launch:
    """The first Triton launch ``call`` makes (raised before it reaches a driver)."""
    with _intercept():
        try:
            call()
        except _Launch as launch:
            return launch
    raise RuntimeError("the call launched no Triton kernel")


def compile_launch(launch: _Launch, arch: int) -> dict:
    """Compile one captured launch for ``cuda:sm_<arch>``; its resources and instruction counts."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    ptx = kernel.asm["ptx"]
    usage = _resource_usage(kernel.asm["cubin"])
    shared = max(kernel.metadata.shared, usage.get("SHARED", 0))
    return {"kernel": fn.__name__, "num_warps": options.num_warps, "num_stages": options.num_stages,
            "fp_fusion": options.enable_fp_fusion,
            "compile_s": round(seconds, 2), "registers": usage.get("REG"), "spill_bytes": usage.get("LOCAL"),
            "shared_bytes": shared, "shared_fits": shared <= SHARED_LIMIT.get(arch, 49152),
            "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)), "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
            "cp_async": len(re.findall(r"\bcp\.async\b", ptx)) + len(re.findall(r"cp\.async\.bulk", ptx))}


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    """REG / LOCAL / SHARED of the cubin's kernel, from the Triton wheel's ``cuobjdump --dump-resource-usage``."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    return {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", out.stdout)}


# ---------------------------------------------------------------------------------------------- the launches
def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _conv(dtype, c_out=64):
    return _rand(2, 32, 8, 8, dtype=dtype), _rand(2, c_out, 8, 8, dtype=dtype), (c_out, 32, 3, 3), (1, 1), (1, 1), \
        (1, 1), 1


def launches(dtype: torch.dtype) -> Dict[str, Callable[[], object]]:
    """One dispatcher call per kernel (GPT-2-like widths, T = 64; the shapes only set the specialisation)."""
    from fastdp.kernels.clip_accumulate import clip_accumulate
    from fastdp.kernels.clip_factor import clip_factor
    from fastdp.kernels.conv_clip_accumulate import conv_clip_accumulate
    from fastdp.kernels.conv_norm import conv_norm
    from fastdp.kernels.direct_norm import direct_norm
    from fastdp.kernels.embedding_norm import embedding_accumulate, embedding_dot, embedding_linear_dot
    from fastdp.kernels.ghost_norm import ghost_dot
    from fastdp.kernels.masked_direct_norm import masked_direct_norm
    from fastdp.kernels.masked_noise import masked_noise
    from fastdp.kernels.noisy_sgd import noisy_sgd
    from fastdp.kernels.norm_affine_grad import norm_affine_grad
    from fastdp.kernels.row_abs_sum import row_abs_sum

    B, T, d, p, V = 2, 64, 768, 256, 512
    x, dy, c = _rand(B, T, d, dtype=dtype), _rand(B, T, p, dtype=dtype), torch.rand(B)
    idx = torch.randint(0, V, (B, T))
    mask = torch.rand(p, d) < 0.5
    return {
        "ghost_dot": lambda: ghost_dot(x, dy, x, dy),
        "direct_norm": lambda: direct_norm(x, dy),
        "masked_direct_norm": lambda: masked_direct_norm(x, dy, mask, torch.randn(p, d), torch.rand(p, d) + 1),
        "row_abs_sum": lambda: row_abs_sum(x, dy, c),
        "clip_accumulate": lambda: clip_accumulate(x, dy, c, torch.zeros(p, d)),
        "conv_direct_norm": lambda: conv_norm(*_conv(dtype), ghost=False),
        "conv_ghost_norm": lambda: conv_norm(*_conv(dtype), ghost=True),
        "conv_clip_accumulate": lambda: conv_clip_accumulate(*_conv(dtype)[:2], c, *_conv(dtype)[2:]),
        "embedding_dot": lambda: embedding_dot(idx, dy, idx, dy),
        "embedding_linear_dot": lambda: embedding_linear_dot(idx, x, x, _rand(B, T, V, dtype=dtype)),
        "embedding_accumulate": lambda: embedding_accumulate(idx, x, c, V, torch.zeros(V, d)),
        "clip_factor": lambda: clip_factor(torch.rand(B) * 10, 1.0, 1e-6),
        "masked_noise": lambda: masked_noise(torch.zeros(p, d), 1.0, 0, mask),
        "noisy_sgd": lambda: noisy_sgd(torch.zeros(p * d, dtype=dtype), torch.randn(p * d), torch.zeros(p * d),
                                       lr=0.1, std=1.0, seed=0, scale=0.5, momentum=0.9),
        "norm_affine_grad": lambda: norm_affine_grad(x, _rand(B, T, d, dtype=dtype), torch.randn(B, T),
                                                     torch.rand(B, T) + 1, "layer", (d,)),
    }


def check(arch: int = 90, kernels: Optional[List[str]] = None, dtypes=("fp32", "bf16"),
          default_only: bool = False, log=print) -> List[dict]:
    """Compile every (kernel, tile candidate, dtype); a failure is a row with its message."""
    from fastdp.kernels import _tuning
    rows = []
    for dname in dtypes:
        calls = launches(DTYPES[dname])
        for name in kernels or list(calls):
            if name not in calls:
                raise ValueError(f"unknown kernel {name!r}; known: {', '.join(calls)}")
            tiles = _tuning.REGISTRY.get(name)
            candidates = [None] if tiles is None else [tiles.default] if default_only else tiles.candidates
            for tile in candidates:
                row = {"name": name, "dtype": dname, "tile": str(tile) if tile else "-",
                       "default": tile is None or tile == tiles.default}
                try:
                    with _tuning.force(tiles, tile) if tile else contextlib.nullcontext():
                        launch = captured_launch(calls[name])
                    row.update(compile_launch(launch, arch), status="ok")
                except Exception as err:  # a row, never a dropped one
                    row.update(status="error", error=f"{type(err).__name__}: {err}"[:500])
                rows.append(row)
                log(_fmt(row))
    return rows


def _fmt(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['name']:22s} {r['dtype']:4s} {r['tile']:28s} ERROR {r['error'][:200]}"
    return (f"{r['name']:22s} {r['dtype']:4s} {r['tile']:28s} regs {r['registers']!s:>3} spill {r['spill_bytes']!s:>5} "
            f"smem {r['shared_bytes']:>6}{'' if r['shared_fits'] else ' (over)'} wgmma {r['wgmma']:>2} "
            f"mma {r['mma_sync']:>3} cp.async {r['cp_async']:>3}  {r['compile_s']:.1f} s")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--kernels", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--default-only", action="store_true", help="the default tile of each kernel only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cache", action="store_true", help="use Triton's kernel cache (compile_s then reads ~0 for "
                    "kernels compiled before); default: a fresh temporary cache, so compile_s is the compile time")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_check compiles for a GPU: unset TRITON_INTERPRET")
    if not args.cache:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastdp_compile_check_")
    rows = check(args.arch, args.kernels.split(",") if args.kernels else None, args.dtypes.split(","),
                 args.default_only)
    result = {"what": f"Triton kernels compiled for cuda sm_{args.arch} without a GPU (resources, instructions)",
              "date": datetime.date.today().isoformat(), "arch": args.arch, "rows": rows}
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
