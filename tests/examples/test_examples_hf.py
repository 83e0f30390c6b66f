"""The examples in examples/ run end to end at toy size, a few steps each, and report the epsilon of the steps they
took. They run as scripts (``__main__``, their own argv) in one subprocess, one after the other: the imports of torch,
transformers and peft are paid once."""
import json
import os
import re
import subprocess
import sys

import pytest

import fastdp

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXAMPLES = os.path.join(ROOT, "examples")
DATA_DIR = os.environ.get("FASTDP_DATA_DIR", os.path.join(ROOT, "..", "shared", "data"))  # as tests/conftest.py
HF = ["--samples", "64", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "2", "--noise-multiplier", "1.0",
      "--accountant", "rdp"]
MNIST = ["--batch-size", "60", "--physical-batch-size", "16", "--max-steps", "2", "--noise-multiplier", "1.0",
         "--accountant", "rdp"]
RUNS = {
    "lora_causal_lm": ("dp_lora_causal_lm.py", HF),
    "sequence_classification": ("dp_sequence_classification.py", HF + ["--lora"]),
    "digits_fastdp_splitter": ("dp_mnist_virtual_batches.py", MNIST),
    "mnist_opacus_splitter": ("dp_mnist_virtual_batches.py",
                              MNIST + ["--splitter", "opacus", "--data-dir", DATA_DIR, "--limit", "600"]),
}
# Runs each script as __main__ with its argv; records its stdout, or the traceback it raised.
DRIVER = """
import contextlib, io, json, runpy, sys, traceback
runs, results = json.loads(sys.argv[1]), {}
for key, (script, argv) in runs.items():
    out = io.StringIO()
    sys.argv = [script] + argv
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        results[key] = {"ok": True, "out": out.getvalue()}
    except BaseException:
        results[key] = {"ok": False, "out": out.getvalue() + traceback.format_exc()}
print("RESULTS" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    runs = {k: (os.path.join(EXAMPLES, script), argv) for k, (script, argv) in RUNS.items()}
    if not os.path.exists(os.path.join(DATA_DIR, "mnist.npz")):
        del runs["mnist_opacus_splitter"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs)], cwd=tmp_path_factory.mktemp("examples"),
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "RESULTS" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULTS", 1)[1])


def result(outputs, key):
    if key not in outputs:
        pytest.skip(f"{key}: data not found at {DATA_DIR}")
    assert outputs[key]["ok"], outputs[key]["out"][-4000:]
    return outputs[key]["out"]


def reported_epsilon(out):
    return float(re.search(r"epsilon ([0-9.]+) at delta", out).group(1))


@pytest.mark.parametrize("key", ["digits_fastdp_splitter", "mnist_opacus_splitter"])
def test_mnist_virtual_batches_example(outputs, key):
    out = result(outputs, key)
    assert ("mnist: 600 training samples" if key.startswith("mnist") else "digits:") in out
    steps, largest = map(int, re.search(r"steps (\d+), largest physical batch (\d+)", out).groups())
    rate = float(re.search(r"rate ([0-9.e-]+)\)", out).group(1))
    assert steps == 2 and 0 < largest <= 16
    assert reported_epsilon(out) == pytest.approx(fastdp.get_epsilon(noise_multiplier=1.0, sample_rate=rate, steps=2,
                                                                     delta=1e-5, accountant="rdp"), abs=1e-3)


@pytest.mark.parametrize("key", ["lora_causal_lm", "sequence_classification"])
def test_hf_examples(outputs, key):
    out = result(outputs, key)
    assert "logical batches of 8 expected (rate 0.125), 2 steps" in out
    assert reported_epsilon(out) == pytest.approx(fastdp.get_epsilon(noise_multiplier=1.0, sample_rate=0.125, steps=2,
                                                                     delta=1e-5, accountant="rdp"), abs=1e-3)
    assert ("eval loss" if key == "lora_causal_lm" else "held-out accuracy") in out
