"""``fastdp train --nproc N`` and the DDP example run end to end on the CPU (gloo), as a user starts them."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo is needed")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(args, timeout=240):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def _value(out: str, key: str) -> str:
    m = re.search(rf"^{key}: (\S+)", out, re.M)
    assert m, out
    return m.group(1)


def test_fastdp_train_on_two_ranks_accounts_as_one_process():
    common = ["train", "--epochs", "1", "--limit", "400", "--no-progress", "--reproducible", "--model", "mlp"]
    two = _run(["-m", "fastdp", *common, "--nproc", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    one = _run(["-m", "fastdp", *common])
    assert one.returncode == 0, one.stderr[-3000:]
    # the same global sample rate, noise and steps: the same epsilon and noise multiplier
    assert _value(two.stdout, "epsilon") == _value(one.stdout, "epsilon")
    assert _value(two.stdout, "noise_multiplier") == _value(one.stdout, "noise_multiplier")
    assert float(_value(two.stdout, "test_accuracy")) > 0.15  # it learns something in 4 steps (chance: 0.1)
    assert two.stdout.count("test_accuracy:") == 1  # rank 0 prints, rank 1 is silent


def test_checkpoints_are_refused_on_several_ranks(tmp_path):
    r = _run(["-m", "fastdp", "train", "--nproc", "2", "--epochs", "1", "--limit", "200", "--no-progress",
              "--checkpoint-dir", str(tmp_path)])
    assert r.returncode != 0 and "--checkpoint-dir is not supported with --nproc" in r.stderr


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
