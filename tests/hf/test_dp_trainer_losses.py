"""DPTrainer's per-sample losses: sample i's loss in a padded batch is what the HF model returns for a batch holding
sample i alone (HF's own loss is the oracle), for every head DPTrainer knows."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, GPT2Config, GPT2LMHeadModel  # noqa: E402

from fastdp.hf.losses import head_of, per_sample_losses  # noqa: E402


def bert_config(**kw):
    return BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def padded(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask


def test_causal_lm_loss_is_each_samples_own():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                       bos_token_id=0, eos_token_id=0)).eval()
    assert head_of(model) == "causal_lm"
    lengths = [3, 7, 5, 1]
    ids, mask = padded(lengths, 40)
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 2] = -100  # a token left out of the loss inside a sequence
    losses = per_sample_losses("causal_lm", model(input_ids=ids, attention_mask=mask).logits, labels, model.config)
    assert losses.shape == (4,)
    for i, n in enumerate(lengths):
        if n == 1:  # nothing to predict: HF gives nan (0 / 0), DPTrainer 0 (no gradient)
            assert losses[i] == 0
            continue
        own = model(input_ids=ids[i:i + 1, :n], labels=labels[i:i + 1, :n]).loss
        torch.testing.assert_close(losses[i], own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("problem, num_labels", [(None, 3), ("regression", 1), ("multi_label_classification", 3)])
def test_sequence_classification_loss_is_each_samples_own(problem, num_labels):
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(bert_config(num_labels=num_labels, problem_type=problem)).eval()
    assert head_of(model) == "sequence_classification"
    ids, mask = padded([4, 6, 2], 40)
    if problem is None:
        labels = torch.tensor([0, 2, 1])
    elif problem == "regression":
        labels = torch.tensor([0.5, -1.0, 2.0])
    else:
        labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    losses = per_sample_losses("sequence_classification", model(input_ids=ids, attention_mask=mask).logits, labels,
                               model.config)
    for i in range(3):
        own = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], labels=labels[i:i + 1]).loss
        torch.testing.assert_close(losses[i], own, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls, head", [("BertForTokenClassification", "token_classification"),
                                       ("BertForMaskedLM", "masked_lm")])
def test_token_losses_are_each_samples_own(cls, head):
    torch.manual_seed(0)
    model = getattr(transformers, cls)(bert_config(num_labels=3)).eval()
    assert head_of(model) == head
    ids, mask = padded([4, 6], 40)
    labels = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    losses = per_sample_losses(head, model(input_ids=ids, attention_mask=mask).logits, labels, model.config)
    for i in range(2):
        own = model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], labels=labels[i:i + 1]).loss
        torch.testing.assert_close(losses[i], own, rtol=1e-5, atol=1e-6)


def test_heads_of_peft_models_and_unknown_models():
    peft = pytest.importorskip("peft")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                         task_type="CAUSAL_LM"))
    assert head_of(wrapped) == "causal_lm"
    assert head_of(transformers.BertModel(bert_config())) is None
    assert head_of(torch.nn.Linear(2, 2)) is None
