"""MicroAdam: Adam-exactness at density 1, error feedback bookkeeping, state memory, DP-MicroAdam wiring."""
import copy
import io
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdp
from fastdp.kernels.microadam_cpu import HAS_NUMBA
from fastdp.micro_adam import DPMicroAdam, MicroAdam, fused_backend
from fastdp.models import SmallCNN

# the models here live on the CPU: the Triton path runs there only through the interpreter
BACKENDS = ["reference", pytest.param("triton", marks=[
    pytest.mark.interpreter,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need TRITON_INTERPRET=1")])]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTDP_BACKEND", request.param)
    return request.param


# the fused step's two CPU implementations: the compiled one (numba, the default) and vectorised PyTorch ops
FUSED_IMPLS = [pytest.param("numba", marks=pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")), "torch"]


@pytest.fixture(params=FUSED_IMPLS)
def fused_impl(request, monkeypatch):
    """FASTDP_BACKEND "auto" selects the compiled fused step on the CPU, "reference" the PyTorch one; the unfused
    step runs the PyTorch references under both."""
    monkeypatch.setenv("FASTDP_BACKEND", "auto" if request.param == "numba" else "reference")
    assert fused_backend(torch.device("cpu")) == request.param
    return request.param


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3))


def _run(model, opt, steps=6):
    torch.manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 7), torch.randint(0, 3, (16,))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("ef_bits", [32, 4])
@pytest.mark.parametrize("topk,wd", [("tensor", 0.0), ("block", 0.0), ("tensor", 0.1)])
def test_density_one_is_exactly_adam(backend, ef_bits, topk, wd, fused):
    """density=1, window >= steps: MicroAdam's window moments are Adam's bias-corrected moments (the fused step
    is plain PyTorch whatever the backend; the unfused one runs the backend's kernels)."""
    if fused and backend == "triton":
        pytest.skip("the fused step runs no Triton kernel")
    m1, m2 = _model(), _model()
    ref = (torch.optim.AdamW if wd else torch.optim.Adam)(m1.parameters(), lr=0.01, weight_decay=wd)
    opt = MicroAdam(m2.parameters(), lr=0.01, weight_decay=wd, density=1.0, window=8, ef_bits=ef_bits, topk=topk,
                    topk_block_size=5, fused=fused)
    _run(m1, ref)
    _run(m2, opt)
    tol = 1e-6 if topk == "tensor" else 1e-2  # block mode keeps bf16 values in the ring buffer
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol)


def test_sparse_steps_keep_error_feedback_exact():
    """ef_bits=32: what top-k leaves out is carried exactly: ring row + EF == gradient + previous EF."""
    w = nn.Parameter(torch.zeros(50))
    opt = MicroAdam([w], lr=0.1, density=0.1, window=3)
    ef_prev = torch.zeros(50)
    for t in range(5):
        g = torch.randn(50)
        w.grad = g.clone()
        opt.step()
        st = opt.state[w]
        row = t % 3
        dense = torch.zeros(50).index_add_(0, st["ring_idx"][row].long(), st["ring_val"][row])
        torch.testing.assert_close(dense + st["ef"], g + ef_prev)
        assert (st["ring_idx"][row] >= 0).sum() == 5
        kept = set(st["ring_idx"][row].tolist())
        assert all(abs((g + ef_prev)[i]) >= abs((g + ef_prev)[j]) for i in kept for j in set(range(50)) - kept)
        ef_prev = st["ef"].clone()


def test_untouched_coordinates_only_decay():
    w = nn.Parameter(torch.ones(100))
    opt = MicroAdam([w], lr=0.1, density=0.02, window=2, weight_decay=0.5)
    w.grad = torch.zeros(100)
    w.grad[3], w.grad[40] = 5.0, -7.0
    opt.step()
    moved = (w.detach() != 1.0 * (1 - 0.1 * 0.5)).nonzero().flatten().tolist()
    assert moved == [3, 40]


# sizes that exercise every fused layout case: rows >= 4096 (rows_topk's threshold path), odd sizes (padding to
# even), equal sizes (one [count, S] view), several quantisation blocks with a tail, a non-contiguous parameter
# (70001 values: three update segments of the compiled step's whole-tensor rows)
FUSED_SHAPES = [(5000,), (9, 13), (4100,), (13,), (9, 13), (64, 130), (1,), (3, 5, 7), (20001,), (70001,), (7, 9)]


def _param_list(dtype, gen):
    ps = [nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype)) for s in FUSED_SHAPES]
    ps[-1] = nn.Parameter(torch.randn(9, 7, generator=gen).to(dtype).t())  # strided [7, 9]
    return ps


