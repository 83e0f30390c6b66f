"""Per-step cost of multi-head attention and a TransformerEncoder under fastdp against non-private training (CPU).

Each workload runs forward, backward and an SGD step: non-private, then fastdp (``DPOptimizer``, flat clipping,
noise on), in the same process with the same data; the ratio is fastdp's median step over non-private's.

    python -m fastdp.bench.layer_costs_attention [--steps 20] [--warmup 3] [--threads 2] [--batch 32] [--seq 32]
"""
from __future__ import annotations

import argparse
import json
import platform
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import fastdp
from fastdp.bench.timing import add_cpu_step_args, time_calls


class AttentionBlock(nn.Module):
    """x [B, T, d] -> MultiheadAttention (self) -> Linear head on the mean over time."""

    def __init__(self, d, heads, classes=10):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


class EncoderClassifier(nn.Module):
    """ids [B, T] -> Embedding -> 2-layer TransformerEncoder -> Linear head on the mean over time."""

    def __init__(self, vocab, d, heads, layers=2, classes=10):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        return self.head(self.enc(self.emb(ids)).mean(1))


def _step_fn(model, x, y, private: bool, batch: int):
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    opt = sgd
    if private:
        opt = fastdp.DPOptimizer(model, sgd, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch,
                                 sample_size=100 * batch)

    def step():
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    return step, opt


def run(steps: int, warmup: int, batch: int, seq: int, d: int = 128, heads: int = 4) -> list:
    torch.manual_seed(0)
    workloads = {
        f"MultiheadAttention d={d} h={heads}": (lambda: AttentionBlock(d, heads), torch.randn(batch, seq, d)),
        f"TransformerEncoder 2 layers d={d} h={heads} + Embedding": (lambda: EncoderClassifier(1000, d, heads),
                                                                      torch.randint(0, 1000, (batch, seq))),
    }
    y = torch.randint(0, 10, (batch,))
    rows = []
    for name, (make, x) in workloads.items():
        times = {}
        for variant in ("nonprivate", "fastdp"):
            torch.manual_seed(1)
            model = make()
            step, opt = _step_fn(model, x, y, variant == "fastdp", batch)
            times[variant] = time_calls(step, "cpu", steps, warmup).summary()
            if hasattr(opt, "detach"):
                opt.detach()
        rows.append({"workload": name, "batch": batch, "seq": seq, **{f"{k}_median_ms": v["median_ms"]
                                                                       for k, v in times.items()},
                     "ratio": times["fastdp"]["median_ms"] / times["nonprivate"]["median_ms"]})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cpu_step_args(ap)
    ap.add_argument("--seq", type=int, default=32)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = run(args.steps, args.warmup, args.batch, args.seq)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": args.threads,
                      "torch": torch.__version__}))
    print("| workload | B | T | non-private ms | fastdp ms | × |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['batch']} | {r['seq']} | {r['nonprivate_median_ms']:.1f} | "
              f"{r['fastdp_median_ms']:.1f} | {r['ratio']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
