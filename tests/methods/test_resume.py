"""Checkpoint / resume of every method at every step: a run resumed from ``model.state_dict()`` and
``optimizer.state_dict()`` (through torch.save / torch.load) ends bit-identical to the uninterrupted run, with the same
masks and the same accountant history (warm-up, selection and sparse phases, mask refreshes and growth, ranked masks)."""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdp.methods import SPARTA, AdaDPIGU, BiTFiT, LastLayer, RandomGroups, RandomSparsification
from fastdp.micro_adam import DPMicroAdam

B, N, STEPS = 3, 9, 13  # 3 steps per epoch; 13 steps cross 4 epoch boundaries and end mid-epoch

CASES = {
    "sparta": (SPARTA, dict(warmup_epochs=1, sparsity=0.5)),
    "sparta-aggregate-global": (SPARTA, dict(warmup_epochs=1, sparsity=0.3, selection="aggregate", topk="global")),
    "rs": (RandomSparsification, dict(epochs=4, final_rate=0.8, refresh_per_epoch=2)),
    "rs-ranked": (RandomSparsification, dict(epochs=4, final_rate=0.8, ranked=True)),
    "rs-ranked-refresh": (RandomSparsification, dict(epochs=4, final_rate=0.8, ranked=True, refresh_per_epoch=2)),
    "adadpigu": (AdaDPIGU, dict(pretrain_epochs=1, retention=0.5, unfreeze_step=0.1, unfreeze_epochs=2,
                                pretrain_noise_multiplier=2.0)),
    "random-groups": (RandomGroups, dict(sparsity=0.5)),
    "bitfit": (BiTFiT, {}),
    "last-layer": (LastLayer, {}),
    "dp-microadam": (DPMicroAdam, dict(lr=0.01, density=0.2, window=3)),
    "dp-microadam-block-ef4": (DPMicroAdam, dict(lr=0.01, density=0.2, window=3, topk="block", ef_bits=4,
                                                 topk_block_size=16, quant_block_size=10)),
}


def build(name):
    cls, kw = CASES[name]
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8), nn.ReLU(),
                      nn.Linear(8, 3))
    dp = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B, sample_size=N,
              generator=torch.Generator().manual_seed(0))
    if cls is DPMicroAdam:
        return m, cls(m, **kw, **dp)
    return m, cls(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), **kw, **dp)


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(B, 1, 6, 6, generator=g), torch.randint(0, 3, (B,), generator=g)) for _ in range(STEPS)]


def run(m, opt, data):
    for x, y in data:
        F.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()


def checkpoint(m, opt):
    buf = io.BytesIO()
    torch.save({"model": m.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf)  # weights_only: checkpoints hold tensors and plain containers only


@pytest.mark.parametrize("name", list(CASES))
def test_resume_at_every_step_equals_the_uninterrupted_run(name):
    data = batches()
    m, opt = build(name)
    saved = []
    for x, y in data:
        saved.append(checkpoint(m, opt))
        run(m, opt, [(x, y)])
    final = {n: p.detach().clone() for n, p in m.named_parameters()}
    masks = {n: v.clone() for n, v in getattr(opt, "masks", {}).items()}
    for k, ckpt in enumerate(saved):
        m2, opt2 = build(name)
        m2.load_state_dict(ckpt["model"])
        opt2.load_state_dict(ckpt["optimizer"])
        run(m2, opt2, data[k:])
        diff = [n for n, p in m2.named_parameters() if not torch.equal(p, final[n])]
        assert not diff, f"resumed after {k} steps: {diff} differ"
        assert {n: v for n, v in getattr(opt2, "masks", {}).items()}.keys() == masks.keys()
        assert all(torch.equal(opt2.masks[n], v) for n, v in masks.items()), f"resumed after {k} steps"
        assert opt2.steps_taken == STEPS and opt2.accountant.history == opt.accountant.history  # the same epsilon
        assert getattr(opt2, "phase", None) == getattr(opt, "phase", None)
