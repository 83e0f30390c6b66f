"""CUDA checks (skipped without a GPU): parity on the device, bf16 autocast, seeded CUDA noise."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastdp
from fastdp.models import SmallCNN, TinyTransformer, lm_loss
from helpers import assert_close, check_bf16_autocast, clipped_sum_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _compare(model, loss, x, y, R, rtol):
    ref, norms = clipped_sum_reference(model, loss, x, y, max_grad_norm=R)
    eng = fastdp.GradSampleEngine(model, fastdp.FlatClip(R))
    loss(model(x), y).backward()
    eng.detach()
    assert_close(eng.last_norms, norms, rtol, rtol * norms.max().item(), "norms")
    named = dict(model.named_parameters())
    for n, v in ref.items():
        assert_close(eng.summed[named[n]], v, rtol, rtol * v.abs().max().item(), n)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 2e-5)])
def test_cuda_parity_transformer_and_cnn(dtype, rtol):
    m = TinyTransformer(vocab=61, d=32, layers=2, heads=2, max_len=24).to("cuda", dtype)
    idx = torch.randint(0, 61, (6, 20), device="cuda")
    _compare(m, lm_loss, idx, torch.randint(0, 61, (6, 20), device="cuda"), 0.3, rtol)
    c = SmallCNN(3, 5, width=8, image_size=16).to("cuda", dtype)
    _compare(c, F.cross_entropy, torch.randn(8, 3, 16, 16, device="cuda", dtype=dtype),
             torch.randint(0, 5, (8,), device="cuda"), 0.1, rtol)


def test_cuda_bf16_autocast_close_to_fp32():
    m = TinyTransformer(vocab=61, d=64, layers=2, heads=2, max_len=24).cuda()
    idx, tgt = torch.randint(0, 61, (6, 20), device="cuda"), torch.randint(0, 61, (6, 20), device="cuda")
    check_bf16_autocast(m, idx, tgt, lm_loss, "cuda")


def test_cuda_noise_scale_and_seed():
    m = torch.nn.Linear(512, 512, bias=False).cuda()
    opt = fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=1.0), noise_multiplier=1.5, max_grad_norm=0.5,
                             expected_batch_size=4, sample_size=400,
                             generator=torch.Generator("cuda").manual_seed(0))
    (0.0 * m(torch.randn(4, 512, device="cuda")).sum()).backward()
    opt.step()
    g = m.weight.grad.double().flatten()
    assert abs(g.var().item() / (1.5 * 0.5 / 4) ** 2 - 1) < 5 * math.sqrt(2 / g.numel())


@pytest.mark.parametrize("kw", [dict(), dict(ef_bits=4, topk="block", topk_block_size=4200, quant_block_size=999)],
                         ids=["default", "frugal"])
@pytest.mark.parametrize("dtype,wd", [(torch.float32, 0.0), (torch.bfloat16, 0.1)])
def test_cuda_microadam_fused_step_equals_unfused(monkeypatch, kw, dtype, wd):
    """MicroAdam's fused step on CUDA (the PyTorch op sequence: rows_topk through torch.topk, no host
    synchronisation) against the unfused step with the PyTorch references on CUDA, bit for bit over 6 steps (the
    ring wraps), and against the CPU (compiled where numba is installed) within one fp32 ulp-scale tolerance."""
    from fastdp.micro_adam import MicroAdam

    monkeypatch.setenv("FASTDP_BACKEND", "reference")
    shapes = [(5000,), (9, 13), (4100,), (64, 130), (1,), (20001,), (70001,)]
    kw = dict(dict(lr=0.01, density=0.01, window=4, weight_decay=wd), **kw)
    runs = {}
    for name, device, fused in (("fused", "cuda", True), ("unfused", "cuda", False), ("cpu", "cpu", True)):
        if name == "cpu":
            monkeypatch.setenv("FASTDP_BACKEND", "auto")
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.1).to(dtype).to(device)) for s in shapes]
        opt = MicroAdam(ps, fused=fused, **kw)
        for _ in range(6):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype).to(device)
            opt.step()
        runs[name] = (ps, opt)
    for a, b, c in zip(runs["fused"][0], runs["unfused"][0], runs["cpu"][0]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.cpu(), c, rtol=1e-5, atol=1e-6)
    for a, b in zip(runs["fused"][0], runs["unfused"][0]):
        sa, sb = runs["fused"][1].state[a], runs["unfused"][1].state[b]
        for k, v in sb.items():
            if torch.is_tensor(v):
                assert torch.equal(sa[k], v), k
