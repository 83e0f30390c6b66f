"""DP fine-tuning of a causal LM sharded with FSDP2 (``fully_shard``) on several processes.

    torchrun --nproc_per_node=2 examples/fsdp2_gpt2_finetune.py                 # CPU (gloo), tiny random GPT-2
    torchrun --nproc_per_node=8 examples/fsdp2_gpt2_finetune.py --model PATH    # GPUs (NCCL), weights on disk

Offline by default: a small randomly initialised GPT-2 and a text the script builds (a repeated pangram, byte
tokens). Each transformer block and the root are sharded; ``fastdp.make_private`` gives each rank a Poisson sample
of its shard of the data and the optimizer the global expected batch; fastdp computes the exact per-sample
gradients of each rank's samples on the all-gathered parameters and all-reduces the clipped sums once per step,
with rank 0's noise. Rank 0 prints.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import fastdp
from fastdp.distributed import init_process_group

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs. "


def byte_blocks(n_samples: int, length: int) -> torch.Tensor:
    """``[n_samples, length]`` windows of byte tokens of a repeated text."""
    data = torch.tensor(list((TEXT * (1 + n_samples * length // len(TEXT))).encode()), dtype=torch.long)
    starts = torch.arange(n_samples) * 7 % (len(data) - length)
    return torch.stack([data[s:s + length] for s in starts])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a causal LM folder on disk (default: a tiny random GPT-2)")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--length", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64, help="global expected batch (all ranks together)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--target-epsilon", type=float, default=8.0)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_process_group()
    rank, device = dist.get_rank(), torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=args.length, n_embd=64, n_layer=2, n_head=4,
                                           bos_token_id=0, eos_token_id=0))
    model.to(device)
    for block in model.transformer.h if hasattr(model, "transformer") else model.model.layers:
        fully_shard(block)
    fully_shard(model)

    ids = byte_blocks(args.samples, args.length)
    loader = DataLoader(TensorDataset(ids), batch_size=args.batch_size)  # the whole dataset: fastdp shards it
    model, optimizer, loader = fastdp.make_private(
        module=model, optimizer=torch.optim.AdamW(model.parameters(), lr=args.lr), data_loader=loader,
        target_epsilon=args.target_epsilon, target_delta=1e-5, epochs=args.epochs, max_grad_norm=1.0)
    if rank == 0:
        print(f"{dist.get_world_size()} ranks (FSDP2), noise_multiplier {optimizer.noise_multiplier:.3f}, global "
              f"expected batch {optimizer.expected_batch_size}, {len(loader)} steps per epoch", flush=True)
    for epoch in range(args.epochs):
        for step, (x,) in enumerate(loader):
            x = x.to(device)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if rank == 0 and step % 4 == 0:
                print(f"epoch {epoch + 1} step {step}: loss {loss.item():.3f} (rank 0's batch, not privatised)",
                      flush=True)
    if rank == 0:
        print(f"epsilon {optimizer.epsilon(1e-5):.2f} (delta 1e-5)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
