"""The white-box one-run audit of DistributedDataParallel training: 2 gloo ranks on the CPU, one process each
(``audit_ddp_worker.py``, one launch for every scenario).

* a correct engine: the same result on both ranks, below the claim and well above 0 at epsilon 8, and the same
  scores as the single-process audit of the same run (the canaries enter the reduced sum once, and the data
  baseline subtracted is the sum over both ranks' samples: either mistake would shift the scores by whole R's), for
  every method;
* broken engines are caught: rank 0's noise 10x too small, and the noise forgotten on every rank;
* refusals: FSDP2, the black-box threat and the multi-run audit under DDP; distributed=True without a group.
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

import fastdp
from fastdp.audit.training import METHODS

sys.path.insert(0, os.path.dirname(__file__))  # (importlib import mode: the worker module beside this file)
import audit_ddp_worker  # noqa: E402

from helpers import launch_ranks  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")
WORKER = os.path.join(os.path.dirname(__file__), "audit_ddp_worker.py")


def launch(world: int, what: str, out, timeout: float = 180) -> list:
    """``world`` worker processes started torchrun's way; returns [(returncode, stderr)]."""
    return launch_ranks(WORKER, [out, what], world, timeout, env={"FASTDP_TEST_TIMEOUT": "60"})


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every scenario, run once on 2 ranks; {scenario: [rank 0's result, rank 1's]}."""
    out = tmp_path_factory.mktemp("audit_ddp")
    for rc, err in launch(2, "+".join(audit_ddp_worker.SCENARIOS), out):
        assert rc == 0, err[-3000:]
    return {name: [torch.load(os.path.join(out, f"{name}.rank{r}.pt")) for r in range(2)]
            for name in [*audit_ddp_worker.SCENARIOS, "refusals"]}


def single_process(name):
    with warnings.catch_warnings():  # (one torch thread: tests/audit/conftest.py)
        warnings.simplefilter("ignore")
        return fastdp.audit(audit_ddp_worker.mlp, audit_ddp_worker.digits(),
                            **{"method": "dpsgd", **audit_ddp_worker.SCENARIOS[name]})


@pytest.mark.parametrize("name", list(audit_ddp_worker.SCENARIOS))
def test_every_rank_gets_the_same_result(two_ranks, name):
    a, b = two_ranks[name]
    assert a["world_size"] == b["world_size"] == 2
    assert a["eps_lower"] == b["eps_lower"] and a["epsilon"] == b["epsilon"]
    assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["participations"], b["participations"])


def test_correct_ddp_engine_bounds_between_half_and_the_claim(two_ranks):
    r = two_ranks["honest"][0]
    assert 7.5 < r["epsilon"] <= 8.0
    assert 0.5 < r["eps_lower"] <= r["epsilon"]
    assert r["max_unreleased"] == 0.0
    poisson = two_ranks["poisson"][0]
    assert poisson["sample_rate"] == 0.1 and poisson["eps_lower"] <= poisson["epsilon"]


@pytest.mark.parametrize("name", ["honest", "poisson", *(f"method-{m}" for m in METHODS)])
def test_ddp_scores_equal_the_single_process_audit_of_the_same_run(two_ranks, name):
    """Same seed: same canaries, global batches and rank-0 noise; only the float32 summation order differs. A canary
    inserted on both ranks, or a baseline of one rank's data only, would move scores by O(1) (units of R). Every
    method (masks, phases, per-layer clipping, standardised space) included."""
    ddp, ref = two_ranks[name][0], single_process(name)
    assert torch.equal(ddp["participations"], ref.participations) and torch.equal(ddp["included"], ref.included)
    torch.testing.assert_close(ddp["scores"], ref.scores, rtol=0, atol=1e-3)
    assert abs(ddp["eps_lower"] - ref.eps_lower) < 0.05


@pytest.mark.parametrize("name", ["small_noise", "no_noise"])
def test_a_broken_ddp_engine_is_caught(two_ranks, name):
    for r in two_ranks[name]:
        assert r["epsilon"] <= 2.0
        assert r["eps_lower"] > r["epsilon"]


def test_what_the_data_parallel_audit_does_not_support_is_refused(two_ranks):
    for found in two_ranks["refusals"]:  # every rank raises
        assert "FSDP2 (fully_shard) model is not supported" in found["fsdp2"]
        assert "threat 'black-box-loss' under DistributedDataParallel is not supported" in found["black-box"]
        assert "multi_run_audit under torch.distributed (world size 2) is not supported" in found["multi-run"]
    with pytest.raises(RuntimeError, match="distributed=True needs an initialised torch.distributed process group"):
        fastdp.audit(audit_ddp_worker.mlp, audit_ddp_worker.digits(), canaries=20, noise_multiplier=1.0,
                     distributed=True)
