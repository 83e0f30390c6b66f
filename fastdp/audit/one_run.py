"""The one-run audit's statistics (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023, arXiv:2305.08846): from m canaries, each included independently with probability 1/2, and one
score per canary, guess "in" for the k highest scores and "out" for the k lowest (abstain on the rest), count the
correct guesses, and turn (m, r = 2k guesses, v correct) into the largest epsilon that the run refutes.

The bound (the paper's main result, in the exact form its Appendix D computes): if the training algorithm is
(eps, delta)-DP with respect to the inclusion of each canary, the number W of correct guesses satisfies, for every v,

    P[W >= v] <= f(v) + 2 m delta * max_{i = 1..m} (f(v - i) - f(v)) / i,          f(v) = P[Binomial(r, p) >= v],

with p = e^eps / (1 + e^eps) (the accuracy of eps-DP randomised response). With delta = 0 this is the pure-DP
statement: W is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)). ``p_value`` is the right-hand side
(clamped to 1); ``eps_lower_bound`` is the largest eps whose p-value at the observed v is below
``1 - confidence``: the algorithm is not (eps, delta)-DP for any smaller eps, at that confidence.

Provenance: the paper's stored text could not be retrieved when this was checked, so its theorem numbers are not
quoted here. What was checked: the formula above is the one its Appendix D code computes (the p-value routine with
r guesses, v correct, m canaries, accuracy q = 1 / (1 + e^-eps), the binomial tail plus 2 m delta times the largest
mean of P[v - i <= Binomial(r, q) < v] over i = 1..v), as reproduced by several public implementations that cite
that appendix of arXiv:2305.08846 (one of them names the statement Corollary 5.4; not verified against the
paper). The formula was also checked against independent computations (``tests/audit/test_audit_bound.py``:
scipy's binomial tail where scipy is installed, hand-computed cases, delta = 0 as a plain binomial tail).

Several guess counts: choosing the best of K guess counts after seeing the scores is a multiple test. ``audit_scores``
tests each at level ``(1 - confidence) / K`` (Bonferroni), so the reported maximum keeps the stated confidence.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["AuditBound", "audit_scores", "binomial_pmf", "binomial_tail", "eps_lower_bound", "guess_counts",
           "p_value"]


def _log_pq(eps: float) -> Tuple[float, float]:
    """(log p, log(1 - p)) of p = e^eps / (1 + e^eps), stable for large eps."""
    return -math.log1p(math.exp(-eps)), -(eps + math.log1p(math.exp(-eps)))


def binomial_pmf(k: torch.Tensor, n: int, log_p: float, log_q: float) -> torch.Tensor:
    """P[Binomial(n, p) = k] for the float64 integer tensor ``k`` (0 outside 0..n), from log p and log(1 - p)."""
    k = k.to(torch.float64)
    inside = (k >= 0) & (k <= n)
    kc = k.clamp(0, n)
    log_pmf = (math.lgamma(n + 1) - torch.lgamma(kc + 1) - torch.lgamma(n - kc + 1) + kc * log_p + (n - kc) * log_q)
    return torch.where(inside, log_pmf.exp(), torch.zeros_like(k))


def binomial_tail(v: int, n: int, p: float) -> float:
    """P[Binomial(n, p) >= v] (1 for v <= 0, 0 for v > n)."""
    if v <= 0:
        return 1.0
    if v > n:
        return 0.0
    if p <= 0.0 or p >= 1.0:
        return 0.0 if p <= 0.0 else 1.0
    ks = torch.arange(v, n + 1, dtype=torch.float64)
    return float(math.fsum(binomial_pmf(ks, n, math.log(p), math.log1p(-p)).tolist()))


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The bound on P[W >= v] for an (eps, delta)-DP algorithm (module docstring): m canaries, r guesses, v correct.

    Examples:
        >>> round(p_value(m=100, r=10, v=10, eps=0.0, delta=0.0), 6)  # ten fair coins all right
        0.000977
    """
    _check_counts(m, r, v)
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta!r}")
    log_p, log_q = _log_pq(eps)
    if v == 0:
        return 1.0
    ks = torch.arange(0, r + 1, dtype=torch.float64)
    pmf = binomial_pmf(ks, r, log_p, log_q).tolist()
    f_v = math.fsum(pmf[v:])  # f(v) = P[Binomial(r, p) >= v]
    if delta == 0:
        return min(1.0, f_v)
    # (f(v - i) - f(v)) / i = P[v - i <= Binomial < v] / i; for i > v it only shrinks (no mass below 0)
    below = torch.tensor(pmf[:v][::-1], dtype=torch.float64)  # pmf(v - 1), pmf(v - 2), ..., pmf(0)
    ratio = below.cumsum(0) / torch.arange(1, v + 1, dtype=torch.float64)
    return min(1.0, f_v + 2 * m * delta * float(ratio.max()))


