"""Smoke run of fastdp/bench/studies/utility_methods.py: every study's code path at toy size (500 images, 1 seed, RDP)."""
import json

import pytest

pytest.importorskip("matplotlib")
from fastdp.bench.studies import utility_methods

PNG = b"\x89PNG\r\n\x1a\n"


def test_dpcnn_s_has_26k_parameters():
    model = utility_methods.DPCNNS()
    assert sum(p.numel() for p in model.parameters()) == 26010


def test_utility_methods_smoke(tmp_path, data_dir, capsys):
    # 3 epochs of 2 Poisson steps each, so SPARTA goes through warm-up, selection and its sparse epoch
    argv = ["--study", "all", "--seeds", "0", "--epochs", "3", "--limit", "500", "--test-limit", "500",
            "--epsilons", "2", "--batch-size", "250", "--accountant", "rdp", "--pretrain-epochs", "1",
            "--pretrain-limit", "500", "--data-dir", data_dir, "--out-dir", str(tmp_path)]
    # the learning-rate probe first (its own call, as with parallel shards); then the reported runs
    utility_methods.main(argv + ["--probe-lrs", "0.25,0.5", "--probe-only", "--no-report"])
    argv += ["--probe-lrs", "0.25,0.5"]
    result = utility_methods.main(argv)
    out = result["paths"]
    assert out["jsonl"] == str(tmp_path / "methods.jsonl") and out["md"] == str(tmp_path / "methods.md")
    with open(out["jsonl"]) as f:
        records = [json.loads(line) for line in f]
    probe = [r for r in records if r["config"]["eval"] == "val"]
    assert sorted((r["study"], r["method"], r["lr"], r["seed"]) for r in probe) == sorted(
        (s, "dpsgd", lr, 100) for s in ("rs", "adadpigu", "sparta") for lr in (0.25, 0.5))
    for r in probe:  # validation: 10% of the 500 training images held out
        assert r["train_size"] == 450 and r["config"]["val_fraction"] == 0.1
    records = [r for r in records if r["config"]["eval"] == "test"]
    for study in ("rs", "adadpigu", "sparta"):  # every method of a study uses the probe's best lr
        scores = {r["lr"]: r["accuracy"] for r in probe if r["study"] == study}
        best = max(scores, key=lambda lr: (scores[lr], -lr))
        assert {r["lr"] for r in records if r["study"] == study} == {best}
    runs = sorted((r["study"], r["method"]) for r in records)
    assert runs == sorted([("rs", "dpsgd"), ("rs", "rs"), ("adadpigu", "dpsgd"), ("adadpigu", "adadpigu")]
                          + [("sparta", m) for m in ("sparta", "dpsgd", "random-groups", "bitfit", "last-layer")])
    for r in records:
        assert r["status"] == "ok", r
        assert (r["epsilon"], r["seed"], r["epochs"], r["config"]["limit"]) == (2.0, 0, 3, 500)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["epsilon_spent"] == pytest.approx(2.0, abs=0.05)
        assert r["steps"] == 3 * r["steps_per_epoch"] == 6 and r["noise_multiplier"] > 0 and r["train_size"] == 500
        assert r["wall_s"] > 0 and r["date"] and r["machine"]["cpu_count"] >= 1 and r["lr"] > 0
    by = {(r["study"], r["method"]): r for r in records}
    assert by[("sparta", "sparta")]["sparta_phase_at_end"] == "sparse"
    # SPARTA at the end: head + biases + the kept 20% rows of conv1 (4 of 16), conv2 (7 of 32), fc1 (7 of 32)
    assert by[("sparta", "sparta")]["trainable_params_end"] == 410 + 4 * 64 + 7 * 256 + 7 * 512
    assert by[("rs", "rs")]["trainable_params_end"] == 26010 - int(0.9 * 26010)
    assert by[("adadpigu", "adadpigu")]["adadpigu_kept_fraction"] > 0.6 - 1e-9
    # fewer trainable parameters for the parameter-efficient baselines; the head is 32 * 10 + 10
    assert by[("sparta", "last-layer")]["trainable_params"] == 330
    assert by[("sparta", "random-groups")]["trainable_params"] == by[("sparta", "sparta")]["trainable_params_end"]
    assert by[("sparta", "bitfit")]["trainable_params"] == 330 + 16 + 32 + 32
    assert by[("sparta", "dpsgd")]["trainable_params"] == 26010
    assert 0.0 <= by[("sparta", "dpsgd")]["pretrain_test_accuracy"] <= 1.0
    assert any(p.name.startswith("pretrain_dpcnn-s_mnist") for p in tmp_path.iterdir())

    md = open(out["md"]).read()
    for heading in ("Random sparsification", "AdaDPIGU", "SPARTA"):
        assert f"## {heading}" in md
    assert md.count("| 0.5 |") + md.count("| 0.25 |") == 6 and md.count("| **yes** |") == 3
    assert "| RS (random sparsification) | 2 |" in md and "| Last layer | 2 |" in md
    assert f"{100 * by[('rs', 'dpsgd')]['accuracy']:.2f}" in md
    for study in ("rs", "adadpigu", "sparta"):
        with open(out[f"png_{study}"], "rb") as f:
            assert f.read(8) == PNG

    # resumable: a second call trains nothing and rewrites the report from the JSONL
    capsys.readouterr()
    utility_methods.main(argv)
    assert capsys.readouterr().out.count(" 0 to run") == 6  # probe and reported runs of the 3 studies
    with open(out["jsonl"]) as f:
        assert len(f.readlines()) == len(records) + len(probe)
