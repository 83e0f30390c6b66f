"""Accounting: opacus' accountants through fastdp, checked against Google's dp-accounting as an independent implementation."""
import math

import pytest
import torch

import fastdp

dp_accounting = pytest.importorskip("dp_accounting")

# (sigma, q, steps, delta); published values in ../shared/docs/peer-libraries.md section 7
VECTORS = [(1.0, 0.01, 1000, 1e-5), (1.0, 0.01, 10000, 1e-5), (0.8, 0.01, 1000, 1e-5), (1.5, 0.04, 2250, 1e-5),
           (1.1, 256 / 60000, 14062, 1e-5)]


def dp_acc(sigma, q, steps, delta, kind):
    ev = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    acc = dp_accounting.rdp.RdpAccountant() if kind == "rdp" else dp_accounting.pld.PLDAccountant()
    return acc.compose(ev).get_epsilon(delta)


@pytest.mark.parametrize("sigma,q,steps,delta", VECTORS)
def test_rdp_matches_dp_accounting_to_0_1_percent(sigma, q, steps, delta):
    ours = fastdp.get_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="rdp")
    assert ours == pytest.approx(dp_acc(sigma, q, steps, delta, "rdp"), rel=1e-3)


@pytest.mark.parametrize("sigma,q,steps,delta", VECTORS)
def test_prv_matches_dp_accounting_pld_to_3_percent(sigma, q, steps, delta):
    ours = fastdp.get_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="prv")
    assert ours == pytest.approx(dp_acc(sigma, q, steps, delta, "pld"), rel=3e-2)


def test_published_anchors():
    assert fastdp.get_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5,
                              accountant="rdp") == pytest.approx(7.32911117143, rel=1e-6)
    assert fastdp.get_epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2249, delta=1e-5,
                              accountant="prv") == pytest.approx(6.777395712150674, rel=1e-4)
    assert fastdp.get_noise_multiplier(target_epsilon=8, target_delta=1e-5, sample_rate=0.04, epochs=90,
                                       accountant="rdp") == pytest.approx(1.416, abs=1e-3)
    assert fastdp.get_noise_multiplier(target_epsilon=8, target_delta=1e-5, sample_rate=0.04, epochs=90,
                                       accountant="prv") == pytest.approx(1.34765625, abs=1e-3)


def test_zero_noise_is_infinite_epsilon_and_no_steps_is_zero():
    assert fastdp.get_epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=10, delta=1e-5) == math.inf
    assert fastdp.get_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5) == 0.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_optimizer_epsilon_equals_accountant_fed_the_same_history(accountant):
    m = torch.nn.Linear(3, 2)
    opt = fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=0.9, max_grad_norm=1.0,
                             expected_batch_size=10, sample_size=500, accountant=accountant)
    for _ in range(7):
        m(torch.randn(10, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    assert opt.epsilon(1e-5) == pytest.approx(fastdp.get_epsilon(
        noise_multiplier=0.9, sample_rate=0.02, steps=7, delta=1e-5, accountant=accountant), rel=1e-9)


def test_bad_inputs():
    with pytest.raises(ValueError):
        fastdp.get_epsilon(noise_multiplier=1.0, sample_rate=1.5, steps=10, delta=1e-5)
    with pytest.raises(ValueError):
        fastdp.get_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=0)
    with pytest.raises(ValueError, match="exactly one"):
        fastdp.get_noise_multiplier(target_epsilon=1, target_delta=1e-5, sample_rate=0.1)
