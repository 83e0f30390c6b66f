"""``fastdp audit``: the one-run privacy audit (``fastdp.audit.audit``) of one method on an image dataset, with the
report (eps_lower against the claimed epsilon, the guesses, the command to reproduce) printed and written to
``--out-dir`` as ``audit.txt``, ``audit.json`` and ``audit_scores.png`` (the score histograms; skipped with a note
without matplotlib).

Examples::

    fastdp audit --dataset digits --method dpsgd --target-epsilon 8 --canaries 2000 --epochs 10
    fastdp audit --dataset digits --method sparta --target-epsilon 4 --batch-size 512 --epochs 3
    fastdp audit --threat black-box-loss --canaries 200 --target-epsilon 8
"""
from __future__ import annotations

import argparse
import math
import secrets
import shlex
import warnings
from typing import Sequence

from fastdp.audit.api import THREATS, audit
from fastdp.audit.report import save_report
from fastdp.audit.training import METHODS
from fastdp.data import DATASETS, load_dataset
from fastdp.models import MLP, SmallCNN


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v
    parse.__name__ = kind.__name__
    return parse


def build_parser(prog: str = "fastdp audit") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Empirical privacy audit with one training run (Steinke, Nasr and Jagielski 2023): "
        "train with canaries, guess which were included, and report the epsilon lower bound next to the "
        "accountant's epsilon.")
    p.add_argument("--dataset", choices=DATASETS, default="digits", help="(default: %(default)s)")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="folder with mnist.npz / fashion_mnist.npz")
    p.add_argument("--limit", type=_positive(int), default=None, metavar="N", help="use the first N training samples")
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="(default: %(default)s)")
    p.add_argument("--hidden", type=_positive(int), default=64, help="MLP hidden width (default: %(default)s)")
    p.add_argument("--method", choices=METHODS, default="dpsgd", help="(default: %(default)s)")
    p.add_argument("--threat", choices=THREATS, default="white-box-gradient", help="(default: %(default)s)")
    p.add_argument("--canaries", type=_positive(int), default=1000, help="(default: %(default)s)")
    p.add_argument("--epochs", type=_positive(int), default=10, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=_positive(int), default=None, metavar="B",
                   help="expected batch size; sample rate B / (n + canaries) (default: all, sample rate 1)")
    eps = p.add_mutually_exclusive_group(required=True)
    eps.add_argument("--target-epsilon", type=_positive(float), default=None, metavar="EPS")
    eps.add_argument("--noise-multiplier", type=_positive(float), default=None, metavar="SIGMA")
    p.add_argument("--max-grad-norm", type=_positive(float), default=1.0, metavar="R", help="(default: %(default)s)")
    p.add_argument("--delta", type=_positive(float), default=1e-5, help="(default: %(default)g)")
    p.add_argument("--confidence", type=_positive(float), default=0.95, help="(default: %(default)s)")
    p.add_argument("--lr", type=_positive(float), default=None)
    p.add_argument("--accountant", choices=("prv", "rdp"), default="prv", help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=None,
                   help="derives every random stream; default: a fresh one, printed in the reproduce line")
    p.add_argument("--no-subtract-data", action="store_true",
                   help="white-box: do not subtract the non-canary data's expected clipped sum from the scores")
    p.add_argument("--out-dir", default="fastdp-audit", metavar="DIR", help="(default: %(default)s)")
    return p


def main(argv: Sequence[str], prog: str = "fastdp audit") -> dict:
    """Run ``fastdp audit``; returns {"eps_lower", "epsilon", "report", "files"}."""
    args = build_parser(prog).parse_args(list(argv))
    if not 0 < args.confidence < 1:
        build_parser(prog).error(f"--confidence must be in (0, 1), got {args.confidence}")
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    argv = [a for a in argv]
    if args.seed is None:
        argv += ["--seed", str(seed)]
    command = shlex.join([*prog.split(), *argv])
    train, _, meta = load_dataset(args.dataset, args.data_dir, limit=args.limit)
    c, h, w = meta["image_shape"]

    def model_fn():
        if args.model == "mlp":
            return MLP(c * h * w, meta["num_classes"], hidden=(args.hidden,))
        return SmallCNN(in_channels=c, num_classes=meta["num_classes"], width=16, image_size=h)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="divide by zero", category=RuntimeWarning)  # opacus' PRV at rate 1
        result = audit(model_fn, train, canaries=args.canaries, threat=args.threat, method=args.method,
                       epochs=args.epochs, expected_batch_size=args.batch_size, noise_multiplier=args.noise_multiplier,
                       target_epsilon=args.target_epsilon, max_grad_norm=args.max_grad_norm, delta=args.delta,
                       confidence=args.confidence, seed=seed, lr=args.lr, accountant=args.accountant,
                       subtract_data=not args.no_subtract_data, command=command)
    files = save_report(result, args.out_dir)
    text = result.report() + (f"\nplot: {files['note']}" if files["note"] else f"\nplot: {files['png']}")
    print(text)
    return {"eps_lower": result.eps_lower, "epsilon": result.epsilon, "report": text, "files": files,
            "result": result}