def eps_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest eps with ``p_value(m, r, v, eps, delta) < 1 - confidence`` (0 if even eps = 0 is not refuted),
    to 1e-6 absolute, rounded down (the low end of the bisection: never above the exact supremum).

    Examples:
        >>> eps_lower_bound(m=1000, r=100, v=50, delta=1e-5)  # chance level refutes nothing
        0.0
        >>> round(eps_lower_bound(m=1000, r=100, v=100, delta=0.0), 3)  # 100 of 100 right: p^100 = 0.05
        3.493
    """
    _check_counts(m, r, v)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    alpha = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # p_value -> P[all right] -> 1 as eps grows; reaching this means delta ~ 0 and v = r huge
            return lo
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def guess_counts(candidates: int) -> Tuple[int, ...]:
    """Default numbers k of "in" guesses (as many "out" guesses): about 1%, 2.5%, 5%, 10%, 25% and 50% of the
    ``candidates`` canaries on each side, distinct, at least 1."""
    half = candidates // 2
    ks = sorted({max(1, round(f * candidates / 2)) for f in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)})
    return tuple(k for k in ks if k <= half) or ((1,) if half >= 1 else ())


@dataclass(frozen=True)
class AuditBound:
    """The one-run bound of one audit.

    ``eps_lower``: the best of the per-``k`` bounds (each at the Bonferroni level); ``k``, ``r``, ``v``: the guess
    count that gave it, its number of guesses (2k) and of correct ones; ``table``: (k, r, v, eps_lower) for every
    candidate; ``m``: canaries in the bound; ``candidates``: the canaries the guesses were drawn from (the others
    abstained on); ``confidence``, ``delta``: as given."""

    eps_lower: float
    k: int
    r: int
    v: int
    m: int
    candidates: int
    delta: float
    confidence: float
    table: Tuple[Tuple[int, int, int, float], ...]


def audit_scores(scores: torch.Tensor, included: torch.Tensor, *, delta: float, confidence: float = 0.95,
                 guesses: Union[None, int, Sequence[int]] = None, candidates: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> AuditBound:
    """One-run bound from ``scores`` [m] (higher: more likely included) and the truth ``included`` [m] (bool).

    Args:
        guesses: k (guess "in" for the k highest scores, "out" for the k lowest), or several candidates (each
            tested at level ``(1 - confidence) / len(guesses)``); default ``guess_counts(candidates)``.
        candidates: bool [m], the canaries the auditor guesses on (the others abstain); the choice must depend on
            released information only (e.g. canaries whose coordinate was never released are left out). ``m`` in
            the bound stays the number of all canaries.
        generator: breaks ties between equal scores at random (a fixed order could correlate with ``included``).
    """
    scores = scores.detach().to(torch.float64).cpu().flatten()
    included = included.detach().to(torch.bool).cpu().flatten()
    m = scores.numel()
    if included.numel() != m or m == 0:
        raise ValueError(f"scores ({m}) and included ({included.numel()}) must be non-empty and of one length")
    if candidates is None:
        candidates = torch.ones(m, dtype=torch.bool)
    candidates = candidates.detach().to(torch.bool).cpu().flatten()
    idx = candidates.nonzero().flatten()
    n_cand = idx.numel()
    ks = guess_counts(n_cand) if guesses is None else ((guesses,) if isinstance(guesses, int) else tuple(guesses))
    if any(not (isinstance(k, int) and 1 <= k <= n_cand // 2) for k in ks):
        raise ValueError(f"guess counts {ks} must be ints in [1, {n_cand // 2}] (half the {n_cand} candidate canaries)")
    if not ks:
        return AuditBound(0.0, 0, 0, 0, m, n_cand, delta, confidence, ())
    perm = torch.randperm(n_cand, generator=generator)  # random tie-breaking, then a stable sort
    order = idx[perm][torch.sort(scores[idx[perm]], descending=True, stable=True).indices]
    level = 1 - (1 - confidence) / len(ks)
    table = []
    for k in ks:
        v = int(included[order[:k]].sum()) + int((~included[order[-k:]]).sum())
        table.append((k, 2 * k, v, eps_lower_bound(m, 2 * k, v, delta, level)))
    best = max(table, key=lambda row: row[3])
    return AuditBound(best[3], best[0], best[1], best[2], m, n_cand, delta, confidence, tuple(table))


def _check_counts(m: int, r: int, v: int) -> None:
    for name, x in (("m", m), ("r", r), ("v", v)):
        if not (isinstance(x, int) and not isinstance(x, bool)):
            raise TypeError(f"{name} must be an int, got {x!r}")
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
