"""Argument checks of the kernel dispatchers and their references (one shared check per file: the same ValueError
from either, before any launch), and mixed operand dtypes (cast to x's dtype before they reach ``tl.dot``)."""
import importlib

import pytest
import torch

from fastdp.kernels.clip_accumulate import clip_accumulate, clip_accumulate_ref
from fastdp.kernels.conv_clip_accumulate import conv_clip_accumulate, conv_clip_accumulate_ref
from fastdp.kernels.conv_norm import conv_norm, conv_norm_ref, conv_per_sample_grad_ref
from fastdp.kernels.direct_norm import direct_dot_ref, direct_norm, direct_norm_ref
from fastdp.kernels.ghost_norm import ghost_dot, ghost_dot_ref, ghost_norm, ghost_norm_ref
from fastdp.kernels.masked_direct_norm import masked_direct_norm, masked_direct_norm_ref
from fastdp.kernels.row_abs_sum import row_abs_sum, row_abs_sum_ref

pytestmark = pytest.mark.interpreter
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CONV = ((4, 3, 3, 3), (1, 1), (1, 1), (1, 1), 1)  # weight shape, stride, padding, dilation, groups


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV).to(dtype)


def _ones(n):
    return torch.ones(n, device=DEV)


def _mask(p, d):
    return torch.ones(p, d, dtype=torch.bool, device=DEV)


# (name, call(fn), message): each bad call is made on the dispatcher (Triton forced) and on the reference
LINEAR_CASES = [
    ("direct dy T", lambda f: f(r(2, 8, 5), r(2, 4, 3)), "disagree on the batch or sequence"),
    ("direct dy B", lambda f: f(r(2, 8, 5), r(3, 8, 3)), "disagree on the batch or sequence"),
    ("direct 2-D/3-D", lambda f: f(r(2, 5), r(2, 4, 3)), "disagree on the batch or sequence"),
    ("ghost dy T", lambda f: f(r(2, 8, 5), r(2, 4, 3)), "disagree on the batch or sequence"),
]
DOT_CASES = [
    ("x_b d", lambda f: f(r(2, 6, 5), r(2, 6, 3), r(2, 7, 4), r(2, 7, 3)), "disagree on the batch, d or p"),
    ("dy_b p", lambda f: f(r(2, 6, 5), r(2, 6, 3), r(2, 7, 5), r(2, 7, 4)), "disagree on the batch, d or p"),
    ("x_b B", lambda f: f(r(2, 6, 5), r(2, 6, 3), r(3, 7, 5), r(3, 7, 3)), "disagree on the batch, d or p"),
    ("dy_b T", lambda f: f(r(2, 6, 5), r(2, 6, 3), r(2, 7, 5), r(2, 6, 3)), "x_b .* dy_b .* disagree"),
    ("dy_a T", lambda f: f(r(2, 6, 5), r(2, 5, 3), r(2, 7, 5), r(2, 7, 3)), "x_a .* dy_a .* disagree"),
]
ROW_CASES = [
    ("scale len 1", lambda f: f(r(2, 4, 5), r(2, 4, 3), _ones(1)), "scale has shape"),
    ("scale len 3", lambda f: f(r(2, 4, 5), r(2, 4, 3), _ones(3)), "scale has shape"),
    ("dy T", lambda f: f(r(2, 4, 5), r(2, 3, 3), _ones(2)), "disagree on the batch or sequence"),
]
CLIP_CASES = ROW_CASES + [
    ("out transposed", lambda f: f(r(2, 4, 3), r(2, 4, 5), _ones(2), torch.zeros(3, 5, device=DEV)),
     "out has shape"),
    ("out 1-D", lambda f: f(r(2, 4, 3), r(2, 4, 5), _ones(2), torch.zeros(15, device=DEV)), "out has shape"),
]
MASKED_CASES = [("dy T", lambda f: f(r(2, 4, 5), r(2, 3, 3), _mask(3, 5)), "disagree on the batch or sequence")]
CONV_CASES = [  # x [2, 3, 6, 6] under a 3x3 kernel, padding 1: dy must be [2, 4, 6, 6]
    ("dy 5x5", lambda f: f(r(2, 3, 6, 6), r(2, 4, 5, 5), *CONV), "spatial size"),
    ("dy 7x6", lambda f: f(r(2, 3, 6, 6), r(2, 4, 7, 6), *CONV), "spatial size"),
    ("x channels", lambda f: f(r(2, 2, 6, 6), r(2, 4, 6, 6), *CONV), "channels"),
    ("dy channels", lambda f: f(r(2, 3, 6, 6), r(2, 5, 6, 6), *CONV), "channels"),
    ("batch", lambda f: f(r(2, 3, 6, 6), r(3, 4, 6, 6), *CONV), "batch"),
    ("groups", lambda f: f(r(2, 4, 6, 6), r(2, 3, 6, 6), (3, 2, 3, 3), (1, 1), (1, 1), (1, 1), 2), "channels"),
    ("dims", lambda f: f(r(2, 3, 6), r(2, 4, 6), *CONV), "dims"),
    ("1-D dy", lambda f: f(r(2, 3, 9), r(2, 4, 8), (4, 3, 3), (1,), (1,), (1,), 1), "spatial size"),
    ("geometry", lambda f: f(r(2, 3, 6, 6), r(2, 4, 6, 6), (4, 3, 3, 3), (1,), (1, 1), (1, 1), 1), "per spatial"),
]


