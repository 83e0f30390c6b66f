"""fastdp/bench/timing.py: the one timing method of the benchmark scripts, and the scripts that use it."""
import ast
import json
import os
import statistics
import time

import pytest
import torch

from fastdp.bench import timing

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "fastdp", "bench")


def test_time_calls_warms_up_then_times_each_call():
    calls = []

    def fn():
        calls.append(len(calls))
        time.sleep(0.002)
        return len(calls)

    t = timing.time_calls(fn, "cpu", steps=5, warmup=2)
    assert len(calls) == 7 and len(t.times_ms) == 5
    assert t.first == 1 and t.last == 7 and t.first_ms >= 2.0  # the first warm-up call's result and wall time
    assert all(ms >= 2.0 for ms in t.times_ms)
    s = t.summary()
    assert set(s) == {"median_ms", "min_ms", "p20_ms", "p80_ms", "steps"} and s["steps"] == 5
    assert s["min_ms"] <= s["p20_ms"] <= s["median_ms"] <= s["p80_ms"]
    assert s["median_ms"] == statistics.median(t.times_ms) and s["min_ms"] == min(t.times_ms)


def test_no_warmup_and_percentiles():
    t = timing.time_calls(lambda: None, torch.device("cpu"), steps=1, warmup=0)
    assert t.first_ms is None and len(t.times_ms) == 1
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert [timing.percentile(xs, q) for q in (0.0, 0.2, 0.5, 0.8, 1.0)] == [1.0, 1.8, 3.0, 4.2, 5.0]
    assert timing.percentile([1.0, 2.0], 0.5) == statistics.median([1.0, 2.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events")
def test_cuda_events_time_device_work():
    x = torch.randn(2048, 2048, device="cuda")
    t = timing.time_calls(lambda: x @ x, "cuda", steps=3, warmup=1)
    assert len(t.times_ms) == 3 and t.min_ms > 0


def _calls(path):
    """Dotted names of the functions a module calls (``time.perf_counter``, ``torch.cuda.Event``, ...)."""
    def name(node):
        return f"{name(node.value)}.{node.attr}" if isinstance(node, ast.Attribute) else getattr(node, "id", "?")
    with open(path) as f:
        tree = ast.parse(f.read())
    return {name(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}


def test_every_benchmark_script_times_with_the_shared_harness():
    """No clock, CUDA event or median of its own in a benchmark script: they all go through ``timing``
    (``compile_check`` reads the clock once per compilation it reports, not a benchmark timing; the accuracy studies
    record their wall time)."""
    own = {"time.perf_counter", "time.time", "torch.cuda.Event", "statistics.median"}
    for name in sorted(os.listdir(BENCH)):
        if name.endswith(".py") and name not in ("timing.py", "compile_check.py", "check_norms.py"):
            assert not own & _calls(os.path.join(BENCH, name)), name
    assert {"e2e.py", "cpu_transformer_step.py", "bench_conv_norm.py", "bench_micro_adam.py"} <= {
        name for name in os.listdir(BENCH) if name.endswith(".py") and "timing" in open(os.path.join(BENCH, name)).read()}


def test_cpu_transformer_step_smoke(tmp_path):
    from fastdp.bench import cpu_transformer_step

    threads = torch.get_num_threads()
    out = tmp_path / "cpu.json"
    try:
        res = cpu_transformer_step.main(["--steps", "2", "--warmup", "1", "--threads", "1", "--batch", "2", "--seq", "8",
                                         "--variants", "nonprivate,fastdp", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text())["rows"] == res["rows"]
    for r in res["rows"]:
        assert set(r) == {"variant", "median_ms", "p20_ms", "p80_ms", "ratio_to_nonprivate", "steps"}
        assert r["steps"] == 2 and 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    assert res["rows"][0]["ratio_to_nonprivate"] == 1.0


def test_bench_conv_norm_smoke(capsys, monkeypatch):
    from fastdp.bench import bench_conv_norm

    monkeypatch.setattr(bench_conv_norm, "SHAPES", bench_conv_norm.SHAPES[:2])
    monkeypatch.setenv("FASTDP_BACKEND", "reference")  # main() sets it: restored after the test
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # main() turns both off
    try:
        bench_conv_norm.main(["--device", "cpu", "--batch", "2", "--dtypes", "fp32"])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("fp32")]
    assert len(rows) == 2 and all(float(ms) > 0 for ms in rows[0][5:9])  # wgrad, grouped, unfold, ghost
