"""CI signal for the kernel microbenchmarks (``benchmarks/micro``): every variant runs once on tiny shapes with its
result checked (Triton kernels through the interpreter on the CPU), and a short timing run writes the JSON with the
work and rates in ``extra_info``."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fastdp.kernels._backend import HAS_TRITON

pytest.importorskip("pytest_benchmark")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/benchmarks/ -> the checkout


def _pytest(*args):
    env = dict(os.environ, FASTDP_MICRO_SHAPES="tiny")
    env.pop("FASTDP_BACKEND", None)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/micro", "-q", "-rs", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def test_every_variant_runs_once_and_is_checked():
    out = _pytest("--benchmark-disable")
    assert int(re.search(r"(\d+) passed", out).group(1)) >= 61, out[-3000:]
    if HAS_TRITON:  # the Triton variants ran (through the interpreter on the CPU)
        assert "timed on CUDA only" not in out, out[-3000:]


def test_timing_run_records_work_and_rates(tmp_path):
    path = tmp_path / "micro.json"
    _pytest("-k", "test_ghost_norm or test_masked_noise", "--benchmark-only", "--benchmark-max-time=0.01",
            "--benchmark-min-rounds=1", f"--benchmark-json={path}")
    benches = json.loads(path.read_text())["benchmarks"]
    impls = {(b["extra_info"]["op"], b["extra_info"]["impl"]) for b in benches}
    assert {("ghost_norm", "reference"), ("ghost_norm", "naive"), ("masked_noise", "reference")} <= impls
    for b in benches:
        info = b["extra_info"]
        assert info["op_bytes"] > 0 and info["mean_s"] == pytest.approx(b["stats"]["mean"])
        assert info["achieved_gbs"] == pytest.approx(info["op_bytes"] / info["mean_s"] / 1e9)
        if info["op"] == "ghost_norm":
            assert info["achieved_tflops"] > 0 and info["max_rel_err"] <= {"fp32": 1e-5, "bf16": 1e-2}[info["dtype"]]
