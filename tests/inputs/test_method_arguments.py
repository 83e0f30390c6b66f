"""Counts given to the methods: a bool is not a count (True would be taken as 1 epoch or step)."""
import pytest
import torch
from torch import nn

from fastdp.methods import SPARTA, AdaDPIGU, RandomSparsification
from fastdp.micro_adam import MicroAdam

DP = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, sample_size=40)


def model_and_sgd():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return m, torch.optim.SGD(m.parameters(), lr=0.1)


@pytest.mark.parametrize("make, arg", [
    (lambda m, o, v: SPARTA(m, o, warmup_epochs=v, **DP), "warmup_epochs"),
    (lambda m, o, v: SPARTA(m, o, steps_per_epoch=v, **DP), "steps_per_epoch"),
    (lambda m, o, v: AdaDPIGU(m, o, pretrain_epochs=v, **DP), "pretrain_epochs"),
    (lambda m, o, v: RandomSparsification(m, o, epochs=v, **DP), "epochs"),
    (lambda m, o, v: RandomSparsification(m, o, epochs=3, refresh_per_epoch=v, **DP), "refresh_per_epoch"),
])
def test_a_bool_count_is_refused_naming_the_argument(make, arg):
    m, sgd = model_and_sgd()
    with pytest.raises(ValueError, match=arg):
        make(m, sgd, True)


def test_micro_adam_window_must_be_an_int_not_a_bool():
    with pytest.raises(ValueError, match="window"):
        MicroAdam(nn.Linear(3, 2).parameters(), window=True)


def test_a_bad_method_part_of_a_state_changes_nothing():
    """A method's state dict whose method part fails to load leaves the optimizer as it was (step count, accountant,
    method state): never the new step count with the old method state."""
    torch.manual_seed(0)
    m, sgd = model_and_sgd()
    opt = SPARTA(m, sgd, warmup_epochs=0, steps_per_epoch=3, **DP)
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    for _ in range(2):  # into the selection epoch: scores exist
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()
    state = opt.state_dict()
    before = (opt.steps_taken, list(opt.accountant.history), {k: v.clone() for k, v in opt.scores.items()})
    torch.nn.functional.cross_entropy(m(x), y).backward()
    opt.step()
    opt.zero_grad()
    bad = {**state, "fastdp": {**state["fastdp"], "method": {"scores": {"no such parameter": torch.zeros(3)}}}}
    after_step = (opt.steps_taken, list(opt.accountant.history))
    with pytest.raises(Exception):
        opt.load_state_dict(bad)
    assert (opt.steps_taken, list(opt.accountant.history)) == after_step != before[:2]
