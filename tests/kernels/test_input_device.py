"""Kernel dispatchers make their input's CUDA device current (Triton launches on the current device)."""
import contextlib

import pytest
import torch

from fastdp.kernels import _common


class OnCuda1(torch.Tensor):
    """A CPU tensor that reports itself on cuda:1 (no GPU needed to exercise the device switch)."""

    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 1)


@pytest.fixture
def fake_cuda(monkeypatch):
    state = {"current": 0, "entered": []}

    @contextlib.contextmanager
    def device(d):
        state["entered"].append(d)
        before, state["current"] = state["current"], torch.device(d).index
        try:
            yield
        finally:
            state["current"] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    return state


def test_dispatcher_runs_on_its_input_device(fake_cuda):
    @_common.on_input_device
    def dispatcher(label, t, scale=1.0):
        return torch.cuda.current_device()

    x = torch.zeros(3).as_subclass(OnCuda1)
    assert dispatcher("first arg not a tensor", x) == 1  # the first tensor argument decides
    assert fake_cuda["entered"] == [torch.device("cuda", 1)] and fake_cuda["current"] == 0  # restored after
    fake_cuda["current"] = 1
    assert dispatcher("already current", x) == 1 and len(fake_cuda["entered"]) == 1  # no switch needed
    fake_cuda["current"] = 0
    assert dispatcher("cpu", torch.zeros(3)) == 0 and len(fake_cuda["entered"]) == 1  # CPU tensors: nothing


def test_every_function_that_launches_a_kernel_is_wrapped():
    import importlib
    import inspect
    import pkgutil
    import re

    import fastdp.kernels as pkg
    launching = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"fastdp.kernels.{info.name}")
        for name, fn in vars(mod).items():
            if name.startswith("_") or not inspect.isfunction(fn) or inspect.unwrap(fn).__module__ != mod.__name__:
                continue  # (private launch helpers are called by the public dispatchers)
            src = inspect.getsource(inspect.unwrap(fn))
            if re.search(r"(_kernel|_TILES)\[", src):  # a Triton launch
                launching.append(name)
                assert hasattr(fn, "__wrapped__"), f"{mod.__name__}.{name} launches a kernel without on_input_device"
    assert len(launching) >= 17, launching  # the scan found the dispatchers
