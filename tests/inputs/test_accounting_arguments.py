"""Accounting arguments (issue 22, rows 1, 2, 7, 8): every target gives a result or a clear error in bounded time,
the sigma returned really has epsilon <= target, and bad numbers are refused naming the argument."""
import math
import warnings

import pytest
import torch
from inputs.deadline import within
from torch.utils.data import DataLoader, TensorDataset

import fastdp
from fastdp.accounting import get_epsilon, get_noise_multiplier

DEADLINE_S = 120  # measured: 1-6 s each on the 2-core CPU; opacus' own search never returned (300-590 s)


def reported_epsilon(sigma, q, steps, delta, accountant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=accountant)


# ------------------------------------------------------------------------------------------------ row 1
@pytest.mark.parametrize("target", [1000.0, 1e6])
def test_targets_past_prv_range_return_a_sigma_whose_epsilon_is_within_target(target):
    """opacus' PRV returns inf past ~709.8 and its search never ends (1000: no result in 590 s). Now: a sigma in
    bounded time, with a warning that the RDP bound calibrated it, and the epsilon reported for it <= target."""
    q, epochs, delta = 1 / 3, 1, 1e-5
    r = within(DEADLINE_S, get_noise_multiplier, target_epsilon=target, target_delta=delta, sample_rate=q,
               epochs=epochs)
    sigma = r["value"]
    assert 0 < sigma < 1 and math.isfinite(sigma)
    assert any("RDP bound" in w for w in r["warnings"]), r["warnings"]
    eps = reported_epsilon(sigma, q, int(epochs / q), delta, "prv")
    assert eps <= target
    assert eps >= 0.99 * target  # not needlessly noisy


def test_make_private_with_a_huge_target_epsilon_returns():
    ds = TensorDataset(torch.randn(30, 4), torch.randint(0, 2, (30,)))
    model = torch.nn.Linear(4, 2)

    def build():
        return fastdp.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                   data_loader=DataLoader(ds, batch_size=10), target_epsilon=1e6, target_delta=1e-5,
                                   epochs=1, max_grad_norm=1.0)
    r = within(DEADLINE_S, build)
    _, opt, _ = r["value"]
    assert 0 < opt.noise_multiplier < 1
    assert reported_epsilon(opt.noise_multiplier, opt.sample_rate, 3, 1e-5, "prv") <= 1e6


def test_prv_epsilon_of_a_tiny_sigma_falls_back_to_rdp_fast():
    """PRV at sigma 0.01 took 21 s and returned inf; now the RDP bound (finite, an upper bound), with a warning."""
    r = within(DEADLINE_S, get_epsilon, noise_multiplier=0.01, sample_rate=1 / 3, steps=3, delta=1e-5)
    rdp = reported_epsilon(0.01, 1 / 3, 3, 1e-5, "rdp")
    assert r["value"] == rdp and math.isfinite(rdp)
    assert any("RDP bound" in w for w in r["warnings"]) and r["seconds"] < 10


# ------------------------------------------------------------------------------------------------ row 2
def test_nan_noise_multiplier_is_refused():
    with pytest.raises(ValueError, match="noise_multiplier"):
        within(DEADLINE_S, get_epsilon, noise_multiplier=math.nan, sample_rate=0.1, steps=10, delta=1e-5)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_infinite_noise_is_epsilon_zero(accountant):
    r = within(DEADLINE_S, get_epsilon, noise_multiplier=math.inf, sample_rate=0.1, steps=10, delta=1e-5,
               accountant=accountant)
    assert r["value"] == 0.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_huge_finite_noise_is_a_small_epsilon_not_an_overflow(accountant):
    """sigma = 1e300 raised OverflowError inside opacus; it is accounted as sigma = 1e10 (an upper bound)."""
    eps = get_epsilon(noise_multiplier=1e300, sample_rate=0.1, steps=30, delta=1e-5, accountant=accountant)
    assert 0 <= eps <= get_epsilon(noise_multiplier=10.0, sample_rate=0.1, steps=30, delta=1e-5, accountant=accountant)


# ------------------------------------------------------------------------------------------------ row 7
@pytest.mark.parametrize("epochs", [0, 0.05, -1, math.nan, math.inf, True])
def test_bad_epochs_are_refused_naming_epochs(epochs):
    with pytest.raises(ValueError, match="epochs"):
        get_noise_multiplier(target_epsilon=3, target_delta=1e-5, sample_rate=0.1, epochs=epochs)


@pytest.mark.parametrize("epochs", [0, 0.05, -1, math.nan])
def test_make_private_refuses_bad_epochs(epochs):
    ds = TensorDataset(torch.randn(30, 4), torch.randint(0, 2, (30,)))
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="epochs"):
        fastdp.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                            data_loader=DataLoader(ds, batch_size=10), target_epsilon=3.0, target_delta=1e-5,
                            epochs=epochs, max_grad_norm=1.0)


@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_steps_are_refused(steps):
    with pytest.raises(ValueError, match="steps"):
        get_noise_multiplier(target_epsilon=3, target_delta=1e-5, sample_rate=0.1, steps=steps)


def test_delta_near_one_is_a_clear_error_naming_delta():
    """opacus' PRV raised RuntimeError('Cannot compute epsilon'); RDP gave a negative epsilon."""
    with pytest.raises(ValueError, match="delta"):
        within(DEADLINE_S, get_noise_multiplier, target_epsilon=3, target_delta=0.9999999, sample_rate=0.1, epochs=3)
    for accountant in ("prv", "rdp"):
        with pytest.raises(ValueError, match="delta=0.9999999 is too large"):
            get_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=30, delta=0.9999999, accountant=accountant)


@pytest.mark.parametrize("delta", [0, 1, -1e-5, math.nan, math.inf, True])
def test_bad_deltas_are_refused(delta):
    with pytest.raises(ValueError, match="delta"):
        get_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=30, delta=delta)
    with pytest.raises(ValueError, match="target_delta"):
        get_noise_multiplier(target_epsilon=3, target_delta=delta, sample_rate=0.1, epochs=3)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_unreachable_tiny_target_is_a_clear_error(accountant):
    with pytest.raises(ValueError, match="target_epsilon=1e-06 is too small to reach"):
        within(DEADLINE_S, get_noise_multiplier, target_epsilon=1e-6, target_delta=1e-5, sample_rate=1 / 3, epochs=1,
               accountant=accountant)


# ------------------------------------------------------------------------------------------------ row 8
@pytest.mark.parametrize("target", [math.nan, math.inf, -1.0, 0.0, True])
def test_non_finite_or_non_positive_target_epsilon_is_refused(target):
    with pytest.raises(ValueError, match="target_epsilon"):
        get_noise_multiplier(target_epsilon=target, target_delta=1e-5, sample_rate=0.1, epochs=3)
    m = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="target_epsilon"):
        fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), target_epsilon=target, target_delta=1e-5,
                           epochs=1, max_grad_norm=1.0, expected_batch_size=10, sample_size=100)


@pytest.mark.parametrize("rate", [0, 1.5, math.nan, -0.1, True])
def test_bad_sample_rate_is_refused(rate):
    with pytest.raises(ValueError, match="sample_rate"):
        get_epsilon(noise_multiplier=1.0, sample_rate=rate, steps=30, delta=1e-5)
