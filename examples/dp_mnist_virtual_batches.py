"""DP-SGD on MNIST (or scikit-learn's bundled digits) with a small CNN and virtual batches.

Large Poisson batches help DP-SGD (the noise is shared by more samples) but may not fit in memory: each logical
(Poisson) batch is run as physical batches of at most --physical-batch-size samples, and the optimizer steps once per
logical batch. Two splitters do the same thing: fastdp's ``VirtualBatches`` (default) and Opacus'
``BatchMemoryManager`` (--splitter opacus), which works with ``fastdp.DPOptimizer`` unchanged.

    python examples/dp_mnist_virtual_batches.py --data-dir /path/holding/mnist.npz --epochs 1
    python examples/dp_mnist_virtual_batches.py                  # digits, bundled with scikit-learn: no download
"""
from __future__ import annotations

import argparse
import secrets
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import fastdp
from fastdp.data import load_dataset
from fastdp.models import SmallCNN
from fastdp.virtual_batches import VirtualBatches


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="folder holding mnist.npz; without it, scikit-learn's digits set")
    p.add_argument("--limit", type=int, help="use only the first N training samples (quick runs)")
    p.add_argument("--batch-size", type=int, default=512, help="expected logical (Poisson) batch size")
    p.add_argument("--physical-batch-size", type=int, default=128, help="most samples per forward/backward")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, help="stop after this many logical steps (accounting is unchanged)")
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--target-epsilon", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--noise-multiplier", type=float, help="sigma; replaces the calibration to --target-epsilon")
    p.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--splitter", choices=("fastdp", "opacus"), default="fastdp")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation only")
    return p.parse_args(argv)


def accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in DataLoader(data, batch_size=1024))
    model.train()
    return correct / len(data)


def main(argv=None):
    args = parse_args(argv)
    name = "mnist" if args.data_dir else "digits"
    train, test, meta = load_dataset(name, data_dir=args.data_dir, limit=args.limit)
    torch.manual_seed(args.seed)
    model = SmallCNN(in_channels=1, num_classes=meta["num_classes"], image_size=meta["image_shape"][-1])
    model, optimizer, loader = fastdp.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        data_loader=DataLoader(train, batch_size=args.batch_size), max_grad_norm=args.max_grad_norm,
        target_epsilon=None if args.noise_multiplier is not None else args.target_epsilon,
        noise_multiplier=args.noise_multiplier, target_delta=args.delta, epochs=args.epochs,
        accountant=args.accountant,
        noise_generator=torch.Generator().manual_seed(secrets.randbits(62)))
    steps_per_epoch = len(loader)
    total_steps = int(args.epochs * steps_per_epoch)
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    print(f"{name}: {len(train)} training samples, logical batches of {args.batch_size} expected "
          f"(rate {optimizer.sample_rate:.4g}), physical batches of at most {args.physical_batch_size}, "
          f"{total_steps} steps, noise multiplier {optimizer.noise_multiplier:.3f}")

    start, largest = time.time(), 0
    while optimizer.steps_taken < total_steps:
        if args.splitter == "fastdp":
            for physical_batches in VirtualBatches(loader, max_physical_batch_size=args.physical_batch_size):
                for x, y in physical_batches:
                    largest = max(largest, len(y))
                    F.cross_entropy(model(x), y, reduction="sum").div(max(1, len(y))).backward()
                optimizer.step()
                optimizer.zero_grad()
                if optimizer.steps_taken >= total_steps:
                    break
        else:
            from opacus.utils.batch_memory_manager import BatchMemoryManager
            with BatchMemoryManager(data_loader=loader, max_physical_batch_size=args.physical_batch_size,
                                    optimizer=optimizer) as physical_loader:
                for x, y in physical_loader:
                    largest = max(largest, len(y))
                    F.cross_entropy(model(x), y, reduction="sum").div(max(1, len(y))).backward()
                    optimizer.step()  # a no-op until the last physical batch of the logical batch
                    optimizer.zero_grad()
                    if optimizer.steps_taken >= total_steps:
                        break
    print(f"steps {optimizer.steps_taken}, largest physical batch {largest}, "
          f"{time.time() - start:.1f} s, test accuracy {accuracy(model, test):.4f}, "
          f"epsilon {optimizer.epsilon(args.delta):.3f} at delta {args.delta:g}")


if __name__ == "__main__":
    main()
