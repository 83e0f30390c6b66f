"""fastdp/bench/compile_check.py: the engine's kernels compile for the H100 (sm_90) on a machine without a GPU, and
16-bit dots at 64-wide tiles lower to Hopper tensor-core instructions (wgmma)."""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/benchmarks/ -> the checkout
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@pytest.mark.skipif(not os.path.exists(os.path.join(NVIDIA_BIN, "cuobjdump")),
                    reason="this Triton wheel has no CUDA toolchain (ptxas, cuobjdump)")
def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "fastdp.bench.compile_check", "--kernels", "clip_factor,direct_norm",
                           "--dtypes", "bf16", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["clip_factor"] + ["direct_norm"] * 4  # every tile candidate
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    for r in rows:
        assert r["registers"] > 0 and r["spill_bytes"] == 0 and r["shared_fits"], r
        assert r["fp_fusion"] is False  # kernels._common.LAUNCH_OPTIONS reached the compiler
    by_tile = {r["tile"]: r for r in rows if r["name"] == "direct_norm"}
    assert by_tile["BM=64,BN=64,BT=32,w4,s3"]["wgmma"] > 0  # Hopper tensor cores
    assert by_tile["BM=32,BN=32,BT=32,w4,s2"]["mma_sync"] > 0  # 32-wide tiles: Ampere-style mma