def _ids(cases):
    return [c[0] for c in cases]


@pytest.fixture(params=["triton", "reference"])
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", request.param)
    return request.param


def _raises(call, fns, match):
    for fn in fns:
        with pytest.raises(ValueError, match=match):
            call(fn)


@pytest.mark.parametrize("name,call,match", LINEAR_CASES, ids=_ids(LINEAR_CASES))
def test_linear_norms_check_dy_against_x(backend, name, call, match):
    _raises(call, (direct_norm, direct_norm_ref, ghost_norm, ghost_norm_ref), match)


@pytest.mark.parametrize("name,call,match", DOT_CASES, ids=_ids(DOT_CASES))
def test_dots_check_use_b_against_use_a(backend, name, call, match):
    _raises(call, (ghost_dot, ghost_dot_ref, direct_dot_ref), match)


@pytest.mark.parametrize("name,call,match", ROW_CASES, ids=_ids(ROW_CASES))
def test_row_abs_sum_checks_scale_and_dy(backend, name, call, match):
    _raises(call, (row_abs_sum, row_abs_sum_ref), match)


@pytest.mark.parametrize("name,call,match", CLIP_CASES, ids=_ids(CLIP_CASES))
def test_clip_accumulate_checks_scale_dy_and_out(backend, name, call, match):
    """Including a length-1 scale, which the reference used to broadcast (the kernel read past its end)."""
    _raises(call, (clip_accumulate, clip_accumulate_ref), match)


def test_clip_accumulate_bad_out_is_untouched(backend):
    """An out of the wrong shape (a view into a larger buffer) raises before anything is written."""
    buf = torch.zeros(40, device=DEV)
    with pytest.raises(ValueError, match="out has shape"):
        clip_accumulate(r(2, 4, 3), r(2, 4, 5), _ones(2), buf[:15].view(3, 5))
    assert (buf == 0).all()


@pytest.mark.parametrize("name,call,match", MASKED_CASES, ids=_ids(MASKED_CASES))
def test_masked_direct_norm_checks_dy(backend, name, call, match):
    _raises(call, (masked_direct_norm, masked_direct_norm_ref), match)


@pytest.mark.parametrize("name,call,match", CONV_CASES, ids=_ids(CONV_CASES))
def test_conv_kernels_check_the_geometry(backend, name, call, match):
    c = _ones(2)
    fns = [lambda *a: conv_norm(*a, ghost=False), lambda *a: conv_norm(*a, ghost=True),
           lambda *a: conv_norm_ref(*a, ghost=False, direct_impl="grouped"),
           lambda *a: conv_norm_ref(*a, ghost=False, direct_impl="unfold"), lambda *a: conv_norm_ref(*a, ghost=True),
           conv_per_sample_grad_ref,
           lambda x, dy, *g: conv_clip_accumulate(x, dy, c, *g), lambda x, dy, *g: conv_clip_accumulate_ref(x, dy, c, *g)]
    _raises(call, fns, match)


