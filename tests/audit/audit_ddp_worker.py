"""One rank of the data-parallel audit tests (started by ``test_audit_ddp.py`` as a process per rank, torchrun's
way: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment).

Each scenario runs ``fastdp.audit`` on a DDP model (the audit wraps it) and saves this rank's result to
``<out>/<scenario>.rank<r>.pt``. The broken engines are test-only injections, patched on every rank:
``small_noise`` (rank 0's noise 10x too small), ``no_noise`` (no rank adds the noise: ``adds_noise`` False).
First, the refusals (FSDP2, black-box, multi-run) are saved to ``<out>/refusals.rank<r>.pt``.
"""
from __future__ import annotations

import datetime
import os
import sys
import traceback
import warnings

import torch
import torch.distributed as dist

import fastdp
from fastdp.audit.api import multi_run_audit
from fastdp.audit.training import METHODS
from fastdp.data import load_dataset
from fastdp.distributed import DataParallel
from fastdp.models import MLP
from fastdp.optimizer import DPOptimizer

LIMIT, CANARIES, EPOCHS = 500, 2000, 10  # digits images, Dirac canaries, full-batch steps


def mlp():
    return MLP(64, 10, hidden=(64,))  # 4810 trainable coordinates


def digits():
    return load_dataset("digits", limit=LIMIT)[0]


# scenario -> fastdp.audit's arguments (besides model_fn and the data)
# (RDP: its calibration is much cheaper than PRV's and only makes sigma a little larger)
SCENARIOS = {
    "honest": dict(canaries=CANARIES, epochs=EPOCHS, target_epsilon=8.0, seed=0, accountant="rdp"),
    "small_noise": dict(canaries=CANARIES, epochs=EPOCHS, target_epsilon=2.0, seed=0, accountant="rdp"),
    "no_noise": dict(canaries=CANARIES, epochs=EPOCHS, target_epsilon=2.0, seed=0, accountant="rdp"),
    # Poisson batches (rate 250 / 2500): the baseline from each rank's shard of the data, summed over the ranks
    "poisson": dict(canaries=CANARIES, epochs=1, expected_batch_size=250, target_epsilon=8.0, seed=1,
                    accountant="rdp"),
}
# every method, briefly (sparse phases reached: SPARTA and AdaDPIGU's defaults here switch after 1 epoch)
SCENARIOS.update({f"method-{m}": dict(method=m, canaries=300, epochs=3, noise_multiplier=1.0, seed=3,
                                      accountant="rdp") for m in METHODS})


def run(name: str, data):
    honest_std, honest_adds = DPOptimizer.noise_std, DataParallel.adds_noise
    try:
        if name == "small_noise":
            DPOptimizer.noise_std = lambda self: 0.1 * honest_std(self)
        elif name == "no_noise":
            DataParallel.adds_noise = property(lambda self: False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # opacus' PRV at sample rate 1, RDP orders
            return fastdp.audit(mlp, data, **{"method": "dpsgd", **SCENARIOS[name]})
    finally:
        DPOptimizer.noise_std, DataParallel.adds_noise = honest_std, honest_adds


def refusals(data) -> dict:
    """{case: the refusal's message} for what the data-parallel audit does not support (raised on every rank)."""
    from torch.distributed.fsdp import fully_shard

    def sharded():
        net = mlp()
        fully_shard(net)
        return net

    cases = {"fsdp2": dict(model_fn=sharded), "black-box": dict(model_fn=mlp, threat="black-box-loss")}
    found = {}
    for case, kw in cases.items():
        try:
            fastdp.audit(train_set=data, canaries=20, noise_multiplier=1.0, seed=0, **kw)
        except NotImplementedError as e:
            found[case] = str(e)
    try:
        multi_run_audit(mlp, data, runs=2, noise_multiplier=1.0)
    except NotImplementedError as e:
        found["multi-run"] = str(e)
    return found


def main(out: str, what: str) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=float(os.environ.get("FASTDP_TEST_TIMEOUT", "60")))
    dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    try:
        data = digits()
        torch.save(refusals(data), os.path.join(out, f"refusals.rank{rank}.pt"))
        for name in what.split("+"):
            r = run(name, data)
            torch.save({"eps_lower": r.eps_lower, "epsilon": r.epsilon, "scores": r.scores,
                        "statistic": r.statistic, "included": r.included, "participations": r.participations,
                        "world_size": r.world_size, "steps": r.steps, "sample_rate": r.sample_rate,
                        "max_unreleased": r.max_unreleased},
                       os.path.join(out, f"{name}.rank{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # the other rank fails on its next collective, within the timeout
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
