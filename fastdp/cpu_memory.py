"""CPU training: keep freed memory in the process so tensors do not fault their pages in again every step.

PyTorch allocates CPU tensors with the C allocator. glibc hands memory back to the operating system when more
than ``M_TRIM_THRESHOLD`` bytes are free at the top of the heap, and serves blocks above ``M_MMAP_THRESHOLD``
with fresh ``mmap`` calls; the next tensor of that size then touches new pages, and the kernel zeroes each 4 KiB
page on its first write (a minor page fault). A DP backward keeps every layer's activations and output gradients
until the clip factors are known and frees them together, so with the default thresholds the heap is trimmed
every step and the next step's outputs fault again (measured in ``benchmarks/NOTES.md``: ~2-5k faults per step
on the CPU transformer benchmark, element-wise kernels 2x slower on fresh pages). Non-private training reaches a
steady state without faults. GPUs are not affected (PyTorch's CUDA allocator caches).

``retain_freed_memory()`` raises both thresholds (as PyTorch's CUDA caching allocator does on the GPU, the
process then keeps its peak heap). It changes the whole process's allocator, so nothing in fastdp calls it
implicitly: ``fastdp train`` and the CPU benchmarks call it (for every variant they compare), library users call
it themselves. It is a no-op returning False where glibc's ``mallopt`` is not available (macOS, Windows, musl).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

DEFAULT_THRESHOLD = 1 << 30  # bytes


def retain_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Keep up to ``threshold`` bytes of freed heap memory in the process, and serve blocks below it from the heap.

    Returns True when glibc accepted both settings, False where they do not apply (non-glibc platforms).
    """
    if not (isinstance(threshold, int) and 0 < threshold < 2 ** 31):
        raise ValueError(f"threshold must be a positive int below 2**31 bytes, got {threshold!r}")
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, threshold)) and bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl has no such symbol and other mallopt semantics
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn
