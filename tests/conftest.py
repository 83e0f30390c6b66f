import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU through the interpreter (before any triton.jit)
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))

DATA_DIR = os.environ.get("FASTDP_DATA_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def data_dir():
    if not os.path.exists(os.path.join(DATA_DIR, "mnist.npz")):
        pytest.skip(f"shared data not found at {DATA_DIR}")
    return DATA_DIR
