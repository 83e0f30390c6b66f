"""``fastdp.bench.layer_costs_attention`` at toy size: both workloads run in both variants."""
from fastdp.bench.layer_costs_attention import run


def test_attention_cost_script_runs_both_variants():
    rows = run(steps=1, warmup=0, batch=2, seq=3, d=8, heads=2)
    assert [r["workload"].split()[0] for r in rows] == ["MultiheadAttention", "TransformerEncoder"]
    assert all(r["nonprivate_median_ms"] > 0 and r["fastdp_median_ms"] > 0 for r in rows)
