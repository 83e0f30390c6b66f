"""Packaging: the public API imports, and a built wheel installs fastdp and fastdp.kernels (never a top-level kernels)."""
import os
import subprocess
import sys
import textwrap

import pytest

import fastdp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_public_name_imports():
    for name in fastdp.__all__:
        assert getattr(fastdp, name) is not None, name
    import fastdp.kernels as k
    for name in k.__all__:
        assert callable(getattr(k, name)), name


def test_readme_layer_table_matches_the_code():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for layer, op, norm in fastdp.SUPPORTED_LAYERS:
        assert f"| {layer} | {op} | {norm} |" in readme, layer


def test_ci_runs_the_readme_commands():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "extract main" in ci and "extract test" in ci
    for tag in ("main", "test"):
        assert f"<!-- ci:{tag} -->" in readme and f"<!-- /ci:{tag} -->" in readme


def test_kernels_are_the_fastdp_subpackage():
    import fastdp.kernels
    assert fastdp.kernels.__name__ == "fastdp.kernels"
    assert os.path.samefile(os.path.dirname(fastdp.kernels.__file__), os.path.join(ROOT, "kernels"))


@pytest.mark.slow
def test_wheel_installs_and_imports(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), ROOT], check=True, cwd=tmp_path)
    wheels = list(wheel_dir.glob("fastdp-*.whl"))
    assert len(wheels) == 1
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheels[0])], check=True, cwd=tmp_path)
    assert not (target / "kernels").exists(), "a top-level 'kernels' package was installed"
    probe = textwrap.dedent("""
        import importlib.util, os, sys
        import fastdp, fastdp.kernels
        assert fastdp.__file__.startswith(sys.argv[1]), fastdp.__file__
        assert importlib.util.find_spec("kernels") is None, "plain 'kernels' is importable"
        import torch
        m = torch.nn.Linear(3, 2)
        opt = fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0,
                                 max_grad_norm=1.0, expected_batch_size=4, sample_size=40)
        m(torch.randn(4, 3)).sum().backward(); opt.step()
        print("ok", fastdp.__version__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    # run from an empty directory with the isolated (-I) interpreter so the source checkout is not on sys.path
    out = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[2]); exec(sys.argv[3])",
                          str(target), str(target), probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_kernel_modules_are_not_shadowed_by_functions():
    """`fastdp.kernels.<op>` stays the op's module (its dispatcher is `fastdp.kernels.<op>.<op>`)."""
    import types

    import fastdp.kernels as k
    for name in ("clip_accumulate", "conv_norm", "direct_norm", "ef_quant", "embedding_norm", "ghost_norm",
                 "masked_noise", "microadam_update", "noisy_sgd", "row_abs_sum", "topk_gather"):
        assert isinstance(getattr(k, name), types.ModuleType), name
