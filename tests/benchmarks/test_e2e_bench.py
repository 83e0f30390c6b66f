"""CPU smoke test of the end-to-end benchmark (fastdp/bench/e2e.py): the code path, not the numbers.

Tiny workloads, one torch thread, one warm-up and one timed step per variant: every variant's rows, failure rows (a
variant forced to raise, Opacus ghost refusing GPT-2's tied weights), the JSON/CSV/MD/PNG outputs, the launch
counts, and the largest-batch search (pure logic with an injected memory limit, and wired to real CPU steps).
"""
import csv
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
from fastdp.bench import e2e  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/benchmarks/ -> the checkout

TINY = ["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "1", "--threads", "1"]
try:  # the [bench] extra, not the [test] one: without it the plots are skipped with that reason
    import matplotlib  # noqa: F401
    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()  # one thread: on a loaded 2-core box, 2 OpenMP threads made tiny steps crawl
    yield
    torch.set_num_threads(threads)


def _boom(model, workload, loss_fn, batch_size, device):
    raise RuntimeError("forced failure for the test")


def test_every_variant_and_a_forced_failure_on_wrn(tmp_path, monkeypatch, restore_threads):
    monkeypatch.setitem(e2e.VARIANTS, "boom", e2e.Variant(_boom, "raises on purpose"))
    names = [v for v in e2e.VARIANTS if v != "boom"]
    result = e2e.main(TINY + ["--workloads", "wrn", "--dtypes", "fp32", "--batch", "wrn=2", "--no-launches",
                              "--variants", ",".join(names + ["boom"]), "--out-dir", str(tmp_path)])
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == names + ["boom"]  # one row per variant, in order, failures included
    assert rows["boom"]["status"] == "error" and "forced failure for the test" in rows["boom"]["error"]
    assert "RuntimeError" in rows["boom"]["traceback"]
    for v in names:
        r = rows[v]
        assert r["status"] == "ok", (v, r.get("error"), r.get("traceback"))
        assert r["median_ms"] > 0 and r["p80_ms"] >= r["p20_ms"] > 0 and r["steps"] == 1 and r["batch_size"] == 2
        assert r["peak_mem_bytes"] is None and r["time_ratio"] > 0 and "mem_ratio" not in r
        assert r["first_step_ms"] > 0 and r["peak_mem_warmup_bytes"] is None
        assert 1.0 < r["floor_ratio"] < 1.34 and r["measures"] == e2e.VARIANTS[v].measures
        assert r["loss_first"] == pytest.approx(rows["nonprivate"]["loss_first"], rel=1e-5)  # same model and batch
    assert rows["nonprivate"]["time_ratio"] == 1.0 and rows["nonprivate"]["trained_fraction"] == 1.0
    assert rows["sparta"]["phase"] == "sparse" and rows["adadpigu"]["phase"] == "sparse"
    assert 0.2 < rows["sparta"]["trained_fraction"] < 0.3  # 20% of conv rows, plus head, biases, norms
    assert rows["rs"]["trained_fraction"] == pytest.approx(0.1, abs=1e-3)
    assert rows["adadpigu"]["trained_fraction"] == pytest.approx(0.6, abs=1e-3)
    assert rows["last-layer"]["trained_fraction"] < rows["bitfit"]["trained_fraction"] < 0.05
    assert rows["sparta"]["claim"] == e2e.SPARTA_CLAIM and isinstance(rows["sparta"]["claim_holds"], bool)
    md = open(result["paths"][2]).read()
    assert "boom B=2: error: RuntimeError: forced failure for the test" in md and e2e.SPARTA_CLAIM in md


def test_gpt2_outputs_launches_failure_rows_and_max_batch(tmp_path, restore_threads):
    variants = ["nonprivate", "fastdp", "opacus-hooks", "opacus-ghost"]
    result = e2e.main(TINY + ["--workloads", "gpt2", "--dtypes", "bf16", "--batch-sizes", "gpt2=2:3", "--variants",
                              ",".join(variants), "--max-batch", "--max-batch-cap", "4", "--max-batch-variants",
                              "nonprivate,opacus-ghost", "--out-dir", str(tmp_path)])
    stem = str(tmp_path / f"e2e_{result['env']['date']}_cpu_tiny")
    pngs = ("_time_ratio.png", "_throughput.png") if HAVE_MATPLOTLIB else ()
    assert result["paths"] == [stem + s for s in (".json", ".csv", ".md") + pngs]
    assert all(os.path.getsize(p) > 0 for p in result["paths"])
    if HAVE_MATPLOTLIB:
        assert result["plots"]["mem_ratio"].startswith("skipped: no mem_ratio")  # no memory accounting on the CPU
    else:  # said in the output, not dropped silently
        assert all(v.startswith("skipped: matplotlib is not importable") for v in result["plots"].values())
    rows = result["rows"]
    assert [(r["batch_size"], r["variant"]) for r in rows] == [(b, v) for b in (2, 3) for v in variants]
    for r in rows:
        if r["variant"] == "opacus-ghost":  # Opacus' own message, as a row
            assert r["status"] == "error" and "Parameter tying is not supported with Ghost Clipping" in r["error"]
            continue
        assert r["status"] == "ok", (r["variant"], r.get("error"), r.get("traceback"))
        assert r["cuda_kernels_per_step"] is None and r["aten_ops_per_step"] > 50  # CPU: aten ops, no kernels
        # explicit [B, T] position ids for Opacus give the same loss as the stock call
        ref = next(x for x in rows if x["variant"] == "nonprivate" and x["batch_size"] == r["batch_size"])
        assert r["loss_first"] == pytest.approx(ref["loss_first"], rel=1e-5)
    assert rows[2]["aten_ops_per_step"] > rows[0]["aten_ops_per_step"]  # Opacus hooks dispatch more than plain SGD
    mb = {e["variant"]: e for e in result["max_batch"]}
    assert mb["nonprivate"]["status"] == "capped" and mb["nonprivate"]["max_batch"] == 4
    assert [p["batch_size"] for p in mb["nonprivate"]["probes"]] == [2, 4]  # B=2 from the timing row, then doubled
    assert mb["opacus-ghost"]["status"] == "error" and mb["opacus-ghost"]["max_batch"] is None
    with open(stem + ".json") as f:
        saved = json.load(f)
    assert saved["env"]["versions"]["opacus"] and saved["env"]["date"] == result["env"]["date"]
    assert "git_commit" in saved["env"] and saved["config"]["device"] == "cpu"
    assert [r["variant"] for r in saved["rows"]] == [r["variant"] for r in rows]
    with open(stem + ".csv") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == [r["variant"] for r in rows] and table[0]["opacus"]
    assert table[3]["status"] == "error" and "Parameter tying" in table[3]["error"]
    md = open(stem + ".md").read()
    assert "time × nonprivate" in md and "Largest batch that fits" in md and "smoke run" in md
    again = e2e.main(["--from-json", stem + ".json", "--out-dir", str(tmp_path / "redo")])  # outputs from the JSON
    assert [os.path.basename(p) for p in again["paths"]] == [os.path.basename(p) for p in result["paths"]]
    assert open(again["paths"][2]).read() == md


def _fake_run(fit_below=None, peak_per_sample=100, base=1000, error_at=None):
    """run_at(B) for search_max_batch: OOM at B >= fit_below, a non-OOM error at error_at; peak = base + B * per."""
    calls = []

    def run_at(b):
        calls.append(b)
        if error_at is not None and b >= error_at:
            return {"status": "error", "error": "ValueError: unsupported"}
        if fit_below is not None and b >= fit_below:
            return {"status": "oom", "error": "OutOfMemoryError: CUDA out of memory"}
        return {"status": "ok", "peak_mem_bytes": base + b * peak_per_sample, "median_ms": 1.0}
    return run_at, calls


@pytest.mark.parametrize("limit_samples", [1, 37, 64, 100, 333])
def test_max_batch_search_with_injected_memory_limit(limit_samples):
    run_at, calls = _fake_run()
    out = e2e.search_max_batch(run_at, 8, 1000, mem_limit_bytes=1000 + 100 * limit_samples, resolution=0.0)
    assert out["status"] == "ok" and out["max_batch"] == limit_samples and out["first_fail"] == limit_samples + 1
    assert len(calls) == len(set(calls)) <= 2 * (limit_samples.bit_length() + 4)  # doubling + bisection
    assert [p["over_limit"] for p in out["probes"]] == [b > limit_samples for b in calls]


def test_max_batch_search_counts_the_warmup_peak():
    """A batch whose first step (autotuning copies, lazy state) goes over the limit does not fit, even when its
    timed steps stay under it."""
    def run_at(b):
        return {"status": "ok", "peak_mem_bytes": 100 * b, "peak_mem_warmup_bytes": 100 * b + (500 if b > 8 else 0)}
    out = e2e.search_max_batch(run_at, 4, 1000, mem_limit_bytes=1500, resolution=0.0)
    assert out["max_batch"] == 10 and out["first_fail"] == 11  # 100 * 10 + 500 <= 1500 < 100 * 11 + 500


def test_max_batch_search_oom_cap_error_and_resolution():
    run_at, calls = _fake_run(fit_below=50)
    out = e2e.search_max_batch(run_at, 4, 1000, resolution=0.0)
    assert (out["max_batch"], out["first_fail"], out["status"]) == (49, 50, "ok")
    run_at, calls = _fake_run(fit_below=50)
    coarse = e2e.search_max_batch(run_at, 4, 1000, resolution=0.25)
    assert coarse["max_batch"] <= 49 < coarse["first_fail"] <= coarse["max_batch"] * 1.25 + 1
    assert len(calls) < len(out["probes"])
    run_at, calls = _fake_run()
    assert e2e.search_max_batch(run_at, 4, 20)["status"] == "capped" and calls == [4, 8, 16, 20]
    run_at, _ = _fake_run(fit_below=1)
    assert e2e.search_max_batch(run_at, 4, 20) | {"probes": None} == {
        "max_batch": None, "first_fail": 1, "status": "none fits", "probes": None}
    run_at, calls = _fake_run(error_at=16)
    err = e2e.search_max_batch(run_at, 4, 100)
    assert err["status"] == "error" and "unsupported" in err["error"] and err["max_batch"] == 8 and calls == [4, 8, 16]
    run_at, calls = _fake_run()
    known = {4: {"status": "ok", "peak_mem_bytes": 1400}}
    assert e2e.search_max_batch(run_at, 4, 8, known=known)["max_batch"] == 8 and calls == [8]


def test_time_budget_turns_runs_into_skipped_rows(tmp_path, restore_threads):
    result = e2e.main(TINY + ["--workloads", "wrn", "--dtypes", "fp32", "--variants", "nonprivate,fastdp",
                              "--time-budget", "0", "--out-dir", str(tmp_path)])
    assert [r["status"] for r in result["rows"]] == ["skipped", "skipped"]
    assert all("time budget" in r["error"] for r in result["rows"])


def test_from_json_renders_the_earlier_gpu_step_results(tmp_path):
    """The H100 v3 results (written by the earlier gpu_step harness) render with --from-json: table and plots."""
    src = os.path.join(REPO_ROOT, "benchmarks", "results", "h100_2026-11-26_v3", "gpu_step_2026-11-26.json")
    result = e2e.main(["--from-json", src, "--out-dir", str(tmp_path)])
    md = open(tmp_path / "gpu_step_2026-11-26.md").read()
    assert "H100" in md and md.count("| fastdp |") == 6  # 3 workloads x 2 dtypes
    vit = next(r for r in result["rows"] if (r["workload"], r["dtype"], r["variant"]) == ("vit", "fp32", "fastdp"))
    assert vit["time_ratio"] == pytest.approx(1.303, abs=1e-3)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "gpu_step_2026-11-26_time_ratio.png").read_bytes()[:4] == b"\x89PNG"
