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
