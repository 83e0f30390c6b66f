"""Clip factors from squared norms (``fastdp/kernels/clip_factor.py``): one launch vs the four PyTorch ops of the reference
(sqrt, add, divide, clamp). A latency benchmark: per-layer clipping calls it once per weight inside backward (~50
times per GPT-2 step), so what counts is the time per call at B = 16..256, not bandwidth (``op_bytes``: 8 B per
sample, read and written once)."""
import pytest
import torch

from fastdp.kernels.clip_factor import clip_factor, clip_factor_ref


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("B", [16, 64, 256])
def test_clip_factor(micro, B, impl):
    micro.setup("clip_factor", f"B{B}", impl)
    sq = (torch.rand(B, device=micro.device, dtype=torch.float64) * 4) ** 2
    fn = clip_factor if impl == "triton" else clip_factor_ref
    args = (sq.float(), 1.0, 1e-6 / B, float(B))
    truth = torch.clamp(1.0 / (sq.sqrt() + 1e-6 / B), max=float(B))
    micro.assert_close(fn(*args), truth, rtol=1e-6)
    micro.time(fn, *args, op_bytes=8 * B)
