"""The ``fastdp`` command line: ``fastdp train`` trains a small model with DP-SGD / DP-Adam on an image dataset;
``fastdp bench`` runs the end-to-end step benchmark (``fastdp/bench/e2e.py``).

Examples::

    fastdp train --dataset digits --method dpsgd --target-epsilon 3 --epochs 3
    fastdp train --dataset mnist --data-dir ../shared/data --noise-multiplier 1.0 --epochs 5
    fastdp train --dataset mnist --data-dir ../shared/data --checkpoint-dir run1     # saved every 100 steps
    fastdp train --dataset mnist --data-dir ../shared/data --checkpoint-dir run1 --resume   # after a kill
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
import os
import re
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
from fastdp.noise import mix62
from fastdp.optimizer import DPOptimizer
from fastdp.private import make_private
from fastdp.train_checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    DEFAULT_CHECKPOINT_EVERY,
    data_fingerprint,
    load_checkpoint,
    run_config,
    save_checkpoint,
)
from fastdp.train_distributed import all_ranks_sum, launched_distributed, relaunch_with_torchrun, start_ranks

MOMENTUM = 0.9
DEFAULT_TARGET_EPSILON = 3.0
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
    t.add_argument("--target-epsilon", type=_number(float, 0), default=None, metavar="EPS",
                   help=f"calibrate the noise to spend this epsilon over --epochs (default: {DEFAULT_TARGET_EPSILON} "
                        "unless --noise-multiplier is given)")
    t.add_argument("--noise-multiplier", type=_number(float, 0, lo_open=False), default=None, metavar="SIGMA",
                   help="use this noise multiplier instead of calibrating to a target epsilon (excludes "
                        "--target-epsilon)")
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
    t.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help=f"save the run to DIR/{CHECKPOINT_FILE} every --checkpoint-every steps and at the end (model, "
                        "optimizer, accountant, sampler and noise generator states, written atomically). The file "
                        "holds the generators' states: keep it as private as the data")
    t.add_argument("--checkpoint-every", type=_number(int, 0), default=None, metavar="N",
                   help=f"steps between checkpoints (default: {DEFAULT_CHECKPOINT_EVERY}; needs --checkpoint-dir)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run saved in --checkpoint-dir (same options: the next steps, the final model and "
                        "epsilon are those of the uninterrupted run)")
    t.add_argument("--nproc", type=_number(int, 0), default=1, metavar="N",
                   help="data-parallel training on N processes of this machine (DistributedDataParallel: gloo on "
                        "the CPU, NCCL with one GPU each on CUDA), started with torch.distributed.run; the same as "
                        "`torchrun --nproc_per_node=N -m fastdp train ...`. --batch-size is then the global "
                        "expected batch (default: %(default)s)")
    t.set_defaults(func=train, error=t.error)
    # listed for `fastdp --help`; main() hands `fastdp bench ...` to fastdp/bench/e2e.py's own parser unparsed
    sub.add_parser("bench", add_help=False, help="end-to-end step benchmark: non-private, every fastdp method, Opacus "
                   "hooks/ghost on ViT, GPT-2, WRN (fastdp bench --help)")
    # the same for `fastdp audit ...`, handed to fastdp/audit/cli.py's parser
    sub.add_parser("audit", add_help=False, help="empirical privacy audit with one training run: eps_lower against the "
                   "claimed epsilon (fastdp audit --help)")
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
        if argv is None and result["exit_status"]:  # a failed measurement fails the command (fastdp bench --help)
            sys.exit(result["exit_status"])
    elif args[:1] == ["audit"]:
        from fastdp.audit import cli as audit_cli
        result = audit_cli.main(args[1:])
    else:
        parsed = build_parser().parse_args(args)
        if getattr(parsed, "nproc", 1) > 1 and not launched_distributed():
            return relaunch_with_torchrun(parsed.nproc, args)
        result = parsed.func(parsed)
    return result if argv is not None else None


# ---------------------------------------------------------------------------------------------- bench
def bench(argv: Sequence[str]) -> dict:
    """Run the end-to-end step benchmark, ``fastdp.bench.e2e.main(argv)`` (installed with the package)."""
    from fastdp.bench import e2e
    return e2e.main(list(argv), prog="fastdp bench")


# ---------------------------------------------------------------------------------------------- train
def train(args: argparse.Namespace) -> dict:
    """Run ``fastdp train``; returns {test_accuracy, epsilon, noise_multiplier, samples_per_second, ...}.

    Every check of the options and of the data runs before the first step. With ``--checkpoint-dir`` the run is
    saved every ``--checkpoint-every`` steps and at the end (``save_checkpoint``); ``--resume`` continues it exactly
    (the sampler is replayed from the epoch's start, the model, optimizer, accountant and noise generator come from
    the checkpoint), after checking that the options and the data are the checkpointed run's.
    """
    error = args.error  # the train parser's error(): `fastdp train: error: ...` and exit status 2
    private = args.method != "nonprivate"
    if args.noise_multiplier is not None and args.target_epsilon is not None:
        error(f"give --noise-multiplier or --target-epsilon, not both: --noise-multiplier {args.noise_multiplier:g} "
              f"is not calibrated to --target-epsilon {args.target_epsilon:g} (its epsilon could exceed it)")
    if args.noise_multiplier is not None:
        target_epsilon = None
    else:
        target_epsilon = DEFAULT_TARGET_EPSILON if args.target_epsilon is None else args.target_epsilon
    _check_method_phases(args, error)
    if (args.resume or args.checkpoint_every is not None) and not args.checkpoint_dir:
        error("--resume and --checkpoint-every need --checkpoint-dir")
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
    if args.reproducible and args.secure_mode:
        error("--reproducible seeds the noise from --seed; --secure-mode draws it from the OS: choose one")
    world, rank = start_ranks(args, device, error)  # (1, 0) unless started as one of several ranks (torchrun)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    if device.type == "cpu":
        retain_freed_memory()  # this process only trains: no page faults per step (fastdp.cpu_memory)

    try:
        train_set, test_set, meta = load_dataset(args.dataset, data_dir=args.data_dir, limit=args.limit)
    except (FileNotFoundError, ValueError) as err:
        error(str(err))
    c, h, w = meta["image_shape"]
    if args.model == "cnn" and (h != w or h < 4):
        error(f"--model cnn needs square images of at least 4x4 pixels, {args.dataset} has {h}x{w}: use --model mlp")

    ckpt_path, ckpt, config, fingerprint = None, None, None, None
    if args.checkpoint_dir:
        ckpt_path = os.path.join(args.checkpoint_dir, CHECKPOINT_FILE)
        try:  # a folder that cannot take the checkpoint fails now, not after the first N steps
            os.makedirs(args.checkpoint_dir, exist_ok=True)
        except OSError as err:
            error(f"--checkpoint-dir {args.checkpoint_dir}: cannot create the folder ({err})")
        if not os.access(args.checkpoint_dir, os.W_OK):
            error(f"--checkpoint-dir {args.checkpoint_dir}: the folder is not writable")
        config = run_config(args, target_epsilon=target_epsilon, batch_size=batch_size, lr=lr, device=device)
        fingerprint = data_fingerprint(train_set, test_set)
        if args.resume:
            ckpt = load_checkpoint(ckpt_path, config, fingerprint, error)
        elif os.path.exists(ckpt_path):
            error(f"--checkpoint-dir {args.checkpoint_dir} already holds a checkpoint ({ckpt_path}): pass --resume to "
                  "continue that run, or choose another folder")

    torch.manual_seed(args.seed)
    model = _make_model(args.model, meta, defaults).to(device)
    if world > 1:  # each rank clips its samples; fastdp all-reduces the clipped sums (fastdp.distributed)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    base_opt = BASE_OPTIMIZERS["dpsgd" if args.method in SPARSE_METHODS else args.method](model.parameters(), lr)
    method_class, method_args = SPARSE_METHODS.get(args.method, (DPOptimizer, lambda a: {}))
    sample_gen = torch.Generator().manual_seed(args.seed)  # nonprivate: the shuffling's generator
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=not private, generator=sample_gen)
    optimizer = base_opt
    seeds = private_seeds(args.seed if args.reproducible else None)
    if private:
        # each rank samples its own shard: its own stream (correlated inclusions would void the Poisson analysis)
        sample_gen = torch.Generator().manual_seed(seeds["sampling"] if world == 1 else mix62(seeds["sampling"], rank))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # opacus, calibration search
            if args.noise_multiplier == 0:  # the warning is replaced by the epsilon line below
                warnings.filterwarnings("ignore", message="noise_multiplier=0")
            max_grad_norm = args.max_grad_norm
            if args.clipping == "per_layer":  # equal thresholds: sqrt(sum R_k^2) = R over all the model's tensors
                names = [n for n, _ in model.named_parameters()]
                max_grad_norm = {n: args.max_grad_norm / len(names) ** 0.5 for n in names}
            try:
                model, optimizer, loader = make_private(
                    module=model, optimizer=base_opt, data_loader=loader, max_grad_norm=max_grad_norm,
                    noise_multiplier=args.noise_multiplier, target_epsilon=target_epsilon,
                    target_delta=args.delta, epochs=args.epochs, clipping=args.clipping, accountant=args.accountant,
                    noise_generator=None if args.secure_mode else torch.Generator(device).manual_seed(seeds["noise"]),
                    secure_mode=args.secure_mode, sample_generator=sample_gen,
                    optimizer_class=method_class,
                    **method_args(args))
            except ValueError as err:
                error(_as_options(str(err)))
        print(f"noise_multiplier {optimizer.noise_multiplier:.4f}, sample_rate {optimizer.sample_rate:.4g}, "
              f"expected batch size {optimizer.expected_batch_size}, {len(loader)} steps per epoch", flush=True)

    start_epoch, resumed_at = 0, None
    totals = {"samples": 0, "steps": 0, "train_time": 0.0}  # of the completed epochs
    if ckpt is not None:
        if private and ckpt["noise_multiplier"] != optimizer.noise_multiplier:
            error(f"--resume: the checkpoint's noise multiplier {ckpt['noise_multiplier']} is not this run's "
                  f"{optimizer.noise_multiplier}")
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, RuntimeError, KeyError, TypeError) as err:
            error(f"--resume: {ckpt_path}: cannot restore the model and optimizer ({err})")
        torch.set_rng_state(ckpt["torch_rng_state"])
        start_epoch, totals = ckpt["epoch"], dict(ckpt["totals"])
        resumed_at = totals["steps"] + ckpt["epoch_stats"]["steps"]
        print(f"resumed from {ckpt_path} after {resumed_at} steps (epoch {min(start_epoch + 1, args.epochs)}/"
              f"{args.epochs}, step {ckpt['epoch_stats']['steps']} of it)", flush=True)
    print(f"{args.method} on {args.dataset} ({meta['train_size']} train / {meta['test_size']} test), "
          f"model {args.model}, lr {lr:g}, batch size {batch_size}, {args.epochs} epochs, device {device}, "
          f"amp {args.amp}", flush=True)

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp == "bf16" \
        else contextlib.nullcontext
    every = args.checkpoint_every or DEFAULT_CHECKPOINT_EVERY

    def checkpoint(epoch, epoch_start_state, epoch_stats, finished=False):
        save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config, "data": fingerprint,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "noise_multiplier": optimizer.noise_multiplier if private else None,
            "epoch": epoch, "finished": finished, "sampler_state": epoch_start_state,
            "torch_rng_state": torch.get_rng_state(), "totals": dict(totals), "epoch_stats": epoch_stats})

    for epoch in range(start_epoch, args.epochs):
        if ckpt is not None and epoch == start_epoch:  # replay the epoch's sampling from its start
            epoch_start_state, skip, start = ckpt["sampler_state"], ckpt["epoch_stats"]["steps"], ckpt["epoch_stats"]
            sample_gen.set_state(epoch_start_state)
        else:
            epoch_start_state, skip, start = sample_gen.get_state(), 0, None
        on_step = None
        if ckpt_path is not None:
            def on_step(steps_in_epoch, epoch_stats, epoch=epoch, epoch_start_state=epoch_start_state):
                if (totals["steps"] + steps_in_epoch) % every == 0:
                    checkpoint(epoch, epoch_start_state, epoch_stats())
        try:
            n, k, secs, loss = _train_epoch(model, optimizer, loader, device, autocast,
                                            desc=f"epoch {epoch + 1}/{args.epochs}", progress=not args.no_progress,
                                            skip=skip, start=start, on_step=on_step)
        except NonFiniteNormError as err:
            sys.exit(f"fastdp train: error: training diverged in epoch {epoch + 1} ({err}). Try a smaller --lr.")
        if world > 1:  # the epoch's samples over all ranks (the loss printed is rank 0's)
            n = int(all_ranks_sum(n))
        totals = {"samples": totals["samples"] + n, "steps": totals["steps"] + k,
                  "train_time": totals["train_time"] + secs}
        # the exact loss and sample count are not privatised: outside the epsilon below (as in Opacus' examples)
        print(f"epoch {epoch + 1}/{args.epochs}: {n} samples in {secs:.2f} s, train_loss {loss:.4f}"
              + (" (exact: not covered by epsilon)" if private else ""), flush=True)
    if ckpt_path is not None and not (ckpt is not None and ckpt["finished"]):
        checkpoint(args.epochs, sample_gen.get_state(), _EMPTY_EPOCH, finished=True)
    samples, steps, train_time = totals["samples"], totals["steps"], totals["train_time"]
    accuracy = evaluate(model, test_set, device, autocast)

    bound = args.accountant
    if private:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epsilon = optimizer.epsilon(args.delta)
        for w in caught:
            if "Optimal order is the" in str(w.message):
                continue  # opacus' RDP order range
            if "reporting the RDP bound" in str(w.message):
                bound = f"{args.accountant}; the RDP bound: PRV cannot compute this run"
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        sigma = optimizer.noise_multiplier
        phase = getattr(optimizer, "phase", None)
        optimizer.detach()
    else:
        epsilon, sigma, phase = math.inf, None, None
    result = {
        "test_accuracy": accuracy, "epsilon": epsilon, "delta": args.delta if private else None,
        "accountant": args.accountant if private else None, "noise_multiplier": sigma,
        "samples_per_second": samples / train_time if train_time > 0 else 0.0, "train_time_s": train_time,
        "samples": samples, "steps": steps, "epochs": args.epochs, "dataset": args.dataset, "method": args.method,
        "model": args.model, "batch_size": batch_size, "lr": lr, "device": str(device), "amp": args.amp,
        "phase": phase, "checkpoint": ckpt_path, "resumed_at_step": resumed_at,
    }
    print(f"test_accuracy: {accuracy:.4f}")
    if private:
        print(f"epsilon: {epsilon:.2f} (delta={args.delta:g}, accountant={bound})")
        print(f"noise_multiplier: {sigma:.4f}")
    else:
        print("epsilon: inf (not private)")
        print("noise_multiplier: n/a (not private)")
    print(f"samples_per_second: {result['samples_per_second']:.0f}", flush=True)
    if world > 1:
        result["world_size"] = world
        torch.distributed.destroy_process_group()
    return result


def _check_method_phases(args, error) -> None:
    """Refuse a sparse method whose sparse phase the run would never reach (its results would be another method's)."""
    if args.method == "sparta" and args.epochs < args.warmup_epochs + 2:
        error(f"--method sparta with --warmup-epochs {args.warmup_epochs} trains sparsely from epoch "
              f"{args.warmup_epochs + 2} on ({args.warmup_epochs} warm-up epochs, then one row-selection epoch): "
              f"--epochs {args.epochs} never reaches it. Give --epochs >= {args.warmup_epochs + 2} or fewer "
              "--warmup-epochs")
    if args.method == "adadpigu" and args.epochs < args.pretrain_epochs + 1:
        error(f"--method adadpigu with --pretrain-epochs {args.pretrain_epochs} trains sparsely from epoch "
              f"{args.pretrain_epochs + 1} on: --epochs {args.epochs} never reaches it. Give --epochs >= "
              f"{args.pretrain_epochs + 1} or fewer --pretrain-epochs")


# library argument -> the `fastdp train` option that sets it (messages of make_private's errors)
_OPTION_OF = {"target_epsilon": "--target-epsilon", "target_delta": "--delta", "delta": "--delta",
              "noise_multiplier": "--noise-multiplier", "max_grad_norm": "--max-grad-norm", "epochs": "--epochs",
              "sparsity": "--sparsity", "warmup_epochs": "--warmup-epochs", "final_rate": "--final-rate",
              "refresh_per_epoch": "--refresh-per-epoch", "retention": "--retention",
              "pretrain_epochs": "--pretrain-epochs"}


def _as_options(message: str) -> str:
    """A library error message with its argument names replaced by the command line's options."""
    names = "|".join(sorted(_OPTION_OF, key=len, reverse=True))
    return re.sub(rf"\b({names})\b", lambda m: _OPTION_OF[m.group(1)], message)


# ----------------------------------------------------------------------------------------- checkpoints
# options that may differ between a run and its --resume (everything else must be the same)
_EMPTY_EPOCH = {"samples": 0, "steps": 0, "batches": 0, "loss_sum": 0.0, "secs": 0.0}


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


def _train_epoch(model, optimizer, loader, device, autocast, desc, progress, skip=0, start=None, on_step=None):
    """One pass over ``loader``; returns (samples, steps, wall seconds, mean train loss over non-empty batches).

    Resuming mid-epoch: the loader (its sampler's generator set to the epoch's starting state) draws the epoch's
    batches again and the first ``skip`` are not trained on (the checkpoint holds their result); ``start`` holds
    the epoch's figures up to the checkpoint, so the numbers returned are the whole epoch's. ``on_step(steps,
    stats)`` runs after every step (``stats()`` gives the epoch's figures so far, with a device sync); its time is
    not counted.
    """
    model.train()
    start = start or _EMPTY_EPOCH
    n, steps, batches = start["samples"], start["steps"], start["batches"]
    loss_sum = torch.tensor(start["loss_sum"], dtype=torch.float32, device=device)
    paused = 0.0
    _sync(device)
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, file=sys.stderr, dynamic_ncols=True)
    for i, (x, y) in enumerate(bar):
        if i < skip:
            continue  # trained before the checkpoint: drawn again only to replay the sampler's stream
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
        if on_step is not None:
            t_pause = time.perf_counter()

            def stats():
                _sync(device)
                return {"samples": n, "steps": steps, "batches": batches, "loss_sum": loss_sum.item(),
                        "secs": start["secs"] + t_pause - t0 - paused}
            on_step(steps, stats)
            paused += time.perf_counter() - t_pause
    _sync(device)
    secs = start["secs"] + time.perf_counter() - t0 - paused
    return n, steps, secs, loss_sum.item() / max(batches, 1)


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
