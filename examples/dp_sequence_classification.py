"""DP fine-tuning of a BERT-style sequence classifier with ``fastdp.hf.DPTrainer``.

``--model PATH`` loads a Hugging Face checkpoint (BERT, RoBERTa, DistilBERT...) and its tokenizer from disk; without
it the script runs offline on a tiny randomly initialised BERT and a built-in sentiment-like task (a sentence is
positive when it holds more positive than negative words), with a word-level tokenizer. ``--lora`` trains LoRA
adapters and the classification head instead of every weight.

    python examples/dp_sequence_classification.py                         # offline smoke run
    python examples/dp_sequence_classification.py --model ./bert-base-uncased --target-epsilon 3 --epochs 3
"""
from __future__ import annotations

import argparse
import random

import numpy as np
import torch

POSITIVE = "good great fine lovely happy bright".split()
NEGATIVE = "bad awful poor sad dull grim".split()
NEUTRAL = "the a film day book song was is very quite and but it".split()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="folder of a Hugging Face encoder checkpoint (weights + tokenizer)")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--max-length", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=16, help="physical batch size (per_device_train_batch_size)")
    p.add_argument("--grad-accum", type=int, default=4, help="logical batch = batch-size x grad-accum (expected)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--target-epsilon", type=float, default=3.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--noise-multiplier", type=float, help="sigma; replaces the calibration to --target-epsilon")
    p.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lora", action="store_true", help="train LoRA adapters and the head only")
    p.add_argument("--output-dir", default="dp_sequence_classification_out")
    p.add_argument("--seed", type=int, default=0, help="seeds the model's initialisation and the data set only")
    return p.parse_args(argv)


def build_sentences(n: int, seed: int):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        words = [rng.choice(NEUTRAL + POSITIVE + NEGATIVE) for _ in range(rng.randint(4, 12))]
        score = sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)
        if score:
            out.append((" ".join(words), int(score > 0)))
    return out


class WordTokenizer:
    """Word -> id (0 padding, 1 [CLS]) over the built-in vocabulary."""

    def __init__(self):
        self.vocab = {w: i + 2 for i, w in enumerate(sorted(set(POSITIVE + NEGATIVE + NEUTRAL)))}

    def __call__(self, text, truncation=True, max_length=None):
        ids = [1] + [self.vocab[w] for w in text.split()]
        return {"input_ids": ids[:max_length]}


def encode(pairs, tokenizer, max_length):
    return [{"input_ids": torch.tensor(tokenizer(t, truncation=True, max_length=max_length)["input_ids"]),
             "labels": torch.tensor(y)} for t, y in pairs]


def pad_collate(features, pad_id=0):
    T = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(features), T, dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, :len(f["input_ids"])], mask[i, :len(f["input_ids"])] = f["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([f["labels"] for f in features])}


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main(argv=None):
    args = parse_args(argv)
    import transformers

    from fastdp.hf import DPTrainer

    torch.manual_seed(args.seed)
    pairs = build_sentences(args.samples + max(64, args.samples // 5), args.seed)
    if args.model:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
        pad_id = tokenizer.pad_token_id or 0
    else:
        tokenizer = WordTokenizer()
        cfg = transformers.BertConfig(vocab_size=len(tokenizer.vocab) + 2, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64,
                                      max_position_embeddings=args.max_length, num_labels=2)
        model = transformers.BertForSequenceClassification(cfg)
        pad_id = 0
    if args.lora:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="SEQ_CLS",
                                                           target_modules=["query", "value"]))
    train = encode(pairs[:args.samples], tokenizer, args.max_length)
    held_out = encode(pairs[args.samples:], tokenizer, args.max_length)
    training_args = transformers.TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, num_train_epochs=args.epochs, max_steps=args.max_steps,
        learning_rate=args.lr, logging_steps=10, save_strategy="no", report_to=[],
        per_device_eval_batch_size=64, use_cpu=not torch.cuda.is_available())
    trainer = DPTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=held_out,
                        data_collator=lambda f: pad_collate(f, pad_id), compute_metrics=accuracy,
                        target_epsilon=None if args.noise_multiplier is not None else args.target_epsilon,
                        noise_multiplier=args.noise_multiplier, target_delta=args.delta,
                        max_grad_norm=args.max_grad_norm, accountant=args.accountant)
    print(f"logical batches of {trainer.expected_batch_size} expected (rate {trainer.sample_rate:.4g}), "
          f"{trainer.total_steps} steps, noise multiplier {trainer.noise_multiplier:.3f}")
    trainer.train()
    metrics = trainer.evaluate()
    print(f"held-out accuracy {metrics['eval_accuracy']:.4f}, epsilon {trainer.epsilon():.3f} at delta {args.delta:g}")


if __name__ == "__main__":
    main()
