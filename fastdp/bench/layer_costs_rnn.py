"""CPU step time of recurrent models under fastdp against non-private training, timed in one run.

Workloads (issue 17): a char-level LM (Embedding -> 2-layer nn.LSTM or nn.GRU -> Linear over the vocabulary, vocab
64, embed 64, hidden 128, B=32, T=32, padded batch-first) and the same LSTM on packed sequences of random lengths in
[T/2, T]. A step is forward + backward + optimizer step + zero_grad on a fixed synthetic batch (fp32). Each step's
wall time and the process's CPU time (``time.process_time``: all threads; with ``--threads 1`` the figure to trust on a
machine shared with other jobs) are recorded; medians are reported.

    python -m fastdp.bench.layer_costs_rnn [--steps 20] [--threads 2] [--out benchmarks/results/layer_costs_rnn.json]

The floor is the FLOP floor of exact per-sample clipping for the model's matmuls: non-private training costs
6 T d p per sample per Linear-like use (forward, input gradient, weight gradient); fastdp replaces the weight-gradient
GEMM by the clip-and-accumulate GEMM (same cost) and adds the per-sample norm, min(ghost 2 T^2 (d + p), direct
2 T d p). Recurrent weights count as one use over the T stacked steps (``fastdp.layers.rnn``); elementwise gate
work and the embedding are left out.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastdp
from fastdp.bench.run_env import write_result
from fastdp.bench.timing import Timing, add_cpu_step_args, time_calls
from fastdp.grad_sample import prefer_ghost

GATES = {"lstm": 4, "gru": 3}


class CharRNN(nn.Module):
    """Embedding -> nn.LSTM / nn.GRU (batch-first) -> Linear over the vocabulary; ``lengths``: packed."""

    def __init__(self, kind: str, vocab: int, embed: int, hidden: int, layers: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, embed)
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx, lengths=None):
        x = self.emb(idx)
        if lengths is None:
            return self.head(self.rnn(x)[0])
        out = self.rnn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))[0]
        return self.head(pad_packed_sequence(out, batch_first=True, total_length=idx.shape[1])[0])


def flop_floor(kind: str, vocab: int, embed: int, hidden: int, layers: int, T: int) -> float:
    """(non-private + per-sample norm FLOPs) / non-private FLOPs of the model's matmuls, per sample."""
    g = GATES[kind] * hidden
    uses = [(T, embed if layer == 0 else hidden, g) for layer in range(layers)]  # input projections
    uses += [(T, hidden, g)] * layers  # hidden projections, one use over the stacked steps
    uses.append((T, hidden, vocab))  # the head
    base = sum(6 * t * d * p for t, d, p in uses)
    norms = sum(2 * t * t * (d + p) if prefer_ghost(t, p, d) else 2 * t * d * p for t, d, p in uses)
    return (base + norms) / base


def time_variant(model, private: bool, idx, tgt, lengths, steps: int, warmup: int) -> list:
    m = copy.deepcopy(model)
    sgd = torch.optim.SGD(m.parameters(), lr=0.01)
    opt = sgd
    if private:
        opt = fastdp.DPOptimizer(m, sgd, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=idx.shape[0],
                                 sample_size=50_000, generator=torch.Generator().manual_seed(0))

    cpu_ms = []

    def step():
        t0 = time.process_time()
        loss = F.cross_entropy(m(idx, lengths).flatten(0, 1), tgt.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        cpu_ms.append(1e3 * (time.process_time() - t0))

    times = time_calls(step, "cpu", steps, warmup).times_ms
    if private:
        opt.detach()
    return times, cpu_ms[warmup:]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cpu_step_args(ap)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--workloads", default="lstm,gru,lstm_packed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (two interleaved rounds of steps // 2)")
    torch.set_num_threads(args.threads)
    vocab, embed, layers, B, T = 64, 64, 2, args.batch, args.seq
    rows = []
    for name in args.workloads.split(","):
        kind = name.split("_")[0]
        torch.manual_seed(0)
        model = CharRNN(kind, vocab, embed, args.hidden, layers)
        idx, tgt = torch.randint(0, vocab, (B, T)), torch.randint(0, vocab, (B, T))
        lengths = torch.randint(max(1, T // 2), T + 1, (B,)) if name.endswith("packed") else None
        wall, cpu = {False: [], True: []}, {False: [], True: []}
        for _ in range(2):  # interleaved rounds: drift of the machine hits both variants alike
            for private in (False, True):
                w, c = time_variant(model, private, idx, tgt, lengths, args.steps // 2, args.warmup)
                wall[private] += w
                cpu[private] += c
        base, dp = Timing(wall[False]).summary(), Timing(wall[True]).summary()
        base_cpu, dp_cpu = Timing(cpu[False]).median_ms, Timing(cpu[True]).median_ms
        rows.append({"workload": name, "nonprivate_ms": base["median_ms"], "fastdp_ms": dp["median_ms"],
                     "fastdp_p20_ms": dp["p20_ms"], "fastdp_p80_ms": dp["p80_ms"],
                     "ratio": dp["median_ms"] / base["median_ms"], "nonprivate_cpu_ms": base_cpu,
                     "fastdp_cpu_ms": dp_cpu, "cpu_ratio": dp_cpu / base_cpu,
                     "floor": flop_floor(kind, vocab, embed, args.hidden, layers, T), "steps": dp["steps"]})
    result = {"workload": f"char LM: Embedding({vocab}, {embed}) -> {layers}-layer RNN(hidden {args.hidden}) -> "
                          f"Linear({args.hidden}, {vocab}); B={B}, T={T}, fp32",
              "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads",
              "torch": torch.__version__, "date": datetime.date.today().isoformat(), "rows": rows}
    print(f"{'workload':<12} {'nonprivate ms':>14} {'fastdp ms':>10} {'x':>7} {'cpu-time x':>11} {'floor':>7}")
    for r in rows:
        print(f"{r['workload']:<12} {r['nonprivate_ms']:>14.1f} {r['fastdp_ms']:>10.1f} {r['ratio']:>7.2f} "
              f"{r['cpu_ratio']:>11.2f} {r['floor']:>7.3f}")
    return write_result(result, args.out)


if __name__ == "__main__":
    main()
