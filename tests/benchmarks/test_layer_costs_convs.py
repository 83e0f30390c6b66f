"""Smoke run of fastdp/bench/layer_costs_convs.py at toy size: every workload runs both variants and is written."""
import json

import torch

from fastdp.bench import layer_costs_convs


def test_layer_costs_convs_tiny(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "costs.json"
    try:
        result = layer_costs_convs.main(["--tiny", "--batch", "3", "--steps", "2", "--warmup", "0", "--threads", "1",
                                         "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    names = [r["workload"] for r in result["rows"]]
    assert names == list(layer_costs_convs.workloads(3, tiny=True))
    assert all(r["nonprivate_ms"] > 0 and r["fastdp_ms"] > 0 and r["fastdp_fwd_bwd_ms"] > 0 and r["steps"] == 2
               for r in result["rows"])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
