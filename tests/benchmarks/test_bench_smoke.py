"""Smoke run of the GPU step benchmark on the CPU with tiny models (the CI signal for fastdp/bench/gpu_step.py)."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
from fastdp.bench import gpu_step  # noqa: E402


def test_gpu_step_cpu_tiny(tmp_path):
    threads = torch.get_num_threads()
    try:  # one thread: on a loaded 2-core CI box, 2 OpenMP threads made these tiny steps up to 100x slower
        result = gpu_step.main(["--device", "cpu", "--tiny", "--steps", "2", "--warmup", "1", "--workloads", "gpt2,wrn",
                                "--threads", "1", "--out-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    json_path, md_path = result["paths"]
    assert os.path.dirname(json_path) == str(tmp_path) and os.path.exists(md_path)
    with open(json_path) as f:
        saved = json.load(f)
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    rows = saved["rows"]
    for workload in ("gpt2", "wrn"):
        mine = [r for r in rows if r["workload"] == workload]
        assert {(r["dtype"], r["variant"]) for r in mine} == {(d, v) for d in ("fp32", "bf16") for v in ("nonprivate", "fastdp")}
        for r in mine:
            assert r["status"] == "ok", (workload, r["dtype"], r["variant"], r.get("error"), r.get("traceback"))
            assert r["median_ms"] > 0 and r["p20_ms"] > 0 and r["p80_ms"] >= r["p20_ms"] and r["steps"] == 2
            assert r["peak_mem_bytes"] is None  # no CUDA memory stats on the CPU
            assert r["time_ratio"] > 0
            assert 1.0 < r["floor_ratio"] < 1.34
        assert 1.0 < saved["floor"][workload]["floor_ratio"] < 1.34
        # same initial weights and batch: the first loss does not depend on the variant
        for dtype in ("fp32", "bf16"):
            np_row, dp_row = (next(r for r in mine if r["dtype"] == dtype and r["variant"] == v) for v in ("nonprivate", "fastdp"))
            assert dp_row["loss_first"] == pytest.approx(np_row["loss_first"], rel=1e-5)


def test_micro_adam_bench_smoke(tmp_path):
    """The MicroAdam benchmark runs end to end (tiny shapes; Triton through the interpreter on the CPU)."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 on the CPU")
    from fastdp.bench import bench_micro_adam

    out = tmp_path / "m.json"
    res = bench_micro_adam.main(["--device", "cuda" if torch.cuda.is_available() else "cpu", "--tiny",
                                 "--steps", "1", "--warmup", "0", "--kernel-n", "3000", "--out", str(out)])
    assert out.exists()
    rows = {r["optimizer"]: r for r in res["optimizers"]}
    assert all("error" not in r and r["step_ms"] > 0 for r in rows.values()), rows
    assert rows["adam_foreach"]["state_bytes_per_param"] == 8
    assert 0.85 < rows["microadam_frugal"]["state_bytes_per_param"] < 0.95
    assert all("triton_ms" in k and "reference_ms" in k for k in res["kernels"]), res["kernels"]


def test_micro_adam_bench_repeats_in_processes(tmp_path):
    """``--processes 2``: two fresh runs, every optimizer's ratio per run and their median; on the CPU the compiled
    and the PyTorch fused steps are both timed and say which ran."""
    from fastdp.bench import bench_micro_adam
    from fastdp.kernels.microadam_cpu import HAS_NUMBA

    out = tmp_path / "r.json"
    res = bench_micro_adam.main(["--device", "cpu", "--shapes", "tiny", "--steps", "2", "--warmup", "0",
                                 "--processes", "2", "--out", str(out)])
    assert out.exists() and (tmp_path / "r.md").exists() and len(res["runs"]) == 2
    rows = {r["optimizer"]: r for r in res["summary"]}
    assert rows["adam_foreach"]["ratio_runs"] == [1.0, 1.0]
    for name in ("microadam_dp_default", "microadam_frugal"):
        assert len(rows[name]["ratio_runs"]) == 2 and rows[name]["ratio_min"] <= rows[name]["ratio_median"]
        assert rows[name]["impl"] == ("numba" if HAS_NUMBA else "torch")
        assert rows[name + "_torch"]["impl"] == "torch"
