"""The classic multi-run audit (Jagielski, Ullman and Oprea 2020; Nasr et al. 2021): train many models, each with
or without one canary, threshold the canary's score, and bound the attack's false positive and false negative
rates from above with Clopper-Pearson intervals. An (eps, delta)-DP algorithm forces

    FPR + e^eps FNR >= 1 - delta   and   FNR + e^eps FPR >= 1 - delta,

so eps >= max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)) with the rates' upper confidence
bounds plugged in (each at level (1 - confidence) / 2: both hold together at ``confidence``).

The threshold is chosen on one half of the runs and the rates are counted on the other half, so the choice does
not bias the bound. Clopper-Pearson is computed from the exact binomial tail (``fastdp.audit.one_run``) by
bisection on p: no scipy needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch

from fastdp.audit.one_run import binomial_tail

__all__ = ["MultiRunBound", "clopper_pearson", "eps_from_rates", "multi_run_bound"]


def clopper_pearson(k: int, n: int, alpha: float) -> Tuple[float, float]:
    """(lower, upper): one-sided Clopper-Pearson bounds at level ``alpha`` each on the success probability p of
    ``k`` successes in ``n`` trials: P[Binomial(n, lower) >= k] = alpha and P[Binomial(n, upper) <= k] = alpha
    (0 for k = 0, 1 for k = n), to 1e-12.

    Examples:
        >>> lo, hi = clopper_pearson(0, 10, 0.025)
        >>> lo, round(hi, 4)   # 1 - 0.025 ** (1 / 10)
        (0.0, 0.3085)
    """
    if not (isinstance(k, int) and isinstance(n, int) and 0 <= k <= n and n >= 1):
        raise ValueError(f"need ints 0 <= k <= n, n >= 1, got k={k!r}, n={n!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")

    def solve(f, target) -> float:  # f increasing in p: the p with f(p) = target
        lo, hi = 0.0, 1.0
        while hi - lo > 1e-12:
            mid = (lo + hi) / 2
            if f(mid) < target:
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: binomial_tail(k, n, p), alpha)
    upper = 1.0 if k == n else solve(lambda p: binomial_tail(k + 1, n, p), 1 - alpha)  # P[Bin <= k] = alpha
    return lower, upper


def eps_from_rates(fpr_upper: float, fnr_upper: float, delta: float) -> float:
    """The eps lower bound implied by upper bounds on an attack's FPR and FNR at ``delta`` (0 if none)."""
    best = 0.0
    for a, b in ((fpr_upper, fnr_upper), (fnr_upper, fpr_upper)):
        if b > 0 and 1 - delta - a > 0:
            best = max(best, math.log((1 - delta - a) / b))
        elif b == 0 and 1 - delta - a > 0:
            return math.inf
    return best


@dataclass(frozen=True)
class MultiRunBound:
    """``eps_lower`` at ``confidence``; the threshold chosen on the calibration half; the counts and the
    Clopper-Pearson upper bounds of the false positive / negative rates on the evaluation half."""

    eps_lower: float
    threshold: float
    false_positives: int
    negatives: int
    false_negatives: int
    positives: int
    fpr_upper: float
    fnr_upper: float
    delta: float
    confidence: float


def multi_run_bound(scores: torch.Tensor, included: torch.Tensor, *, delta: float,
                    confidence: float = 0.95) -> MultiRunBound:
    """Bound from one canary score per run (``scores`` [n], higher: included) and whether the canary was in that
    run (``included`` [n] bool). The first half of the runs picks the threshold (among the midpoints between its
    scores, the middle one of those whose point estimate of eps is largest), the second half is counted."""
    scores = scores.detach().to(torch.float64).cpu().flatten()
    included = included.detach().to(torch.bool).cpu().flatten()
    n = scores.numel()
    if n < 4 or included.numel() != n:
        raise ValueError("need at least 4 runs (two to choose the threshold, two to count) and one label per run")
    half = n // 2
    cal_s, cal_in, ev_s, ev_in = scores[:half], included[:half], scores[half:], included[half:]
    alpha = (1 - confidence) / 2

    def rates(s, inc, t):
        fp, neg = int(((s >= t) & ~inc).sum()), int((~inc).sum())
        fn, pos = int(((s < t) & inc).sum()), int(inc.sum())
        return fp, neg, fn, pos

    if bool(cal_in.all()) or not bool(cal_in.any()):
        raise ValueError("the calibration half has no run with (or without) the canary: run more")
    values = torch.unique(cal_s)  # thresholds between consecutive calibration scores; the middle of the best ones
    cuts = torch.cat([values[:1] - 1, (values[1:] + values[:-1]) / 2, values[-1:] + 1]).tolist()
    found = []
    for t in cuts:
        fp, neg, fn, pos = rates(cal_s, cal_in, t)
        found.append(eps_from_rates((fp + 0.5) / (neg + 1), (fn + 0.5) / (pos + 1), delta))  # smoothed estimate
    best = [t for t, e in zip(cuts, found) if e == max(found)]
    best_t = best[len(best) // 2]
    fp, neg, fn, pos = rates(ev_s, ev_in, best_t)
    if neg == 0 or pos == 0:
        raise ValueError("the evaluation half has no run with (or without) the canary: run more")
    fpr_u = clopper_pearson(fp, neg, alpha)[1]
    fnr_u = clopper_pearson(fn, pos, alpha)[1]
    return MultiRunBound(eps_from_rates(fpr_u, fnr_u, delta), best_t, fp, neg, fn, pos, fpr_u, fnr_u, delta,
                         confidence)
