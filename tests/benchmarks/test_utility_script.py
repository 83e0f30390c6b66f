"""Smoke run of fastdp/bench/studies/utility_micro_adam.py on the bundled digits dataset (no data files, a few seconds)."""
import json

import pytest

pytest.importorskip("matplotlib")
from fastdp.bench.studies import utility_micro_adam


def test_utility_script_digits(tmp_path, capsys):
    # batch 64 on the full digits set: noise calibration (most of a run's time here) is slowest at large sample rates
    argv = ["--dataset", "digits", "--epochs", "1", "--batch-size", "64", "--seeds", "0", "--methods", "dpsgd,dpmicroadam",
            "--lrs", "dpsgd=0.5;dpmicroadam=0.01", "--clip-methods", "dpmicroadam", "--clip-norms", "1",
            "--out-dir", str(tmp_path), "--quiet"]
    result = utility_micro_adam.main(argv)
    paths = result["paths"]
    assert paths == {k: str(tmp_path / f"micro_adam_digits.{k}") for k in ("jsonl", "md", "png")}
    with open(paths["jsonl"]) as f:
        records = [json.loads(line) for line in f]
    # main: 2 methods x 1 seed at C=1; clip: dpmicroadam at C=1 is the main run (same config), not rerun
    runs = sorted((r["config"]["method"], r["config"]["max_grad_norm"], r["stage"]) for r in records)
    assert runs == [("dpmicroadam", 1.0, "main"), ("dpsgd", 1.0, "main")]
    for r in records:
        assert r["status"] == "ok", r.get("message")
        c = r["config"]
        assert (c["dataset"], c["epochs"], c["seed"], c["batch_size"], c["limit"], c["eval_split"]) == ("digits", 1, 0, 64, None, "test")
        assert c["lr"] == {"dpsgd": 0.5, "dpmicroadam": 0.01}[c["method"]]
        assert 0.0 <= r["accuracy"] <= 1.0 and r["epsilon"] == pytest.approx(3.0, abs=0.05) and r["noise_multiplier"] > 0
        assert r["wall_s"] > 0 and r["torch"] and r["date"] and r["machine"]["cpu_count"] >= 1
    summary = result["summary"]
    assert set(summary["main"]) == {"dpsgd", "dpmicroadam"} and set(summary["clip"]) == {"dpmicroadam"}
    assert [r["config"]["method"] for r in summary["clip"]["dpmicroadam"][1.0]] == ["dpmicroadam"]

    md = open(paths["md"]).read()
    assert "| DP-SGD (momentum 0.9) | 0.5 |" in md and "| DP-MicroAdam | 0.01 |" in md and "| C=1 |" in md
    acc = next(r["accuracy"] for r in records if r["config"]["method"] == "dpsgd")
    assert f"{100 * acc:.2f}" in md
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # resumable: a second call runs nothing and rewrites the report from the JSONL
    capsys.readouterr()
    utility_micro_adam.main(argv + ["--stage", "all"])
    assert "0 to run" in capsys.readouterr().out
    with open(paths["jsonl"]) as f:
        assert len(f.readlines()) == 2
