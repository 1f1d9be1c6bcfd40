"""Fine-tune a 4-bit model with TRL's SFTTrainer: the QLoRA script, switched to Quantized Side Tuning in one line.

This is an ordinary QLoRA script — SmolLM2-135M-Instruct loaded in 4-bit NF4 with bf16 compute, TRL's `SFTTrainer`,
`SFTConfig` with its defaults (gradient checkpointing on, bf16, fused LM-head loss, completion-only loss on a
prompt/completion data set) — in which ``peft_config=LoraConfig(...)`` became ``peft_config=QSTConfig(...)``. Nothing
else changed: `SFTTrainer` calls `get_peft_model` with whatever PEFT config it is given. ``--lora`` runs the original
QLoRA form, so both sides of the diff can be compared.

The task is generated in code (seeded, no downloads): route a short customer message to a team and answer with a fixed
format, ``Team: billing``. Before training the instruct model answers in free text; after it answers in the format.
The held-out messages use phrasings never seen in training.

Run it from the repository root (after ``bash scripts/main.sh`` has set up ``.venv``):

    .venv/bin/python examples/sft_trl.py                 # QST, 60 steps: a few minutes on 2 CPU cores
    .venv/bin/python examples/sft_trl.py --lora          # the same script with LoraConfig (QLoRA), slower
    .venv/bin/python examples/sft_trl.py --max-steps 20  # shorter

Like the QLoRA script it came from, it computes in bfloat16 (``bnb_4bit_compute_dtype`` and SFTConfig's default bf16).
A CPU without AVX512-BF16 emulates bfloat16: a step of this script took 9.5 s on such a 2-core CPU (AVX2 only), about
10 minutes for the 60 steps, against 2.75 s with the model in float32 and ``SFTConfig(bf16=False)``, the settings
docs/trl.md gives for such CPUs ("On a CPU without AVX512-BF16"; ``integration/bench_trl_dtype.py``).

It prints TRL's own progress bar and logs, then a summary: the training loss and TRL's ``mean_token_accuracy`` (share
of answer tokens the model predicts right) at the first and last logging step, and the held-out eval loss and token
accuracy before and after training. The adapter is saved to ``--output-dir``.
"""

from __future__ import annotations

import os

# PyTorch's OpenMP threads busy-wait between parallel regions; on a shared CPU that makes every step many times
# slower (see examples/quickstart.py). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import random

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
from trl import SFTConfig, SFTTrainer

from peft_qst import QSTConfig
from peft_qst.smollm2 import smollm2_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lora", action="store_true", help="run the original QLoRA form (LoraConfig) instead of QST")
    parser.add_argument("--max-steps", type=int, default=60, help="optimizer steps (default: 60)")
    parser.add_argument("--output-dir", default=None, help="where TRL writes (default: outputs/sft-trl-{qst,lora})")
    parser.add_argument("--eval-size", type=int, default=32,
                        help="held-out messages scored before and after training (default: 32)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the data, the adapter's init and the order")
    parser.add_argument("--overwrite-output-dir", action="store_true",
                        help="write into an --output-dir that already holds files (default: refuse it)")
    args = parser.parse_args(argv)
    if args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.eval_size < 1:
        parser.error(f"--eval-size must be at least 1, got {args.eval_size}")
    default = f"outputs/sft-trl-{'lora' if args.lora else 'qst'}"
    args.output_dir = args.output_dir or default
    check_output_dir(parser, args.output_dir, args.overwrite_output_dir, default)
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
# A small instruction data set, generated in code: route a customer message to a team
# ----------------------------------------------------------------------------------------------------------------------

TOPICS = {
    "billing": ["my invoice", "a double charge", "the refund", "my credit card payment", "the monthly fee"],
    "shipping": ["my parcel", "the delivery", "the tracking number", "the courier", "my order's shipment"],
    "technical": ["the app", "the login page", "the password reset", "the sync feature", "the mobile website"],
    "account": ["my username", "my email address", "my profile", "the account settings", "my subscription plan"],
}
TRAIN_TEMPLATES = [
    "Hi, I have a problem with {x}.",
    "Hello, can you help me with {x}?",
    "Something is wrong with {x}, please help.",
    "I need assistance regarding {x}.",
    "Quick question about {x}.",
    "I'm unhappy with {x}.",
]
# held out: these phrasings occur only in the evaluation messages
EVAL_TEMPLATES = ["Good morning! Could someone look into {x}?", "Urgent: {x} is giving me trouble."]


def make_example(rng: random.Random, templates: list[str]) -> dict:
    """One conversational prompt/completion pair: SFTTrainer trains on the completion only (its default here)."""
    team = rng.choice(sorted(TOPICS))
    message = rng.choice(templates).format(x=rng.choice(TOPICS[team]))
    return {
        "prompt": [{"role": "user", "content": f"Which team should handle this message? {message}"}],
        "completion": [{"role": "assistant", "content": f"Team: {team}"}],
    }


def make_datasets(seed: int, n_train: int = 1000, n_eval: int = 32) -> tuple[Dataset, Dataset]:
    rng = random.Random(seed)
    train = [make_example(rng, TRAIN_TEMPLATES) for _ in range(n_train)]
    held_out = [make_example(rng, EVAL_TEMPLATES) for _ in range(n_eval)]
    return Dataset.from_list(train), Dataset.from_list(held_out)


# ----------------------------------------------------------------------------------------------------------------------
# The QLoRA script
# ----------------------------------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    set_seed(args.seed)
    output_dir = args.output_dir
    train_dataset, eval_dataset = make_datasets(args.seed, n_eval=args.eval_size)

    model_path = smollm2_path()  # a local SmolLM2-135M-Instruct checkpoint (no Hub access needed)
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=bnb_config)
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    if args.lora:  # the script as it was: QLoRA
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    else:  # the one line that changed
        peft_config = QSTConfig(task_type="CAUSAL_LM")

    training_args = SFTConfig(
        output_dir=output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-3,
        warmup_steps=max(1, args.max_steps // 10),
        logging_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on a CPU-only machine unless told

    )
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.model.print_trainable_parameters()

    before = trainer.evaluate()
    train_result = trainer.train()
    after = trainer.evaluate()
    trainer.save_model(output_dir)

    if not trainer.is_world_process_zero():  # under `accelerate launch`, one summary (the trainer saved once already)
        return
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "mean_token_accuracy" in entry]
    first, last = logs[0], logs[-1]
    method = "QLoRA (LoraConfig)" if args.lora else "QST (QSTConfig)"
    seconds = train_result.metrics["train_runtime"]
    per_step = seconds / args.max_steps
    print(f"\n=== {method}: {args.max_steps} steps of batch 8 in {seconds:.0f} s ({per_step:.2f} s/step) ===")
    print(
        f"train loss:                {first['loss']:.3f} (step {first['step']}) -> "
        f"{last['loss']:.3f} (step {last['step']})"
    )
    print(
        f"train mean_token_accuracy: {first['mean_token_accuracy']:.3f} (step {first['step']}) -> "
        f"{last['mean_token_accuracy']:.3f} (step {last['step']})"
    )
    print(f"held-out eval loss:        {before['eval_loss']:.3f} before -> {after['eval_loss']:.3f} after")
    print(
        f"held-out token accuracy:   {before['eval_mean_token_accuracy']:.3f} before -> "
        f"{after['eval_mean_token_accuracy']:.3f} after"
    )
    print(f"adapter saved to {output_dir}")


if __name__ == "__main__":
    main()
