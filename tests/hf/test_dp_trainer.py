"""DPTrainer: the update, the sampling, the accounting and the checkpoints of a transformers.Trainer under DP-SGD.

Oracles: ``fastdp.DPOptimizer`` on the same samples, each sample's loss being what the HF model returns for a batch
of that sample alone (an independent path: HF's own loss, one sample per backward); ``fastdp.get_epsilon``; the
binomial law of Poisson batch sizes; an uninterrupted run for resume.
"""
import copy
import math
import os
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import TrainingArguments  # noqa: E402

import fastdp  # noqa: E402
from fastdp.hf import DPTrainer  # noqa: E402
from fastdp.hf.sampling import EpochPoissonSampler, LogicalBatch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # (importlib import mode: the shared data module beside this file)
from hf_data import gpt2, pad_collate, texts  # noqa: E402

R, N = 0.05, 240  # expected logical batch 2 x 3 = 6 of 240: rate 0.025 (cheap to account)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, gradient_accumulation_steps=3,
                max_steps=1, learning_rate=1.0, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                use_cpu=True, disable_tqdm=True, logging_steps=1000, optim="sgd")
    base.update(kw)
    return TrainingArguments(**base)


def trainer(model, tmp_path, data, dp=None, optimizers=(None, None), **kw):
    dp = {**dict(noise_multiplier=0.0, target_delta=1e-5, max_grad_norm=R, sampling_seed=5, noise_seed=6,
                 accountant="rdp"), **(dp or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPTrainer(model=model, args=args(tmp_path, **kw), train_dataset=data, data_collator=pad_collate,
                         optimizers=optimizers, **dp)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])


def one_sample_loss(model, f):
    """A sample's causal LM loss on a batch of that sample alone, unpadded: mean over its tokens of the cross-entropy
    of predicting token t+1 from tokens <= t (in the model's dtype; HF's own loss is checked in
    test_dp_trainer_losses.py, it computes in fp32)."""
    logits = model(input_ids=f["input_ids"][None]).logits[0]
    return torch.nn.functional.cross_entropy(logits[:-1], f["labels"][1:])


def oracle_step(model, samples, expected_batch_size):
    """Noiseless DPOptimizer (SGD, lr 1) on ``samples``, one sample per backward."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = fastdp.DPOptimizer(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
                                 noise_multiplier=0.0, max_grad_norm=R, expected_batch_size=expected_batch_size,
                                 sample_size=1000, loss_reduction="sum")
    for f in samples:
        one_sample_loss(model, f).backward()
    opt.step()
    opt.detach()
    return flat(model)


def first_logical_batch(t, data):
    """The indices of the trainer's first logical batch, redrawn from its sampler's seed."""
    sampler = EpochPoissonSampler(len(data), t.sample_rate, t.steps_per_epoch, t.sampling_seed)
    return next(iter(sampler))


def lora(model):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                          lora_dropout=0.0, task_type="CAUSAL_LM", init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


@pytest.mark.parametrize("kind", ["plain", "lora"])
def test_noiseless_update_equals_dp_optimizer_on_the_same_samples(tmp_path, kind):
    data = texts(N)
    make = (lambda: gpt2()) if kind == "plain" else (lambda: lora(gpt2()))
    model, reference = make(), make()
    reference.load_state_dict(model.state_dict())
    if kind == "plain":
        t = trainer(model, tmp_path, data)  # Trainer's optimizer (args.optim="sgd"), wrapped
    else:  # a plain optimizer passed in, as with Trainer(optimizers=(optimizer, None))
        sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        t = trainer(model, tmp_path, data, optimizers=(sgd, None))
    assert t.expected_batch_size == 6 and t.sample_rate == 6 / N
    idx = first_logical_batch(t, data)
    assert len(idx) > 2  # more than one physical batch of 2
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = flat(model)
    t.train()
    expected = oracle_step(reference, [data[i] for i in idx], expected_batch_size=6)
    assert not torch.equal(expected, start)  # the step moved the model
    torch.testing.assert_close(flat(model), expected, rtol=1e-9, atol=1e-12)
    assert t.dp_optimizer.steps_taken == 1
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_gradient_checkpointing_is_exact_or_refused_clearly(tmp_path):
    """Activation checkpointing reaches fastdp's engine through DPTrainer: either the update is the exact one, or the
    engine's refusal reaches the user naming checkpointing."""
    data = texts(N)
    model, reference = gpt2(), gpt2()
    t = trainer(model, tmp_path, data, gradient_checkpointing=True)
    idx = first_logical_batch(t, data)
    try:
        t.train()
    except Exception as err:  # noqa: BLE001 -- the refusal is what is checked
        assert "checkpoint" in str(err).lower(), f"unclear refusal: {type(err).__name__}: {err}"
        return
    expected = oracle_step(reference, [data[i] for i in idx], expected_batch_size=6)
    torch.testing.assert_close(flat(model), expected, rtol=1e-9, atol=1e-12)


