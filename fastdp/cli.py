"""The ``fastdp`` command line: ``fastdp train`` trains a small model with DP-SGD / DP-Adam on an image dataset;
``fastdp bench`` runs the end-to-end step benchmark (``fastdp/bench/e2e.py``).

Examples::

    fastdp train --dataset digits --method dpsgd --target-epsilon 3 --epochs 3
    fastdp train --dataset mnist --data-dir ../shared/data --noise-multiplier 1.0 --epochs 5
    python -m fastdp train --help
    fastdp bench --device cpu --tiny --steps 2 --warmup 1     # fastdp bench --help for the options

The last lines of a run are one ``key: value`` each (``test_accuracy``, ``epsilon``, ``noise_multiplier``,
``samples_per_second``); ``main(argv)`` returns the same numbers as a dict.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import secrets
import sys
import time
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from fastdp.cpu_memory import retain_freed_memory
from fastdp.data import DATASETS, load_dataset
from fastdp.engine import NonFiniteNormError
from fastdp.methods import SPARTA, AdaDPIGU, BiTFiT, LastLayer, RandomGroups, RandomSparsification
from fastdp.micro_adam import MicroAdam
from fastdp.models import MLP, SmallCNN
from fastdp.optimizer import DPOptimizer
from fastdp.private import make_private

MOMENTUM = 0.9
# --method -> the base optimizer fastdp wraps (nonprivate: trained without the DP wrapper, for comparison)
BASE_OPTIMIZERS = {
    "dpsgd": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=MOMENTUM),
    "dpadam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "dpmicroadam": lambda params, lr: MicroAdam(params, lr=lr),  # DP-MicroAdam's defaults
    "nonprivate": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=MOMENTUM),
}
# --method -> (DP optimizer class, its arguments from the command line) for the sparse methods (on SGD + momentum)
SPARSE_METHODS = {
    "sparta": (SPARTA, lambda a: dict(sparsity=a.sparsity, warmup_epochs=a.warmup_epochs)),
    "rs": (RandomSparsification, lambda a: dict(final_rate=a.final_rate, refresh_per_epoch=a.refresh_per_epoch,
                                                 seed=a.seed)),
    "adadpigu": (AdaDPIGU, lambda a: dict(retention=a.retention, pretrain_epochs=a.pretrain_epochs)),
    "bitfit": (BiTFiT, lambda a: {}),
    "last-layer": (LastLayer, lambda a: {}),
    "random-groups": (RandomGroups, lambda a: dict(sparsity=a.sparsity, seed=a.seed)),
}
METHODS = tuple(BASE_OPTIMIZERS) + tuple(SPARSE_METHODS)

# Defaults that depend on the dataset (and, for the learning rate, on the method); used where the
# user did not set the option. digits (1437 training images), eps=3, 3 epochs: batch 128 / lr 0.5 gave the
# best SmallCNN accuracy of the batch sizes 32-256 and learning rates 0.05-2 tried (0.82-0.86 over 3 seeds).
DEFAULTS = {
    "digits": {"batch_size": 128, "width": 16, "hidden": 128,
               "lr": {"dpsgd": 0.5, "dpadam": 2e-2, "dpmicroadam": 2e-2, "nonprivate": 0.1, "sparse": 0.5}},
    "mnist": {"batch_size": 256, "width": 16, "hidden": 256,
              "lr": {"dpsgd": 0.5, "dpadam": 5e-3, "dpmicroadam": 5e-3, "nonprivate": 0.05, "sparse": 0.5}},
    "fashion-mnist": {"batch_size": 256, "width": 16, "hidden": 256,
                      "lr": {"dpsgd": 0.5, "dpadam": 5e-3, "dpmicroadam": 5e-3, "nonprivate": 0.05, "sparse": 0.5}},
}


# ----------------------------------------------------------------------------------------- arguments
def _number(kind, lo, lo_open=True, hi=None, hi_open=True):
    """argparse type: a number of ``kind`` in the interval given (errors are argparse errors)."""
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        bad_lo = v <= lo if lo_open else v < lo
        bad_hi = hi is not None and (v >= hi if hi_open else v > hi)
        if bad_lo or bad_hi:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"must be in {left}{lo}, {'inf' if hi is None else hi}{right}, got {text}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdp", description="Differentially private training with fastdp.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    t = sub.add_parser(
        "train", help="train a small model with DP-SGD / DP-Adam and report accuracy, epsilon and throughput",
        description="Train a small image classifier with differential privacy (Poisson sampling, per-sample "
                    "clipping, Gaussian noise) and print test_accuracy, epsilon, noise_multiplier and "
                    "samples_per_second. --batch-size and --lr default per dataset (and method).")
    t.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits is bundled with scikit-learn; mnist / fashion-mnist are read from --data-dir "
                        "(default: %(default)s)")
    t.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder with mnist.npz / fashion_mnist.npz (default: $FASTDP_DATA_DIR, else ./data)")
    t.add_argument("--method", choices=METHODS, default="dpsgd",
                   help="dpsgd: SGD with momentum 0.9 under DP; dpadam: Adam under DP; dpmicroadam: MicroAdam "
                        "(density 0.01, window 10, fp32 error feedback) under DP; nonprivate: SGD with momentum 0.9, "
                        "no clipping or noise, for comparison; sparta, rs, adadpigu, bitfit, last-layer, "
                        "random-groups: the sparse DP methods (fastdp.methods) on SGD with momentum 0.9 "
                        "(default: %(default)s)")
    t.add_argument("--target-epsilon", type=_number(float, 0), default=3.0, metavar="EPS",
                   help="calibrate the noise to spend this epsilon over --epochs (default: %(default)s)")
    t.add_argument("--noise-multiplier", type=_number(float, 0, lo_open=False), default=None, metavar="SIGMA",
                   help="use this noise multiplier instead of calibrating to --target-epsilon")
    t.add_argument("--delta", type=_number(float, 0, hi=1), default=1e-5, help="(default: %(default)g)")
    t.add_argument("--epochs", type=_number(int, 0), default=3, help="(default: %(default)s)")
    t.add_argument("--batch-size", type=_number(int, 0), default=None, metavar="B",
                   help="expected (Poisson) batch size (default: "
                        + ", ".join(f"{v['batch_size']} for {k}" for k, v in DEFAULTS.items()) + ")")
    t.add_argument("--lr", type=_number(float, 0), default=None,
                   help="learning rate (default: " + "; ".join(
                       f"{k}: " + ", ".join(f"{m} {lr:g}" for m, lr in v["lr"].items()) for k, v in DEFAULTS.items())
                        + ")")
    t.add_argument("--max-grad-norm", type=_number(float, 0), default=1.0, metavar="R",
                   help="per-sample clipping threshold (default: %(default)s)")
    t.add_argument("--model", choices=("mlp", "cnn"), default="cnn",
                   help="cnn: SmallCNN, two conv + GroupNorm blocks; mlp: one hidden layer (default: %(default)s)")
    t.add_argument("--clipping", choices=("flat", "automatic", "per_layer"), default="flat",
                   help="flat: min(1, R/||g||); automatic: R/(||g|| + 0.01); per_layer: each of the model's n "
                        "parameter tensors clipped to R/sqrt(n) inside backward (total sensitivity <= R) "
                        "(default: %(default)s)")
    t.add_argument("--accountant", choices=("prv", "rdp"), default="prv", help="(default: %(default)s)")
    t.add_argument("--seed", type=int, default=0,
                   help="seeds the model's initialisation and the data-independent masks of rs / random-groups; the "
                        "Poisson sampling and the noise get fresh OS entropy unless --reproducible (default: %(default)s)")
    t.add_argument("--reproducible", action="store_true",
                   help="seed the Poisson sampling and the noise from --seed too (two independent streams derived "
                        "from it): reruns are identical, for debugging and tests. The (epsilon, delta) guarantee "
                        "then holds only against an adversary who does not know the seed")
    t.add_argument("--secure-mode", action="store_true",
                   help="draw the noise from the OS's cryptographically secure generator (fastdp.noise, slower); "
                        "excludes --reproducible")
    t.add_argument("--device", choices=("cpu", "cuda"), default=None, help="(default: cuda if available, else cpu)")
    t.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="bf16: bfloat16 autocast for training and evaluation (default: %(default)s)")
    t.add_argument("--sparsity", type=_number(float, 0, hi=1, hi_open=False), default=0.2,
                   help="sparta, random-groups: fraction of rows kept (default: %(default)s)")
    t.add_argument("--warmup-epochs", type=_number(int, 0, lo_open=False), default=1,
                   help="sparta: warm-up epochs before the selection epoch (library default 10; default here: "
                        "%(default)s, for short runs)")
    t.add_argument("--final-rate", type=_number(float, 0, lo_open=False, hi=1), default=0.9,
                   help="rs: fraction of coordinates masked in the last epoch (default: %(default)s)")
    t.add_argument("--refresh-per-epoch", type=_number(int, 0), default=1, help="rs: mask redraws per epoch")
    t.add_argument("--retention", type=_number(float, 0, hi=1, hi_open=False), default=0.6,
                   help="adadpigu: fraction of coordinates kept after pre-training (default: %(default)s)")
    t.add_argument("--pretrain-epochs", type=_number(int, 0), default=1,
                   help="adadpigu: DP-SGD pre-training epochs (default: %(default)s)")
    t.add_argument("--limit", type=_number(int, 0), default=None, metavar="N",
                   help="use only the first N training samples (quick runs)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=train, error=t.error)
    # listed for `fastdp --help`; main() hands `fastdp bench ...` to fastdp/bench/e2e.py's own parser unparsed
    sub.add_parser("bench", add_help=False, help="end-to-end step benchmark: non-private, every fastdp method, Opacus "
                   "hooks/ghost on ViT, GPT-2, WRN (fastdp bench --help)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    """Entry point of the ``fastdp`` console script and of ``python -m fastdp``.

    ``main(["train", ...])`` (in-process use) returns the subcommand's result dict. With ``argv=None``
    the arguments come from ``sys.argv`` and the return value is None: the console-script wrapper
    passes it to ``sys.exit``, where a dict would be printed and turned into exit status 1.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"]:
        result = bench(args[1:])
    else:
        parsed = build_parser().parse_args(args)
        result = parsed.func(parsed)
    return result if argv is not None else None


