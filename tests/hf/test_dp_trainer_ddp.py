"""DPTrainer on several processes (torchrun's way, gloo on the CPU): one launch of 2 rank processes
(``hf_ddp_worker.py``) runs every multi-process check.

Oracles: one process's DPTrainer on the union of the ranks' Poisson samples (noiseless; exact up to float64
rounding); ``fastdp.get_epsilon`` at the global logical rate; the ranks' parameters against each other; an
uninterrupted 2-rank run for a 2-rank resume.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

sys.path.insert(0, os.path.dirname(__file__))  # (importlib import mode: the worker module beside this file)
import hf_ddp_worker as worker  # noqa: E402

import fastdp  # noqa: E402
import fastdp.hf.trainer as trainer_module  # noqa: E402
from fastdp.hf.sampling import EpochPoissonSampler  # noqa: E402
from helpers import launch_ranks  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run the worker on WORLD ranks once; returns {run: [rank 0's record, rank 1's, ...]}."""
    out = tmp_path_factory.mktemp("hf_ddp")
    for rc, err in launch_ranks(os.path.join(os.path.dirname(__file__), "hf_ddp_worker.py"), [out], WORLD, 240):
        assert rc == 0, err[-3000:]
    return {run: [torch.load(os.path.join(out, f"{run}.rank{r}.pt")) for r in range(WORLD)] for run in ("exact", "noisy")}


class FixedBatches:
    """Stands in for DPTrainer's sampler in the single-process reference: yields the given batches."""

    def __init__(self, batches):
        self.batches = batches

    def __call__(self, *args, **kwargs):
        return self

    def set_epoch(self, epoch):
        pass

    def skip_next(self, n):
        assert n == 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_two_ranks_update_equals_one_process_on_the_union_of_their_samples(ranks, tmp_path, monkeypatch):
    recs = ranks["exact"]
    batches = [set(r["batch"]) for r in recs]
    assert all(batches) and not batches[0] & batches[1]
    for rank, b in enumerate(batches):
        assert all(i % WORLD == rank for i in b)  # rank r's shard: r, r + WORLD, ...
    union = sorted(batches[0] | batches[1])
    # one process, the same expected logical batch (2 x 6 = 2 x 3 x 2 ranks), the union as its Poisson batch
    monkeypatch.setattr(trainer_module, "EpochPoissonSampler", FixedBatches([union]))
    sizes = {**worker.EXACT, "gradient_accumulation_steps": worker.EXACT["gradient_accumulation_steps"] * WORLD}
    model = worker.gpt2()
    torch.testing.assert_close(worker.flat(model), recs[0]["init"], rtol=0, atol=0)
    t = worker.trainer(tmp_path / "ref", model, sizes, dict(noise_multiplier=0.0, sampling_seed=1, noise_seed=2),
                       logging_steps=1000)
    t.train()
    ref = worker.flat(t.model)
    assert not torch.equal(ref, recs[0]["init"])
    for r, rec in enumerate(recs):
        torch.testing.assert_close(rec["final"], ref, rtol=1e-10, atol=1e-12, msg=lambda m: f"rank {r}: {m}")


def test_trainer_wraps_the_model_in_ddp_once_and_builds_dpoptimizer_on_it(ranks):
    for rec in ranks["noisy"]:
        assert rec["wrapped_is_ddp"] and rec["ddp_wraps_model"]  # one DDP wrapper, around the HF model
        assert rec["optimizer_on_wrapper"] and rec["ddp_sync_off"]  # DDP's all-reduce off, fastdp's on
        assert rec["expected_batch_size"] == WORLD * 1 * 1 and rec["sample_rate"] == WORLD / worker.N


def test_epsilon_is_the_global_rate_s_on_every_rank(ranks):
    steps = worker.NOISY["max_steps"]
    expected = [fastdp.get_epsilon(noise_multiplier=worker.NOISY_SIGMA, sample_rate=WORLD / worker.N, steps=k,
                                   delta=worker.DELTA, accountant="rdp") for k in range(1, steps + 1)]
    for rec in ranks["noisy"]:
        assert rec["steps"] == rec["global_step"] == steps
        assert rec["epsilon"] == pytest.approx(expected[-1], rel=1e-12)
        assert rec["logged_epsilon"] == pytest.approx(expected, rel=1e-12)


def test_noisy_training_keeps_the_replicas_identical_with_empty_local_batches(ranks):
    recs = ranks["noisy"]
    sizes = [rec["sizes"] for rec in recs]
    assert any(0 in s for s in sizes)  # some rank stepped with an empty local batch
    assert all(len(s) == worker.NOISY["max_steps"] for s in sizes)
    for rec in recs[1:]:
        assert torch.equal(rec["final"], recs[0]["final"])
    assert not torch.equal(recs[0]["final"], ranks["exact"][0]["init"])


def test_resume_on_two_ranks_continues_the_uninterrupted_run(ranks):
    """Rank 0's checkpoint holds the run's sampling seed (shared by the ranks) and the noise state."""
    for rec in ranks["noisy"]:
        torch.testing.assert_close(rec["resumed"], rec["final"], rtol=1e-12, atol=1e-14)
        assert rec["resumed_epsilon"] == rec["epsilon"]


def test_rank_shards_partition_the_dataset_and_sample_at_the_global_rate():
    n, world, q, steps = 101, 3, 0.1, 3000
    samplers = [EpochPoissonSampler(n, q, steps, seed=7, rank=r, world_size=world) for r in range(world)]
    shards = [set(s.shard().tolist()) for s in samplers]
    assert set().union(*shards) == set(range(n)) and sum(map(len, shards)) == n
    draws = [list(s) for s in samplers]
    assert all(len(d) == steps for d in draws)  # every rank the same number of batches, empty ones included
    assert all(set(b) <= shards[r] for r in range(world) for b in draws[r])
    assert draws[0][:20] != draws[1][:20]  # the ranks' generators differ
    counts = torch.zeros(n)
    for d in draws:
        for b in d:
            counts[b] += 1
    # every sample's inclusion count ~ Binomial(steps, q): within 6 standard deviations
    sd = (steps * q * (1 - q)) ** 0.5
    assert ((counts - steps * q).abs() < 6 * sd).all()
    with pytest.raises(ValueError, match="rank 3 is not in range"):
        EpochPoissonSampler(n, q, steps, seed=7, rank=3, world_size=3)