def test_logical_batch_sizes_vary_as_poisson_samples(tmp_path):
    n, draws = 200, 400
    data = texts(n)
    t = trainer(gpt2(), tmp_path, data, per_device_train_batch_size=5, gradient_accumulation_steps=4)
    q = t.sample_rate
    assert q == 20 / 200 and t.steps_per_epoch == 10
    loader = t.get_train_dataloader()
    sizes, members = [], torch.zeros(n)
    for epoch in range(draws // t.steps_per_epoch):
        loader.set_epoch(epoch)
        for batch in loader:
            assert isinstance(batch, LogicalBatch)
            lens = [len(b["input_ids"]) for b in batch.physical]
            assert all(m <= 5 for m in lens)
            if batch.num_samples:
                assert sum(lens) == batch.num_samples
            sizes.append(batch.num_samples)
    sampler = EpochPoissonSampler(n, q, t.steps_per_epoch, t.sampling_seed)
    for epoch in range(draws // t.steps_per_epoch):
        sampler.set_epoch(epoch)
        for idx in sampler:
            members[idx] += 1
    sizes = torch.tensor(sizes, dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean() - mean) < 4 * math.sqrt(var / draws)
    # sample variance of a binomial: its ratio to var has std about sqrt(2 / draws)
    assert abs(sizes.var() / var - 1) < 4 * math.sqrt(2 / draws)
    assert sizes.min() < mean - 4 and sizes.max() > mean + 4  # not fixed-size batches
    # each sample joins each batch independently: its count over the draws is Binomial(draws, q) (a shuffled epoch
    # of fixed-size batches would give every sample the same count)
    count_var = draws * q * (1 - q)
    assert abs(members.mean() - draws * q) < 4 * math.sqrt(count_var / n)
    assert abs(members.var() / count_var - 1) < 4 * math.sqrt(2 / n)


def test_epsilon_and_schedule_after_n_logical_steps(tmp_path):
    """epsilon after N logical steps is get_epsilon for N steps at the logical rate, logged with the loss."""
    data = texts(N)
    t = trainer(gpt2(), tmp_path, data, dp={"noise_multiplier": 1.3}, max_steps=3, logging_steps=1,
                learning_rate=0.3, lr_scheduler_type="linear")
    t.train()
    expected = fastdp.get_epsilon(noise_multiplier=1.3, sample_rate=6 / N, steps=3, delta=1e-5, accountant="rdp")
    assert t.dp_optimizer.steps_taken == 3
    assert t.epsilon() == pytest.approx(expected, rel=1e-12)
    # Trainer's schedule steps once per logical batch (the rate logged is the one each step used)
    assert [h["learning_rate"] for h in t.state.log_history if "loss" in h] == pytest.approx([0.3, 0.2, 0.1])
    logged = [h["epsilon"] for h in t.state.log_history if "loss" in h]
    assert logged == [pytest.approx(fastdp.get_epsilon(noise_multiplier=1.3, sample_rate=6 / N, steps=k, delta=1e-5,
                                                        accountant="rdp"), rel=1e-12) for k in (1, 2, 3)]
    eval_loss = t.evaluate(eval_dataset=data[:4])["eval_loss"]  # evaluation on training data spends nothing
    assert math.isfinite(eval_loss) and t.dp_optimizer.steps_taken == 3


def test_target_epsilon_is_spent_over_the_whole_run(tmp_path):
    t = trainer(gpt2(), tmp_path, texts(N), dp={"noise_multiplier": None, "target_epsilon": 4.0},
                num_train_epochs=1.5, max_steps=-1)
    assert t.steps_per_epoch == 40 and t.total_steps == 60
    assert t.noise_multiplier == pytest.approx(fastdp.get_noise_multiplier(
        target_epsilon=4.0, target_delta=1e-5, sample_rate=6 / N, steps=60, accountant="rdp"))
    assert fastdp.get_epsilon(noise_multiplier=t.noise_multiplier, sample_rate=6 / N, steps=60, delta=1e-5,
                              accountant="rdp") == pytest.approx(4.0, rel=0.02)


def test_an_empty_poisson_batch_steps_with_noise_alone(tmp_path):
    model = gpt2()
    t = trainer(model, tmp_path, texts(N))
    t.create_optimizer()
    empty = t.get_train_dataloader().collate_fn([])
    assert empty.num_samples == 0
    before = flat(model)
    assert t.training_step(model, empty).item() == 0.0
    t.dp_optimizer.step()
    assert torch.equal(flat(model), before) and t.dp_optimizer.steps_taken == 1  # noiseless: nothing moves


def test_resume_continues_with_the_same_epsilon_and_updates(tmp_path):
    data = texts(N)
    dp = {"noise_multiplier": 1.0}
    init = gpt2()
    first = copy.deepcopy(init)
    t = trainer(first, tmp_path, data, dp=dp, max_steps=3, save_strategy="steps", save_steps=2,
                learning_rate=0.1, optim="adamw_torch", lr_scheduler_type="linear")
    t.train()
    checkpoint = os.path.join(str(tmp_path / "out"), "checkpoint-2")
    assert os.path.isfile(os.path.join(checkpoint, "fastdp_dp_state.pt"))
    assert os.stat(os.path.join(checkpoint, "fastdp_dp_state.pt")).st_mode & 0o077 == 0  # owner only
    second = copy.deepcopy(init)
    # a fresh trainer with other (fresh-entropy) seeds: the checkpoint's sampling seed and noise state take over
    r = trainer(second, tmp_path, data, dp={**dp, "sampling_seed": None, "noise_seed": None}, max_steps=3,
                save_strategy="steps", save_steps=2, learning_rate=0.1, optim="adamw_torch", lr_scheduler_type="linear")
    r.train(resume_from_checkpoint=checkpoint)
    assert r.dp_optimizer.steps_taken == 3 and r.epsilon() == t.epsilon()
    torch.testing.assert_close(flat(second), flat(first), rtol=1e-12, atol=1e-14)

    other = trainer(copy.deepcopy(init), tmp_path, data, dp={"noise_multiplier": 2.0}, max_steps=3)
    with pytest.raises(ValueError, match="noise_multiplier"):
        other.train(resume_from_checkpoint=checkpoint)
    os.remove(os.path.join(checkpoint, "fastdp_dp_state.pt"))
    with pytest.raises(ValueError, match="restart the privacy accounting"):
        trainer(copy.deepcopy(init), tmp_path, data, dp=dp, max_steps=3).train(resume_from_checkpoint=checkpoint)


@pytest.mark.parametrize("setting, message", [
    ({"train_sampling_strategy": "group_by_length"}, "Poisson"),
    ({"train_sampling_strategy": "sequential"}, "Poisson"),
    ({"dataloader_drop_last": True}, "drops samples"),
    ({"auto_find_batch_size": True}, "sampling rate"),
    ({"ignore_data_skip": True}, "replay"),
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
    ({"max_grad_norm": 5.0}, "per-sample clipping bound"),
    ({"fp16": True}, "GradScaler"),
    ({"torch_compile": True}, "torch.compile"),
])
def test_trainer_settings_that_break_the_guarantee_are_refused(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        trainer(gpt2(), tmp_path, texts(N), **setting)


def test_other_refusals(tmp_path):
    data = texts(N)
    with pytest.raises(ValueError, match="per_sample_loss"):
        DPTrainer(model=gpt2(), args=args(tmp_path), train_dataset=data, data_collator=pad_collate,
                  noise_multiplier=1.0, target_delta=1e-5, compute_loss_func=lambda *a, **k: 0)
    model = gpt2()
    dp_opt = fastdp.DPOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0,
                                expected_batch_size=6, sample_size=24)
    with pytest.raises(ValueError, match="plain optimizer"):
        DPTrainer(model=model, args=args(tmp_path), train_dataset=data, data_collator=pad_collate,
                  noise_multiplier=1.0, target_delta=1e-5, optimizers=(dp_opt, None))
    dp_opt.detach()

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(data)

    with pytest.raises(ValueError, match="IterableDataset"):
        DPTrainer(model=gpt2(), args=args(tmp_path), train_dataset=Stream(), data_collator=pad_collate,
                  noise_multiplier=1.0, target_delta=1e-5)
    with pytest.raises(ValueError, match="target_delta"):
        DPTrainer(model=gpt2(), args=args(tmp_path), train_dataset=data, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        DPTrainer(model=gpt2(), args=args(tmp_path), train_dataset=data, target_delta=1e-5)
    with pytest.raises(ValueError, match="exceeds the training set"):
        DPTrainer(model=gpt2(), args=args(tmp_path), train_dataset=data[:5], noise_multiplier=1.0, target_delta=1e-5)
    body = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(NotImplementedError, match="per_sample_loss"):
        DPTrainer(model=body, args=args(tmp_path), train_dataset=data, noise_multiplier=1.0, target_delta=1e-5)


def test_a_per_sample_loss_of_the_wrong_shape_is_refused(tmp_path):
    def mean_loss(model, inputs):
        return model(**inputs).loss  # batch-reduced: one scalar, not one loss per sample

    t = trainer(gpt2(), tmp_path, texts(N), dp={"per_sample_loss": mean_loss})
    with pytest.raises(ValueError, match="one loss per sample"):
        t.train()
