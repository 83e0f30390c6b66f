"""fastdp.cpu_memory: freed CPU memory stays in the process, so DP steps stop faulting their pages in again."""
import subprocess
import sys

import pytest

from fastdp.cpu_memory import retain_freed_memory

# DP steps of the CPU benchmark's transformer (d=128, T=64, B=32, 3 blocks); minor page faults of the last 4 of 8
PROBE = r"""
import resource, sys, torch
import fastdp
from fastdp.cpu_memory import retain_freed_memory
from fastdp.models import TinyTransformer, lm_loss
applied = retain_freed_memory() if sys.argv[1] == "1" else None
torch.set_num_threads(1)
torch.manual_seed(0)
B, T = 32, 64
m = TinyTransformer(vocab=256, d=128, layers=3, heads=4, max_len=T)
opt = fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
                         expected_batch_size=B, sample_size=100 * B)
idx, tgt = torch.randint(0, 256, (B, T)), torch.randint(0, 256, (B, T))
faults = []
for i in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    lm_loss(m(idx), tgt).backward(); opt.step(); opt.zero_grad()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[4:]))
"""


def _probe(retain: bool):
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if retain else "0"], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


def test_dp_steps_stop_faulting():
    applied, retained = _probe(True)
    if applied != "True":
        pytest.skip("glibc mallopt not available on this platform")
    _, default = _probe(False)
    assert default > 2000  # glibc's defaults: the heap is trimmed every step, thousands of pages fault back in
    assert retained < default / 4


def test_bad_threshold():
    for bad in (0, -1, 2 ** 31, 1.5):
        with pytest.raises(ValueError):
            retain_freed_memory(bad)