# ---------------------------------------------------------------------------------------------- bench
def bench(argv: Sequence[str]) -> dict:
    """Run the end-to-end step benchmark, ``fastdp.bench.e2e.main(argv)`` (installed with the package)."""
    from fastdp.bench import e2e
    return e2e.main(list(argv), prog="fastdp bench")


# ---------------------------------------------------------------------------------------------- train
def train(args: argparse.Namespace) -> dict:
    """Run ``fastdp train``; returns {test_accuracy, epsilon, noise_multiplier, samples_per_second, ...}."""
    error = args.error  # the train parser's error(): `fastdp train: error: ...` and exit status 2
    private = args.method != "nonprivate"
    defaults = DEFAULTS[args.dataset]
    batch_size = args.batch_size or defaults["batch_size"]
    lr = args.lr or defaults["lr"]["sparse" if args.method in SPARSE_METHODS else args.method]
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        error("--device cuda: CUDA is not available (torch.cuda.is_available() is False)")
    else:
        device = torch.device(args.device)
    if args.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        error("--amp bf16: this GPU does not support bfloat16")
    if device.type == "cpu":
        retain_freed_memory()  # this process only trains: no page faults per step (fastdp.cpu_memory)

    try:
        train_set, test_set, meta = load_dataset(args.dataset, data_dir=args.data_dir, limit=args.limit)
    except (FileNotFoundError, ValueError) as err:
        error(str(err))

    if args.reproducible and args.secure_mode:
        error("--reproducible seeds the noise from --seed; --secure-mode draws it from the OS: choose one")
    torch.manual_seed(args.seed)
    model = _make_model(args.model, meta, defaults).to(device)
    base_opt = BASE_OPTIMIZERS["dpsgd" if args.method in SPARSE_METHODS else args.method](model.parameters(), lr)
    method_class, method_args = SPARSE_METHODS.get(args.method, (DPOptimizer, lambda a: {}))
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=not private,
                        generator=torch.Generator().manual_seed(args.seed))
    optimizer = base_opt
    seeds = private_seeds(args.seed if args.reproducible else None)
    if private:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # opacus, calibration search
            if args.noise_multiplier == 0:  # the warning is replaced by the epsilon line below
                warnings.filterwarnings("ignore", message="noise_multiplier=0")
            max_grad_norm = args.max_grad_norm
            if args.clipping == "per_layer":  # equal thresholds: sqrt(sum R_k^2) = R over all the model's tensors
                names = [n for n, _ in model.named_parameters()]
                max_grad_norm = {n: args.max_grad_norm / len(names) ** 0.5 for n in names}
            model, optimizer, loader = make_private(
                module=model, optimizer=base_opt, data_loader=loader, max_grad_norm=max_grad_norm,
                noise_multiplier=args.noise_multiplier,
                target_epsilon=None if args.noise_multiplier is not None else args.target_epsilon,
                target_delta=args.delta, epochs=args.epochs, clipping=args.clipping, accountant=args.accountant,
                noise_generator=None if args.secure_mode else torch.Generator(device).manual_seed(seeds["noise"]),
                secure_mode=args.secure_mode, sample_generator=torch.Generator().manual_seed(seeds["sampling"]),
                optimizer_class=method_class,
                **method_args(args))
        print(f"noise_multiplier {optimizer.noise_multiplier:.4f}, sample_rate {optimizer.sample_rate:.4g}, "
              f"expected batch size {optimizer.expected_batch_size}, {len(loader)} steps per epoch", flush=True)
    print(f"{args.method} on {args.dataset} ({meta['train_size']} train / {meta['test_size']} test), "
          f"model {args.model}, lr {lr:g}, batch size {batch_size}, {args.epochs} epochs, device {device}, "
          f"amp {args.amp}", flush=True)

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp == "bf16" \
        else contextlib.nullcontext
    samples, steps, train_time = 0, 0, 0.0
    for epoch in range(1, args.epochs + 1):
        try:
            n, k, secs, loss = _train_epoch(model, optimizer, loader, device, autocast,
                                            desc=f"epoch {epoch}/{args.epochs}", progress=not args.no_progress)
        except NonFiniteNormError as err:
            sys.exit(f"fastdp train: error: training diverged in epoch {epoch} ({err}). Try a smaller --lr.")
        samples, steps, train_time = samples + n, steps + k, train_time + secs
        # the exact loss and sample count are not privatised: outside the epsilon below (as in Opacus' examples)
        print(f"epoch {epoch}/{args.epochs}: {n} samples in {secs:.2f} s, train_loss {loss:.4f}"
              + (" (exact: not covered by epsilon)" if private else ""), flush=True)
    accuracy = evaluate(model, test_set, device, autocast)

    if private:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            epsilon = optimizer.epsilon(args.delta)
        sigma = optimizer.noise_multiplier
        optimizer.detach()
    else:
        epsilon, sigma = math.inf, None
    result = {
        "test_accuracy": accuracy, "epsilon": epsilon, "delta": args.delta if private else None,
        "accountant": args.accountant if private else None, "noise_multiplier": sigma,
        "samples_per_second": samples / train_time if train_time > 0 else 0.0, "train_time_s": train_time,
        "samples": samples, "steps": steps, "epochs": args.epochs, "dataset": args.dataset, "method": args.method,
        "model": args.model, "batch_size": batch_size, "lr": lr, "device": str(device), "amp": args.amp,
    }
    print(f"test_accuracy: {accuracy:.4f}")
    if private:
        print(f"epsilon: {epsilon:.2f} (delta={args.delta:g}, accountant={args.accountant})")
        print(f"noise_multiplier: {sigma:.4f}")
    else:
        print("epsilon: inf (not private)")
        print("noise_multiplier: n/a (not private)")
    print(f"samples_per_second: {result['samples_per_second']:.0f}", flush=True)
    return result


