"""Privacy accounting through opacus' accountants (PRV and RDP); nothing re-implemented here.

``get_epsilon`` and ``get_noise_multiplier`` are the stateless helpers; ``make_accountant`` builds
the stateful accountant a DP optimizer steps once per update. Epsilon is never under-reported:
a zero noise multiplier gives ``inf``, and a PRV computation that fails falls back to the (larger)
RDP bound with a warning that says so.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier as _opacus_get_noise_multiplier

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}


def make_accountant(name: str = "prv") -> IAccountant:
    """A fresh opacus accountant: ``"prv"`` (default, tight) or ``"rdp"`` (conservative)."""
    try:
        return ACCOUNTANTS[name]()
    except KeyError:
        raise ValueError(f"unknown accountant {name!r}; choose one of {sorted(ACCOUNTANTS)}") from None


def epsilon_of(accountant: IAccountant, delta: float) -> float:
    """Epsilon spent so far at ``delta`` by an accountant's history."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    history = list(accountant.history)
    if not history:
        return 0.0
    if any(sigma == 0 and q > 0 and steps > 0 for sigma, q, steps in history):
        return math.inf
    try:
        eps = float(accountant.get_epsilon(delta))
    except Exception as err:  # opacus' PRV can fail far outside its domain (opacus #604)
        if isinstance(accountant, RDPAccountant):
            raise
        rdp = RDPAccountant()
        rdp.history = history
        eps = float(rdp.get_epsilon(delta))
        warnings.warn(f"PRV accounting failed ({err!r}); reporting the RDP bound {eps:.4g}, which is an "
                      "upper bound on the PRV value", RuntimeWarning, stacklevel=2)
    return eps


def get_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "prv") -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps.

    Examples:
        >>> round(get_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5, accountant="rdp"), 4)
        7.3291
    """
    _check_rate(sample_rate)
    if steps < 0 or noise_multiplier < 0:
        raise ValueError("steps and noise_multiplier must be non-negative")
    acc = make_accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))] if steps else []
    return epsilon_of(acc, delta)


def get_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                         steps: Optional[int] = None, epochs: Optional[float] = None, accountant: str = "prv",
                         epsilon_tolerance: float = 0.01) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) whose epsilon stays at or below the target.

    Give ``steps`` or ``epochs`` (steps = epochs / sample_rate, as in opacus).
    """
    _check_rate(sample_rate)
    if target_epsilon <= 0 or not 0 < target_delta < 1:
        raise ValueError("target_epsilon must be > 0 and target_delta in (0, 1)")
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs")
    make_accountant(accountant)  # validates the name
    return float(_opacus_get_noise_multiplier(
        target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate, epochs=epochs,
        steps=steps, accountant=accountant, epsilon_tolerance=epsilon_tolerance))


def _check_rate(q):
    if not 0 < q <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {q}")
