"""``fastdp train`` on several processes: ``--nproc N`` relaunches the command under ``torch.distributed.run``
(torchrun), and each rank then joins the process group, trains its DDP replica and samples its own shard
(``fastdp.distributed``). Rank 0 prints; the other ranks are silent."""
from __future__ import annotations

import os
import sys
from typing import List, Sequence

import torch
import torch.distributed as dist

from fastdp.distributed import init_process_group, launched_distributed

__all__ = ["all_ranks_sum", "launched_distributed", "relaunch_with_torchrun", "start_ranks"]


def relaunch_with_torchrun(nproc: int, argv: Sequence[str]) -> None:
    """Run ``fastdp <argv>`` (without ``--nproc``) on ``nproc`` local processes: ``torchrun --standalone
    --nproc_per_node=nproc -m fastdp <argv>``. A failed rank makes this raise (torchrun's ChildFailedError)."""
    from torch.distributed import run as torchrun

    torchrun.main(["--standalone", f"--nproc_per_node={nproc}", "-m", "fastdp", *_without_nproc(argv)])


def _without_nproc(argv: Sequence[str]) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def start_ranks(args, device: torch.device, error) -> tuple:
    """(world size, rank): (1, 0) in a single process; under torchrun, joins the process group (gloo on the CPU,
    NCCL on CUDA, ``fastdp.distributed.DEFAULT_TIMEOUT``) after checking the options this mode supports, and
    silences every rank but 0."""
    if not launched_distributed():
        return 1, 0
    if args.method == "nonprivate":
        error("--nproc / torchrun: the nonprivate baseline runs in one process (fastdp's data-parallel mode is "
              "for the DP methods)")
    if args.checkpoint_dir:
        error("--checkpoint-dir is not supported with --nproc / torchrun yet (each rank's sampler state would have "
              "to be saved): run without checkpoints, or in one process")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the rest of this process)
        args.no_progress = True
    return dist.get_world_size(), rank


def all_ranks_sum(value: float) -> float:
    """``value`` summed over the ranks (a float64 all-reduce on the CPU group)."""
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())
