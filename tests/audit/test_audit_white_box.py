"""The white-box one-run audit end to end on the CPU (digits, a small MLP): a correct engine stays below its claim
and is not trivially 0 at epsilon 8; an engine whose noise is 10x too small is caught; canaries enter the clipped sum
exactly as clipped samples; a tensor left without noise is caught; coordinates a method never releases read exactly
0; refusals."""
import warnings

import pytest
import torch

import fastdp
from fastdp.audit import multi_run_audit
from fastdp.audit.training import METHODS
from fastdp.data import load_dataset
from fastdp.models import MLP
from fastdp.optimizer import DPOptimizer


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", limit=500)[0]


def mlp():
    return MLP(64, 10, hidden=(64,))  # 4810 trainable coordinates


@pytest.fixture(autouse=True)
def _quiet_prv_at_rate_one():
    with warnings.catch_warnings():  # opacus' PRV takes log(1 - q) = log(0) at sample rate 1 (harmless)
        warnings.filterwarnings("ignore", message="divide by zero", category=RuntimeWarning)
        yield


def test_correct_dpsgd_at_epsilon_8_bounds_between_1_and_the_claim(digits):
    r = fastdp.audit(mlp, digits, canaries=2000, method="dpsgd", epochs=10, target_epsilon=8.0, seed=0)
    assert 7.5 < r.epsilon <= 8.0
    assert 1.0 < r.eps_lower <= r.epsilon
    assert r.max_unreleased == 0.0 and int(r.candidates.sum()) == 2000
    assert "CONSISTENT" in r.report()


def test_noise_ten_times_too_small_is_caught(digits, monkeypatch):
    honest = DPOptimizer.noise_std
    monkeypatch.setattr(DPOptimizer, "noise_std", lambda self: 0.1 * honest(self))  # the deliberately broken engine
    r = fastdp.audit(mlp, digits, canaries=2000, method="dpsgd", epochs=10, target_epsilon=2.0, seed=0,
                     accountant="rdp")
    assert r.epsilon <= 2.0
    assert r.eps_lower > r.epsilon
    assert "VIOLATION" in r.report()


def test_a_tensor_left_without_noise_is_caught(digits, monkeypatch):
    honest = DPOptimizer.add_noise

    def forget_the_head(self, grads):  # a broken release: no noise on one parameter tensor
        head = self.model.head.weight
        kept = grads.views[head].clone()
        honest(self, grads)
        grads.views[head].copy_(kept)

    monkeypatch.setattr(DPOptimizer, "add_noise", forget_the_head)
    monkeypatch.setattr(DPOptimizer, "fuse_sgd", False)  # the fused kernel would not call add_noise
    r = fastdp.audit(mlp, digits, canaries=2000, method="dpsgd", epochs=10, target_epsilon=2.0, seed=0,
                     accountant="rdp")
    on_head = torch.tensor([name == "head.weight" for name, _ in r.coordinates])
    assert r.statistic[on_head].abs().min() > 1e6  # their releases carry no noise: certain guesses
    assert r.eps_lower > r.epsilon


@pytest.mark.parametrize("method", ["dpsgd", "per-layer"])
def test_a_canary_adds_exactly_its_clipped_gradient_per_participation(digits, method):
    with pytest.warns(UserWarning, match="NOT differentially private"):
        r = fastdp.audit(mlp, digits, canaries=300, method=method, epochs=3, noise_multiplier=0.0, seed=1)
    inc = r.included
    # noiseless, sample rate 1: each step's release minus the data's clipped sum is R_c per included canary
    assert torch.allclose(r.scores[inc], torch.full_like(r.scores[inc], 3.0), atol=1e-4)
    assert torch.allclose(r.scores[~inc], torch.zeros_like(r.scores[~inc]), atol=1e-4)
    assert bool((r.statistic[inc] > 1e6).all()) and bool((r.statistic[~inc] < -1e6).all())  # no noise: certain
    assert r.eps_lower > 3  # k = 75: all 150 guesses right (3.4 at the Bonferroni level of 6 guess counts)


def test_canaries_are_poisson_sampled_like_samples():
    small = load_dataset("digits", limit=200)[0]
    r = fastdp.audit(mlp, small, canaries=400, method="dpsgd", epochs=2, expected_batch_size=90,
                     noise_multiplier=1.0, seed=2, accountant="rdp")
    assert r.sample_rate == pytest.approx(90 / 600) and r.steps == 14
    assert int(r.participations[~r.included].sum()) == 0
    joined = r.participations[r.included].double()  # Binomial(14, 0.15) each: mean 2.1, sd of the mean ~0.06
    assert abs(float(joined.mean()) - 14 * 0.15) < 0.3 and int(joined.max()) <= 14
    assert r.eps_lower <= r.epsilon