def test_good_calls_still_pass(backend):
    """What the engine passes: 2-D inputs, expanded (stride-0) operands, [B, *, d] with several middle dims, an
    empty batch, a conv1d; and dy of another dtype."""
    x2, dy2, c = r(3, 5), r(3, 4), torch.rand(3, device=DEV)
    assert direct_norm(x2, dy2).shape == ghost_norm(x2, dy2).shape == (3,)
    assert clip_accumulate(x2, dy2, c).shape == (4, 5) and row_abs_sum(x2, dy2, c).shape == (4,)
    xe = r(1, 6, 5).expand(3, 6, 5)
    dye = r(3, 1, 4).expand(3, 6, 4)
    torch.testing.assert_close(direct_norm(xe, dye), direct_norm_ref(xe.contiguous(), dye.contiguous()))
    torch.testing.assert_close(ghost_dot(xe, dye, r(3, 2, 5), r(3, 2, 4)).shape, torch.Size([3]))
    x4, dy4 = r(2, 3, 2, 5), r(2, 6, 4)  # 3 x 2 positions against 6
    assert direct_norm(x4, dy4).shape == (2,)
    assert clip_accumulate(r(0, 4, 5), r(0, 4, 3), c[:0]).shape == (3, 5)
    assert conv_norm(r(2, 3, 9), r(2, 4, 9), (4, 3, 3), (1,), (1,), (1,), 1, ghost=False).shape == (2,)
    assert conv_norm(r(2, 3, 9), r(2, 4, 4), (4, 3, 3), (2,), (0,), (1,), 1, ghost=True).shape == (2,)
    assert conv_per_sample_grad_ref(r(2, 4, 6, 6), r(2, 6, 3, 3), (6, 2, 2, 2), (2, 2), (0, 0), (1, 1), 2).shape \
        == (2, 6, 2, 2, 2)


