"""Issue 22, row 10: a kill while a benchmark writes its results must leave the previous complete file, never a
partial one. Every results file of ``fastdp.bench`` goes through ``run_env.atomic_write`` (temporary file in the same
folder, then ``os.replace``); the failures here are simulated in the middle of a write."""
import contextlib
import csv
import json
import os
import signal
import subprocess
import sys

import pytest

from fastdp.bench import e2e, run_env

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SAVED = os.path.join(REPO_ROOT, "benchmarks", "results", "h100_2026-11-26_v3", "gpu_step_2026-11-26.json")


def _dump_half_then(exc):
    """A ``json.dump`` that writes the first half of the document, then raises ``exc``."""
    dumps = json.dumps

    def dump(obj, fp, **kw):
        text = dumps(obj, **kw)
        fp.write(text[: len(text) // 2])
        fp.flush()
        raise exc
    return dump


def _leftovers(folder):
    return [n for n in os.listdir(folder) if n.endswith(".tmp")]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_write_result_keeps_the_previous_file_when_the_write_fails(tmp_path, monkeypatch, exc):
    path = tmp_path / "result.json"
    run_env.write_result({"rows": [1, 2, 3]}, str(path))
    before = path.read_text()
    monkeypatch.setattr(json, "dump", _dump_half_then(exc))
    with pytest.raises(type(exc)):
        run_env.write_result({"rows": list(range(1000))}, str(path))
    assert path.read_text() == before and json.loads(before)["rows"] == [1, 2, 3]
    assert _leftovers(tmp_path) == []  # the temporary file is removed


def _break_json(monkeypatch):
    monkeypatch.setattr(json, "dump", _dump_half_then(KeyboardInterrupt()))


def _break_csv(monkeypatch):
    """The CSV writer dies after the header line."""
    writerow = csv.DictWriter.writerow

    def writerow_once(self, row):
        if getattr(self, "_wrote", False):
            raise KeyboardInterrupt
        self._wrote = True
        return writerow(self, row)
    monkeypatch.setattr(csv.DictWriter, "writerow", writerow_once)


def _break_markdown(monkeypatch):
    def markdown(result):
        raise RuntimeError("failed while rendering the tables")
    monkeypatch.setattr(e2e, "markdown", markdown)


@pytest.mark.parametrize("suffix, breaks", [(".json", _break_json), (".csv", _break_csv), (".md", _break_markdown)])
def test_e2e_outputs_keep_the_previous_complete_file_when_a_write_fails(tmp_path, monkeypatch, suffix, breaks):
    """``fastdp bench`` rewrites its JSON, CSV and markdown after every workload: a failure while one is written
    leaves that file as it was before (and no temporary file)."""
    with open(SAVED) as f:
        result = e2e._upgrade_legacy(json.load(f))
    stem = str(tmp_path / "e2e")
    e2e.write_outputs(result, stem, with_plots=False)
    before = open(stem + suffix).read()
    later = dict(result, rows=result["rows"] + [dict(result["rows"][0], variant="later")])
    breaks(monkeypatch)
    with pytest.raises((KeyboardInterrupt, RuntimeError)):
        e2e.write_outputs(later, stem, with_plots=False)
    monkeypatch.undo()
    assert open(stem + suffix).read() == before
    with open(stem + ".json") as f:
        assert len(json.load(f)["rows"]) in (len(result["rows"]), len(later["rows"]))  # whole, old or new
    with open(stem + ".csv") as f:
        assert len(list(csv.DictReader(f))) in (len(result["rows"]), len(later["rows"]))
    assert _leftovers(tmp_path) == []


def test_e2e_plots_keep_the_previous_png_when_rendering_fails(tmp_path, monkeypatch):
    figure = pytest.importorskip("matplotlib.figure")
    with open(SAVED) as f:
        result = e2e._upgrade_legacy(json.load(f))
    stem = str(tmp_path / "e2e")
    path = e2e.plots(result, stem)["time_ratio"]
    before = open(path, "rb").read()
    assert before[:4] == b"\x89PNG"

    def savefig_half_then_fail(self, fname, **kw):
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(open(fname, "wb")) if isinstance(fname, str) else fname
            f.write(before[: len(before) // 2])
        raise RuntimeError("killed while rendering")
    monkeypatch.setattr(figure.Figure, "savefig", savefig_half_then_fail)
    with pytest.raises(RuntimeError):
        e2e.plots(result, stem)
    monkeypatch.undo()
    assert open(path, "rb").read() == before and _leftovers(tmp_path) == []


def test_a_process_killed_mid_write_leaves_the_previous_json(tmp_path):
    """SIGKILL (no exception handler runs) in the middle of ``write_result`` (every script's JSON but e2e's): the
    previous file is intact; only a hidden temporary file is left behind."""
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"rows": ["previous"]}))
    script = f"""
import json, os, signal
from fastdp.bench import run_env
def dump(obj, fp, **kw):
    fp.write(json.dumps(obj, **kw)[:10]); fp.flush(); os.kill(os.getpid(), signal.SIGKILL)
json.dump = dump
run_env.write_result({{"rows": ["next"] * 1000}}, {str(path)!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads(path.read_text()) == {"rows": ["previous"]}
    assert [n.startswith(".result.json.") for n in _leftovers(tmp_path)] == [True]
