"""MicroAdam's moment reconstruction and parameter update from the ring buffer (``fastdp/kernels/microadam_update.py``)
vs a dense [window, d] materialisation of the sparse gradients. Layouts as in ``test_topk_gather.py``."""
import functools
import math

import pytest
import torch

from fastdp.kernels.microadam_update import microadam_update, microadam_update_ref

BETA1, BETA2 = 0.9, 0.999


def ring(s, layout, device):
    """(ring_idx [R, k], ring_val [R, k], per_block, block_size): R distinct-index sparse gradients."""
    R = s.window
    if layout == "tensor":
        k = math.ceil(s.density * s.d)
        idx = torch.stack([torch.randperm(s.d, device=device)[:k] for _ in range(R)]).int()
        return idx, torch.randn(R, k, device=device), 0, 0
    bs = min(s.topk_block, s.d)
    nb, per_block = math.ceil(s.d / bs), math.ceil(s.density * bs)
    idx = torch.stack([torch.rand(nb, bs, device=device).topk(per_block, dim=1).indices.reshape(-1)
                       for _ in range(R)]).short()  # the tail block's picks past d are skipped by every variant
    return idx, torch.randn(R, nb * per_block, device=device).bfloat16(), per_block, bs


def dense_window(idx, vals, d, per_block, block_size, dtype):
    """[R, d] dense sparse gradients; entries past d go to a dropped extra column."""
    g = idx.long()
    if per_block:
        g = g + torch.arange(idx.shape[1], device=idx.device) // per_block * block_size
    g = torch.where(g < d, g, d)
    return torch.zeros(idx.shape[0], d + 1, dtype=dtype, device=idx.device).scatter_(1, g, vals.to(dtype))[:, :d]


def naive(p, idx, vals, w1, w2, *, lr, eps, c1, c2, decay, per_block, block_size, workspace=None):
    dense = dense_window(idx, vals, p.numel(), per_block, block_size, p.dtype)
    m = (w1.to(p.dtype)[:, None] * dense).sum(0) * c1
    v = (w2.to(p.dtype)[:, None] * dense.square()).sum(0) * c2
    return p.mul_(decay).sub_(lr * m / (v.sqrt() + eps))


@pytest.mark.parametrize("impl", ["reference", "triton", "naive"])
@pytest.mark.parametrize("layout", ["tensor", "block"])
def test_microadam_update(micro, flat_shape, layout, impl):
    s = flat_shape
    idx, vals, per_block, bs = ring(s, layout, micro.device)
    micro.setup("microadam_update", f"{s.name}-{layout}", impl)
    ages = torch.arange(s.window, device=micro.device, dtype=torch.float64)
    w1, w2 = (BETA1 ** ages).float(), (BETA2 ** ages).float()
    t = s.window  # steps so far: the ring is full
    # lr = 1 so the update dominates the fp32 rounding of p (the check compares updates, p_new - p)
    kw = dict(lr=1.0, eps=1e-8, c1=(1 - BETA1) / (1 - BETA1 ** t), c2=(1 - BETA2) / (1 - BETA2 ** t), decay=0.99,
              per_block=per_block, block_size=bs)
    workspace = torch.zeros(2, s.d, device=micro.device) if impl == "triton" else None
    fn = functools.partial({"reference": microadam_update_ref, "triton": microadam_update, "naive": naive}[impl],
                           workspace=workspace, **kw)
    p = torch.randn(s.d, device=micro.device)
    truth = naive(p.double(), idx, vals, w1.double(), w2.double(), **kw) - p.double()
    micro.assert_close(fn(p.clone(), idx, vals, w1, w2) - p, truth, normwise=True)
    op_bytes = idx.numel() * (idx.element_size() + vals.element_size()) + 8 * s.d + 8 * s.window
    micro.time(fn, p, idx, vals, w1, w2, op_bytes=op_bytes)