# ------------------------------------------------------------------------------------------ mixed operand dtypes
def _record_operands(monkeypatch, module, tiles, n):
    """Dtypes of the first ``n`` arguments (the data operands) of every launch of ``module.tiles``' kernel."""
    t = getattr(importlib.import_module(f"fastdp.kernels.{module}"), tiles)
    seen, orig = [], t.fn

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append({a.dtype for a in args[:n]})
                return orig[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(t, "fn", Recorder())
    return seen


MIXED = [  # (module, tiles, operands, call(x_dtype, dy_dtype) -> (dispatcher result, reference result))
    ("direct_norm", "DIRECT_TILES", 2,
     lambda a, b: (lambda x, dy: (direct_norm(x, dy), direct_norm_ref(x, dy)))(r(2, 20, 8, dtype=a), r(2, 20, 5, dtype=b))),
    ("ghost_norm", "GHOST_TILES", 4,
     lambda a, b: (lambda x, dy, xb, dyb: (ghost_dot(x, dy, xb, dyb), ghost_dot_ref(x, dy, xb, dyb)))(
         r(2, 20, 8, dtype=a), r(2, 20, 5, dtype=b), r(2, 9, 8, dtype=b), r(2, 9, 5, dtype=b))),
    ("ghost_norm", "GHOST_TILES", 4,
     lambda a, b: (lambda x, dy: (ghost_norm(x, dy), ghost_norm_ref(x, dy)))(r(2, 20, 8, dtype=a), r(2, 20, 5, dtype=b))),
    ("row_abs_sum", "ROW_ABS_TILES", 2,
     lambda a, b: (lambda x, dy, c: (row_abs_sum(x, dy, c), row_abs_sum_ref(x, dy, c)))(
         r(2, 20, 8, dtype=a), r(2, 20, 5, dtype=b), torch.rand(2, device=DEV))),
    ("masked_direct_norm", "MASKED_TILES", 2,
     lambda a, b: (lambda x, dy, m: (masked_direct_norm(x, dy, m), masked_direct_norm_ref(x, dy, m)))(
         r(2, 20, 8, dtype=a), r(2, 20, 5, dtype=b), torch.rand(5, 8, device=DEV) < 0.5)),
    ("conv_norm", "CONV_DIRECT_TILES", 2,
     lambda a, b: (lambda x, dy: (conv_norm(x, dy, *CONV, ghost=False), conv_norm_ref(x, dy, *CONV, ghost=False)))(
         r(2, 3, 6, 6, dtype=a), r(2, 4, 6, 6, dtype=b))),
    ("conv_norm", "CONV_GHOST_TILES", 2,
     lambda a, b: (lambda x, dy: (conv_norm(x, dy, *CONV, ghost=True), conv_norm_ref(x, dy, *CONV, ghost=True)))(
         r(2, 3, 6, 6, dtype=a), r(2, 4, 6, 6, dtype=b))),
    ("conv_clip_accumulate", "CONV_CLIP_TILES", 2,
     lambda a, b: (lambda x, dy, c: (conv_clip_accumulate(x, dy, c, *CONV), conv_clip_accumulate_ref(x, dy, c, *CONV)))(
         r(2, 3, 6, 6, dtype=a), r(2, 4, 6, 6, dtype=b), torch.rand(2, device=DEV))),
    ("clip_accumulate", "CLIP_TILES", 2,
     lambda a, b: (lambda x, dy, c: (clip_accumulate(x, dy, c), clip_accumulate_ref(x, dy, c)))(
         r(2, 20, 8, dtype=a), r(2, 20, 5, dtype=b), torch.rand(2, device=DEV))),
]


@pytest.mark.parametrize("module,tiles,n,call", MIXED, ids=[f"{m[0]}-{m[1]}" for m in MIXED])
@pytest.mark.parametrize("x_dtype,dy_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float16, torch.bfloat16)], ids=["bf16-fp32", "fp32-bf16", "fp16-bf16"])
def test_mixed_dtypes_reach_the_kernel_in_x_dtype(module, tiles, n, call, x_dtype, dy_dtype, monkeypatch):
    """The GPU's tl.dot rejects operands of two dtypes (the interpreter upcasts and hid it): the dispatchers cast dy
    (and x_b, dy_b) to x's dtype, and so do the references, so both give the same result."""
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    seen = _record_operands(monkeypatch, module, tiles, n)
    got, ref = call(x_dtype, dy_dtype)
    assert seen and all(s == {x_dtype} for s in seen), seen
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("module", ["direct_norm", "ghost_norm", "row_abs_sum", "masked_direct_norm", "conv_norm"])
def test_mixed_dtypes_with_the_gpu_dot_flags(module, monkeypatch):
    """fp32 x with a bf16 dy under the flags a GPU launch gets (no interpreter upcast, IEEE fp32 dots): the
    interpreter's tl.dot then asserts one dtype, as the GPU frontend does."""
    monkeypatch.setenv("FASTDP_BACKEND", "triton")
    monkeypatch.setattr(importlib.import_module(f"fastdp.kernels.{module}"), "interpreting", lambda: False)
    x, dy, c = r(2, 20, 8), r(2, 20, 5, dtype=torch.bfloat16), torch.rand(2, device=DEV)
    xc, dyc = r(2, 3, 6, 6), r(2, 4, 6, 6, dtype=torch.bfloat16)
    got, ref = {
        "direct_norm": lambda: (direct_norm(x, dy), direct_norm_ref(x, dy)),
        "ghost_norm": lambda: (ghost_norm(x, dy), ghost_norm_ref(x, dy)),
        "row_abs_sum": lambda: (row_abs_sum(x, dy, c), row_abs_sum_ref(x, dy, c)),
        "masked_direct_norm": lambda: (masked_direct_norm(x, dy, _mask(5, 8)), masked_direct_norm_ref(x, dy, _mask(5, 8))),
        "conv_norm": lambda: (conv_norm(xc, dyc, *CONV, ghost=False), conv_norm_ref(xc, dyc, *CONV, ghost=False)),
    }[module]()
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=0)
