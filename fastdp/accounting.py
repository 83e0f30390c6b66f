"""Privacy accounting through opacus' accountants (PRV and RDP); nothing re-implemented here.

``get_epsilon`` and ``get_noise_multiplier`` are the stateless helpers; ``make_accountant`` builds
the stateful accountant a DP optimizer steps once per update. Epsilon is never under-reported:
a zero noise multiplier gives ``inf``, and where the PRV accountant cannot compute a history (it raises, returns a
non-finite value, or its discretisation domain would leave float64's ``exp`` range or exceed ``PRV_MAX_POINTS``
points) the (larger) RDP bound is returned with a warning that says so. Every search is bounded: the calibration
takes at most ``MAX_SEARCH_STEPS`` accountant evaluations, each of bounded size.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import List, Optional, Tuple

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}

# The PRV accountant evaluates exp(t) and exp(-t) on its discretisation domain [t_min, t_max]: past |t| ~ 709.78
# float64 overflows and opacus returns inf (or a value computed from NaNs). A domain reaching past PRV_T_LIMIT, or
# one of more than PRV_MAX_POINTS points (its time and memory grow with the size: ~10 s and a few GiB at the
# limit), is not computed: the RDP bound is used instead, with a warning.
PRV_T_LIMIT = 700.0
PRV_MAX_POINTS = 2 ** 23
# Noise multipliers above this are accounted as this value (epsilon decreases with sigma: an upper bound); the
# accountants' arithmetic overflows near sigma = 1e154.
SIGMA_ACCOUNTING_CAP = 1e10
# get_noise_multiplier: the largest sigma tried (opacus' MAX_SIGMA) and the most accountant evaluations.
MAX_SIGMA = 1e6
MAX_SEARCH_STEPS = 200


class PRVDomainError(RuntimeError):
    """The PRV accountant cannot compute this history (see ``PRV_T_LIMIT`` / ``PRV_MAX_POINTS``)."""


class _CheckedPRV(PRVAccountant):
    """opacus' PRV accountant, refusing (before any large allocation) the domains it cannot compute exactly."""

    def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
        domain = super()._get_domain(prvs=prvs, num_self_compositions=num_self_compositions, eps_error=eps_error,
                                     delta_error=delta_error)
        _check_domain(domain)
        return domain

    def get_epsilon(self, delta: float, *, eps_error: float = 0.01, delta_error: Optional[float] = None,
                    **kwargs) -> float:
        # PRVAccountant.get_epsilon, with the composed domain checked too
        if delta_error is None:
            delta_error = delta / 1000
        dprv = self._get_dprv(eps_error=eps_error, delta_error=delta_error)
        _check_domain(dprv.domain)
        _, _, eps_upper = dprv.compute_epsilon(delta, delta_error, eps_error)
        return eps_upper


def _check_domain(domain):
    if not (max(abs(domain.t_min), abs(domain.t_max)) <= PRV_T_LIMIT and domain.size <= PRV_MAX_POINTS):
        raise PRVDomainError(f"its discretisation domain [{domain.t_min:.4g}, {domain.t_max:.4g}] with {domain.size} "
                             f"points is outside what it computes exactly (|t| <= {PRV_T_LIMIT:g}, at most "
                             f"{PRV_MAX_POINTS} points)")


def make_accountant(name: str = "prv") -> IAccountant:
    """A fresh opacus accountant: ``"prv"`` (default, tight) or ``"rdp"`` (conservative)."""
    if not isinstance(name, str) or name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {sorted(ACCOUNTANTS)}")
    return ACCOUNTANTS[name]()


