"""What ``DPOptimizer`` accepts: its arguments, and the privacy part of a state dict (``checked_state``).

Every check raises a ``ValueError`` / ``TypeError`` naming the argument or entry, before anything changes.
"""
from __future__ import annotations

import numbers
import warnings

import torch

from fastdp.accounting import check_history, is_int

STATE_VERSION = 1


def check_arguments(optimizer, expected_batch_size, sample_size, max_grad_norm, target_delta, secure_mode,
                    generator) -> None:
    """The arguments of ``DPOptimizer.__init__`` that need no model (sizes, clip bound type, delta, secure mode)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not (is_int(expected_batch_size) and expected_batch_size > 0):
        raise ValueError(f"expected_batch_size must be a positive int, got {expected_batch_size!r}")
    if not (is_int(sample_size) and sample_size >= expected_batch_size):
        raise ValueError(f"sample_size must be an int >= expected_batch_size, got {sample_size!r}")
    if isinstance(max_grad_norm, bool) or (isinstance(max_grad_norm, (list, tuple, dict)) and any(
            isinstance(r, bool) for r in (max_grad_norm.values() if isinstance(max_grad_norm, dict)
                                          else max_grad_norm))):
        raise ValueError(f"max_grad_norm must be a positive finite number (or one per parameter), got "
                         f"{max_grad_norm!r}")
    if target_delta is not None:
        if not (isinstance(target_delta, numbers.Real) and not isinstance(target_delta, bool)
                and 0 < target_delta < 1):
            raise ValueError(f"target_delta must be a number in (0, 1), got {target_delta!r}")
        if target_delta >= 1 / sample_size:
            warnings.warn(f"target_delta={target_delta:g} >= 1/sample_size = 1/{sample_size}: a mechanism that "
                          "publishes a random sample in full meets such a delta; choose delta far below 1/n",
                          UserWarning, stacklevel=3)  # (the caller of DPOptimizer(...))
    if secure_mode and generator is not None:
        raise ValueError("secure_mode draws noise from the OS CSPRNG; do not pass a generator with it")


def checked_state(st, accountant_name: str):
    """(history, steps_taken, generator_state, seed_base, seed_count) of the 'fastdp' part, or ValueError."""
    if not isinstance(st, dict):
        raise ValueError(f"DPOptimizer state: the 'fastdp' entry must be a dict, got {type(st).__name__}")
    missing = [k for k in ("version", "accountant", "accountant_state", "steps_taken") if k not in st]
    if missing:
        raise ValueError(f"DPOptimizer state: the 'fastdp' entry lacks {missing}")
    if st["version"] != STATE_VERSION:
        raise ValueError(f"unsupported DPOptimizer state version {st['version']!r}")
    if st["accountant"] != accountant_name:
        raise ValueError(f"state was accounted with {st['accountant']!r}, this optimizer uses "
                         f"{accountant_name!r}")
    acc = st["accountant_state"]
    if not isinstance(acc, dict) or "history" not in acc:
        raise ValueError("DPOptimizer state: accountant_state must be the accountant's state_dict() (a dict with "
                         "'history')")
    if acc.get("mechanism", accountant_name) != accountant_name:
        raise ValueError(f"DPOptimizer state: accountant_state is of mechanism {acc.get('mechanism')!r}, this "
                         f"optimizer uses {accountant_name!r}")
    history, steps_taken = _checked_steps(acc["history"], st["steps_taken"])
    generator_state, seed_base, seed_count = _checked_noise_state(st)
    return history, steps_taken, generator_state, seed_base, seed_count


def _checked_steps(history, steps_taken):
    """The accountant's history and the step count, which must agree (epsilon is never under-reported)."""
    try:
        history = check_history(history)
    except ValueError as err:
        raise ValueError(f"DPOptimizer state: {err}") from None
    if not (is_int(steps_taken) and steps_taken >= 0):
        raise ValueError(f"DPOptimizer state: steps_taken must be an int >= 0, got {steps_taken!r}")
    accounted = sum(steps for _, _, steps in history)
    if accounted != steps_taken:
        raise ValueError(f"inconsistent DPOptimizer state: steps_taken={steps_taken} but the accountant's history "
                         f"holds {accounted} steps; refusing to load it (epsilon would not match the steps taken)")
    return history, steps_taken


def _checked_noise_state(st):
    """(generator_state, seed_base, seed_count) of the noise: the generator's bytes and the seed stream's position."""
    generator_state = st.get("generator_state")
    if generator_state is not None and not (isinstance(generator_state, torch.Tensor)
                                            and generator_state.dtype == torch.uint8):
        raise ValueError("DPOptimizer state: generator_state must be None or a torch.ByteTensor "
                         "(Generator.get_state())")
    seed_base, seed_count = st.get("seed_base"), st.get("seed_count", 0)
    if seed_base is not None and not (is_int(seed_base) and 0 <= seed_base < 2 ** 62):
        raise ValueError(f"DPOptimizer state: seed_base must be None or an int in [0, 2**62), got {seed_base!r}")
    if not (is_int(seed_count) and seed_count >= 0):
        raise ValueError(f"DPOptimizer state: seed_count must be an int >= 0, got {seed_count!r}")
    return generator_state, seed_base, int(seed_count)
