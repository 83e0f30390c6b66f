"""CPU step time of Conv3d, ConvTranspose1d/2d/3d, InstanceNorm2d and EmbeddingBag under fastdp against non-private
training, timed in one run.

Each workload is the layer alone (its trainable parameters are the model's), fp32, B=32 by default, loss the mean
square of its output; a step is forward + backward + optimizer step + zero_grad on a fixed synthetic batch, and
"fwd+bwd" is forward + backward + zero_grad alone (for fastdp: per-sample norms, clip factors and the clipped sum,
without the noise and the update, whose cost grows with the parameter count, not with the layer's work). The two
variants run in interleaved rounds (drift of a shared machine hits both alike). fastdp is DP-SGD with flat clipping
(noise multiplier 1, R = 1). On a loaded machine use ``--threads 1``: two OpenMP threads competing with other
processes made single ops (``index_add_`` into a large table) up to 1000x slower in both variants.

    python -m fastdp.bench.layer_costs_convs [--steps 20] [--threads 2] [--out benchmarks/results/layer_costs_convs.json]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform

import torch
from torch import nn

import fastdp
from fastdp.bench.run_env import write_result
from fastdp.bench.timing import Timing, add_cpu_step_args, time_calls


class Packed(nn.Module):
    """nn.EmbeddingBag on 1-D ids packed with offsets: ``model(ids, offsets)``."""

    def __init__(self, vocab: int, dim: int, mode: str):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab, dim, mode=mode)

    def forward(self, ids, offsets):
        return self.bag(ids, offsets)


def workloads(B: int, tiny: bool):
    """{name: (description, model, inputs)} at the benchmark's sizes (``tiny``: a smoke-test size)."""
    s = 2 if tiny else 1  # spatial divisor
    vocab, dim, L = (100, 8, 5) if tiny else (20_000, 64, 20)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 2 * L, (B,), generator=g)
    packed = (torch.randint(0, vocab, (int(lengths.sum()),), generator=g), torch.cumsum(lengths, 0) - lengths)
    return {
        "conv3d": ("Conv3d(16, 32, 3, padding=1) on [B, 16, 8, 8, 8]", nn.Conv3d(16, 32, 3, padding=1),
                   (torch.randn(B, 16, 8 // s, 8 // s, 8 // s, generator=g),)),
        "conv_transpose1d": ("ConvTranspose1d(32, 16, 4, stride=2, padding=1) on [B, 32, 64]",
                             nn.ConvTranspose1d(32, 16, 4, stride=2, padding=1), (torch.randn(B, 32, 64 // s, generator=g),)),
        "conv_transpose2d": ("ConvTranspose2d(32, 16, 4, stride=2, padding=1) on [B, 32, 16, 16]",
                             nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
                             (torch.randn(B, 32, 16 // s, 16 // s, generator=g),)),
        "conv_transpose3d": ("ConvTranspose3d(16, 8, 2, stride=2) on [B, 16, 6, 6, 6]", nn.ConvTranspose3d(16, 8, 2, stride=2),
                             (torch.randn(B, 16, 6 // s, 6 // s, 6 // s, generator=g),)),
        "instance_norm2d": ("InstanceNorm2d(32, affine=True) on [B, 32, 16, 16]", nn.InstanceNorm2d(32, affine=True),
                            (torch.randn(B, 32, 16 // s, 16 // s, generator=g),)),
        **{f"embedding_bag_{mode}": (f"EmbeddingBag({vocab}, {dim}, mode={mode!r}) on [B, {L}] ids",
                                     nn.EmbeddingBag(vocab, dim, mode=mode),
                                     (torch.randint(0, vocab, (B, L), generator=g),)) for mode in ("sum", "mean", "max")},
        "embedding_bag_packed": (f"EmbeddingBag({vocab}, {dim}, mode='sum') on 1-D ids + offsets, bags of 1..{2 * L - 1}",
                                 Packed(vocab, dim, "sum"), packed),
    }


def time_variant(model, private: bool, inputs, steps: int, warmup: int):
    """(step times, forward + backward times) in ms."""
    m = copy.deepcopy(model)
    sgd = torch.optim.SGD(m.parameters(), lr=0.01)
    opt = sgd
    B = inputs[1].numel() if isinstance(m, Packed) else inputs[0].shape[0]
    if private:
        opt = fastdp.DPOptimizer(m, sgd, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B,
                                 sample_size=50_000, generator=torch.Generator().manual_seed(0))

    def step():
        m(*inputs).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()

    def forward_backward():
        m(*inputs).pow(2).mean().backward()
        opt.zero_grad()

    times = time_calls(step, "cpu", steps, warmup).times_ms, time_calls(forward_backward, "cpu", steps, warmup).times_ms
    if private:
        opt.detach()
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cpu_step_args(ap)
    ap.add_argument("--workloads", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--tiny", action="store_true", help="smoke-test sizes: the code path, not the numbers")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (two interleaved rounds of steps // 2)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    table = workloads(args.batch, args.tiny)
    names = args.workloads.split(",") if args.workloads else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; choose from {list(table)}")
    rows = []
    for name in names:
        desc, model, inputs = table[name]
        samples = {(False, 0): [], (True, 0): [], (False, 1): [], (True, 1): []}
        for _ in range(2):  # interleaved rounds
            for private in (False, True):
                step_ms, fb_ms = time_variant(model, private, inputs, args.steps // 2, args.warmup)
                samples[private, 0] += step_ms
                samples[private, 1] += fb_ms
        base, dp = Timing(samples[False, 0]).summary(), Timing(samples[True, 0]).summary()
        base_fb, dp_fb = Timing(samples[False, 1]), Timing(samples[True, 1])
        rows.append({"workload": name, "layer": desc, "nonprivate_ms": base["median_ms"], "fastdp_ms": dp["median_ms"],
                     "fastdp_p20_ms": dp["p20_ms"], "fastdp_p80_ms": dp["p80_ms"],
                     "ratio": dp["median_ms"] / base["median_ms"], "min_ratio": dp["min_ms"] / base["min_ms"],
                     "nonprivate_fwd_bwd_ms": base_fb.median_ms, "fastdp_fwd_bwd_ms": dp_fb.median_ms,
                     "fwd_bwd_ratio": dp_fb.median_ms / base_fb.median_ms,
                     "fwd_bwd_min_ratio": dp_fb.min_ms / base_fb.min_ms, "steps": dp["steps"]})
    result = {"workload": f"single layers, B={args.batch}, fp32, loss mean(out^2)",
              "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads",
              "torch": torch.__version__, "date": datetime.date.today().isoformat(), "rows": rows}
    print("medians (ms) and ratios of medians; 'min x': ratio of the fastest calls")
    print(f"{'workload':<22} {'step: nonprivate':>17} {'fastdp':>8} {'x':>6} {'min x':>6} {'fwd+bwd: nonprivate':>20} "
          f"{'fastdp':>8} {'x':>6} {'min x':>6}")
    for r in rows:
        print(f"{r['workload']:<22} {r['nonprivate_ms']:>17.2f} {r['fastdp_ms']:>8.2f} {r['ratio']:>6.2f} "
              f"{r['min_ratio']:>6.2f} {r['nonprivate_fwd_bwd_ms']:>20.2f} {r['fastdp_fwd_bwd_ms']:>8.2f} "
              f"{r['fwd_bwd_ratio']:>6.2f} {r['fwd_bwd_min_ratio']:>6.2f}")
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
