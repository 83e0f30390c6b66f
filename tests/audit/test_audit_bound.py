"""The audit's statistics against independent computations: the one-run bound of Steinke, Nasr and Jagielski (2023)
recomputed from integer binomial coefficients (``math.comb``, the max over all i in 1..m as
the theorem states it), scipy's binomial and beta distributions where scipy is installed, hand-computed cases, and
the multi-run Clopper-Pearson bounds."""
import math

import pytest
import torch

from fastdp.audit.multi_run import clopper_pearson, eps_from_rates, multi_run_bound
from fastdp.audit.one_run import audit_scores, binomial_tail, eps_lower_bound, guess_counts, p_value


def theorem_p_value(m, r, v, eps, delta):
    """The bound as the theorem writes it, from integer binomial coefficients: f(v) + 2 m delta max_{1<=i<=m}
    (f(v - i) - f(v)) / i, f(u) = P[Binomial(r, p) >= u], p = e^eps / (1 + e^eps)."""
    p = math.exp(eps) / (1 + math.exp(eps))

    def f(u):
        return sum(math.comb(r, k) * p ** k * (1 - p) ** (r - k) for k in range(max(u, 0), r + 1))

    fv = f(v)
    return min(1.0, fv + 2 * m * delta * max((f(v - i) - fv) / i for i in range(1, m + 1)))


@pytest.mark.parametrize("m,r,v,eps,delta", [(10, 10, 8, 0.5, 0.0), (10, 10, 8, 0.5, 1e-3), (50, 20, 17, 1.3, 1e-4),
                                             (30, 30, 30, 2.0, 1e-5), (40, 24, 12, 0.0, 1e-2), (5, 4, 0, 1.0, 0.1)])
