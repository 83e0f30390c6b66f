"""``fastdp train --nproc N`` and the DDP example run end to end on the CPU (gloo), as a user starts them."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import fastdp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo is needed")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(args, timeout=240):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def _value(out: str, key: str) -> str:
    m = re.search(rf"^{key}: (\S+)", out, re.M)
    assert m, out
    return m.group(1)


def test_fastdp_train_on_two_ranks_accounts_the_global_rate():
    two = _run(["-m", "fastdp", "train", "--epochs", "1", "--limit", "400", "--no-progress", "--reproducible",
                "--model", "mlp", "--nproc", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    # 400 samples, batch size 128: 4 steps at the global rate 1/4 (not a rank's shard), calibrated to epsilon 3
    assert "sample_rate 0.25, expected batch size 100, 4 steps per epoch" in two.stdout, two.stdout
    sigma = fastdp.get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.25, steps=4)
    assert _value(two.stdout, "noise_multiplier") == f"{sigma:.4f}"
    assert float(_value(two.stdout, "epsilon")) == pytest.approx(3.0, abs=0.011)
    assert float(_value(two.stdout, "test_accuracy")) > 0.15  # it learns something in 4 steps (chance: 0.1)
    assert two.stdout.count("test_accuracy:") == 1  # rank 0 prints, rank 1 is silent


def test_checkpoints_are_refused_on_several_ranks(monkeypatch, tmp_path, capsys):
    from fastdp.cli import build_parser
    from fastdp.train_distributed import start_ranks
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun starts each rank
    args = build_parser().parse_args(["train", "--checkpoint-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        start_ranks(args, torch.device("cpu"), args.error)  # the parser's error(): before any process group
    assert "--checkpoint-dir is not supported with --nproc" in capsys.readouterr().err


def test_ddp_example_trains_on_two_ranks():
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              os.path.join(ROOT, "examples", "ddp_image_classifier.py"), "--epochs", "1", "--limit", "400"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks" in r.stdout and re.search(r"epoch 1: test accuracy \S+, epsilon \S+", r.stdout), r.stdout


def test_fsdp2_gpt2_example_trains_on_two_ranks():
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              os.path.join(ROOT, "examples", "fsdp2_gpt2_finetune.py"), "--samples", "64", "--batch-size", "16",
              "--length", "16"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks (FSDP2)" in r.stdout and re.search(r"epsilon \S+ \(delta 1e-5\)", r.stdout), r.stdout
