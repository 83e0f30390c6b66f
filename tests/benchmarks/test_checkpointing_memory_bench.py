"""Toy-size run of ``fastdp.bench.checkpointing_memory`` (the code path and the result file, not the numbers)."""
import json
import sys

import pytest

pytest.importorskip("transformers")
from fastdp.bench import checkpointing_memory  # noqa: E402


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_checkpointing_memory_bench_runs_and_both_variants_take_the_same_step(tmp_path):
    """(In process: a fresh process per variant, the default, costs an import of transformers each.)"""
    out = tmp_path / "ckmem.json"
    result = checkpointing_memory.main(["--layers", "1", "--d", "16", "--heads", "2", "--vocab", "32", "--seq", "8",
                                        "--batch", "2", "--threads", "1", "--variants", "flat,flat_ckpt",
                                        "--in-process", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"])) and "machine" in saved
    flat, ckpt = saved["rows"]
    assert "error" not in flat and "error" not in ckpt, (flat, ckpt)
    assert (flat["variant"], ckpt["variant"]) == ("flat", "flat_ckpt")
    for r in (flat, ckpt):
        assert r["peak_rss_mib"] >= r["rss_before_mib"] > 0 and r["step_s"] > 0
    # checkpointing recomputes the same step: same loss and the same parameters after it (same seeds)
    assert ckpt["loss"] == pytest.approx(flat["loss"], rel=1e-6)
    assert ckpt["param_abs_sum"] == pytest.approx(flat["param_abs_sum"], rel=1e-9)
    # (in one process the heap may already hold what a step needs: a step peak of 0, and then no ratio)
    expected = ckpt["step_peak_mib"] / flat["step_peak_mib"] if flat["step_peak_mib"] > 0 else None
    assert ckpt["peak_ratio_to_no_ckpt"] == pytest.approx(expected)
