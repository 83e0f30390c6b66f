"""Data-parallel DP-SGD of a small CNN with fastdp on several processes (DistributedDataParallel).

    torchrun --nproc_per_node=2 examples/ddp_image_classifier.py                    # CPU (gloo), digits data
    torchrun --nproc_per_node=4 examples/ddp_image_classifier.py --dataset mnist --data-dir DIR   # 4 GPUs (NCCL)

Every rank runs this script. The model is wrapped in DDP; ``fastdp.make_private`` sees the wrapper and gives each
rank a Poisson sample of its shard of the data, the optimizer the GLOBAL expected batch size, and at each step
fastdp all-reduces the clipped sums once (rank 0 adds the noise, once). Rank 0 prints.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

import fastdp
from fastdp.data import load_dataset
from fastdp.distributed import init_process_group
from fastdp.models import SmallCNN


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits", choices=("digits", "mnist", "fashion-mnist"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128, help="global expected batch (all ranks together)")
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--target-epsilon", type=float, default=3.0)
    ap.add_argument("--limit", type=int, default=None, help="first N training samples only")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_process_group()  # gloo on the CPU, NCCL on CUDA; fastdp.distributed.DEFAULT_TIMEOUT (5 minutes)
    rank, device = dist.get_rank(), torch.device("cuda") if cuda else torch.device("cpu")

    train_set, test_set, meta = load_dataset(args.dataset, data_dir=args.data_dir, limit=args.limit)
    c, h, _ = meta["image_shape"]
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = torch.nn.parallel.DistributedDataParallel(
        SmallCNN(in_channels=c, num_classes=meta["num_classes"], width=16, image_size=h).to(device),
        device_ids=[device.index] if cuda else None)
    model, optimizer, loader = fastdp.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        data_loader=DataLoader(train_set, batch_size=args.batch_size),  # the whole dataset: fastdp shards it
        target_epsilon=args.target_epsilon, target_delta=1e-5, epochs=args.epochs, max_grad_norm=1.0)
    if rank == 0:
        print(f"{dist.get_world_size()} ranks, noise_multiplier {optimizer.noise_multiplier:.3f}, global expected "
              f"batch {optimizer.expected_batch_size}, {len(loader)} steps per epoch", flush=True)
    for epoch in range(args.epochs):
        for x, y in loader:
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
            optimizer.zero_grad()
        if rank == 0:
            model.eval()
            with torch.no_grad():
                x, y = (torch.stack([s[0] for s in test_set]).to(device), torch.tensor([int(s[1]) for s in test_set]))
                acc = (model.module(x).argmax(1).cpu() == y).float().mean().item()
            model.train()
            print(f"epoch {epoch + 1}: test accuracy {acc:.3f}, epsilon {optimizer.epsilon(1e-5):.2f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
