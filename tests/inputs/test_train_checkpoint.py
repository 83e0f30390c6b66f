"""`fastdp train --checkpoint-dir DIR [--checkpoint-every N] [--resume]` (issue 22): a killed run resumes to the
uninterrupted run's final model, optimizer state, accountant history and epsilon; the checkpoint is written
atomically; a resume with other options or data is refused."""
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

import fastdp.cli as cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# 400 digits at expected batch 8: 50 steps per epoch, 150 steps; --checkpoint-every 7 falls mid-epoch
KILL_ARGS = ["train", "--dataset", "digits", "--limit", "400", "--batch-size", "8", "--lr", "0.05", "--epochs", "3",
             "--noise-multiplier", "1.0", "--device", "cpu", "--no-progress", "--reproducible", "--seed", "3"]
# in-process runs: 200 digits, 25 steps per epoch, 75 steps
SMALL = ["train", "--dataset", "digits", "--limit", "200", "--batch-size", "8", "--lr", "0.05", "--epochs", "3",
         "--device", "cpu", "--no-progress", "--reproducible", "--seed", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the subprocesses below use (OMP_NUM_THREADS=1): the same kernels and rounding, and
    no OpenMP threads waiting for a core that another process holds (which made these runs 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli.main(argv)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_run(a, b):
    """Two final checkpoints: the same parameters (bitwise), optimizer state, accountant history and step count."""
    assert a["model"].keys() == b["model"].keys()
    diff = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not diff, f"parameters differ: {diff}"
    private = "fastdp" in a["optimizer"]
    sa = (a["optimizer"]["optimizer"] if private else a["optimizer"])["state"]
    sb = (b["optimizer"]["optimizer"] if private else b["optimizer"])["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for k in sa:  # momentum buffers, Adam / MicroAdam moments...
        assert sa[k].keys() == sb[k].keys()
        assert all(torch.equal(v, sb[k][n]) if isinstance(v, torch.Tensor) else v == sb[k][n] for n, v in sa[k].items())
    if private:
        fa, fb = a["optimizer"]["fastdp"], b["optimizer"]["fastdp"]
        assert fa["accountant_state"]["history"] == fb["accountant_state"]["history"]
        assert fa["steps_taken"] == fb["steps_taken"] and torch.equal(fa["generator_state"], fb["generator_state"])
    assert a["totals"]["steps"] == b["totals"]["steps"] and a["totals"]["samples"] == b["totals"]["samples"]


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a `python -m fastdp train` right after its first checkpoint (mid-epoch), resume it in a new process:
    the final model, momentum, accountant history and printed epsilon are the uninterrupted run's."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ref = run(KILL_ARGS + ["--checkpoint-dir", str(tmp_path / "ref"), "--checkpoint-every", "7"])
    folder = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fastdp"] + KILL_ARGS + ["--checkpoint-dir", str(folder), "--checkpoint-every", "7"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    path = folder / cli.CHECKPOINT_FILE
    deadline = time.monotonic() + 120
    try:
        while not path.exists():
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.communicate()}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed = load(path)
    at = killed["totals"]["steps"] + killed["epoch_stats"]["steps"]
    assert not killed["finished"] and 0 < at < 150 and at % 7 == 0
    assert [f for f in os.listdir(folder) if f != cli.CHECKPOINT_FILE and not f.endswith(".tmp")] == []

    out = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert f"resumed from {path} after {at} steps" in out.stdout
    final = load(path)
    assert final["finished"]
    assert_same_run(final, load(tmp_path / "ref" / cli.CHECKPOINT_FILE))
    assert f"epsilon: {ref['epsilon']:.2f} (delta=1e-05, accountant=prv)" in out.stdout
    assert f"test_accuracy: {ref['test_accuracy']:.4f}" in out.stdout
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, saves):
    """Make the run stop (as a kill would) right after its ``saves``-th checkpoint was written."""
    real = cli.save_checkpoint
    count = [0]

    def save(path, payload):
        real(path, payload)
        count[0] += 1
        if count[0] == saves:
            raise Interrupted
    monkeypatch.setattr(cli, "save_checkpoint", save)
    return lambda: monkeypatch.setattr(cli, "save_checkpoint", real)


@pytest.mark.parametrize("case,extra,every,saves", [
    ("dpsgd, mid-epoch", ["--noise-multiplier", "1.0"], 7, 2),
    ("dpsgd, epoch boundary", ["--noise-multiplier", "1.0"], 25, 1),
    ("sparta, selection epoch", ["--method", "sparta", "--noise-multiplier", "1.0"], 10, 4),
    ("nonprivate, mid-epoch", ["--method", "nonprivate"], 4, 3),
    ("dpmicroadam, mid-epoch", ["--method", "dpmicroadam", "--noise-multiplier", "1.0"], 9, 3),
])
def test_resume_from_any_checkpoint_equals_the_uninterrupted_run(tmp_path, monkeypatch, case, extra, every, saves):
    argv = SMALL + extra + ["--checkpoint-every", str(every)]
    ref = run(argv + ["--checkpoint-dir", str(tmp_path / "ref")])
    restore = interrupt_after(monkeypatch, saves)
    with pytest.raises(Interrupted):
        run(argv + ["--checkpoint-dir", str(tmp_path / "cut")])
    restore()
    cut = load(tmp_path / "cut" / cli.CHECKPOINT_FILE)
    assert cut["totals"]["steps"] + cut["epoch_stats"]["steps"] == every * saves
    resumed = run(argv + ["--checkpoint-dir", str(tmp_path / "cut"), "--resume"])
    assert resumed["resumed_at_step"] == every * saves
    assert_same_run(load(tmp_path / "cut" / cli.CHECKPOINT_FILE), load(tmp_path / "ref" / cli.CHECKPOINT_FILE))
    for key in ("epsilon", "test_accuracy", "steps", "samples", "phase", "noise_multiplier"):
        assert resumed[key] == ref[key], key


def test_checkpointing_does_not_change_the_run(tmp_path):
    argv = SMALL + ["--noise-multiplier", "1.0", "--epochs", "1"]
    a, b = run(argv), run(argv + ["--checkpoint-dir", str(tmp_path), "--checkpoint-every", "3"])
    assert (a["test_accuracy"], a["epsilon"], a["samples"]) == (b["test_accuracy"], b["epsilon"], b["samples"])


def test_resuming_a_finished_run_trains_nothing_and_reports_the_same(tmp_path, monkeypatch):
    argv = SMALL + ["--noise-multiplier", "1.0", "--epochs", "1", "--checkpoint-dir", str(tmp_path)]
    first = run(argv)

    def refuse(*a, **k):
        raise AssertionError("a finished run trained again")
    monkeypatch.setattr(cli, "_train_epoch", refuse)
    again = run(argv + ["--resume"])
    assert (again["epsilon"], again["test_accuracy"], again["steps"]) == (first["epsilon"], first["test_accuracy"],
                                                                         first["steps"])


# ------------------------------------------------------------------------------------------------ refusals
def cli_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        run(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "fastdp train: error:" in err and "Traceback" not in err, err
    return err


@pytest.fixture
def finished(tmp_path):
    argv = SMALL + ["--noise-multiplier", "1.0", "--epochs", "1", "--checkpoint-dir", str(tmp_path)]
    run(argv)
    return argv


def test_resume_with_other_options_is_refused(finished, capsys):
    err = cli_error(capsys, [a if a != "0.05" else "0.1" for a in finished] + ["--resume"])
    assert "--lr 0.05 (now 0.1)" in err and "other options" in err
    err = cli_error(capsys, [a if a != "1.0" else "1.5" for a in finished] + ["--resume"])
    assert "--noise-multiplier 1.0 (now 1.5)" in err
    run(finished + ["--resume", "--checkpoint-every", "5"])  # these may change


def test_resume_with_other_data_is_refused(finished, capsys, monkeypatch):
    real = cli.load_dataset

    def altered(*a, **k):
        train, test, meta = real(*a, **k)
        test.tensors[1][0] = (test.tensors[1][0] + 1) % 10
        return train, test, meta
    monkeypatch.setattr(cli, "load_dataset", altered)
    assert "data differ" in cli_error(capsys, finished + ["--resume"])


def test_checkpoint_option_errors(tmp_path, finished, capsys):
    assert "already holds a checkpoint" in cli_error(capsys, finished)  # a fresh run would overwrite it
    empty = str(tmp_path / "empty")
    assert "no checkpoint at" in cli_error(capsys, SMALL + ["--checkpoint-dir", empty, "--resume"])
    assert "need --checkpoint-dir" in cli_error(capsys, SMALL + ["--resume"])
    assert "need --checkpoint-dir" in cli_error(capsys, SMALL + ["--checkpoint-every", "5"])
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    assert "cannot create the folder" in cli_error(capsys, SMALL + ["--checkpoint-dir", str(not_a_folder)])
    path = tmp_path / cli.CHECKPOINT_FILE
    path.write_bytes(path.read_bytes()[:100])
    err = cli_error(capsys, finished + ["--resume"])
    assert "is not a readable checkpoint" in err and str(path) in err


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails (or is killed) midway leaves the previous checkpoint whole and no temporary file."""
    path = str(tmp_path / cli.CHECKPOINT_FILE)
    cli.save_checkpoint(path, {"step": 1, "w": torch.arange(5)})
    real_save = torch.save

    def half_then_fail(obj, f):
        real_save(obj, f)
        f.truncate(10)
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        cli.save_checkpoint(path, {"step": 2, "w": torch.arange(7)})
    monkeypatch.setattr(torch, "save", real_save)
    assert load(path)["step"] == 1 and os.listdir(tmp_path) == [cli.CHECKPOINT_FILE]
    cli.save_checkpoint(path, {"step": 3})
    assert load(path)["step"] == 3 and os.listdir(tmp_path) == [cli.CHECKPOINT_FILE]
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o600)  # the file holds the generators' states
