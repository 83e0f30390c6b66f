"""What the DPTrainer tests share (the single-process ones and the rank worker): a tiny float64 GPT-2, a text set of
unequal lengths, and its padding collator."""
from __future__ import annotations

import torch

VOCAB = 50


def gpt2(seed=0, dtype=torch.float64, n_embd=16):
    """A 2-layer GPT-2 LM without dropout (transformers imported here: the callers skip without it)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=n_embd, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(dtype)


def texts(n, seed=1):
    """n samples of 3..9 tokens; labels = input ids (the causal LM target)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def pad_collate(features):
    """Right padding: input id 0, attention mask 0, label -100."""
    T = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), T, dtype=torch.long)
    labels = torch.full((len(features), T), -100, dtype=torch.long)
    mask = torch.zeros(len(features), T, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = f["input_ids"], f["labels"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
