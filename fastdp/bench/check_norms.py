"""Device check: fastdp's per-sample norms vs a per-sample autograd loop; every parameter updated (fp32, bf16)."""
import copy
import sys

import torch

import fastdp
from fastdp.bench import workloads as W


def main(names: str) -> None:
    """``python -m fastdp.bench.check_norms vit,gpt2,wrn``: one line per workload and dtype (CUDA only)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    for name in names.split(","):
        base, make_batch, loss_fn = W.build(name)
        B = 4
        batch = make_batch(B, dev)
        ref_m = copy.deepcopy(base).to(dev)
        ref = []
        for i in range(B):
            ref_m.zero_grad(set_to_none=True)
            loss_fn(ref_m, tuple(t[i:i + 1] for t in batch)).backward()
            ref.append(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in ref_m.parameters() if p.grad is not None)))
        ref = torch.stack(ref).float()
        ref_m = None
        for dt in ("fp32", "bf16"):
            m = copy.deepcopy(base).to(dev)
            before = {n: p.detach().clone() for n, p in m.named_parameters()}
            opt = fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1e-3,
                                     expected_batch_size=B, sample_size=100 * B)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dt == "bf16"):
                loss = loss_fn(m, batch)
            loss.backward()
            norms = opt.engine.last_norms.float()
            opt.step()
            same = [n for n, p in m.named_parameters() if torch.equal(p, before[n])]
            n_params = len(before)
            # expected update with every sample clipped (R << norms): -(1/B) sum_i R g_i/||g_i||
            print(f"{name} {dt}: fastdp norms {norms.tolist()} ref fp32 {ref.tolist()} max rel diff "
                  f"{((norms - ref).abs() / ref).max().item():.2e}; {n_params} param tensors, not updated: {same}", flush=True)
            m = opt = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1])
