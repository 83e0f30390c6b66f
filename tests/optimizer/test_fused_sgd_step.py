"""DPOptimizer's fused noise + SGD step (``fastdp/kernels/noisy_sgd.py``): the unfused path's maths, masked_noise's noise,
masked coordinates never move, torch-compatible momentum state, and ``last_step_fused`` tells the truth."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastdp
from fastdp.kernels import _backend
from fastdp.kernels.masked_noise import masked_noise
from fastdp.methods import SPARTA, RandomGroups
from fastdp.models import MLP
from helpers import assert_close

pytestmark = [pytest.mark.interpreter, pytest.mark.filterwarnings("ignore:noise_multiplier=0")]
B = 8


@pytest.fixture(autouse=True)
def step_kernels_on_triton(monkeypatch):
    """The backend a GPU gives once noisy_sgd and masked_noise are validated: Triton (the interpreter here) for
    those two ops, the references for the engine's (whose kernels take most of the interpreter's time).
    ``FASTDP_BACKEND=triton`` runs every op on Triton, ``reference`` none."""
    monkeypatch.setattr(_backend, "backend_for",
                        lambda t: "reference" if _backend.requested_backend() == "reference" else "triton")
    monkeypatch.setattr(_backend, "GPU_VALIDATED", _backend.GPU_VALIDATED | {"noisy_sgd", "masked_noise"})
    monkeypatch.delenv("FASTDP_BACKEND", raising=False)


def mlp():
    torch.manual_seed(0)
    return MLP(6, 3, hidden=(7,))


def make(model, sigma=0.0, fuse=True, method=None, seed=0, method_kw=None, **sgd):
    sgd = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, **sgd}
    cls = method or fastdp.DPOptimizer
    opt = cls(model, torch.optim.SGD(model.parameters(), **sgd), noise_multiplier=sigma, max_grad_norm=1.0,
              expected_batch_size=B, sample_size=10 * B, generator=torch.Generator().manual_seed(seed),
              **(method_kw or {}))
    opt.fuse_sgd = fuse
    return opt


def train(model, opt, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(B, 6, generator=g), torch.randint(0, 3, (B,), generator=g)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        yield  # the caller checks p.grad, then calls zero_grad


def run(model, opt, steps, seed=1):
    for _ in train(model, opt, steps, seed):
        opt.zero_grad()


def close(got, want, tol, name):
    """Normwise: max |got - want| <= tol * max |want|."""
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * want.double().abs().max().item(), f"{name}: max |diff| {err:.3e}"


def same_params(a, b, tol=1e-5):
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        close(p.detach(), q.detach(), tol, n)


@pytest.mark.parametrize("sgd,everywhere", [(dict(), True), (dict(dampening=0.2, maximize=True), False),
                                            (dict(nesterov=True, lr=0.05), False)])
def test_fused_equals_unfused_without_noise(sgd, everywhere, monkeypatch):
    """sigma=0: three fused steps give the unfused path's parameters, gradients and momentum buffers (the first case
    with every op on Triton, ``FASTDP_BACKEND=triton``)."""
    if everywhere:
        monkeypatch.setenv("FASTDP_BACKEND", "triton")
    m1, m2 = mlp(), mlp()
    fused, plain = make(m1, **sgd), make(m2, fuse=False, **sgd)
    for _ in zip(train(m1, fused, 3), train(m2, plain, 3)):
        assert fused.last_step_fused and fused.fused_fallback_reason is None
        assert not plain.last_step_fused and plain.fused_fallback_reason == "fuse_sgd is off"
        for p, q in zip(m1.parameters(), m2.parameters()):
            close(p.grad, q.grad, 1e-5, "grad")
        fused.zero_grad()
        plain.zero_grad()
    same_params(m1, m2)
    for p, q in zip(m1.parameters(), m2.parameters()):
        close(fused.state[p]["momentum_buffer"], plain.state[q]["momentum_buffer"], 1e-5, "momentum")


def test_fused_noise_is_masked_noise_from_the_step_seed():
    """sigma>0: p.grad = (clipped sum + masked_noise(seed)) / B with the seed the step draws from the generator, and
    the first step moves p by -lr (p.grad + wd p) (torch's new momentum buffer is the gradient)."""
    m = mlp()
    opt = make(m, sigma=1.3, seed=5)
    x, y = torch.randn(B, 6), torch.randint(0, 3, (B,))
    F.cross_entropy(m(x), y).backward()
    buf = opt.engine.buffer
    sums = [f.clone() for f in buf.flats]
    before = {p: p.detach().clone() for p in m.parameters()}
    opt.step()
    assert opt.last_step_fused
    seeds = torch.Generator().manual_seed(5)
    for flat, params in zip(sums, buf.groups):
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=seeds))
        masked_noise(flat, 1.3, seed, mask=torch.ones_like(flat, dtype=torch.bool))
        assert_close(torch.cat([p.grad.flatten() for p in params]), flat / B, 1e-6, 1e-9, "noisy gradient")
    for p in m.parameters():
        assert_close(p.detach(), before[p] - 0.1 * (p.grad + 0.01 * before[p]), 1e-6, 1e-8, "update")
        assert torch.equal(opt.state[p]["momentum_buffer"], p.grad + 0.01 * before[p])


