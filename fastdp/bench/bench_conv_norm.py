"""Per-sample conv weight-gradient norms at WRN-16-4 shapes (B=256): direct (grouped weight-gradient conv)
vs ghost (strided unfold + Gram) vs the implicit-im2col Triton kernels, direct and ghost (CUDA only, forced with
FASTDP_BACKEND=triton whatever the environment says; tiles autotuned unless FASTDP_AUTOTUNE=0), vs the non-private
weight-gradient conv they add to. The Triton columns are checked against the reference (relative error < 2e-2).

    python -m fastdp.bench.bench_conv_norm [--device cuda] [--batch 256]
"""
from __future__ import annotations

import argparse
import os

import torch

from fastdp.bench.timing import time_calls
from fastdp.kernels import conv_norm_ref
from fastdp.kernels._backend import HAS_TRITON
from fastdp.kernels.conv_norm import conv_norm

# (C_in, C_out, H=W, stride) of WRN-16-4's 3x3 convs at 32x32 input
SHAPES = [(3, 16, 32, 1), (16, 64, 32, 1), (64, 64, 32, 1), (64, 128, 32, 2), (128, 128, 16, 1),
          (128, 256, 16, 2), (256, 256, 8, 1)]


def bench(fn, device, reps=10):
    """Median ms of ``reps`` calls after one warm-up call (:func:`fastdp.bench.timing.time_calls`)."""
    return time_calls(fn, device, reps, warmup=1).median_ms


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dtypes", default="fp32,bf16")
    args = ap.parse_args(argv)
    os.environ["FASTDP_BACKEND"] = "triton" if args.device == "cuda" and HAS_TRITON else "reference"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"device {torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}, B={args.batch}")
    print(f"{'dtype':5} {'C_in':>4} {'C_out':>5} {'HW':>3} {'s':>1} {'wgrad ms':>9} {'grouped ms':>10} "
          f"{'unfold ms':>9} {'ghost ms':>9} {'triton ms':>9} {'tr-ghost ms':>11}")
    for dname in args.dtypes.split(","):
        dt = torch.float32 if dname == "fp32" else torch.bfloat16
        for cin, cout, hw, s in SHAPES:
            x = torch.randn(args.batch, cin, hw, hw, device=args.device, dtype=dt)
            ho = (hw + 2 - 3) // s + 1
            dy = torch.randn(args.batch, cout, ho, ho, device=args.device, dtype=dt)
            ws = (cout, cin, 3, 3)
            w = torch.empty(ws, device=args.device, dtype=dt)

            def wgrad():
                torch.ops.aten.convolution_backward(dy, x, w, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1,
                                                    [False, True, False])
            row = [bench(wgrad, args.device)]
            for ghost, impl in ((False, "grouped"), (False, "unfold"), (True, None)):
                try:
                    row.append(bench(lambda: conv_norm_ref(x, dy, ws, (s, s), (1, 1), (1, 1), 1, ghost, impl),
                                     args.device))
                except torch.OutOfMemoryError:
                    row.append(float("nan"))
            for ghost in (False, True):
                row.append(float("nan"))
                if args.device == "cuda" and HAS_TRITON:
                    def triton_norm(ghost=ghost):
                        return conv_norm(x, dy, ws, (s, s), (1, 1), (1, 1), 1, ghost=ghost)
                    ref = conv_norm_ref(x, dy, ws, (s, s), (1, 1), (1, 1), 1, False, "unfold")
                    err = ((triton_norm() - ref).abs() / ref).max().item()
                    if err > 2e-2:
                        raise AssertionError(f"Triton conv norm (ghost={ghost}) differs from the reference by "
                                             f"{err:.2e} at {ws}")
                    row[-1] = bench(triton_norm, args.device)
            print(f"{dname:5} {cin:4d} {cout:5d} {hw:3d} {s:1d} {row[0]:9.3f} {row[1]:10.3f} {row[2]:9.3f} "
                  f"{row[3]:9.3f} {row[4]:9.3f} {row[5]:11.3f}", flush=True)


if __name__ == "__main__":
    main()
