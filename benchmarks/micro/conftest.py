"""Harness of the kernel microbenchmarks: one op per ``test_<op>.py``, each timed as its PyTorch reference
(``*_ref``), its Triton kernel (CUDA only) and the plain PyTorch formulation it replaces ("naive": per-sample
gradients materialised, full-size noise, a dense window...) where one exists.

Run (``benchmarks/NOTES.md``, "Kernel microbenchmarks"):

    python -m pytest benchmarks/micro --benchmark-only --benchmark-json benchmarks/results/<device>_<date>_micro.json
    python -m pytest benchmarks/micro --benchmark-disable     # every variant once, results checked, no timing

Shapes (``SHAPE_SETS`` below): ViT-S/16 (B=64, T=197, d=384, p=1536) and GPT-2 small (B=16, T=256, d=768,
p=3072) MLP layers, WRN-16-4 convolutions, GPT-2's embedding table on CUDA; small shapes on the CPU
(``FASTDP_MICRO_SHAPES=large|small|tiny`` overrides; ``tiny`` is for the interpreter smoke run). Activation
dtypes fp32 and bf16; the optimizer-state ops run on fp32 buffers as the library does.

Every benchmark checks its result before it is timed (``Micro.assert_close`` or an explicit property check;
``Micro.time`` refuses to time an unchecked result): against fp64 ground truth computed from the same (rounded)
inputs, relative tolerance 1e-5 for fp32 and 1e-2 for bf16, elementwise for per-sample norms and row sums,
normwise (``|got - truth| <= rtol * max|truth|``) for matrices and parameter updates. A fast wrong kernel fails.

Triton variants run only on CUDA: timings under ``TRITON_INTERPRET=1`` measure the interpreter. With
``--benchmark-disable`` and ``TRITON_INTERPRET=1`` they run once through the interpreter as a correctness check
(what ``tests/benchmarks/test_micro_bench_smoke.py`` does in CI).

Timing: pytest-benchmark's calibrated rounds. On CUDA the timer synchronises the device before reading the clock
and a round is at least 1 ms of back-to-back calls, so the mean is device time per call including launch overhead
(what a training step pays), not host enqueue time. Defaults here: ``max_time`` 0.25 s per benchmark, 3 rounds
minimum on the CPU, 5 on CUDA (command-line ``--benchmark-max-time`` / ``--benchmark-min-rounds`` /
``--benchmark-timer`` win). The JSON keeps each benchmark's statistics without the per-round times
(``FASTDP_MICRO_KEEP_DATA=1`` keeps them). CPU runs use one torch thread (``FASTDP_MICRO_THREADS`` overrides): on the
loaded 2-core development machine two OpenMP threads made these small ops 10-100x slower and erratic.

Work counted per op, recorded in ``extra_info`` (B samples, T positions, layer input width d, output width p, e
bytes per element of x / dy, i and v bytes per ring index / value):

* ``ghost_norm``: ``op_flops = 2BT^2(d+p) + 2BT^2`` (the two T x T Grams, their product reduced; the kernel's
  symmetric half-triangle is not credited), ``op_bytes = BT(d+p)e + 4B``.
  ``ghost_dot`` (two uses, T each): the same FLOPs, ``op_bytes = 2BT(d+p)e + 4B``.
* ``direct_norm``: ``2BTpd + 2Bpd`` FLOPs, ``BT(d+p)e + 4B`` bytes. The naive per-sample-gradient formulation
  of the ghost norms costs the same ``impl_flops``.
* ``clip_accumulate`` (into an fp32 [p, d] buffer): ``2BTpd + BT min(p, d)`` FLOPs, ``BT(d+p)e + 4B + 8pd`` bytes.
* ``row_abs_sum``: ``2BTpd + 3Bpd`` FLOPs, ``BT(d+p)e + 4B + 4p`` bytes.
* ``conv_norm`` (per group: d = C_in/g kh kw, p = C_out/g, T = L output positions): ``op_flops = g min(2BLpd,
  2BL^2(p+d))`` (the engine's choice), ``impl_flops`` the variant's own; ``op_bytes = B(C_in H W + C_out L)e + 4B``.
* ``conv_clip_accumulate`` (3x3, into an fp32 weight buffer): ``2BLpd`` FLOPs, ``B(C_in H W + C_out L)e + 4B + 8pd``
  bytes.
* ``embedding_norm``: ``2BT^2 d + 2BT^2`` FLOPs, ``BTde + 8BT`` bytes (naive: ``2BVd`` FLOPs over the dense
  [B, V, d] per-sample gradients).
* ``norm_affine_grad`` (x of n elements, B samples, F features): ``2n e + 8BF`` bytes (x and dY read once, the two
  [B, F] fp32 sums written), plus the statistics (``8B x rows`` for LayerNorm, ``8BG`` for GroupNorm); no FLOPs
  counted. The naive variant is the reference's formulation in plain PyTorch.
* ``masked_noise`` (k selected of n coordinates): ``n + 8k`` bytes with a bool mask, ``8k + 8 k_rows`` with rows;
  no FLOPs counted (the normal draw is not a matmul).
* ``ef_quant``: ``4.5n + 8 n_blocks`` bytes; ``ef_dequant_add``: ``8.5n + 8 n_blocks``.
* ``gather_zero`` (k ring entries): ``k(i + v) + 8k`` bytes. ``microadam_update`` (window R, k entries per row,
  n parameters): ``Rk(i + v) + 8n + 8R`` bytes (the ring read once, the fp32 parameter read and written once;
  the kernel's workspace traffic is its own overhead, not part of the floor).

From the measured mean time ``t`` (seconds): ``achieved_tflops = impl_flops / t / 1e12`` and ``achieved_gbs =
op_bytes / t / 1e9`` (effective bandwidth: compulsory bytes only). On a GPU in ``PEAKS``, ``floor_s =
max(op_flops / peak_flops, op_bytes / peak_bandwidth)`` (the roofline time of the op itself, whatever the
variant computes) and ``fraction_of_floor = floor_s / t`` (1.0 = at the floor). ``peak_flops`` is the bf16 dense
tensor-core rate for bf16, the TF32 rate for fp32 when ``torch.backends.cuda.matmul.allow_tf32`` is set, else the
fp32 non-tensor rate (the Triton kernels use IEEE fp32 dots for fp32 inputs). Nominal SXM data-sheet figures:
H100 989 / 495 / 67 TFLOP/s and 3.35 TB/s; H200 the same compute, 4.8 TB/s.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fastdp.kernels._backend import HAS_TRITON

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":  # 2 OpenMP threads on a loaded 2-core box made these small ops 10-100x slower
    torch.set_num_threads(int(os.environ.get("FASTDP_MICRO_THREADS", "1")))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

# name fragment (first match wins) -> (bf16 dense, TF32, fp32 non-tensor TFLOP/s; memory GB/s)
PEAKS = (
    ("H100 PCIe", (756.0, 378.0, 51.0, 2000.0)),
    ("H100", (989.0, 495.0, 67.0, 3350.0)),
    ("H200", (989.0, 495.0, 67.0, 4800.0)),
)


@dataclass(frozen=True)
class Linear:
    """A Linear layer's backward operands: x [B, T, d], dy [B, T, p]."""

    name: str
    B: int
    T: int
    d: int
    p: int


