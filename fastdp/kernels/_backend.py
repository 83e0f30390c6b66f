"""Which implementation of a kernel runs: the Triton kernel or its PyTorch reference.

Default: Triton for CUDA tensors (when Triton imports), the reference otherwise. ``FASTDP_BACKEND``
overrides it for debugging and tests: ``reference`` forces the references everywhere, ``triton``
forces the Triton kernels on any tensor (CPU tensors need ``TRITON_INTERPRET=1``) and never falls
back. The choice is visible: ``backend_for(t)`` returns it and objects using kernels show it in repr.
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # e.g. macOS: the references still work
    HAS_TRITON = False

BACKENDS = ("auto", "reference", "triton")


def requested_backend() -> str:
    name = os.environ.get("FASTDP_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"FASTDP_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def backend_for(t: torch.Tensor) -> str:
    """"triton" or "reference" for an op on tensor ``t``."""
    name = requested_backend()
    if name == "triton":
        if not HAS_TRITON:
            raise RuntimeError("FASTDP_BACKEND=triton but triton is not importable")
        if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("FASTDP_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
        return "triton"
    if name == "reference":
        return "reference"
    return "triton" if (HAS_TRITON and t.is_cuda) else "reference"


# Ops whose Triton kernel has passed its parity tests on a GPU; "auto" picks Triton on CUDA only for these.
# The engine's kernels (ghost_norm, direct_norm, clip_accumulate) are tested through the interpreter only so
# far and run on the GPU under FASTDP_BACKEND=triton until a device run validates them (issue: fused kernels).
# ef_quant / ef_dequant_add left the set in session 15: their formula changed (x * s + o, each rounded on its own)
# and was checked through the interpreter only; a GPU may contract the two into an FMA. Back after a device run.
GPU_VALIDATED = {"gather_zero", "microadam_update"}


def backend_for_op(op: str, t: torch.Tensor) -> str:
    """Like ``backend_for``, with "auto" choosing Triton on CUDA only for ops in ``GPU_VALIDATED``."""
    name = backend_for(t)
    if name == "triton" and requested_backend() == "auto" and op not in GPU_VALIDATED:
        return "reference"
    return name


def interpreting() -> bool:
    """Triton runs through its CPU interpreter (whose ``tl.dot`` mishandles bf16/fp16 operands: kernels
    upcast them to fp32 there; on a GPU they use the tensor cores)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
