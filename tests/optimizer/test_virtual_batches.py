"""Virtual batches: a Poisson batch run as physical batches makes the step of the whole batch, once.

Both splitters: ``fastdp.virtual_batches.VirtualBatches`` and Opacus' ``BatchMemoryManager`` (which drives
``DPOptimizer.signal_skip_step``). The oracle is ``DPOptimizer`` stepping on the whole logical batch, itself checked
against torch.func per-sample gradients here (``clipped_sum_reference``).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset

import fastdp
from fastdp.virtual_batches import VirtualBatches, chunk_indices, split_batch
from helpers import clipped_sum_reference, flat_params, small_mlp

N, BATCH, R = 40, 10, 0.05


def _data():
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.randn(N, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (N,), generator=g))


def _private(seed=7, sigma=0.0, accountant="prv"):
    """A noiseless (by default) DP-SGD at lr 1 on a Poisson loader of expected batch BATCH, with a seeded sampler."""
    model = small_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastdp.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                   data_loader=DataLoader(_data(), batch_size=BATCH), noise_multiplier=sigma,
                                   max_grad_norm=R, sample_generator=torch.Generator().manual_seed(seed),
                                   noise_generator=torch.Generator().manual_seed(11), accountant=accountant)


def _loss(out, y):
    return F.cross_entropy(out, y)


def _whole_batch_run(seed=7):
    """Parameters after each step of DPOptimizer on whole logical batches (checked against torch.func) and the sizes
    of the batches (iterating the loader draws its worker seed from the sampler's generator first, as the splitters'
    loaders do)."""
    model, opt, loader = _private(seed)
    after, sizes = [], []
    for x, y in loader:
        sizes.append(len(y))
        before = flat_params(model)
        if len(y):
            ref, _ = clipped_sum_reference(model, lambda out, t: _loss(out, t), x, y, max_grad_norm=R)
            expected = before - torch.cat([ref[n].flatten() for n, _ in model.named_parameters()]) / BATCH
        else:
            expected = before
        _loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(flat_params(model), expected, rtol=1e-10, atol=1e-12)
        after.append(flat_params(model))
    return after, sizes


def test_chunks_cover_the_batch_in_order_and_respect_the_limit():
    for n in range(0, 23):
        for m in (1, 3, 5, 30):
            parts = chunk_indices(list(range(n)), m)
            assert [i for p in parts for i in p] == list(range(n))
            assert all(len(p) <= m for p in parts) and len(parts) == max(1, -(-n // m))


def test_fastdp_virtual_batches_make_the_whole_batch_step():
    expected, logical = _whole_batch_run()
    assert any(n > 3 for n in logical)  # some logical batches are cut in several pieces
    model, opt, loader = _private()
    sizes = []
    for k, physical in enumerate(VirtualBatches(loader, max_physical_batch_size=3)):
        seen = []
        for x, y in physical:
            assert len(y) <= 3
            seen.append(len(y))
            _loss(model(x), y).backward()
        sizes.append(sum(seen))
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(flat_params(model), expected[k], rtol=1e-10, atol=1e-12)
    assert sizes == logical
    assert opt.steps_taken == len(logical)


def test_opacus_batch_memory_manager_makes_the_whole_batch_step():
    expected, logical = _whole_batch_run()
    model, opt, loader = _private()
    steps, sizes, pending = 0, [], 0
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=opt) as physical_loader:
        for x, y in physical_loader:
            assert len(y) <= 3
            pending += len(y)
            _loss(model(x), y).backward()
            before = opt.steps_taken
            opt.step()
            opt.zero_grad()
            if opt.steps_taken > before:
                torch.testing.assert_close(flat_params(model), expected[steps], rtol=1e-10, atol=1e-12)
                steps += 1
                sizes.append(pending)
                pending = 0
    assert sizes == logical
    assert steps == opt.steps_taken == len(expected)


def test_batch_memory_manager_accounts_one_step_per_poisson_batch():
    model, opt, loader = _private(sigma=1.0, accountant="rdp")
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt) as physical_loader:
        for x, y in physical_loader:
            _loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    steps = len(loader)
    assert opt.steps_taken == steps
    assert opt.epsilon(1e-5) == pytest.approx(fastdp.get_epsilon(noise_multiplier=1.0, sample_rate=BATCH / N,
                                                                  steps=steps, delta=1e-5, accountant="rdp"),
                                                rel=1e-9)


def test_an_empty_poisson_batch_is_one_empty_physical_batch():
    data = TensorDataset(torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 3, (30,)))
    model = small_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = fastdp.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(data, batch_size=1), noise_multiplier=0.0, max_grad_norm=R,
            sample_generator=torch.Generator().manual_seed(0))
    steps, empties = 0, 0
    for physical in VirtualBatches(loader, max_physical_batch_size=2):
        sizes = []
        for x, y in physical:
            sizes.append(len(y))
            _loss(model(x), y).backward() if len(y) else model(x).sum().backward()
        empties += sizes == [0]
        before = flat_params(model)
        opt.step()
        opt.zero_grad()
        if sizes == [0]:  # noiseless: the step of an empty batch moves nothing
            torch.testing.assert_close(flat_params(model), before, rtol=0, atol=0)
        steps += 1
    assert empties > 0  # expected batch 1 of 30: about a third of the batches are empty
    assert steps == opt.steps_taken == len(loader)


def test_unused_physical_batches_are_refused():
    _, _, loader = _private()
    with pytest.raises(RuntimeError, match="were not all used"):
        for physical in VirtualBatches(loader, max_physical_batch_size=1):
            next(physical)


def test_a_loader_without_poisson_sampling_is_refused():
    with pytest.raises(TypeError, match="Poisson"):
        VirtualBatches(DataLoader(_data(), batch_size=8, shuffle=True), max_physical_batch_size=4)
    _, _, loader = _private()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_physical_batch_size"):
            VirtualBatches(loader, max_physical_batch_size=bad)


def test_split_batch_cuts_every_tensor_along_the_sample_dim():
    batch = {"x": torch.arange(14).view(7, 2), "y": torch.arange(7), "tag": "keep"}
    parts = split_batch(batch, 3)
    assert [len(p["y"]) for p in parts] == [2, 3, 2]
    assert torch.equal(torch.cat([p["x"] for p in parts]), batch["x"]) and all(p["tag"] == "keep" for p in parts)
    assert [len(p[1]) for p in split_batch((torch.zeros(0, 3), torch.zeros(0)), 4)] == [0]
    with pytest.raises(ValueError, match="common leading"):
        split_batch((torch.zeros(3, 2), torch.zeros(4)), 2)