@dataclass(frozen=True)
class Conv:
    """A 3x3 convolution, stride 1, padding 1 (WRN blocks): x [B, c_in, H, W], dy [B, c_out, H, W]."""

    name: str
    B: int
    c_in: int
    c_out: int
    H: int
    W: int


@dataclass(frozen=True)
class Embedding:
    """An embedding table [V, d] looked up at [B, T] tokens."""

    name: str
    B: int
    T: int
    V: int
    d: int


@dataclass(frozen=True)
class Grid:
    """A [rows, cols] fp32 gradient of which a fraction ``density`` of coordinates / rows gets noise."""

    name: str
    rows: int
    cols: int
    density: float


@dataclass(frozen=True)
class Flat:
    """A flat fp32 parameter of ``d`` values under MicroAdam (its defaults: density 0.01, window 10)."""

    name: str
    d: int
    quant_block: int = 100_000
    topk_block: int = 32_000
    density: float = 0.01
    window: int = 10


@dataclass(frozen=True)
class Norm:
    """A normalisation layer's input [B, ...]: LayerNorm over the last dim (``arg`` = (d,)) or GroupNorm (``arg``
    groups over [B, C, H, W])."""

    name: str
    kind: str
    shape: tuple
    arg: object


# large: the real layers (CUDA default); small: CPU timing runs (< 1 min in all); tiny: odd sizes, for the smoke
# run through the Triton interpreter.
SHAPE_SETS = {
    "large": dict(
        linear=[Linear("gpt2-fc1", 16, 256, 768, 3072), Linear("vits-fc1", 64, 197, 384, 1536)],
        conv=[Conv("wrn-64ch-32x32", 256, 64, 64, 32, 32), Conv("wrn-256ch-8x8", 256, 256, 256, 8, 8)],
        embedding=[Embedding("gpt2-wte", 16, 256, 50257, 768)],
        grid=[Grid("gpt2-fc1-w", 3072, 768, 0.2), Grid("gpt2-wte", 50257, 768, 0.2)],
        flat=[Flat("gpt2-wte", 50257 * 768)],
        norm=[Norm("gpt2-ln", "layer", (16, 256, 768), (768,)), Norm("vits-ln", "layer", (64, 197, 384), (384,)),
              Norm("wrn-gn-64ch-32x32", "group", (256, 64, 32, 32), 16)],
    ),
    "small": dict(
        linear=[Linear("small", 8, 64, 128, 256)],
        conv=[Conv("small", 8, 16, 16, 16, 16)],
        embedding=[Embedding("small", 8, 64, 1000, 64)],
        grid=[Grid("small", 512, 256, 0.2)],
        flat=[Flat("small", 1 << 18, quant_block=10_000)],
        norm=[Norm("small-ln", "layer", (8, 64, 128), (128,)), Norm("small-gn", "group", (8, 16, 16, 16), 4)],
    ),
    "tiny": dict(
        linear=[Linear("tiny", 2, 17, 40, 24)],
        conv=[Conv("tiny", 2, 3, 4, 7, 6)],
        embedding=[Embedding("tiny", 2, 9, 50, 12)],
        grid=[Grid("tiny", 301, 101, 0.3)],
        flat=[Flat("tiny", 5003, quant_block=1000, topk_block=1000, density=0.02, window=3)],
        norm=[Norm("tiny-ln", "layer", (2, 9, 13), (13,)), Norm("tiny-gn", "group", (2, 6, 5, 7), 3)],
    ),
}
SHAPE_SET = os.environ.get("FASTDP_MICRO_SHAPES", "large" if DEVICE.type == "cuda" else "small")
SHAPES = SHAPE_SETS[SHAPE_SET]