def _run_fused_unfused(steps, kw, dtype=torch.float32, skip=lambda t, i: False, impl=None):
    """Both paths on identical parameters and gradients (``skip(t, i)``: parameter i gets no gradient at step
    t); returns [(params, optimizer)] for fused and unfused. ``impl``: every chunk of the fused optimizer must
    have stepped with that implementation."""
    out = []
    for fused in (True, False):
        gen = torch.Generator().manual_seed(0)
        ps = _param_list(dtype, gen)
        opt = MicroAdam(ps, fused=fused, **kw)
        for t in range(steps):
            for i, p in enumerate(ps):
                g = torch.randn(p.shape, generator=gen).to(dtype)
                if i == 1:  # a strided gradient
                    g = torch.randn(p.shape[::-1], generator=gen).to(dtype).t()
                p.grad = None if skip(t, i) else g
            opt.step()
            if fused and impl is not None:
                assert {c.last_impl for cs in opt._chunks.values() for c in cs} == {impl}
        out.append((ps, opt))
    return out


def _assert_same(a, b):
    (pa, oa), (pb, ob) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        sa, sb = oa.state[x], ob.state[y]
        assert sa.keys() == sb.keys() and sa["step"] == sb["step"]
        for k, v in sb.items():
            if torch.is_tensor(v):
                assert v.dtype == sa[k].dtype and torch.equal(sa[k], v), k


LAYOUTS = [dict(), dict(ef_bits=4), dict(topk="block", topk_block_size=4200),
           dict(ef_bits=4, topk="block", topk_block_size=4200, quant_block_size=999),
           dict(ef_bits=4, topk="block", topk_block_size=5, quant_block_size=7, density=0.2, window=3)]


@pytest.mark.parametrize("kw", LAYOUTS, ids=["default", "ef4", "block", "frugal", "frugal-small-blocks"])
@pytest.mark.parametrize("dtype,wd", [(torch.float32, 0.0), (torch.float32, 0.1), (torch.bfloat16, 0.0),
                                      (torch.bfloat16, 0.1)])
def test_fused_step_equals_unfused_bit_for_bit(fused_impl, kw, dtype, wd):
    """The fused step (flat buffers, rows_topk, quantisation over 2-D views, one scatter of the window) computes
    the unfused reference's maths with the same float ops: parameters and every state tensor are bit-identical,
    across the ring's wrap-around."""
    kw = dict(dict(lr=0.01, density=0.01, window=4), **kw, weight_decay=wd)
    _assert_same(*_run_fused_unfused(6, kw, dtype, impl=fused_impl))


