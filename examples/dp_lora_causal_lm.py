"""DP LoRA fine-tuning of a causal language model with ``fastdp.hf.DPTrainer`` (transformers + peft).

Any Hugging Face causal LM works: ``--model PATH`` loads weights and tokenizer from a folder on disk (e.g. a
downloaded GPT-2, Llama or Qwen). Without it the script runs offline: a small randomly initialised GPT-2 and a small
text set that the script writes itself, with a character-level tokenizer.

    python examples/dp_lora_causal_lm.py                                   # offline smoke run
    python examples/dp_lora_causal_lm.py --model ./gpt2 --epochs 3 --target-epsilon 8 --batch-size 8 --grad-accum 8

Each logical batch is a Poisson sample of expected size batch-size x grad-accum, run as physical batches of at most
--batch-size samples; only the LoRA adapters train (the base weights are frozen and cost nothing to privatise).
"""
from __future__ import annotations

import argparse
import math
import random

import torch

WORDS = ("the cat dog bird sat ran flew over under near a small big red green quiet loud house tree river "
         "garden morning evening saw found liked").split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="folder of a Hugging Face causal LM (weights + tokenizer); default: a tiny "
                                   "random GPT-2, offline")
    p.add_argument("--samples", type=int, default=512, help="size of the built-in text set")
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8, help="physical batch size (per_device_train_batch_size)")
    p.add_argument("--grad-accum", type=int, default=4, help="logical batch = batch-size x grad-accum (expected)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=-1, help="logical steps (overrides --epochs when > 0)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--target-epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--noise-multiplier", type=float, help="sigma; replaces the calibration to --target-epsilon")
    p.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--output-dir", default="dp_lora_causal_lm_out")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation and the text set only")
    return p.parse_args(argv)


def build_texts(n: int, seed: int):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))) + "." for _ in range(n)]


class CharTokenizer:
    """Characters of the built-in text set -> ids (0 is padding); enough for the offline run."""

    def __init__(self, texts):
        self.vocab = {c: i + 1 for i, c in enumerate(sorted(set("".join(texts))))}

    def __call__(self, text, max_length):
        return [self.vocab[c] for c in text[:max_length]]


def tokenized(texts, tokenizer, max_length):
    """[{"input_ids", "labels"}] (labels = input ids: the collator pads them with -100)."""
    if isinstance(tokenizer, CharTokenizer):
        ids = [tokenizer(t, max_length) for t in texts]
    else:
        ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    return [{"input_ids": torch.tensor(i), "labels": torch.tensor(i)} for i in ids if len(i) > 1]


def pad_collate(features, pad_id=0):
    T = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": torch.full((len(features), T), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros(len(features), T, dtype=torch.long),
             "labels": torch.full((len(features), T), -100, dtype=torch.long)}
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        batch["input_ids"][i, :n], batch["labels"][i, :n], batch["attention_mask"][i, :n] = \
            f["input_ids"], f["labels"], 1
    return batch


def main(argv=None):
    args = parse_args(argv)
    import peft
    import transformers

    from fastdp.hf import DPTrainer

    torch.manual_seed(args.seed)
    texts = build_texts(args.samples + max(16, args.samples // 10), args.seed)
    train_texts, eval_texts = texts[:args.samples], texts[args.samples:]
    if args.model:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    else:
        tokenizer = CharTokenizer(texts)
        cfg = transformers.GPT2Config(vocab_size=len(tokenizer.vocab) + 1, n_positions=args.max_length, n_embd=32,
                                      n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
        pad_id = 0
    lora = peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    model.print_trainable_parameters()

    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=10, save_strategy="no", report_to=[],
        per_device_eval_batch_size=args.batch_size, use_cpu=not torch.cuda.is_available())
    trainer = DPTrainer(model=model, args=training_args, train_dataset=tokenized(train_texts, tokenizer, args.max_length),
                        eval_dataset=tokenized(eval_texts, tokenizer, args.max_length),
                        data_collator=lambda f: pad_collate(f, pad_id),
                        target_epsilon=None if args.noise_multiplier is not None else args.target_epsilon,
                        noise_multiplier=args.noise_multiplier, target_delta=args.delta,
                        max_grad_norm=args.max_grad_norm, accountant=args.accountant)
    print(f"logical batches of {trainer.expected_batch_size} expected (rate {trainer.sample_rate:.4g}), "
          f"{trainer.total_steps} steps, noise multiplier {trainer.noise_multiplier:.3f}")
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]
    print(f"eval loss {eval_loss:.4f} (perplexity {math.exp(eval_loss):.2f}), "
          f"epsilon {trainer.epsilon():.3f} at delta {args.delta:g}")


if __name__ == "__main__":
    main()