def pytest_generate_tests(metafunc):
    for kind, shapes in SHAPES.items():
        if f"{kind}_shape" in metafunc.fixturenames:
            metafunc.parametrize(f"{kind}_shape", shapes, ids=[s.name for s in shapes])
    if "dtype" in metafunc.fixturenames:
        metafunc.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))


def _cuda_clock() -> float:
    """``time.perf_counter`` after the device has finished the work queued so far (the CUDA timer)."""
    torch.cuda.synchronize()
    return time.perf_counter()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    given = " ".join(config.invocation_params.args)
    options = {"max_time": 0.25, "min_rounds": 5 if DEVICE.type == "cuda" else 3}
    if DEVICE.type == "cuda":
        options.update(timer=_cuda_clock, min_time=1e-3, warmup=True, warmup_iterations=20)
    options = {k: v for k, v in options.items() if f"--benchmark-{k.replace('_', '-')}" not in given}
    for item in items:
        if here in item.path.parents and "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.benchmark(**options))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Keep each benchmark's statistics, not every round's time (``FASTDP_MICRO_KEEP_DATA=1`` keeps them)."""
    if os.environ.get("FASTDP_MICRO_KEEP_DATA") != "1":
        for bench in output_json["benchmarks"]:
            bench["stats"].pop("data", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def linear_inputs(linear_shape, dtype):
    """(x, dy) of a Linear layer, N(0, 1) rounded to ``dtype``."""
    s = linear_shape
    x = torch.randn(s.B, s.T, s.d, device=DEVICE).to(dtype)
    dy = torch.randn(s.B, s.T, s.p, device=DEVICE).to(dtype)
    return x, dy


def device_peaks():
    """(name, (bf16, tf32, fp32 TFLOP/s, GB/s)) of this GPU, or None (CPU, or a GPU not in ``PEAKS``)."""
    if DEVICE.type != "cuda":
        return None
    name = torch.cuda.get_device_name(DEVICE)
    for fragment, peaks in PEAKS:
        if fragment in name:
            return fragment, peaks
    return None


class Micro:
    """One benchmark: ``setup`` (variant, skip rules), a checked result (``assert_close`` / ``assert_property``),
    then ``time`` (pytest-benchmark, rates and roofline fraction into ``extra_info``)."""

    def __init__(self, benchmark, monkeypatch):
        self.benchmark = benchmark
        self._monkeypatch = monkeypatch
        self._checked = False
        self.dtype = torch.float32
        self.device = DEVICE

    def setup(self, op: str, case: str, impl: str, dtype: torch.dtype = torch.float32) -> "Micro":
        self.dtype = dtype
        dname = next(k for k, v in DTYPES.items() if v == dtype)
        self.benchmark.group = f"{op} {case} {dname}"
        self.benchmark.extra_info.update(op=op, case=case, impl=impl, dtype=dname, shapes=SHAPE_SET, device=str(DEVICE),
                                         device_name=torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda"
                                         else "cpu", threads=torch.get_num_threads())
        if impl.startswith("triton"):  # "triton", "triton-direct"
            if not HAS_TRITON:
                pytest.skip("triton is not importable")
            interpret = os.environ.get("TRITON_INTERPRET") == "1"
            if DEVICE.type != "cuda" and not (self.benchmark.disabled and interpret):
                pytest.skip("Triton kernels are timed on CUDA only (no CUDA here: interpreter timings are meaningless); "
                            "with --benchmark-disable and TRITON_INTERPRET=1 they run once as a correctness check")
            self._monkeypatch.setenv("FASTDP_BACKEND", "triton")
        else:
            self._monkeypatch.setenv("FASTDP_BACKEND", "reference")
        return self

    def assert_close(self, got: torch.Tensor, truth: torch.Tensor, normwise: bool = False, rtol: float = None):
        """``got`` within ``rtol`` (default by dtype: fp32 1e-5, bf16 1e-2) of the fp64 ``truth``, elementwise
        relative or, with ``normwise``, relative to ``max|truth|``."""
        rtol = RTOL[self.dtype] if rtol is None else rtol
        assert got.shape == truth.shape, (tuple(got.shape), tuple(truth.shape))
        err = (got.double() - truth).abs()
        scale = truth.abs().max() if normwise else truth.abs()
        worst = (err / scale.clamp(min=1e-300)).max().item() if err.numel() else 0.0
        assert worst <= rtol, f"relative error {worst:.3g} > {rtol:g} ({'normwise' if normwise else 'elementwise'})"
        self.benchmark.extra_info["max_rel_err"] = worst
        self._checked = True

    def assert_property(self, ok: bool, message: str):
        """A checked property of the result (stochastic or discrete outputs, where allclose does not apply)."""
        assert ok, message
        self._checked = True

    def time(self, fn, *args, op_bytes: float, op_flops: float = 0.0, impl_flops: float = None):
        """Time ``fn(*args)`` and record the work and, when timed, the achieved rates and the roofline fraction."""
        if not self._checked:
            raise RuntimeError("check the variant's result before timing it")
        impl_flops = op_flops if impl_flops is None else impl_flops
        info = self.benchmark.extra_info
        info.update(op_flops=float(op_flops), impl_flops=float(impl_flops), op_bytes=float(op_bytes))
        result = self.benchmark(fn, *args)
        if self.benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
            return result
        t = self.benchmark.stats.stats.mean
        info["mean_s"] = t
        info["achieved_tflops"] = impl_flops / t / 1e12 if impl_flops else None
        info["achieved_gbs"] = op_bytes / t / 1e9
        peaks = device_peaks()
        if peaks is not None:
            name, (bf16, tf32, fp32, gbs) = peaks
            if self.dtype == torch.bfloat16:
                flops_peak = bf16
            else:
                flops_peak = tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
            floor_s = max(op_flops / (flops_peak * 1e12), op_bytes / (gbs * 1e9))
            info.update(peaks=name, peak_tflops=flops_peak, peak_gbs=gbs, floor_s=floor_s,
                        fraction_of_floor=floor_s / t)
        return result


@pytest.fixture
def micro(benchmark, monkeypatch):
    return Micro(benchmark, monkeypatch)
