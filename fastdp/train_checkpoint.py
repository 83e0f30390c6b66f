"""Checkpoints of a ``fastdp train`` run: what defines a run (options, a hash of the data), and the file written
atomically, readable by its owner only (it holds the generators' states), checked before a resume."""
from __future__ import annotations

import contextlib
import hashlib
import os

import torch

from fastdp.atomic import atomic_write

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "fastdp-train-checkpoint"
CHECKPOINT_VERSION = 1
DEFAULT_CHECKPOINT_EVERY = 100
# options a resumed run may change (all others must equal the checkpointed run's)
RESUME_MAY_CHANGE = ("data_dir", "no_progress", "checkpoint_dir", "checkpoint_every", "resume", "func", "error")


def run_config(args, *, target_epsilon, batch_size, lr, device) -> dict:
    """The options that define a run, defaults resolved (compared on --resume)."""
    config = {k: v for k, v in sorted(vars(args).items()) if k not in RESUME_MAY_CHANGE}
    config.update(target_epsilon=target_epsilon, batch_size=batch_size, lr=lr, device=device.type)
    return config


def data_fingerprint(train_set, test_set) -> str:
    """SHA-256 of the training and test tensors (a resumed run must see the same data)."""
    h = hashlib.sha256()
    for t in (*train_set.tensors, *test_set.tensors):
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().numpy())
    return h.hexdigest()


def save_checkpoint(path: str, payload: dict) -> None:
    """``torch.save(payload)`` to ``path`` atomically and readable by its owner only (``fastdp.atomic``): a run killed
    at any moment leaves the previous checkpoint or the new one, never a partial file."""
    with atomic_write(path, "wb", private=True) as f:
        torch.save(payload, f)


def load_checkpoint(path: str, config: dict, fingerprint: str, error) -> dict:
    """The checkpoint at ``path``, checked against this run's options and data (parser errors otherwise)."""
    if not os.path.isfile(path):
        error(f"--resume: no checkpoint at {path}")
    folder = os.path.dirname(os.path.abspath(path))
    for name in os.listdir(folder):  # left by a run killed while writing (the checkpoint itself is whole)
        if name.startswith(f".{os.path.basename(path)}.") and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        error(f"--resume: {path} is not a readable checkpoint ({type(err).__name__}: {err})")
    keys = ("config", "data", "model", "optimizer", "noise_multiplier", "epoch", "finished", "sampler_state",
            "torch_rng_state", "totals", "epoch_stats")
    if not (isinstance(ckpt, dict) and ckpt.get("format") == CHECKPOINT_FORMAT):
        error(f"--resume: {path} is not a fastdp train checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION or any(k not in ckpt for k in keys):
        error(f"--resume: {path} is a checkpoint of another version ({ckpt.get('version')!r}) or incomplete")
    saved = ckpt["config"]
    changed = [k for k in sorted(set(saved) | set(config)) if saved.get(k) != config.get(k)]
    if changed:
        error(f"--resume: the checkpoint in {os.path.dirname(path) or '.'} was written by a run with other options: "
              + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)} (now {config.get(k)})" for k in changed)
              + ". Resume with the run's options (only --data-dir, --no-progress and --checkpoint-every may change)")
    if ckpt["data"] != fingerprint:
        error(f"--resume: the training or test data differ from those of the checkpointed run ({path})")
    return ckpt