def masked_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 3))


def test_masked_method_fused_never_moves_masked_rows_and_equals_unfused():
    """RandomGroups, momentum, noise: fused steps keep masked rows (and their momentum) untouched, and equal the
    unfused path, whose masked noise comes from the same Philox kernel and seeds."""
    m1, m2 = masked_model(), masked_model()
    fused = make(m1, sigma=1.0, method=RandomGroups, weight_decay=0.0, method_kw=dict(sparsity=0.5))
    plain = make(m2, sigma=1.0, method=RandomGroups, weight_decay=0.0, method_kw=dict(sparsity=0.5), fuse=False)
    before = {p: p.detach().clone() for p in m1.parameters()}
    for _ in zip(train(m1, fused, 3), train(m2, plain, 3)):
        assert fused.last_step_fused
        fused.zero_grad()
        plain.zero_grad()
    masks = fused.engine.masks
    assert masks
    for p, mask in masks.items():
        assert torch.equal(p.detach()[~mask.dense], before[p][~mask.dense])
        assert not fused.state[p]["momentum_buffer"][~mask.dense].any()
        assert not torch.equal(p.detach()[mask.dense], before[p][mask.dense])
    same_params(m1, m2)


def test_sparta_phases_fused():
    """SPARTA (momentum, no noise so both paths' steps compare): warm-up steps fuse, selection steps are the method's
    own (not fused), sparse steps fuse after the eligible weights' momentum reset (buffers missing for some
    parameters only: zero-filled), masked rows never move, and the run equals the unfused one."""
    runs = []
    for fuse in (True, False):
        m = masked_model()
        opt = make(m, fuse=fuse, method=SPARTA, weight_decay=0.0,
                   method_kw=dict(warmup_epochs=1, sparsity=0.5, steps_per_epoch=2))
        fused, start = [], None
        for _ in train(m, opt, 6):
            fused.append(opt.last_step_fused)
            if opt.phase == "sparse" and start is None:  # masks installed, before the first sparse step
                start = {p: p.detach().clone() for p in m.parameters()}
            opt.zero_grad()
        runs.append((m, opt, fused, start))
    (m1, opt, fused, start), (m2, _, _, _) = runs
    assert fused == [True, True, False, False, True, True]
    assert opt.engine.masks
    for p, mask in opt.engine.masks.items():
        assert torch.equal(p.detach()[~mask.dense], start[p][~mask.dense])
    same_params(m1, m2)


def test_masked_fallbacks_keep_torch_maths():
    """Where torch's SGD moves masked coordinates (weight decay, momentum left on them), the step is not fused."""
    m = masked_model()
    opt = make(m, method=RandomGroups, method_kw=dict(sparsity=0.5))  # weight decay 0.01
    run(m, opt, 1)
    assert not opt.last_step_fused and "weight decay" in opt.fused_fallback_reason
    m1, m2 = masked_model(), masked_model()
    fused = make(m1, method=RandomGroups, weight_decay=0.0, method_kw=dict(sparsity=0.5))
    plain = make(m2, method=RandomGroups, weight_decay=0.0, method_kw=dict(sparsity=0.5), fuse=False)
    for o, mm in ((fused, m1), (plain, m2)):  # momentum carried from earlier training, on masked rows too
        for p in mm.parameters():
            o.state[p]["momentum_buffer"] = torch.full_like(p, 0.01)
    run(m1, fused, 2)
    run(m2, plain, 2)
    assert not fused.last_step_fused and "momentum left on masked" in fused.fused_fallback_reason
    same_params(m1, m2, tol=1e-6)


