"""`fastdp audit` end to end (report files, the reproduce line), the plot skipped without matplotlib, and the
black-box (input canary, loss difference) audit."""
import builtins
import json
import shlex
import warnings

import pytest

import fastdp
from fastdp.cli import main
from fastdp.data import load_dataset
from fastdp.models import MLP

ARGS = ["audit", "--limit", "300", "--hidden", "32", "--canaries", "800", "--epochs", "3", "--noise-multiplier", "1.5",
        "--accountant", "rdp"]


def test_fastdp_audit_writes_the_report_and_reproduces(tmp_path, capsys):
    out = main([*ARGS, "--out-dir", str(tmp_path), "--seed", "11"])
    printed = capsys.readouterr().out
    assert f"eps_lower: {out['eps_lower']:.4f}" in printed and f"epsilon:   {out['epsilon']:.4f}" in printed
    assert 0 <= out["eps_lower"] <= out["epsilon"]
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["eps_lower"] == out["eps_lower"] and len(saved["scores"]) == 800
    assert (tmp_path / "audit_scores.png").stat().st_size > 0
    reproduce = next(line for line in printed.splitlines() if line.startswith("reproduce: "))[len("reproduce: "):]
    argv = shlex.split(reproduce)
    assert argv[:2] == ["fastdp", "audit"] and argv[-2:] == ["--seed", "11"]
    again = main([*argv[1:], "--out-dir", str(tmp_path / "again")])  # the same command: the same run
    assert again["eps_lower"] == out["eps_lower"] and again["result"].scores.tolist() == saved["scores"]


def test_without_a_seed_the_reproduce_line_records_the_one_drawn(tmp_path, capsys):
    main([*ARGS[:-4], "--noise-multiplier", "3", "--epochs", "1", "--canaries", "100", "--out-dir", str(tmp_path)])
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("reproduce: "))
    assert "--seed " in line


def test_the_plot_is_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = main([*ARGS[:-4], "--noise-multiplier", "3", "--epochs", "1", "--canaries", "100", "--seed", "1",
                "--out-dir", str(tmp_path)])
    assert out["files"]["png"] is None and not (tmp_path / "audit_scores.png").exists()
    assert "matplotlib is not installed" in (tmp_path / "audit.txt").read_text()
    assert "matplotlib is not installed" in capsys.readouterr().out


def test_cli_refuses_bad_options(capsys):
    with pytest.raises(SystemExit):
        main(["audit", "--target-epsilon", "1", "--noise-multiplier", "1"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["audit", "--target-epsilon", "1", "--confidence", "2"])
    assert "--confidence must be in (0, 1)" in capsys.readouterr().err


def test_black_box_loss_audit_stays_below_the_claim():
    train = load_dataset("digits", limit=300)[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="divide by zero", category=RuntimeWarning)
        r = fastdp.audit(lambda: MLP(64, 10, hidden=(32,)), train, canaries=100, threat="black-box-loss",
                         epochs=3, expected_batch_size=100, target_epsilon=8.0, seed=0, accountant="rdp")
    assert r.threat == "black-box-loss" and r.scores.shape == (100,) and r.sample_rate == pytest.approx(1 / 3)
    assert 0 <= r.eps_lower <= r.epsilon <= 8.0
    assert r.max_unreleased is None and "never released" not in r.report()


def test_black_box_refuses_more_canaries_than_samples():
    train = load_dataset("digits", limit=50)[0]
    with pytest.raises(ValueError, match="need 2 <= canaries < 50"):
        fastdp.audit(lambda: MLP(64, 10), train, canaries=50, threat="black-box-loss", noise_multiplier=1.0)
