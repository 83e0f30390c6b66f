"""Packaging: the public API imports; a built wheel installs the one top-level package ``fastdp``; nothing in the
repository shadows another installed distribution's top-level name when Python starts in the repository root."""
import os
import subprocess
import sys
import textwrap
import zipfile
from importlib import metadata

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
    assert os.path.samefile(os.path.dirname(fastdp.kernels.__file__), os.path.join(ROOT, "fastdp", "kernels"))


def repository_top_level_names() -> set:
    """Names that ``import NAME`` finds in this repository when Python starts in its root (sys.path[0] = root), or
    that the tests make importable (tests/conftest.py puts tests/ on sys.path): ``NAME.py`` files and folders with an
    ``__init__.py``. A folder without one is at most a namespace portion, which never hides an installed regular
    package of the same name (the import system prefers the regular package, wherever it stands on sys.path)."""
    names = set()
    for folder in (ROOT, os.path.join(ROOT, "tests")):
        for entry in os.listdir(folder):
            path = os.path.join(folder, entry)
            if entry.endswith(".py") and os.path.isfile(path) and not entry.startswith(("test_", "conftest")):
                names.add(entry[:-3])
            elif os.path.isfile(os.path.join(path, "__init__.py")):
                names.add(entry)
    return names


def test_no_repository_name_shadows_an_installed_distribution():
    """A dependency that starts shipping a top-level name this repository also uses (as transformers' `kernels` did
    with the old top-level kernels/ folder) fails here, naming both, before it breaks an import somewhere else."""
    installed = metadata.packages_distributions()
    ours = repository_top_level_names()
    assert "fastdp" in ours and "kernels" not in ours and "benchmarks" not in ours
    clashes = {name: sorted(set(installed[name]) - {"fastdp"}) for name in ours if name in installed}
    clashes = {name: dists for name, dists in clashes.items() if dists}
    assert not clashes, f"repository names also installed by other distributions: {clashes}"


@pytest.mark.parametrize("name", ["kernels", "benchmarks"])  # once top-level folders of ours, now fastdp.kernels, fastdp.bench
def test_python_started_in_the_root_imports_the_installed_package(name):
    """`python -c "import kernels"` run in the repository root finds the installed distribution's package (Hugging
    Face's `kernels`, which transformers imports; opacus' `benchmarks`), never a folder of this repository."""
    if name not in metadata.packages_distributions():
        pytest.skip(f"no installed distribution provides {name!r}")
    out = subprocess.run([sys.executable, "-c", f"import {name}; print({name}.__file__)"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    found = os.path.abspath(out.stdout.strip())  # (a venv may live inside the checkout: .venv/lib/.../site-packages)
    assert os.path.dirname(found) != os.path.join(ROOT, name) and os.sep + "site-packages" + os.sep in found, found


@pytest.mark.slow
def test_wheel_installs_and_imports(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), ROOT], check=True, cwd=tmp_path)
    wheels = list(wheel_dir.glob("fastdp-*.whl"))
    assert len(wheels) == 1
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheels[0]).namelist()}
    assert top == {"fastdp", f"fastdp-{fastdp.__version__}.dist-info"}, f"the wheel installs {sorted(top)}"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheels[0])], check=True, cwd=tmp_path)
    probe = textwrap.dedent("""
        import importlib.util, os, sys
        import fastdp, fastdp.kernels, fastdp.bench.e2e
        assert fastdp.__file__.startswith(sys.argv[1]), fastdp.__file__
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