def test_state_dict_round_trip_and_switching_paths():
    """Momentum buffers are per-parameter views of one flat tensor in torch's state: a checkpoint of the fused run
    resumes fused or unfused, or loads into a plain torch SGD, with the same result."""
    m = mlp()
    opt = make(m)
    run(m, opt, 2)
    bufs = [opt.state[p]["momentum_buffer"] for p in m.parameters()]
    assert len({b.untyped_storage().data_ptr() for b in bufs}) == 1
    assert all(b.shape == p.shape and b.dtype == torch.float32 for b, p in zip(bufs, m.parameters()))
    sd = copy.deepcopy(opt.state_dict())
    plain_sgd = torch.optim.SGD(mlp().parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    plain_sgd.load_state_dict(sd["optimizer"])
    resumed = []
    for fuse in (True, False):
        m2 = copy.deepcopy(m)
        o2 = make(m2, fuse=fuse)
        o2.load_state_dict(sd)
        run(m2, o2, 1, seed=2)
        assert o2.last_step_fused == fuse
        resumed.append(m2)
    run(m, opt, 1, seed=2)
    for other in resumed:
        same_params(m, other)
    new = opt.state[next(iter(m.parameters()))]["momentum_buffer"]
    assert new.untyped_storage().data_ptr() == bufs[0].untyped_storage().data_ptr()  # kept, updated in place


def test_last_step_fused_reports_the_path(monkeypatch):
    class OwnNoise(fastdp.DPOptimizer):
        def add_noise(self, grads):
            super().add_noise(grads)

    cases = [
        (dict(), True, None),
        (dict(method=OwnNoise), False, "overridden"),
        (dict(lr_sched=True), True, None),
    ]
    for kw, fused, reason in cases:
        m = mlp()
        sched = kw.pop("lr_sched", False)
        opt = make(m, **kw)
        if sched:
            lr = torch.optim.lr_scheduler.StepLR(opt.original_optimizer, 1, gamma=0.5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(m, opt, 1)
            if sched:
                lr.step()
        assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
        assert opt.last_step_fused == fused and (reason is None or reason in opt.fused_fallback_reason)
    m = mlp()
    adam = fastdp.DPOptimizer(m, torch.optim.Adam(m.parameters()), noise_multiplier=0.0, max_grad_norm=1.0,
                              expected_batch_size=B, sample_size=10 * B)
    run(m, adam, 1)
    assert not adam.last_step_fused and "Adam" in adam.fused_fallback_reason
    m = mlp()
    secure = fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                                expected_batch_size=B, sample_size=10 * B, secure_mode=True)
    run(m, secure, 1)
    assert not secure.last_step_fused and "secure_mode" in secure.fused_fallback_reason
    m = mlp()
    groups = [{"params": [m.layers[0].weight]}, {"params": [p for p in m.parameters() if p is not m.layers[0].weight],
                                               "lr": 0.2}]
    split = fastdp.DPOptimizer(m, torch.optim.SGD(groups, lr=0.1), noise_multiplier=0.0, max_grad_norm=1.0,
                               expected_batch_size=B, sample_size=10 * B)
    run(m, split, 1)
    assert not split.last_step_fused and "different SGD settings" in split.fused_fallback_reason
    monkeypatch.setenv("FASTDP_BACKEND", "reference")
    m = mlp()
    opt = make(m)
    run(m, opt, 1)
    assert not opt.last_step_fused and "not active" in opt.fused_fallback_reason


def test_momentum_missing_for_some_parameters():
    """torch creates a missing buffer undamped: with dampening the step falls back once (torch creates it), then fuses
    again; the run equals the unfused one."""
    runs = []
    for fuse in (True, False):
        m = mlp()
        opt = make(m, fuse=fuse, dampening=0.3)
        fused = []
        for i, _ in enumerate(train(m, opt, 4)):
            fused.append(opt.last_step_fused)
            if i == 1:
                opt.state.pop(m.head.bias)
            opt.zero_grad()
        runs.append((m, fused))
    assert runs[0][1] == [True, True, False, True]
    same_params(runs[0][0], runs[1][0])


def test_bf16_parameters_take_the_unfused_path():
    """torch keeps a bf16 parameter's gradient and momentum in bf16: the fused fp32 update would change the maths."""
    m = mlp().bfloat16()
    opt = make(m)
    F.cross_entropy(m(torch.randn(B, 6).bfloat16()).float(), torch.randint(0, 3, (B,))).backward()
    opt.step()
    assert not opt.last_step_fused and "fp32" in opt.fused_fallback_reason
