"""One rank of ``test_dp_trainer_ddp.py`` (started as a process per rank, torchrun's way: RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment; gloo on the CPU), plus the data and settings the test's
single-process reference shares with it.

Two runs of ``DPTrainer`` on a tiny float64 GPT-2, saved to ``<out>/<run>.rank<r>.pt``:

* ``exact``: noiseless, one logical batch (expected 12 = 2 per device x 3 accumulation x 2 ranks): the initial and
  final parameters and this rank's Poisson sample (the indices its sampler draws);
* ``noisy``: sigma = 1, three logical batches of expected size 2, a sampling seed for which some rank's local batch
  is empty at some step: the final parameters, the epsilon and the logged epsilons, the wiring (who wraps what),
  and the same run resumed from its step-2 checkpoint by a trainer with fresh seeds.
"""
from __future__ import annotations

import os
import sys
import traceback
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))  # (also when pytest imports this file for its doctests)
from hf_data import gpt2 as _gpt2  # noqa: E402
from hf_data import pad_collate, texts  # noqa: E402

R, N, DELTA = 0.05, 240, 1e-5
EXACT = dict(per_device_train_batch_size=2, gradient_accumulation_steps=3, max_steps=1)
NOISY = dict(per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=3)
NOISY_SIGMA, EXACT_SEED = 1.0, 11


def gpt2(seed=0):
    """The shared tiny GPT-2 at width 32."""
    return _gpt2(seed, n_embd=32)


def trainer(out_dir, model, sizes, dp, **kw):
    from transformers import TrainingArguments

    from fastdp.hf import DPTrainer
    kw = {"save_strategy": "no", **kw}
    args = TrainingArguments(output_dir=str(out_dir), learning_rate=1.0, lr_scheduler_type="constant", report_to=[],
                             use_cpu=True, disable_tqdm=True, optim="sgd", **sizes, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPTrainer(model=model, args=args, train_dataset=texts(N), data_collator=pad_collate,
                         target_delta=DELTA, max_grad_norm=R, accountant="rdp", **dp)


def local_batches(seed, sizes, rank, world, steps):
    """The first ``steps`` Poisson batches rank ``rank`` draws (as DPTrainer's sampler for these settings)."""
    from fastdp.hf.sampling import EpochPoissonSampler
    expected = sizes["per_device_train_batch_size"] * sizes["gradient_accumulation_steps"] * world
    q = expected / N
    it = iter(EpochPoissonSampler(N, q, int(1 / q), seed, rank=rank, world_size=world))
    return [next(it) for _ in range(steps)]


def noisy_seed(world):
    """The first sampling seed whose first NOISY steps hold an empty local batch on some rank (and samples on
    another): the case where a rank steps on noise or nothing alone."""
    for seed in range(1000):
        sizes = [len(b) for r in range(world) for b in local_batches(seed, NOISY, r, world, NOISY["max_steps"])]
        if 0 in sizes and max(sizes) > 0:
            return seed
    raise AssertionError("no seed found")


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def main(out):
    from torch.nn.parallel import DistributedDataParallel

    from fastdp.distributed import DataParallel
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    # exact: noiseless, one logical batch
    model = gpt2()
    t = trainer(os.path.join(out, "exact"), model, EXACT, dict(noise_multiplier=0.0, sampling_seed=EXACT_SEED,
                                                                noise_seed=3), logging_steps=1000, ddp_timeout=60)
    init = flat(model)
    t.train()
    torch.save({"init": init, "final": flat(t.model), "sampling_seed": t.sampling_seed,
                "batch": local_batches(t.sampling_seed, EXACT, rank, world, 1)[0]},
               os.path.join(out, f"exact.rank{rank}.pt"))

    # noisy: some rank's local batch is empty at some step
    seed = noisy_seed(world)
    noisy_dir = os.path.join(out, "noisy")
    t = trainer(noisy_dir, gpt2(), NOISY, dict(noise_multiplier=NOISY_SIGMA, sampling_seed=seed, noise_seed=1000 + rank),
                logging_steps=1, save_strategy="steps", save_steps=2)
    t.train()
    # resumed from step 2 by a trainer with other seeds (fresh OS entropy): the checkpoint's take over
    resumed = trainer(noisy_dir, gpt2(seed=5), NOISY, dict(noise_multiplier=NOISY_SIGMA), logging_steps=1,
                      save_strategy="no")
    resumed.train(resume_from_checkpoint=os.path.join(noisy_dir, "checkpoint-2"))
    comm = t.dp_optimizer.comm
    torch.save({"final": flat(t.model), "resumed": flat(resumed.model), "resumed_epsilon": resumed.epsilon(),
                "epsilon": t.epsilon(), "steps": t.dp_optimizer.steps_taken,
                "global_step": t.state.global_step,
                "logged_epsilon": [h["epsilon"] for h in t.state.log_history if "loss" in h],
                "sizes": [len(b) for b in local_batches(seed, NOISY, rank, world, NOISY["max_steps"])],
                "wrapped_is_ddp": type(t.model_wrapped) is DistributedDataParallel,
                "ddp_wraps_model": t.model_wrapped.module is t.model,
                "optimizer_on_wrapper": isinstance(comm, DataParallel) and comm.ddp is t.model_wrapped,
                "ddp_sync_off": t.model_wrapped.require_backward_grad_sync is False,
                "sample_rate": t.sample_rate, "expected_batch_size": t.expected_batch_size},
               os.path.join(out, f"noisy.rank{rank}.pt"))


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # do not wait in the process group's teardown for a rank that will not come
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
