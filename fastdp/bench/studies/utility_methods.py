"""Utility studies of the sparse DP methods (fastdp.methods) against DP-SGD, with the papers' numbers beside ours.

Three studies (``--study rs|adadpigu|sparta|all``), every run trained here with ``fastdp.make_private(...,
optimizer_class=<method class>, **method_kwargs)`` (Poisson sampling, flat clipping C = 1, SGD with momentum 0.9
and a constant learning rate, noise calibrated to the target epsilon over all the run's steps):

* ``rs``: Zhu & Blaschko (TMLR 2023) Table 2, Fashion-MNIST, DP-CNN/S, epsilon 3 and 1: DP-SGD vs random
  sparsification (final rate r* = 0.9, one mask per epoch, gradual cooling over the run's epochs).
* ``adadpigu``: Zhang & Xie (arXiv 2507.06525), MNIST, epsilon 8: DP-SGD vs AdaDPIGU (retention 0.6, the DP-valid
  form of ``docs/methods.md`` section 3) on the same CNN.
* ``sparta``: Makni et al. (KDD'25) private fine-tuning: DP-CNN/S pre-trained non-privately on MNIST (the public
  set; cached under ``--out-dir`` as ``pretrain_*.pt``, git-ignored), the 10-class head re-initialised, then
  fine-tuned privately on Fashion-MNIST at epsilon 1, 2, 4 with SPARTA (sparsity 0.2: fraction of rows kept),
  full DP-SGD, DP-BiTFiT, last layer only and random row groups (sparsity 0.2).

DP-CNN/S (``DPCNNS``) is the small MNIST CNN of Papernot et al. / Tramer & Boneh that the RS paper calls
DP-CNN/S (26,010 parameters): conv 16 8x8 stride 2 pad 3, tanh, max-pool 2x2 stride 1, conv 32 4x4 stride 2,
tanh, max-pool 2x2 stride 1, linear 512 -> 32, tanh, linear 32 -> 10. ``--model smallcnn`` uses the CLI's
SmallCNN (width 16, GroupNorm) instead.

One JSON line per run goes to ``<out-dir>/methods.jsonl``; a run whose config is already there is skipped, so an
interrupted study resumes. ``--shard i/n`` runs every n-th run (start n processes with one thread each to
use n cores; then ``--report-only`` with the same flags writes the report). The report is ``methods.md`` (mean ±
sample std over seeds per method and epsilon, the papers' numbers beside ours) and ``methods_<study>.png``
(accuracy vs epsilon with error bars).

    python -m fastdp.bench.studies.utility_methods --study all                          # paper-like epochs: hours on a CPU
    python -m fastdp.bench.studies.utility_methods --study rs --epochs 4 --seeds 0,1,2  # a pilot
    python -m fastdp.bench.studies.utility_methods --study all --report-only            # the report from the JSONL
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fastdp.bench.run_env import ROOT, atomic_write, commit, machine, results_dir, save_figure, torch_threads, write_text

DEFAULT_OUT = results_dir("utility")
DEFAULT_DATA = os.environ.get("FASTDP_DATA_DIR", os.path.join(os.path.dirname(ROOT), "shared", "data"))
MOMENTUM = 0.9
VAL_SPLIT_SEED = 12345  # the permutation that holds out the lr probe's validation images (not a training seed)
STUDIES = ("rs", "adadpigu", "sparta")
LABELS = {"dpsgd": "DP-SGD", "rs": "RS (random sparsification)", "adadpigu": "AdaDPIGU", "sparta": "SPARTA",
          "bitfit": "DP-BiTFiT", "last-layer": "Last layer", "random-groups": "Random groups"}
# study -> fixed settings; epochs and lr are defaults that the command line overrides
STUDY = {
    "rs": {"dataset": "fashion-mnist", "epsilons": (1.0, 3.0), "methods": ("dpsgd", "rs"), "epochs": 20,
           "probe_epsilon": 3.0,
           "title": "Random sparsification (Zhu & Blaschko, TMLR 2023), Table 2: Fashion-MNIST, DP-CNN/S"},
    "adadpigu": {"dataset": "mnist", "epsilons": (8.0,), "methods": ("dpsgd", "adadpigu"), "epochs": 20,
                 "probe_epsilon": 8.0,
                 "title": "AdaDPIGU (Zhang & Xie, arXiv 2507.06525): MNIST, epsilon 8"},
    "sparta": {"dataset": "fashion-mnist", "pretrain": "mnist", "epsilons": (1.0, 2.0, 4.0),
               "methods": ("sparta", "dpsgd", "random-groups", "bitfit", "last-layer"), "epochs": 20,
               "probe_epsilon": 2.0,
               "title": "SPARTA (Makni et al., KDD'25): private fine-tuning, MNIST-pretrained DP-CNN/S -> "
                        "Fashion-MNIST"},
}
# constant learning rates (SGD, momentum 0.9, C = 1, expected batch 256); see the report for how they were chosen
DEFAULT_LR = {"rs": 0.5, "adadpigu": 0.5, "sparta": 0.5}
# the papers' numbers (test accuracy %) in the same setting; None where the paper gives none
PAPER = {
    "rs": {("dpsgd", 3.0): 86.6, ("dpsgd", 1.0): 83.2, ("rs", 3.0): 87.4, ("rs", 1.0): 84.5},
    "adadpigu": {("adadpigu", 8.0): 99.12, ("dpsgd", 8.0): 97.42},  # DP-SGD: "about 1.7 points" below (derived)
    "sparta": {},
}
# SPARTA's Table 1 (seed summary; a different setting: ResNet18 pre-trained on CIFAR-100, CIFAR-10, epsilon 2)
SPARTA_TABLE1 = {"sparta": 78.81, "dpsgd": 77.89, "bitfit": 77.66, "last-layer": 73.61, "random-groups": 77.84}
CONFIG_KEYS = ("study", "dataset", "model", "method", "epsilon", "seed", "epochs", "lr", "batch_size", "max_grad_norm",
               "delta", "limit", "test_limit", "accountant", "method_kwargs", "pretrain", "eval", "val_fraction")


# ------------------------------------------------------------------------------------------------ models
class DPCNNS(nn.Module):
    """DP-CNN/S: the 26K-parameter tanh CNN of Papernot et al. (2020) / Tramer & Boneh (2021) for 28x28 images."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 8, stride=2, padding=3)  # 28 -> 14, pool -> 13
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2)  # 13 -> 5, pool -> 4
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2, 1)
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2, 1)
        return self.head(torch.tanh(self.fc1(x.flatten(1))))


