"""Hugging Face Trainer with fastsam: a small BERT (built from a config, no download) learns a toy
sequence classification task with SAM (or ESAM) inside ``Trainer.training_step``.

    pip install 'fastsam[transformers]'
    python examples/sam_transformers.py --max-steps 60
    python examples/sam_transformers.py --optimizer esam --accumulate 2

Everything the Trainer offers keeps working: ``TrainingArguments``' optimizer (AdamW here) becomes
SAM's base over the Trainer's weight-decay groups, its LR schedule acts on fastsam's param groups,
``gradient_accumulation_steps`` accumulates both passes, ``max_grad_norm`` clips the second-pass
gradient, and ``bf16=True``/``fp16=True`` (on a GPU) use the Trainer's autocast and GradScaler.
"""

import argparse
import tempfile

import torch
import transformers

import fastsam
from fastsam.integrations.transformers import SAMTrainer

VOCAB, LENGTH, CLASSES = 64, 12, 3


def make_data(n, seed):
    """The label is the most frequent of three marker tokens in the sequence (a bag-of-tokens task)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(CLASSES + 1, VOCAB, (n, LENGTH), generator=gen)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    for i in range(n):
        where = torch.randperm(LENGTH, generator=gen)[:4]
        ids[i, where] = labels[i] + 1  # four copies of the marker token
    return [{"input_ids": ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": labels[i]}
            for i in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--optimizer", choices=["sam", "asam", "esam"], default="sam")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--accumulate", type=int, default=1, help="gradient_accumulation_steps")
    ap.add_argument("--rho", type=float, default=0.05)
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=LENGTH, num_labels=CLASSES)
    model = transformers.BertForSequenceClassification(config)
    sam_class, sam_kwargs = {"sam": (fastsam.SAM, dict(rho=args.rho)),
                             "asam": (fastsam.ASAM, dict(rho=10 * args.rho)),
                             "esam": (fastsam.ESAM, dict(rho=args.rho, beta=0.6, gamma=0.5))}[args.optimizer]
    with tempfile.TemporaryDirectory() as out:
        training_args = transformers.TrainingArguments(
            output_dir=out, max_steps=args.max_steps, per_device_train_batch_size=32 // args.accumulate,
            gradient_accumulation_steps=args.accumulate, learning_rate=3e-3, warmup_steps=5,
            lr_scheduler_type="linear", weight_decay=0.01, max_grad_norm=1.0, report_to=[], save_strategy="no",
            logging_steps=max(1, args.max_steps // 4), use_cpu=not torch.cuda.is_available(), disable_tqdm=True)
        trainer = SAMTrainer(model=model, args=training_args, train_dataset=make_data(1024, seed=1),
                             sam_class=sam_class, sam_kwargs=sam_kwargs)
        trainer.train()
        test = make_data(256, seed=2)
        predictions = trainer.predict(test)
    accuracy = (predictions.predictions.argmax(-1) == predictions.label_ids).mean()
    print(f"{type(trainer.sam_optimizer).__name__}: test accuracy {accuracy:.3f} after {args.max_steps} steps")


if __name__ == "__main__":
    main()
