"""DPOptimizer arguments and state (issue 22, rows 9, 11, 12, 14): all-or-nothing ``load_state_dict`` with the step
count cross-checked against the accountant (epsilon is never under-reported), noise that would overflow float32
refused before any weight changes, bools refused as sizes, a warning for delta >= 1/n."""
import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastdp


def build(seed=0, **kw):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), noise_multiplier=1.0,
                             max_grad_norm=1.0, expected_batch_size=4, sample_size=40,
                             generator=torch.Generator().manual_seed(seed), **kw)
    return m, opt


def train(m, opt, steps):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)
        F.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad()


def snapshot(opt):
    """Everything load_state_dict may change, deep-copied."""
    return {"optimizer": copy.deepcopy(opt.original_optimizer.state_dict()), "history": list(opt.accountant.history),
            "steps": opt.steps_taken, "generator": opt.generator.get_state().clone(),
            "seeds": (opt.state_dict()["fastdp"]["seed_base"], opt.state_dict()["fastdp"]["seed_count"])}


def assert_unchanged(opt, before):
    after = snapshot(opt)
    assert after["history"] == before["history"] and after["steps"] == before["steps"]
    assert torch.equal(after["generator"], before["generator"]) and after["seeds"] == before["seeds"]
    s0, s1 = before["optimizer"]["state"], after["optimizer"]["state"]
    assert s0.keys() == s1.keys()
    assert all(torch.equal(s0[k]["momentum_buffer"], s1[k]["momentum_buffer"]) for k in s0)
    assert before["optimizer"]["param_groups"] == after["optimizer"]["param_groups"]


def saved_state(steps=3):
    m, opt = build(seed=5)
    train(m, opt, steps)
    return copy.deepcopy(opt.state_dict())


def corrupt(path, value):
    def apply(sd):
        node = sd
        for k in path[:-1]:
            node = node[k]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return sd
    return apply


BAD_FASTDP_PARTS = {
    "steps not an int": corrupt(("fastdp", "steps_taken"), "x"),
    "negative steps": corrupt(("fastdp", "steps_taken"), -1),
    "version": corrupt(("fastdp", "version"), 99),
    "no accountant state": corrupt(("fastdp", "accountant_state"), KeyError),
    "history entry": corrupt(("fastdp", "accountant_state", "history"), [(1.0, 0.1)]),
    "history sigma nan": corrupt(("fastdp", "accountant_state", "history"), [(math.nan, 0.1, 3)]),
    "other accountant": corrupt(("fastdp", "accountant"), "rdp"),
    "generator state type": corrupt(("fastdp", "generator_state"), [1, 2, 3]),
    "generator state size": corrupt(("fastdp", "generator_state"), torch.zeros(7, dtype=torch.uint8)),
    "seed base": corrupt(("fastdp", "seed_base"), 2 ** 70),
    "empty history, 3 steps": corrupt(("fastdp", "accountant_state", "history"), []),
    "steps 5, history 3": corrupt(("fastdp", "steps_taken"), 5),
}


@pytest.mark.parametrize("case", list(BAD_FASTDP_PARTS))
def test_a_bad_fastdp_part_changes_nothing(case):
    """Raised after the wrapped optimizer's state was already replaced (a mixed state)."""
    sd = BAD_FASTDP_PARTS[case](saved_state())
    m, opt = build()
    train(m, opt, 2)
    before = snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)
    train(m, opt, 1)  # still usable


def test_a_bad_wrapped_optimizer_part_changes_nothing():
    sd = saved_state()
    sd["optimizer"]["param_groups"].append(dict(sd["optimizer"]["param_groups"][0]))  # one group too many
    m, opt = build()
    train(m, opt, 2)
    before = snapshot(opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)
    assert_unchanged(opt, before)


def test_steps_without_history_are_refused_not_reported_as_epsilon_zero():
    """steps_taken=5 with an empty accountant history loaded and reported epsilon 0.0."""
    sd = saved_state(steps=5)
    sd["fastdp"]["accountant_state"]["history"] = []
    m, opt = build()
    with pytest.raises(ValueError, match="steps_taken=5 but the accountant's history holds 0 steps"):
        opt.load_state_dict(sd)
    assert opt.epsilon(1e-5) == 0.0 and opt.steps_taken == 0  # the fresh optimizer, untouched


def test_a_consistent_state_loads_and_continues_identically():
    m, opt = build(seed=5)
    train(m, opt, 3)
    sd = copy.deepcopy(opt.state_dict())
    params = copy.deepcopy(m.state_dict())
    train(m, opt, 2)
    m2, opt2 = build(seed=9)
    m2.load_state_dict(params)
    opt2.load_state_dict(sd)
    train(m2, opt2, 2)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert opt2.accountant.history == opt.accountant.history and opt2.epsilon(1e-5) == opt.epsilon(1e-5)


# ----------------------------------------------------------------------------------------------- row 11
@pytest.mark.parametrize("clipping,R", [("flat", 1e300), ("automatic", 1e300), ("flat", 1e38),
                                        ("per_layer", [1e300, 1.0])])
def test_noise_that_would_overflow_float32_is_refused_before_any_step(clipping, R):
    """max_grad_norm=1e300 was accepted and the step wrote non-finite weights without an error."""
    m = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="overflow float32"):
        fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=R,
                           expected_batch_size=4, sample_size=40, clipping=clipping)


def test_large_but_representable_noise_still_runs_finite():
    m = nn.Linear(3, 2)
    opt = fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=1e-30), noise_multiplier=1.0, max_grad_norm=1e30,
                             expected_batch_size=4, sample_size=40)
    F.cross_entropy(m(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())


# ----------------------------------------------------------------------------------------------- row 14
@pytest.mark.parametrize("arg", ["expected_batch_size", "sample_size", "noise_multiplier", "max_grad_norm"])
def test_bool_is_not_a_size_or_a_number(arg):
    """expected_batch_size=True was taken as 1."""
    kw = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4, sample_size=40)
    kw[arg] = True
    m = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=arg):
        fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), **kw)


# ----------------------------------------------------------------------------------------------- row 12
def test_target_delta_at_least_one_over_n_warns():
    m = nn.Linear(3, 2)
    with pytest.warns(UserWarning, match=r"target_delta=0.05 >= 1/sample_size = 1/40"):
        fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                           expected_batch_size=4, sample_size=40, target_delta=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                           expected_batch_size=4, sample_size=40, target_delta=1e-3)
    with pytest.raises(ValueError, match="target_delta"):
        fastdp.DPOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                           expected_batch_size=4, sample_size=40, target_delta=math.nan)