def check_history(history) -> List[Tuple[float, float, int]]:
    """``history`` as a list of (noise_multiplier, sample_rate, steps), each checked (ValueError otherwise)."""
    if not isinstance(history, (list, tuple)):
        raise ValueError(f"an accountant history is a list of (noise_multiplier, sample_rate, steps), got "
                         f"{type(history).__name__}")
    out = []
    for entry in history:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise ValueError(f"accountant history entry {entry!r} is not (noise_multiplier, sample_rate, steps)")
        sigma, q, steps = entry
        if not (_is_real(sigma) and not math.isnan(sigma) and sigma >= 0):
            raise ValueError(f"accountant history entry {entry!r}: noise_multiplier must be a number >= 0")
        if not (_is_real(q) and 0 <= q <= 1):
            raise ValueError(f"accountant history entry {entry!r}: sample_rate must be in [0, 1]")
        if not (is_int(steps) and steps >= 0):
            raise ValueError(f"accountant history entry {entry!r}: steps must be an int >= 0")
        out.append((float(sigma), float(q), int(steps)))
    return out


def epsilon_of(accountant: IAccountant, delta: float) -> float:
    """Epsilon spent so far at ``delta`` by an accountant's history (see the module docstring for PRV's limits)."""
    _check_delta(delta, "delta")
    mechanism = accountant.mechanism() if hasattr(accountant, "mechanism") else None
    if mechanism not in ACCOUNTANTS:
        eps = float(accountant.get_epsilon(delta))
        return _checked_epsilon(eps, delta)
    eps, fallback = _epsilon(check_history(list(accountant.history)), delta, mechanism)
    if fallback is not None:
        warnings.warn(f"PRV accounting cannot compute this history ({fallback}); reporting the RDP bound {eps:.4g}, "
                      "which is an upper bound on the PRV value", RuntimeWarning, stacklevel=2)
    return eps


def _epsilon(history, delta: float, mechanism: str) -> Tuple[float, Optional[str]]:
    """(epsilon, why PRV fell back to RDP or None) of a checked history."""
    kept = []
    for sigma, q, steps in history:
        if steps == 0 or q == 0 or sigma == math.inf:
            continue  # releases nothing about the data
        if sigma == 0:
            return math.inf, None
        kept.append((min(sigma, SIGMA_ACCOUNTING_CAP), q, steps))
    if not kept:
        return 0.0, None
    fallback = None
    if mechanism == "prv":
        acc = _CheckedPRV()
        acc.history = kept
        try:
            eps = float(acc.get_epsilon(delta))
            if not math.isfinite(eps):
                raise PRVDomainError(f"it returned {eps}")
        except Exception as err:  # opacus' PRV can fail far outside its domain (opacus #604)
            fallback = str(err) if isinstance(err, PRVDomainError) else repr(err)
    if mechanism == "rdp" or fallback is not None:
        rdp = RDPAccountant()
        rdp.history = kept
        eps = float(rdp.get_epsilon(delta))
    return _checked_epsilon(eps, delta), fallback


def _checked_epsilon(eps: float, delta: float) -> float:
    if math.isnan(eps):
        raise RuntimeError(f"the accountant returned epsilon NaN at delta={delta:g}")
    if eps < 0:
        raise ValueError(f"delta={delta:.10g} is too large: the accountant's epsilon at it is negative ({eps:.4g}). "
                         "A meaningful delta is far below 1 / (number of samples)")
    return eps