def _same_nan_as_nan(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit-identical, except that NaN payloads are not compared (torch's own fp32 -> bf16 conversion gives 0x7FC0 or
    0xFFFF for a NaN depending on the code path)."""
    if not x.is_floating_point():
        return torch.equal(x, y)
    nx, ny = torch.isnan(x), torch.isnan(y)
    iview = torch.int16 if x.element_size() == 2 else torch.int32
    return torch.equal(nx, ny) and torch.equal(x.masked_fill(nx, 0).view(iview), y.masked_fill(ny, 0).view(iview))


@pytest.mark.parametrize("kw", LAYOUTS, ids=["default", "ef4", "block", "frugal", "frugal-small-blocks"])
def test_nonfinite_gradients_match_the_reference(fused_impl, kw):
    """NaN and +-inf in a gradient (fewer than a row's picks): top-k ranks them first (NaN above inf), the window
    carries them, and every path gives the same parameters and state (NaN where the reference has NaN)."""
    kw = dict(dict(lr=0.01, density=0.01, window=4), **kw)
    out = []
    for fused in (True, False):
        gen = torch.Generator().manual_seed(0)
        ps = _param_list(torch.float32, gen)
        opt = MicroAdam(ps, fused=fused, **kw)
        for t in range(4):
            for p in ps:
                g = torch.randn(p.shape, generator=gen)
                if t == 1 and p.numel() > 1000:
                    g.view(-1)[[7, 500, 900]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
                p.grad = g
            opt.step()
        out.append((ps, opt))
    (pa, oa), (pb, ob) = out
    assert sum(int(torch.isnan(p).sum()) for p in pa) > 0
    for x, y in zip(pa, pb):
        assert _same_nan_as_nan(x.detach(), y.detach())
        for k, v in ob.state[y].items():
            if torch.is_tensor(v):
                assert _same_nan_as_nan(oa.state[x][k], v), k


def test_fused_chunks_and_missing_gradients(fused_impl):
    """Small chunks (chunk_elements) and parameters without a gradient at some steps (their step count falls
    behind: they are stepped in their own cohort) give the unfused result."""
    kw = dict(lr=0.01, density=0.05, window=3, ef_bits=4, topk="block", topk_block_size=300, quant_block_size=77,
              chunk_elements=200)
    fused, unfused = _run_fused_unfused(5, kw, skip=lambda t, i: (t, i) in {(1, 2), (2, 2), (3, 0)}, impl=fused_impl)
    assert len(fused[1]._chunks[0]) > 2
    _assert_same(fused, unfused)


@pytest.mark.parametrize("kw", LAYOUTS[:4], ids=["default", "ef4", "block", "frugal"])
def test_checkpoints_move_between_fused_and_unfused(fused_impl, kw):
    """optimizer.state holds views of the fused buffers with the per-tensor shapes and dtypes: a checkpoint of
    either path resumes in the other bit-identically, and a resumed fused optimizer owns fresh flat buffers."""
    kw = dict(lr=0.01, density=0.05, window=3, **kw)
    gen = torch.Generator().manual_seed(0)
    shapes = [p.shape for p in _param_list(torch.float32, torch.Generator().manual_seed(0))]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]

    def run(fused, steps, ckpt=None):
        ps = _param_list(torch.float32, torch.Generator().manual_seed(0))
        opt = MicroAdam(ps, fused=fused, **kw)
        if ckpt is not None:
            with torch.no_grad():
                for p, v in zip(ps, ckpt["params"]):
                    p.copy_(v)
            opt.load_state_dict(ckpt["opt"])
        for gs in steps:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        return ps, opt

    straight = run(True, grads)
    for first, second in ((True, False), (False, True)):
        ps, opt = run(first, grads[:3])
        ckpt = _checkpoint({"params": [p.detach().clone() for p in ps], "opt": opt.state_dict()})
        _assert_same(straight, run(second, grads[3:], ckpt))


def test_state_is_views_of_flat_buffers():
    ps = _param_list(torch.float32, torch.Generator().manual_seed(0))
    opt = MicroAdam(ps, ef_bits=4, topk="block", topk_block_size=4200)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    (chunk,) = opt._chunks[0]
    for p in ps:
        st = opt.state[p]
        assert st["ring_idx"].untyped_storage().data_ptr() == chunk.ring_idx.untyped_storage().data_ptr()
        assert st["ef_codes"].untyped_storage().data_ptr() == chunk.codes.untyped_storage().data_ptr()
    # the flat buffers hold the per-tensor state and nothing more (no padding in state storage)
    assert chunk.codes.numel() + 8 * chunk.ef_min.numel() + (2 + 2) * chunk.ring_idx.numel() == opt.state_bytes()


def test_state_bytes_per_parameter():
    """ef_bits=4, density=0.01, window=10, blockwise top-k: about 0.9 B/param (Adam: 8 B/param)."""
    w = nn.Parameter(torch.zeros(3_200_000))
    opt = MicroAdam([w], density=0.01, window=10, ef_bits=4, topk="block", topk_block_size=32_000)
    w.grad = torch.randn_like(w)
    opt.step()
    per_param = opt.state_bytes() / w.numel()
    assert 0.89 < per_param < 0.91, per_param
    # GPT-2's 148 tensors at quarter width (the CPU benchmark's list): balanced top-k blocks keep the frugal
    # layout at ~0.9 B/param (blocks padded to a full 32000 values would make it 0.945)
    from fastdp.bench.bench_micro_adam import SHAPES
    frugal = MicroAdam([w], density=0.01, window=10, ef_bits=4, topk="block")
    shapes = SHAPES["quarter"]()
    spec_bytes = sum(math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
                     for s in shapes for shape, dtype, _ in frugal._state_spec(torch.empty(s, device="meta")).values())
    assert 0.9 <= spec_bytes / sum(math.prod(s) for s in shapes) < 0.902
    adam = torch.optim.Adam([w])
    adam.step()
    adam_bytes = sum(v.numel() * v.element_size() for v in adam.state[w].values() if torch.is_tensor(v) and v.dim())
    assert adam_bytes / w.numel() == 8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters(backend, dtype):
    m = _model().to(dtype)
    opt = MicroAdam(m.parameters(), lr=0.01, density=0.3, ef_bits=4, topk="block", topk_block_size=16)
    before = [p.detach().clone() for p in m.parameters()]
    for _ in range(3):
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in m.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters()))


def test_bad_arguments():
    p = [nn.Parameter(torch.zeros(3))]
    for kw in (dict(density=0), dict(density=1.5), dict(window=0), dict(ef_bits=8), dict(topk="global"),
               dict(topk_block_size=40000)):
        with pytest.raises(ValueError):
            MicroAdam(p, **kw)


def test_dp_microadam_is_dp_gradient_then_microadam():
    """The noise enters once, on the clipped sum, before top-k: same result as DPOptimizer's gradient fed to MicroAdam."""
    torch.manual_seed(0)
    base = SmallCNN(1, 3, width=4, image_size=8)
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    dp = dict(noise_multiplier=1.0, max_grad_norm=0.5, expected_batch_size=8, sample_size=800)
    o1 = DPMicroAdam(m1, lr=0.01, generator=torch.Generator().manual_seed(3), **dp)
    o2 = fastdp.DPOptimizer(m2, MicroAdam(m2.parameters(), lr=0.01), generator=torch.Generator().manual_seed(3), **dp)
    assert isinstance(o1.original_optimizer, MicroAdam)
    assert (o1.original_optimizer.density, o1.original_optimizer.window, o1.original_optimizer.ef_bits,
            o1.original_optimizer.topk) == (0.01, 10, 32, "tensor")
    for _ in range(3):
        x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
        for m, o in ((m1, o1), (m2, o2)):
            F.cross_entropy(m(x), y).backward()
            o.step()
            o.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert o1.epsilon(1e-5) == pytest.approx(fastdp.get_epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=3,
                                                                 delta=1e-5))
    assert not math.isinf(o1.epsilon(1e-5))


def _checkpoint(obj):
    """``obj`` through torch.save / torch.load, as a checkpoint on disk."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk,ef_bits", [("tensor", 32), ("block", 32), ("tensor", 4), ("block", 4)])
def test_resume_from_state_dict_is_bit_identical(dtype, topk, ef_bits):
    """Every state tensor keeps its dtype through load_state_dict (torch would cast int16/int32 indices, uint8 codes
    and fp32 error feedback to the parameter's dtype); the resumed run equals the uninterrupted one."""
    kw = dict(lr=0.01, density=0.2, window=3, topk=topk, ef_bits=ef_bits, topk_block_size=16, quant_block_size=10)
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=gen).to(dtype) for p in _model().parameters()] for _ in range(7)]

    def run(model, opt, steps):
        for gs in steps:
            for p, g in zip(model.parameters(), gs):
                p.grad = g.clone()
            opt.step()

    m = _model().to(dtype)
    opt = MicroAdam(m.parameters(), **kw)
    run(m, opt, grads[:4])
    ckpt = _checkpoint({"model": m.state_dict(), "opt": opt.state_dict()})
    run(m, opt, grads[4:])
    m2 = _model().to(dtype)
    m2.load_state_dict(ckpt["model"])
    opt2 = MicroAdam(m2.parameters(), **kw)
    opt2.load_state_dict(ckpt["opt"])
    for p, p2 in zip(m.parameters(), m2.parameters()):
        assert {k: v.dtype for k, v in opt2.state[p2].items() if torch.is_tensor(v)} == \
               {k: v.dtype for k, v in opt.state[p].items() if torch.is_tensor(v)}
    run(m2, opt2, grads[4:])
    for p, p2 in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, p2)
        for k, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt2.state[p2][k])), k