def test_p_value_matches_the_theorem_computed_with_exact_binomials(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(theorem_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_delta_zero_is_the_binomial_tail_of_randomised_response():
    for r, v, eps in [(100, 70, 0.7), (400, 300, 1.1), (1000, 560, 0.2)]:
        q = math.exp(eps) / (1 + math.exp(eps))
        assert p_value(1000, r, v, eps, 0.0) == pytest.approx(binomial_tail(v, r, q), rel=1e-12)


def test_binomial_tail_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for v, n, p in [(1, 1, 0.3), (60, 100, 0.55), (900, 1000, 0.88), (3, 2000, 0.001), (1990, 2000, 0.999)]:
        assert binomial_tail(v, n, p) == pytest.approx(float(stats.binom.sf(v - 1, n, p)), rel=1e-9)


def test_binomial_tail_hand_cases():
    assert binomial_tail(2, 3, 0.5) == pytest.approx(0.5)  # 3 + 1 of 8 outcomes
    assert binomial_tail(0, 5, 0.2) == 1.0 and binomial_tail(6, 5, 0.2) == 0.0
    assert binomial_tail(3, 3, 0.9) == pytest.approx(0.729)


def test_all_guesses_right_without_delta_has_a_closed_form():
    # P[all r right] = p^r = 1 - confidence  =>  eps = log(p / (1 - p)), p = 0.05 ** (1 / r)
    for r in (10, 100, 1000):
        p = 0.05 ** (1 / r)
        assert eps_lower_bound(r, r, r, 0.0, 0.95) == pytest.approx(math.log(p / (1 - p)), abs=2e-6)


def test_eps_lower_is_the_edge_of_the_rejection_region():
    for m, r, v, delta in [(1000, 200, 170, 1e-5), (2000, 1000, 700, 1e-5), (500, 100, 90, 1e-3)]:
        e = eps_lower_bound(m, r, v, delta, 0.95)
        assert e > 0
        assert p_value(m, r, v, e, delta) < 0.05 <= p_value(m, r, v, e + 2e-6, delta)


def test_eps_lower_is_monotone():
    m, r = 1000, 200
    by_v = [eps_lower_bound(m, r, v, 1e-5) for v in range(100, 201, 10)]
    assert by_v == sorted(by_v) and by_v[0] == 0.0 and by_v[-1] > 3
    by_delta = [eps_lower_bound(m, r, 180, d) for d in (0.0, 1e-6, 1e-5, 1e-4)]
    assert by_delta == sorted(by_delta, reverse=True)
    by_conf = [eps_lower_bound(m, r, 180, 1e-5, c) for c in (0.5, 0.9, 0.95, 0.99)]
    assert by_conf == sorted(by_conf, reverse=True)
    eps = [p_value(m, r, 180, e, 1e-5) for e in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert eps == sorted(eps)


def test_chance_level_refutes_nothing():
    assert eps_lower_bound(1000, 100, 50, 1e-5) == 0.0
    assert eps_lower_bound(1000, 100, 0, 1e-5) == 0.0


def test_bound_refuses_impossible_counts():
    with pytest.raises(ValueError, match="0 <= v <= r <= m"):
        p_value(10, 20, 5, 1.0, 0.0)
    with pytest.raises(TypeError, match="r must be an int"):
        eps_lower_bound(10, 4.0, 2, 0.0)
    with pytest.raises(ValueError, match="confidence"):
        eps_lower_bound(10, 4, 2, 0.0, 1.0)


def test_audit_scores_counts_the_guesses_and_applies_bonferroni():
    m = 400
    included = torch.arange(m) % 2 == 0
    scores = included.double() + 0.01 * torch.arange(m).double() / m  # perfectly separated
    b = audit_scores(scores, included, delta=1e-5, guesses=[10, 100])
    assert [row[:3] for row in b.table] == [(10, 20, 20), (100, 200, 200)]
    assert b.eps_lower == max(row[3] for row in b.table) == b.table[1][3]
    assert b.table[1][3] == pytest.approx(eps_lower_bound(m, 200, 200, 1e-5, 1 - 0.05 / 2))
    single = audit_scores(scores, included, delta=1e-5, guesses=100)
    assert single.eps_lower > b.eps_lower  # one pre-chosen k pays no multiple-testing price
    flipped = audit_scores(-scores, included, delta=1e-5, guesses=100)
    assert flipped.v == 0 and flipped.eps_lower == 0.0


def test_audit_scores_abstains_outside_the_candidates():
    m = 100
    included = torch.arange(m) % 2 == 0
    candidates = torch.arange(m) < 40
    scores = torch.where(candidates, included.double(), torch.zeros(m, dtype=torch.float64))
    b = audit_scores(scores, included, delta=0.0, candidates=candidates, guesses=20)
    assert (b.m, b.candidates, b.r, b.v) == (100, 40, 40, 40)
    with pytest.raises(ValueError, match="half the 40 candidate"):
        audit_scores(scores, included, delta=0.0, candidates=candidates, guesses=21)


def test_default_guess_counts():
    assert guess_counts(2000) == (20, 50, 100, 200, 500, 1000)
    assert guess_counts(3) == (1,) and guess_counts(1) == ()


def test_clopper_pearson_against_scipy_beta_quantiles():
    stats = pytest.importorskip("scipy.stats")
    for k, n, a in [(3, 20, 0.025), (0, 50, 0.025), (50, 50, 0.05), (17, 400, 0.01), (399, 400, 0.025)]:
        lo, hi = clopper_pearson(k, n, a)
        ref_lo = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
        ref_hi = 1.0 if k == n else float(stats.beta.ppf(1 - a, k + 1, n - k))
        assert lo == pytest.approx(ref_lo, abs=1e-9) and hi == pytest.approx(ref_hi, abs=1e-9)


def test_clopper_pearson_hand_cases():
    lo, hi = clopper_pearson(0, 10, 0.025)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** 0.1, abs=1e-10)
    lo, hi = clopper_pearson(10, 10, 0.025)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** 0.1, abs=1e-10)


def test_eps_from_rates():
    assert eps_from_rates(0.1, 0.2, 0.0) == pytest.approx(math.log(0.8 / 0.1))
    assert eps_from_rates(0.5, 0.5, 0.0) == 0.0
    assert eps_from_rates(0.0, 0.3, 0.0) == math.inf


def test_multi_run_bound_separates_and_stays_at_zero_on_noise():
    gen = torch.Generator().manual_seed(0)
    included = torch.rand(400, generator=gen) < 0.5
    separated = multi_run_bound(included.double() * 10 + torch.randn(400, generator=gen, dtype=torch.float64),
                                included, delta=1e-5)
    assert separated.false_positives + separated.false_negatives <= 2
    # 200 evaluation runs with no error: FPR, FNR <= 1 - 0.025^(1/~100) ~ 0.036 => eps >= log(0.96 / 0.036) ~ 3.3
    assert separated.eps_lower > 2.5
    noise = multi_run_bound(torch.randn(400, generator=gen, dtype=torch.float64), included, delta=1e-5)
    assert noise.eps_lower < 0.5