def get_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                accountant: str = "prv") -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps (``noise_multiplier=inf``: 0, nothing is released).

    Examples:
        >>> round(get_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5, accountant="rdp"), 4)
        7.3291
    """
    _check_rate(sample_rate)
    if not (_is_real(noise_multiplier) and not math.isnan(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be a number >= 0 (inf allowed), got {noise_multiplier!r}")
    if not (is_int(steps) and steps >= 0):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    _check_delta(delta, "delta")
    make_accountant(accountant)  # validates the name
    eps, fallback = _epsilon([(float(noise_multiplier), float(sample_rate), int(steps))], delta, accountant)
    if fallback is not None:
        warnings.warn(f"PRV accounting cannot compute this history ({fallback}); reporting the RDP bound {eps:.4g}, "
                      "which is an upper bound on the PRV value", RuntimeWarning, stacklevel=2)
    return eps


def get_noise_multiplier(*, target_epsilon: float, target_delta: float, sample_rate: float,
                         steps: Optional[int] = None, epochs: Optional[float] = None, accountant: str = "prv",
                         epsilon_tolerance: float = 0.01) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) whose epsilon stays at or below the target.

    Give ``steps`` or ``epochs`` (steps = int(epochs / sample_rate), as in opacus). The search is opacus' (doubling
    from 20, then bisection until the epsilon is within ``epsilon_tolerance`` below the target), with at most
    ``MAX_SEARCH_STEPS`` evaluations, each computed as ``epsilon_of`` reports it: the sigma returned always has a
    computed epsilon <= ``target_epsilon``. Where PRV cannot compute the epsilons near the target (targets past
    ~600, very long runs), they are RDP's, with a warning: the RDP bound is an upper bound on PRV's, so the
    guarantee holds, with more noise than PRV would need.
    """
    _check_rate(sample_rate)
    if not (_is_real(target_epsilon) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    _check_delta(target_delta, "target_delta")
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps or epochs")
    if not (_is_real(epsilon_tolerance) and math.isfinite(epsilon_tolerance) and epsilon_tolerance > 0):
        raise ValueError(f"epsilon_tolerance must be a finite number > 0, got {epsilon_tolerance!r}")
    make_accountant(accountant)  # validates the name
    if epochs is not None:
        if not (_is_real(epochs) and math.isfinite(epochs) and epochs > 0):
            raise ValueError(f"epochs must be a finite number > 0, got {epochs!r}")
        steps = int(epochs / sample_rate)
        if steps < 1:
            raise ValueError(f"epochs={epochs!r} at sample_rate={sample_rate:g} is {epochs / sample_rate:.3g} steps: "
                             "at least one step is needed")
    elif not (is_int(steps) and steps >= 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    steps = int(steps)
    q = float(sample_rate)

    def eps_at(sigma):
        return _epsilon([(sigma, q, steps)], target_delta, accountant)

    evaluations = 0
    sigma_low, sigma_high, eps_high, fallback = 0.0, 10.0, math.inf, None
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high, fallback = eps_at(sigma_high)
        evaluations += 1
        if sigma_high > MAX_SIGMA:
            raise ValueError(f"target_epsilon={target_epsilon:g} is too small to reach: noise_multiplier "
                             f"{sigma_high:.3g} still gives epsilon {eps_high:.4g} (accountant {accountant!r}, "
                             f"delta {target_delta:g}, sample_rate {q:.4g}, {steps} steps)"
                             + ("; PRV's epsilon is at least its error bound 0.01" if accountant == "prv" else ""))
    while target_epsilon - eps_high > epsilon_tolerance and evaluations < MAX_SEARCH_STEPS:
        sigma = (sigma_low + sigma_high) / 2
        if not sigma_low < sigma < sigma_high:
            break  # the interval cannot be split further: sigma_high is the answer (eps jumps past the target)
        eps, why = eps_at(sigma)
        evaluations += 1
        if eps < target_epsilon:
            sigma_high, eps_high, fallback = sigma, eps, why
        else:
            sigma_low = sigma
    if fallback is not None:
        warnings.warn(f"target_epsilon={target_epsilon:g}: PRV accounting cannot compute the epsilons near this "
                      f"target ({fallback}); the noise multiplier {sigma_high:.4g} is calibrated with the RDP bound "
                      f"({eps_high:.4g}), an upper bound on PRV's, and epsilon will be reported with it",
                      RuntimeWarning, stacklevel=2)
    return float(sigma_high)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_int(x) -> bool:
    """An integer count or size: bool is not one (``True`` would be taken as 1)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_delta(delta, name):
    if not (_is_real(delta) and 0 < delta < 1):
        raise ValueError(f"{name} must be a number in (0, 1), got {delta!r}")


def _check_rate(q):
    if not (_is_real(q) and 0 < q <= 1):
        raise ValueError(f"sample_rate must be a number in (0, 1], got {q!r}")