def private_seeds(seed: Optional[int] = None) -> dict:
    """{"sampling": int, "noise": int}: the seeds of the Poisson sampler and of the noise generator.

    The model's initialisation is public in DP-SGD's analysis: its generator must not share a stream with the
    sampling (whose batches could then be read off the initial weights) or the noise, and the two must not share
    one either (seeded alike, CPU generators emit the same words, so the noise would follow the batch membership).
    ``seed=None``: 62 bits of OS entropy each. An int: two distinct 62-bit seeds derived from it with SHA-256
    (reproducible runs; private only while the seed is secret).
    """
    if seed is None:
        return {k: secrets.randbits(62) for k in ("sampling", "noise")}
    return {k: int.from_bytes(hashlib.sha256(f"fastdp/{k}/{seed}".encode()).digest()[:8], "little") >> 2
            for k in ("sampling", "noise")}


def _make_model(kind: str, meta: dict, defaults: dict) -> torch.nn.Module:
    c, h, w = meta["image_shape"]
    if kind == "mlp":
        return MLP(c * h * w, meta["num_classes"], hidden=(defaults["hidden"],))
    return SmallCNN(in_channels=c, num_classes=meta["num_classes"], width=defaults["width"], image_size=h)


def _train_epoch(model, optimizer, loader, device, autocast, desc, progress):
    """One pass over ``loader``; returns (samples, steps, wall seconds, mean train loss over non-empty batches)."""
    model.train()
    n, steps, loss_sum, batches = 0, 0, torch.zeros((), device=device), 0
    _sync(device)
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, file=sys.stderr, dynamic_ncols=True)
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            out = model(x)
        # an empty Poisson batch runs too: its backward is empty and the step adds noise only
        loss = F.cross_entropy(out.float(), y, reduction="sum") / max(len(y), 1)
        loss.backward()
        if len(y):
            loss_sum += loss.detach()
            batches += 1
            if progress and batches % 10 == 0:  # .item() waits for the device: not on every step
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        optimizer.step()
        optimizer.zero_grad()
        n, steps = n + len(y), steps + 1
    _sync(device)
    return n, steps, time.perf_counter() - start, loss_sum.item() / max(batches, 1)


@torch.no_grad()
def evaluate(model, dataset, device, autocast=contextlib.nullcontext, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (eval mode, no gradients)."""
    model.eval()
    correct = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        with autocast():
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(dataset)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":  # pragma: no cover
    main()