def make_model(name: str) -> nn.Module:
    if name == "dpcnn-s":
        return DPCNNS()
    if name == "smallcnn":
        from fastdp.models import SmallCNN
        return SmallCNN(in_channels=1, num_classes=10, width=16, image_size=28)
    raise ValueError(f"unknown model {name!r}")


# ------------------------------------------------------------------------------------------------ arguments
def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _per_study(kind):
    """``5`` (every study) or ``rs=5,sparta=4`` -> {study: value} (missing studies: the default)."""
    def parse(text: str) -> Dict[str, object]:
        text = text.strip()
        if "=" not in text:
            v = kind(text)
            return {s: v for s in STUDIES}
        out = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            if name.strip() not in STUDIES:
                raise argparse.ArgumentTypeError(f"unknown study {name.strip()!r}; choose from {', '.join(STUDIES)}")
            out[name.strip()] = kind(value)
        return out
    parse.__name__ = kind.__name__
    return parse


def _method_floats(text: str) -> Dict[str, float]:
    out = {}
    for part in text.replace(";", ",").split(","):
        if part.strip():
            name, _, value = part.partition("=")
            if name.strip() not in LABELS:
                raise argparse.ArgumentTypeError(f"unknown method {name.strip()!r}; choose from {', '.join(LABELS)}")
            out[name.strip()] = float(value)
    return out