@pytest.mark.parametrize("method,trains", [("bitfit", lambda name: name.endswith("bias") or name.startswith("head")),
                                           ("last-layer", lambda name: name.startswith("head"))])
def test_frozen_coordinates_are_never_released(digits, method, trains):
    r = fastdp.audit(mlp, digits, canaries=1000, method=method, epochs=4, noise_multiplier=0.5, seed=3)
    expected = torch.tensor([trains(name) for name, _ in r.coordinates])
    assert torch.equal(r.candidates, expected)
    assert bool((r.scores[~expected] == 0).all()) and r.max_unreleased == 0.0
    assert r.eps_lower <= r.epsilon


def test_masked_rows_are_never_released(digits):
    r = fastdp.audit(mlp, digits, canaries=1000, method="random-groups", epochs=3, noise_multiplier=0.5, seed=4)
    on_weights = torch.tensor([name == "layers.0.weight" for name, _ in r.coordinates])
    kept = r.candidates[on_weights].double().mean()
    assert 0.1 < kept < 0.3  # 20% of the rows train
    assert bool(r.candidates[~on_weights].all())
    assert bool((r.scores[~r.candidates] == 0).all()) and r.max_unreleased == 0.0


def test_noise_leaking_off_the_mask_is_reported(digits, monkeypatch):
    def unmasked_noise(self, grads):  # a broken release: noise on every coordinate, masked ones included
        for flat in grads.flats:
            flat += torch.randn(flat.shape, dtype=flat.dtype) * self.noise_std()

    monkeypatch.setattr(DPOptimizer, "add_noise", unmasked_noise)
    monkeypatch.setattr(DPOptimizer, "fuse_sgd", False)  # the fused kernel would not call add_noise
    r = fastdp.audit(mlp, digits, canaries=500, method="random-groups", epochs=2, noise_multiplier=0.5, seed=5)
    assert r.max_unreleased > 0
    assert "must be 0" in r.report()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_audited_below_its_claim(digits, method):
    epochs = 3 if method in ("sparta", "adadpigu") else 2
    r = fastdp.audit(mlp, digits, canaries=600, method=method, epochs=epochs, noise_multiplier=1.0, seed=6,
                     accountant="rdp")
    assert 0 <= r.eps_lower <= r.epsilon
    assert r.max_unreleased == 0.0
    assert bool((r.scores[~r.candidates] == 0).all())


def test_multi_run_audit_catches_a_tiny_noise_and_accepts_a_correct_one():
    small = load_dataset("digits", limit=40)[0]
    common = dict(epochs=2, seed=7, accountant="rdp")
    loud = multi_run_audit(lambda: MLP(64, 10, hidden=(8,)), small, runs=160, noise_multiplier=0.02, **common)
    # ~80 evaluation runs without an error: FPR, FNR <= 1 - 0.025^(1/~40) ~ 0.09  =>  eps_lower ~ log(0.91 / 0.09)
    assert loud.false_positives + loud.false_negatives == 0 and loud.eps_lower > 2.0
    quiet = multi_run_audit(lambda: MLP(64, 10, hidden=(8,)), small, runs=40, noise_multiplier=2.0, **common)
    assert quiet.eps_lower < fastdp.get_epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=2, delta=1e-5,
                                                accountant="rdp")


def test_refusals(digits, monkeypatch):
    with pytest.raises(ValueError, match="5000 Dirac canaries need 5000 distinct coordinates, but the model has 4810"):
        fastdp.audit(mlp, digits, canaries=5000, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="exactly one of noise_multiplier and target_epsilon"):
        fastdp.audit(mlp, digits, canaries=100, noise_multiplier=1.0, target_epsilon=1.0)
    with pytest.raises(ValueError, match="threat must be one of"):
        fastdp.audit(mlp, digits, canaries=100, noise_multiplier=1.0, threat="grey-box")
    with pytest.raises(ValueError, match="sparta needs epochs >= warmup_epochs \\+ 2"):
        fastdp.audit(mlp, digits, canaries=100, noise_multiplier=1.0, method="sparta", epochs=1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    with pytest.raises(NotImplementedError, match="threat 'black-box-loss' under DistributedDataParallel"):
        fastdp.audit(mlp, digits, canaries=100, noise_multiplier=1.0, threat="black-box-loss")
    with pytest.raises(NotImplementedError, match="distributed=False under torch.distributed \\(world size 4\\)"):
        fastdp.audit(mlp, digits, canaries=100, noise_multiplier=1.0, distributed=False)
    with pytest.raises(NotImplementedError, match="multi_run_audit under torch.distributed \\(world size 4\\)"):
        multi_run_audit(mlp, digits, runs=2, noise_multiplier=1.0)
