"""`fastdp train` options (issue 22, rows 1, 3, 7, 11, 12, 13): what the library refuses, the command line refuses
too, as a parser error naming the option (exit status 2, no traceback) before the first training step."""
import warnings

import pytest
from inputs.deadline import within

import fastdp.cli as cli

BASE = ["train", "--dataset", "digits", "--device", "cpu", "--no-progress", "--epochs", "1", "--reproducible"]


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started although the options are refused")
    monkeypatch.setattr(cli, "_train_epoch", refuse)


def cli_error(capsys, *extra):
    with pytest.raises(SystemExit) as exc:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli.main(BASE + list(extra))
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "fastdp train: error:" in err and "Traceback" not in err, err
    return err


def test_noise_multiplier_with_an_explicit_target_epsilon_is_refused(capsys, no_training):
    """Trained and reported epsilon 14.15 for --target-epsilon 1, exit 0 (row 3)."""
    err = cli_error(capsys, "--noise-multiplier", "0.5", "--target-epsilon", "1")
    assert "give --noise-multiplier or --target-epsilon, not both" in err


def test_the_default_target_epsilon_still_applies(monkeypatch):
    seen = {}

    def spy(**kw):
        seen.update(kw)
        raise SystemExit(0)
    monkeypatch.setattr(cli, "make_private", spy)
    with pytest.raises(SystemExit):
        cli.main(BASE)
    assert seen["target_epsilon"] == cli.DEFAULT_TARGET_EPSILON == 3.0 and seen["noise_multiplier"] is None
    with pytest.raises(SystemExit):
        cli.main(BASE + ["--noise-multiplier", "0.5"])
    assert seen["target_epsilon"] is None and seen["noise_multiplier"] == 0.5


@pytest.mark.parametrize("extra,message", [
    (["--delta", "0.9999999"], "--delta=0.9999999 is too large"),
    (["--target-epsilon", "1e-6"], "--target-epsilon=1e-06 is too small to reach"),
    (["--max-grad-norm", "1e300", "--noise-multiplier", "1"], "--max-grad-norm = 1 * 1e+300: the noise's standard "
                                                              "deviation would overflow float32"),
    (["--target-epsilon", "nan"], "--target-epsilon: expected a finite number"),
    (["--epochs", "0"], "--epochs: must be in"),
])
def test_bad_numbers_are_parser_errors_naming_the_option(capsys, no_training, extra, message):
    """Were raw opacus tracebacks (rows 7, 11; --max-grad-norm 1e300 trained and blamed --lr)."""
    assert message in cli_error(capsys, *extra)


@pytest.mark.parametrize("extra,message", [
    (["--method", "sparta", "--warmup-epochs", "5", "--epochs", "1"], "never reaches it"),
    (["--method", "sparta", "--warmup-epochs", "1", "--epochs", "2"], "Give --epochs >= 3"),
    (["--method", "adadpigu", "--pretrain-epochs", "5", "--epochs", "2"], "Give --epochs >= 6"),
])
def test_sparse_methods_that_would_never_reach_their_sparse_phase_are_refused(capsys, no_training, extra, message):
    """Results were reported under the method's name though its sparse phase never started (row 13)."""
    assert message in cli_error(capsys, *extra)


def test_sparse_phase_reached_is_in_the_result():
    r = cli.main(["train", "--method", "adadpigu", "--pretrain-epochs", "1", "--epochs", "2", "--limit", "60", "--batch-size", "8",
                  "--noise-multiplier", "1", "--device", "cpu", "--no-progress", "--reproducible"])
    assert r["phase"] == "sparse"


def test_delta_at_least_one_over_n_warns(monkeypatch):
    """--delta 0.5 on a 300-sample set was accepted silently (row 12); 0.01 >= 1/300 now warns, 0.5 is refused
    (its accountant epsilon is negative: no meaningful guarantee)."""
    monkeypatch.setattr(cli, "_train_epoch", lambda *a, **k: (0, 0, 0.0, 0.0))
    with pytest.warns(UserWarning, match=r"target_delta=0.01 >= 1/sample_size = 1/300"):
        cli.main(BASE + ["--limit", "300", "--delta", "0.01", "--noise-multiplier", "1"])
    with pytest.warns(UserWarning, match=r"1/sample_size"), pytest.raises(SystemExit) as exc:
        cli.main(BASE + ["--limit", "300", "--delta", "0.5"])
    assert exc.value.code == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="Optimal order")
        cli.main(BASE + ["--limit", "300", "--delta", "1e-5", "--noise-multiplier", "1"])  # no warning


def test_huge_target_epsilon_trains_and_reports_the_rdp_bound(capsys):
    """--target-epsilon 1e6 hung with the PRV accountant (row 1): now RDP calibrates it, with a warning, and the
    reported epsilon is within the target."""
    out = within(120, cli.main, BASE + ["--limit", "200", "--batch-size", "32", "--target-epsilon", "1e6"])
    r = out["value"]
    assert any("RDP bound" in w for w in out["warnings"]), out["warnings"]
    assert 0 < r["epsilon"] <= 1e6 and 0 < r["noise_multiplier"] < 0.01
    assert "the RDP bound" in capsys.readouterr().out