def _shard(text: str):
    i, _, n = text.partition("/")
    i, n = int(i), int(n)
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n, got {text!r}")
    return i, n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastdp.bench.studies.utility_methods", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--study", choices=STUDIES + ("all",), default="all")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--epochs", type=_per_study(int), default={},
                   help="epochs per run: N for every study or rs=N,adadpigu=N,sparta=N (default: 20 each)")
    p.add_argument("--limit", type=_per_study(int), default={},
                   help="use only the first N training images (N or rs=N,...; default: all)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="score on the first N test images only (quick checks; default: the full test set)")
    p.add_argument("--epsilons", type=_floats, default=None,
                   help="override the studies' epsilons (rs 1,3; adadpigu 8; sparta 1,2,4), e.g. for quick runs")
    p.add_argument("--methods", type=lambda t: [m.strip() for m in t.split(",") if m.strip()], default=None,
                   help="only these methods (comma-separated names as in the report: dpsgd, rs, ...)")
    p.add_argument("--lr", type=_per_study(float), default={},
                   help="constant learning rate per study (N or rs=N,...; default: " +
                        ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--lrs", type=_method_floats, default={},
                   help="per-method learning rates METHOD=v,..., overriding --lr for those methods")
    p.add_argument("--probe-lrs", type=_floats, default=None,
                   help="learning-rate probe: DP-SGD at each of these lrs (seed --probe-seed, one epsilon per study: "
                        "rs 3, adadpigu 8, sparta 2), trained on 1 - --val-fraction of the training set and scored on "
                        "the rest; the best becomes the lr of every method of the study (unless --lr / --lrs)")
    p.add_argument("--probe-seed", type=int, default=100, help="seed of the lr probe (not a reported seed)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="training images held out by the lr probe")
    p.add_argument("--probe-only", action="store_true", help="run only the lr probe (then rerun without it)")
    p.add_argument("--batch-size", type=int, default=256, help="expected (Poisson) batch size")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    p.add_argument("--model", choices=("dpcnn-s", "smallcnn"), default="dpcnn-s")
    p.add_argument("--pretrain-epochs", type=int, default=2, help="sparta: non-private MNIST pre-training epochs")
    p.add_argument("--pretrain-lr", type=float, default=0.05)
    p.add_argument("--pretrain-limit", type=int, default=None, help="sparta: first N MNIST images for pre-training")
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--out-dir", default=DEFAULT_OUT)
    p.add_argument("--shard", type=_shard, default=(0, 1), help="i/n: run only every n-th run of each list, from the i-th")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--report-only", action="store_true", help="no training: write the report from the JSONL")
    p.add_argument("--no-report", action="store_true", help="skip the report (e.g. in all but one shard)")
    return p


# ------------------------------------------------------------------------------------------------ configs
def method_kwargs(method: str, epochs: int, seed: int) -> dict:
    """The method's arguments (besides the DP ones); schedules scaled to the run's epochs as in the papers."""
    if method == "rs":  # README recipe / Table 2 grid {0.5, 0.7, 0.9}; one mask per epoch
        return {"final_rate": 0.9, "refresh_per_epoch": 1, "seed": seed}
    if method == "adadpigu":  # retention 0.6 (paper); pre-training share ~ 1/5 of the epochs (at least 1)
        return {"retention": 0.6, "pretrain_epochs": max(1, epochs // 5)}
    if method == "sparta":  # sparsity 0.2 kept; warm-up T0 = T/5 (launch script: 10 of 50), then one selection epoch
        return {"sparsity": 0.2, "warmup_epochs": max(1, round(epochs / 5)), "selection": "per-sample",
                "topk": "per-layer"}
    if method == "random-groups":
        return {"sparsity": 0.2, "seed": seed}
    return {}


def _config(args, study: str, method: str, eps: float, seed: int, lr: float, split: str = "test") -> dict:
    spec = STUDY[study]
    epochs = args.epochs.get(study, spec["epochs"])
    pretrain = None
    if study == "sparta":
        pretrain = {"dataset": spec["pretrain"], "epochs": args.pretrain_epochs, "lr": args.pretrain_lr,
                    "batch_size": 128, "limit": args.pretrain_limit, "seed": 0}
    return {"study": study, "dataset": spec["dataset"], "model": args.model, "method": method, "epsilon": float(eps),
            "seed": int(seed), "epochs": int(epochs), "lr": float(lr), "batch_size": args.batch_size,
            "max_grad_norm": float(args.max_grad_norm), "delta": float(args.delta), "limit": args.limit.get(study),
            "test_limit": args.test_limit if split == "test" else None, "accountant": args.accountant,
            "method_kwargs": method_kwargs(method, epochs, seed), "pretrain": pretrain, "eval": split,
            "val_fraction": float(args.val_fraction) if split == "val" else None}


def _epsilons(args, study: str) -> List[float]:
    return list(args.epsilons) if args.epsilons else list(STUDY[study]["epsilons"])


def probe_configs(args, study: str) -> List[dict]:
    """The learning-rate probe: DP-SGD at each ``--probe-lrs`` value, one seed, scored on a held-out split."""
    eps = STUDY[study]["probe_epsilon"] if not args.epsilons else args.epsilons[0]
    return [_config(args, study, "dpsgd", eps, args.probe_seed, lr, "val") for lr in (args.probe_lrs or [])]


def study_lr(args, study: str, records: Optional[List[dict]] = None) -> Optional[float]:
    """The study's constant lr: ``--lr``, else the probe's best validation accuracy (``--probe-lrs``; None while
    the probe is incomplete), else ``DEFAULT_LR``."""
    if study in args.lr:
        return args.lr[study]
    if not args.probe_lrs:
        return DEFAULT_LR[study]
    by_key = {_key(r["config"]): r for r in (records if records is not None else load_records(paths(args.out_dir)["jsonl"]))}
    scores = {}
    for c in probe_configs(args, study):
        r = by_key.get(_key(c))
        if r is None:
            return None
        scores[c["lr"]] = -1.0 if r["accuracy"] is None else r["accuracy"]
    return max(scores, key=lambda lr: (scores[lr], -lr))


def study_configs(args, study: str, records: Optional[List[dict]] = None) -> List[dict]:
    """The reported runs of ``study`` (empty while its lr probe is incomplete)."""
    lr = study_lr(args, study, records)
    methods = [m for m in STUDY[study]["methods"] if args.methods is None or m in args.methods]
    out = []
    for eps in _epsilons(args, study):
        for m in methods:
            lr_m = args.lrs.get(m, lr)
            if lr_m is None:
                continue
            for seed in args.seeds:
                out.append(_config(args, study, m, eps, seed, lr_m))
    return out


def _key(config: dict) -> str:
    return json.dumps({k: config.get(k) for k in CONFIG_KEYS}, sort_keys=True)


def load_records(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def paths(out_dir: str) -> Dict[str, str]:
    return {"jsonl": os.path.join(out_dir, "methods.jsonl"), "md": os.path.join(out_dir, "methods.md"),
            **{f"png_{s}": os.path.join(out_dir, f"methods_{s}.png") for s in STUDIES}}


# ------------------------------------------------------------------------------------------------ training
_DATA: Dict[tuple, tuple] = {}
_SIGMA: Dict[tuple, float] = {}


def _data(name: str, data_dir: str, limit: Optional[int]):
    from fastdp.data import load_dataset
    key = (name, data_dir, limit)
    if key not in _DATA:
        _DATA[key] = load_dataset(name, data_dir=None if name == "digits" else data_dir, limit=limit)
    return _DATA[key]


@torch.no_grad()
def evaluate(model: nn.Module, dataset) -> float:
    model.eval()
    correct = 0
    for x, y in DataLoader(dataset, batch_size=1024):
        correct += (model(x).argmax(1) == y).sum().item()
    model.train()
    return correct / len(dataset)


def pretrain_path(out_dir: str, model: str, pre: dict) -> str:
    lim = f"_n{pre['limit']}" if pre["limit"] else ""
    return os.path.join(out_dir, f"pretrain_{model}_{pre['dataset']}_e{pre['epochs']}_lr{pre['lr']:g}_"
                                 f"b{pre['batch_size']}{lim}_s{pre['seed']}.pt")


def pretrained(args, model_name: str, pre: dict) -> dict:
    """The non-private pre-trained checkpoint (``{"state_dict", "test_accuracy", ...}``), trained once and cached."""
    path = pretrain_path(args.out_dir, model_name, pre)
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    train, test, _ = _data(pre["dataset"], args.data_dir, pre["limit"])
    torch.manual_seed(pre["seed"])
    model = make_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=pre["lr"], momentum=MOMENTUM)
    loader = DataLoader(train, batch_size=pre["batch_size"], shuffle=True,
                        generator=torch.Generator().manual_seed(pre["seed"]))
    start = time.perf_counter()
    for _ in range(pre["epochs"]):
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    ckpt = {"state_dict": model.state_dict(), "test_accuracy": evaluate(model, test), "config": pre,
            "wall_s": time.perf_counter() - start}
    print(f"[pretrain] {model_name} on {pre['dataset']}: test accuracy {ckpt['test_accuracy']:.4f} "
          f"({ckpt['wall_s']:.1f} s) -> {os.path.relpath(path)}", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    with atomic_write(path, "wb") as f:  # parallel shards may both pre-train (deterministically) and both write
        torch.save(ckpt, f)
    return ckpt


def _sigma(eps: float, delta: float, q: float, steps: int, accountant: str) -> float:
    from fastdp.accounting import get_noise_multiplier
    key = (eps, delta, q, steps, accountant)
    if key not in _SIGMA:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            _SIGMA[key] = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps,
                                               accountant=accountant)
    return _SIGMA[key]


def train_one(args, config: dict) -> dict:
    """One private training run (fine-tuning for the sparta study); returns the result fields of the record."""
    from fastdp import make_private
    from fastdp.cli import private_seeds
    from fastdp.engine import NonFiniteNormError
    from fastdp.methods import SPARTA, AdaDPIGU, BiTFiT, LastLayer, RandomGroups, RandomSparsification
    from fastdp.optimizer import DPOptimizer

    classes = {"dpsgd": DPOptimizer, "rs": RandomSparsification, "adadpigu": AdaDPIGU, "sparta": SPARTA,
               "bitfit": BiTFiT, "last-layer": LastLayer, "random-groups": RandomGroups}
    train, test, meta = _data(config["dataset"], args.data_dir, config["limit"])
    if config.get("eval") == "val":  # the lr probe: a fixed random split of the training set, the test set unseen
        n = len(train)
        n_val = max(1, round(config["val_fraction"] * n))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(VAL_SPLIT_SEED)).tolist()
        train, test = torch.utils.data.Subset(train, perm[n_val:]), torch.utils.data.Subset(train, perm[:n_val])
        meta = dict(meta, train_size=len(train), test_size=len(test))
    seed = config["seed"]
    torch.manual_seed(seed)
    model = make_model(config["model"])
    extra = {}
    if config["pretrain"]:
        ckpt = pretrained(args, config["model"], config["pretrain"])
        model.load_state_dict(ckpt["state_dict"])
        head = model.head
        torch.manual_seed(seed)
        head.reset_parameters()  # the 10-class head re-initialised (new task), seeded by the run's seed
        extra["pretrain_test_accuracy"] = ckpt["test_accuracy"]
    base = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=MOMENTUM)
    loader = DataLoader(train, batch_size=config["batch_size"])
    steps_per_epoch = len(loader)  # opacus' Poisson loader: sample rate 1 / len(loader), as many batches per epoch
    sigma = _sigma(config["epsilon"], config["delta"], 1 / steps_per_epoch, config["epochs"] * steps_per_epoch,
                   config["accountant"])
    cls = classes[config["method"]]
    kwargs = dict(config["method_kwargs"])
    if cls is not DPOptimizer:
        kwargs["steps_per_epoch"] = steps_per_epoch  # phases on the loader's epochs
    seeds = private_seeds(seed)
    model, opt, loader = make_private(
        module=model, optimizer=base, data_loader=loader, max_grad_norm=config["max_grad_norm"],
        noise_multiplier=sigma, epochs=config["epochs"], accountant=config["accountant"],
        # two seeds derived from the run's seed: one seed for both would tie the CPU noise to batch membership
        noise_generator=torch.Generator().manual_seed(seeds["noise"]),
        sample_generator=torch.Generator().manual_seed(seeds["sampling"]),
        optimizer_class=cls, **kwargs)
    trainable = _trained_coords(model, opt)
    start = time.perf_counter()
    status, losses = "ok", []
    try:
        for _ in range(config["epochs"]):
            total, batches = 0.0, 0
            for x, y in loader:
                out = model(x)
                loss = F.cross_entropy(out, y, reduction="sum") / max(len(y), 1)  # an empty batch: noise only
                loss.backward()
                opt.step()
                opt.zero_grad()
                if len(y):
                    total, batches = total + loss.item(), batches + 1
            losses.append(total / max(batches, 1))
        train_s = time.perf_counter() - start
        if config.get("test_limit"):
            test = torch.utils.data.Subset(test, range(min(config["test_limit"], len(test))))
        accuracy = evaluate(model, test)
    except NonFiniteNormError:
        status, accuracy, train_s = "diverged", None, time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        spent = opt.epsilon(config["delta"])
    result = {"status": status, "accuracy": accuracy, "epsilon_spent": spent, "noise_multiplier": sigma,
              "steps": opt.steps_taken, "steps_per_epoch": steps_per_epoch, "train_size": meta["train_size"],
              "trainable_params": trainable, "train_losses": losses, "train_s": train_s, **extra}
    result["trainable_params_end"] = _trained_coords(model, opt)
    if config["method"] == "sparta":
        result["sparta_phase_at_end"] = opt.phase
    if config["method"] == "adadpigu":
        result["adadpigu_kept_fraction"] = opt.retained_fraction
    opt.detach()
    return result


def _trained_coords(model: nn.Module, opt) -> int:
    """Coordinates that get a gradient at the next step: trainable parameters, masks (SPARTA, RS, AdaDPIGU, random
    groups) applied."""
    masks = opt.engine.masks
    return int(sum(int(masks[p].dense.sum()) if p in masks else p.numel()
                   for p in model.parameters() if p.requires_grad))


def run_study(args, study: str, out: Dict[str, str]) -> None:
    records = load_records(out["jsonl"])
    if args.probe_lrs and study not in args.lr:
        _run(args, study, probe_configs(args, study), records, out, "probe")
        records = load_records(out["jsonl"])
        lr = study_lr(args, study, records)
        if lr is None:
            print(f"[{study}] lr probe incomplete (other shards still running?): rerun without --probe-only once it "
                  "is done", flush=True)
            return
        print(f"[{study}] lr from the probe: {lr:g}", flush=True)
    if not args.probe_only:
        _run(args, study, study_configs(args, study, records), records, out, study)


def _run(args, study: str, configs: List[dict], records: List[dict], out: Dict[str, str], tag: str) -> None:
    done = {_key(r["config"]) for r in records}
    i, n = args.shard
    mine = configs[i::n]  # the shard is a fixed slice of the full list, so shards never overlap between calls
    todo = [c for c in mine if _key(c) not in done]
    print(f"[{tag}] {len(configs)} runs" + (f", {len(mine)} in shard {i}/{n}" if n > 1 else "")
          + f", {len(mine) - len(todo)} already done, {len(todo)} to run", flush=True)
    for k, config in enumerate(todo, 1):
        desc = (f"{study}: {config['method']} eps={config['epsilon']:g} seed={config['seed']} lr={config['lr']:g}"
                + (" (validation split)" if config["eval"] == "val" else ""))
        start = time.perf_counter()
        try:
            result = train_one(args, config)
        except Exception as err:  # not written: rerunning retries it
            print(f"[{tag} {k}/{len(todo)}] ERROR {desc}: {type(err).__name__}: {err}\n{traceback.format_exc()}",
                  flush=True)
            continue
        record = {"study": study, "method": config["method"], "epsilon": config["epsilon"], "seed": config["seed"],
                  "epochs": config["epochs"], "lr": config["lr"], "accuracy": result["accuracy"],
                  "epsilon_spent": result["epsilon_spent"], "wall_s": time.perf_counter() - start,
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": machine(), "torch": torch.__version__, "fastdp_commit": commit(),
                  "config": config, **result}
        os.makedirs(os.path.dirname(out["jsonl"]) or ".", exist_ok=True)
        with open(out["jsonl"], "a") as f:
            f.write(json.dumps(record) + "\n")  # one write per line: parallel shards append whole lines
        acc = "diverged" if record["accuracy"] is None else f"{100 * record['accuracy']:.2f}%"
        print(f"[{tag} {k}/{len(todo)}] {desc}: accuracy {acc}, epsilon {record['epsilon_spent']:.3f}, "
              f"sigma {record['noise_multiplier']:.3f}, {record['wall_s']:.1f} s", flush=True)


# ------------------------------------------------------------------------------------------------ report
def _mean_std(values: Sequence[Optional[float]]):
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _cell(values: Sequence[Optional[float]]) -> str:
    m, s = _mean_std(values)
    if m is None:
        return "diverged" if values else "not run"
    n_div = sum(v is None for v in values)
    return f"{100 * m:.2f} ± {100 * s:.2f}" + (f" ({n_div} div.)" if n_div else "")


def _diff(a: Sequence[Optional[float]], b: Sequence[Optional[float]]):
    """(mean(a) - mean(b), its standard error) in accuracy points; None if either side is missing."""
    a, b = [v for v in a if v is not None], [v for v in b if v is not None]
    if not a or not b:
        return None
    se = math.sqrt((statistics.variance(a) / len(a) if len(a) > 1 else 0.0)
                   + (statistics.variance(b) / len(b) if len(b) > 1 else 0.0))
    return 100 * (statistics.fmean(a) - statistics.fmean(b)), 100 * se


def _verdict(d) -> str:
    if d is None:
        return "n/a"
    diff, se = d
    if se == 0:
        return f"{diff:+.2f} (one seed)"
    tag = "yes" if diff > 2 * se else ("no (reversed)" if diff < -2 * se else "within noise")
    return f"{diff:+.2f} ± {se:.2f}: {tag}"


def collect(args, study: str, records: List[dict]) -> Dict[tuple, List[dict]]:
    """(method, epsilon) -> the records of this study's configs (args-matching), in seed order."""
    by_key = {_key(r["config"]): r for r in records}
    rows: Dict[tuple, List[dict]] = {}
    for c in study_configs(args, study, records):
        r = by_key.get(_key(c))
        rows.setdefault((c["method"], c["epsilon"]), [])
        if r is not None:
            rows[(c["method"], c["epsilon"])].append(r)
    return rows


def _c0(args, study: str) -> dict:
    """A config of the study with the settings that all its runs share (for descriptions)."""
    return _config(args, study, STUDY[study]["methods"][0], _epsilons(args, study)[0], args.seeds[0], 0.0)


def _probe_lines(args, study: str, records: List[dict]) -> List[str]:
    configs = probe_configs(args, study)
    if not configs or study in args.lr:
        return []
    by_key = {_key(r["config"]): r for r in records}
    chosen = study_lr(args, study, records)
    c = configs[0]
    lines = [f"Learning-rate probe: DP-SGD, seed {args.probe_seed} (not a reported seed), epsilon {c['epsilon']:g}, "
             f"same epochs, trained on {100 * (1 - args.val_fraction):.0f}% of the training images and scored on "
             f"the held-out {100 * args.val_fraction:.0f}% (fixed random split; the test set is not used). The best "
             "lr is used by every method of the study"
             + (" except " + ", ".join(f"{m} ({v:g}, --lrs)" for m, v in args.lrs.items()) if args.lrs else "")
             + ".", "", "| lr | validation accuracy % | chosen |", "|---|---|---|"]
    for c in configs:
        r = by_key.get(_key(c))
        acc = "not run" if r is None else ("diverged" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}")
        lines.append(f"| {c['lr']:g} | {acc} | {'**yes**' if chosen == c['lr'] else ''} |")
    return lines + [""]


def _study_section(args, study: str, rows: Dict[tuple, List[dict]], png: str, records: List[dict]) -> List[str]:
    spec = STUDY[study]
    c0 = _c0(args, study)
    epsilons = sorted({e for _, e in rows})
    methods = list(dict.fromkeys(m for m, _ in rows))
    recs = [r for rs in rows.values() for r in rs]
    lines = [f"## {spec['title']}", ""]
    limit = (f", first {c0['limit']} training images" if c0["limit"] else "") + (
        f", scored on the first {c0['test_limit']} test images only" if c0.get("test_limit") else "")
    lines.append(f"`--study {study}`: {spec['dataset']}{limit}, model {c0['model']}, {c0['epochs']} epochs, expected "
                 f"batch {c0['batch_size']} (Poisson), C = {c0['max_grad_norm']:g}, delta = {c0['delta']:g}, "
                 f"{c0['accountant'].upper()} accountant, SGD momentum 0.9, constant lr "
                 + (", ".join(sorted({f'{r["method"]} {r["lr"]:g}' for r in recs})) or "(not chosen yet)")
                 + f"; seeds {', '.join(map(str, args.seeds))}.")
    kw = {m: method_kwargs(m, c0["epochs"], 0) for m in methods}
    kw_text = "; ".join(f"{m}: " + ", ".join(f"{k}={v}" for k, v in d.items() if k != "seed") for m, d in kw.items()
                        if any(k != "seed" for k in d))
    if kw_text:
        lines.append(f"Method settings: {kw_text}.")
    if study == "sparta":
        pre = c0["pretrain"]
        acc = next((r.get("pretrain_test_accuracy") for r in recs if r.get("pretrain_test_accuracy") is not None), None)
        lines.append(f"Public pre-training: non-private SGD (momentum 0.9, lr {pre['lr']:g}, batch {pre['batch_size']}) "
                     f"on {pre['dataset']}{' (first %d images)' % pre['limit'] if pre['limit'] else ''} for "
                     f"{pre['epochs']} epoch(s), seed {pre['seed']}"
                     + (f", MNIST test accuracy {100 * acc:.2f}%" if acc is not None else "")
                     + "; the head (fc 32 -> 10) is re-initialised per seed before private fine-tuning.")
    if c0["epochs"] < spec["epochs"]:
        lines.append(f"Budget: {c0['epochs']} epochs per run, fewer than this study's paper-like default of "
                     f"{spec['epochs']} (the papers also use their own batch sizes, clipping norms and epoch counts), "
                     "so absolute accuracies are not comparable with the papers'; the methods are compared with one "
                     "another at equal settings.")
    if recs:
        wall = sum(r["wall_s"] for r in recs)
        lines.append(f"{len(recs)} runs, {wall / 60:.1f} min of run wall time in total.")
    lines.append("")
    lines += _probe_lines(args, study, records)
    paper = PAPER[study]
    lines += ["| method | epsilon | test accuracy % (mean ± std) | n | per seed | paper | epsilon spent | sigma | "
              "trained coords (start / last step) | s / run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        for e in epsilons:
            rs = rows.get((m, e), [])
            accs = [r["accuracy"] for r in rs]
            per = ", ".join("div." if a is None else f"{100 * a:.2f}" for a in accs)
            p = paper.get((m, e))
            ptxt = "" if p is None else (f"≈{p:.2f} (derived)" if (study, m) == ("adadpigu", "dpsgd") else f"{p:g}")
            spent = max((r["epsilon_spent"] for r in rs), default=float("nan"))
            sig = rs[0]["noise_multiplier"] if rs else float("nan")
            tp = f"{rs[0]['trainable_params']} / {rs[0]['trainable_params_end']}" if rs else ""
            wall = statistics.fmean(r["wall_s"] for r in rs) if rs else float("nan")
            lines.append(f"| {LABELS[m]} | {e:g} | {_cell(accs)} | {len(rs)} | {per} | {ptxt} | {spent:.3f} | "
                         f"{sig:.3f} | {tp} | {wall:.0f} |")
    lines.append("")
    lines += _claims(study, rows, epsilons)
    lines += [f"![accuracy vs epsilon]({os.path.basename(png)})", ""]
    return lines


def _claims(study: str, rows, epsilons) -> List[str]:
    """The paper's claims, checked on these runs: difference of means ± standard error; 'yes' when > 2 SE."""
    acc = {k: [r["accuracy"] for r in v] for k, v in rows.items()}
    out = ["Paper's claims on these runs (difference of means in points ± its standard error; \"yes\" when the "
           "difference exceeds 2 SE in the claimed direction):", ""]
    if study == "rs":
        for e in epsilons:
            p = PAPER["rs"].get(("rs", e)), PAPER["rs"].get(("dpsgd", e))
            ptxt = f" (paper: {p[0] - p[1]:+.1f})" if None not in p else ""
            out.append(f"* epsilon {e:g}: RS > DP-SGD: {_verdict(_diff(acc.get(('rs', e), []), acc.get(('dpsgd', e), [])))}"
                       + ptxt)
    elif study == "adadpigu":
        for e in epsilons:
            out.append(f"* epsilon {e:g}: AdaDPIGU > DP-SGD: "
                       f"{_verdict(_diff(acc.get(('adadpigu', e), []), acc.get(('dpsgd', e), [])))} (paper: about +1.7)")
    else:
        pairs = [("sparta", "dpsgd"), ("dpsgd", "random-groups"), ("dpsgd", "bitfit"), ("random-groups", "last-layer"),
                 ("bitfit", "last-layer")]
        for e in epsilons:
            means = {m: _mean_std(v)[0] for (m, ee), v in acc.items() if ee == e and _mean_std(v)[0] is not None}
            order = " > ".join(LABELS[m] for m in sorted(means, key=lambda m: -means[m]))
            out.append(f"* epsilon {e:g}: ordering by mean: {order}")
            for a, b in pairs:
                out.append(f"  * {LABELS[a]} > {LABELS[b]}: {_verdict(_diff(acc.get((a, e), []), acc.get((b, e), [])))}")
            rg, bf = _diff(acc.get(("random-groups", e), []), acc.get(("bitfit", e), [])) or (None, None)
            if rg is not None:
                out.append(f"  * Random groups ~ DP-BiTFiT: difference {rg:+.2f} ± {bf:.2f}")
        out += ["", "The paper's ordering SPARTA > DP-SGD > Random groups ~ DP-BiTFiT > Last layer comes from its "
                "Table 1 (seed summary; ResNet18 pre-trained on CIFAR-100, fine-tuned on CIFAR-10, epsilon 2): "
                + ", ".join(f"{LABELS[m]} {v:g}" for m, v in SPARTA_TABLE1.items())
                + ". No paper numbers exist for this MNIST -> Fashion-MNIST setting."]
    out.append("")
    return out


def write_report(args, studies: Sequence[str], out: Dict[str, str]) -> Dict[str, dict]:
    records = [r for r in load_records(out["jsonl"]) if r.get("status") in ("ok", "diverged")]
    one = next(iter(records), None)
    lines = ["# Utility of the sparse DP methods against DP-SGD (RS, AdaDPIGU, SPARTA)", "",
             "`python -m fastdp.bench.studies.utility_methods` (`fastdp/bench/studies/utility_methods.py`); raw runs: `methods.jsonl` (one "
             "JSON line per run). Accuracy is top-1 on the test set (all 10,000 images unless a section says "
             "otherwise), in %; mean ± sample standard deviation (n - 1) over seeds. Learning rates are constant; "
             "each section lists them.", "",
             "Model DP-CNN/S (`--model dpcnn-s`, 26,010 parameters): conv 16 8x8 stride 2 pad 3, tanh, max-pool 2 "
             "stride 1, conv 32 4x4 stride 2, tanh, max-pool 2 stride 1, linear 512 -> 32, tanh, linear 32 -> 10 "
             "(Papernot et al. 2020 / Tramer & Boneh 2021; the RS paper's DP-CNN/S for Fashion-MNIST).", ""]
    if one:
        mach = one["machine"]
        lines += [f"Machine: {mach['cpu']} ({mach['cpu_count']} cores, {mach['torch_threads']} torch thread(s) per "
                  f"run), torch {one['torch']}, fastdp {one.get('fastdp_commit')}.", ""]
    summary = {}
    for study in studies:
        rows = collect(args, study, records)
        summary[study] = {k: [r["accuracy"] for r in v] for k, v in rows.items()}
        lines += _study_section(args, study, rows, out[f"png_{study}"], records)
        _plot(args, study, rows, out[f"png_{study}"])
    os.makedirs(os.path.dirname(out["md"]) or ".", exist_ok=True)
    write_text("\n".join(lines), out["md"])
    return summary


def _plot(args, study: str, rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    methods = list(dict.fromkeys(m for m, _ in rows))
    epsilons = sorted({e for _, e in rows})
    n_m = max(1, len(methods))
    span = (max(epsilons) - min(epsilons)) if len(epsilons) > 1 else 1.0
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for e in epsilons:
            mean, std = _mean_std([r["accuracy"] for r in rows.get((m, e), [])])
            if mean is not None:
                xs.append(e + (i - (n_m - 1) / 2) * 0.012 * span)  # small dodge so error bars do not overlap
                ys.append(100 * mean)
                es.append(100 * std)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, color=f"C{i}", label=f"{LABELS[m]} (ours)")
        px = [(e, PAPER[study][(m, e)]) for e in epsilons if (m, e) in PAPER[study]]
        if px:
            ax.plot([e for e, _ in px], [v for _, v in px], linestyle="--", marker="s", mfc="none", color=f"C{i}",
                    label=f"{LABELS[m]} (paper)")
    ax.set_xticks(epsilons)
    if len(epsilons) == 1:
        ax.set_xlim(epsilons[0] - 0.5, epsilons[0] + 0.5)
    else:
        ax.set_xlim(min(epsilons) - 0.15 * span, max(epsilons) + 0.15 * span)
    ax.set_xlabel("epsilon (delta = %g)" % args.delta)
    ax.set_ylabel("test accuracy (%)")
    c0 = _c0(args, study)
    ax.set_title(f"{study}: {STUDY[study]['dataset']}, {c0['model']}, {c0['epochs']} epochs"
                 + (f", {c0['limit']} images" if c0["limit"] else "") + f", mean ± std over {len(args.seeds)} seed(s)",
                 fontsize=9)
    ax.grid(alpha=0.3)
    if methods:
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    with torch_threads(args.threads):
        return _main(args)


def _main(args) -> dict:
    out = paths(args.out_dir)
    studies = STUDIES if args.study == "all" else (args.study,)
    start = time.perf_counter()
    if not args.report_only:
        for study in studies:
            run_study(args, study, out)
    summary = None
    if not args.no_report:
        summary = write_report(args, studies, out)
        print(f"wrote {out['md']} and " + ", ".join(out[f"png_{s}"] for s in studies), flush=True)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    return {"paths": out, "summary": summary}


if __name__ == "__main__":
    main(sys.argv[1:])
