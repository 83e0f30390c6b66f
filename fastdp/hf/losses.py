"""Each sample's own loss for the Hugging Face heads ``DPTrainer`` knows, as a ``[B]`` tensor.

DP-SGD clips each sample's gradient, so each sample's loss must depend on that sample alone. HF models' built-in
losses do not: a causal LM averages over every token of the batch (or divides by ``num_items_in_batch``), so one
sample's weight depends on the others' lengths, and removing a sample would change every other sample's clipped
contribution. Here sample i's loss is what the HF model returns for a batch holding sample i alone: the mean over its
own counted tokens (labels != -100); a sample without any counted token has loss 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

HEADS = ("causal_lm", "masked_lm", "token_classification", "sequence_classification")


def head_of(model) -> Optional[str]:
    """The head of a transformers model (a peft model's base model), or None when DPTrainer does not know it."""
    from transformers.models.auto import modeling_auto as auto

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    tables = (("causal_lm", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
              ("masked_lm", auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
              ("token_classification", auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
              ("sequence_classification", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES))
    for head, table in tables:
        if name in _class_names(table):
            return head
    return None


def _class_names(table) -> set:
    names = set()
    for v in table.values():
        names.update(v if isinstance(v, (tuple, list)) else (v,))
    return names


def token_losses(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """[B] mean cross-entropy over each sample's counted tokens. ``logits [B, T, V]``, ``labels [B, T]`` (-100: not
    counted). ``shift``: position t predicts label t+1 (causal LM), as HF's ``ForCausalLMLoss`` does."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    labels = labels.to(logits.device)
    if shift:
        labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    per_token = F.cross_entropy(_at_least_fp32(logits).transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                reduction="none")
    counted = (labels != IGNORE_INDEX).sum(dim=1)
    return per_token.sum(dim=1) / counted.clamp(min=1)


def sequence_classification_losses(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """[B] loss of each sample, with HF's rule for ``config.problem_type`` (when unset: regression for one label,
    single-label classification for integer labels, multi-label otherwise): squared error, cross-entropy, or the mean
    binary cross-entropy over the labels."""
    num_labels = getattr(config, "num_labels", logits.shape[-1])
    problem = getattr(config, "problem_type", None)
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    labels = labels.to(logits.device)
    if problem == "regression":
        out = _at_least_fp32(logits).reshape(logits.shape[0], -1)
        return (out - labels.to(out.dtype).reshape(out.shape)).pow(2).mean(dim=1)
    if problem == "single_label_classification":
        return F.cross_entropy(_at_least_fp32(logits).view(-1, num_labels), labels.view(-1), reduction="none")
    if problem == "multi_label_classification":
        out = _at_least_fp32(logits)
        return F.binary_cross_entropy_with_logits(out, labels.to(out.dtype), reduction="none").mean(dim=1)
    raise ValueError(f"unknown config.problem_type {problem!r}")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses are computed in fp32 at least (HF upcasts 16-bit logits the same way); fp64 stays fp64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def per_sample_losses(head: str, logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """[B] losses for ``head`` (one of ``HEADS``)."""
    if head == "causal_lm":
        return token_losses(logits, labels, shift=True)
    if head in ("masked_lm", "token_classification"):
        return token_losses(logits, labels, shift=False)
    if head == "sequence_classification":
        return sequence_classification_losses(logits, labels, config)
    raise ValueError(f"unknown head {head!r}; one of {HEADS}")