def test_loading_a_state_of_another_layout_is_refused():
    m = _model()
    opt = MicroAdam(m.parameters(), density=0.2, topk="block", topk_block_size=16)
    _run(m, opt, steps=1)
    sd = opt.state_dict()
    other = MicroAdam(m.parameters(), density=0.2, topk="tensor")
    with pytest.raises(ValueError, match="layout"):
        other.load_state_dict(sd)
    assert not other.state  # nothing half-loaded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dp_microadam_resume_through_dp_optimizer_state_dict(dtype):
    dp = dict(noise_multiplier=1.0, max_grad_norm=0.5, expected_batch_size=8, sample_size=800)
    gen = torch.Generator().manual_seed(5)
    batches = [(torch.randn(8, 7, generator=gen).to(dtype), torch.randint(0, 3, (8,), generator=gen)) for _ in range(6)]

    def build():
        m = _model().to(dtype)
        return m, DPMicroAdam(m, lr=0.01, density=0.2, window=3, generator=torch.Generator().manual_seed(3), **dp)

    def run(m, o, bs):
        for x, y in bs:
            F.cross_entropy(m(x).float(), y).backward()
            o.step()
            o.zero_grad()

    m, o = build()
    run(m, o, batches[:3])
    ckpt = _checkpoint({"model": m.state_dict(), "opt": o.state_dict()})
    run(m, o, batches[3:])
    m2, o2 = build()
    m2.load_state_dict(ckpt["model"])
    o2.load_state_dict(ckpt["opt"])
    st = o2.original_optimizer.state[m2[0].weight]
    assert (st["ef"].dtype, st["ring_idx"].dtype) == (torch.float32, torch.int32)
    run(m2, o2, batches[3:])
    for p, p2 in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, p2)
    assert o.epsilon(1e-5) == o2.epsilon(1e-5)
