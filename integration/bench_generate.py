"""Benchmark: tokens/s of QST generation against the base model's own generation.

Same 4-bit model (NF4, double quantisation, bf16 compute) -- the embedded SmolLM2-135M-Instruct, or with
``--model smollm2-1.7b-shape`` a randomly initialised model of SmolLM2-1.7B's shape --, same prompts, greedy decoding
with a fixed number of new tokens (``min_new_tokens == max_new_tokens``, so all generate exactly as many tokens), CPU. Three ways
are timed: the base model alone, the QST model (its inference fast path, ``peft_qst/fast_path.py``), and the same QST
model with the fast path switched off (``fast_path_disabled()``: the side network through the transformers modules).
The base model and QST alternate (base, QST, base, ...) so that drift of the machine hits both alike, and the table
gives medians; the general path, timed for reference, runs after them.

    .venv/bin/python integration/bench_generate.py [--new-tokens 64] [--repeats 5] [--batch-sizes 1 4] [--threads N]
        [--model smollm2|smollm2-1.7b-shape]

Prints a Markdown table with the machine and versions, and writes it as JSON next to ``--output`` if given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import peft_qst
from peft_qst.fast_path import fast_path_disabled
from peft_qst.smollm2 import smollm2_path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # integration/: measure.py
from measure import add_overwrite_output_argument, build_random_model, check_output_path  # noqa: E402

#: SmolLM2-1.7B's shape (hidden 2048, 24 layers, 32 heads, FFN 8192, SmolLM2's vocabulary and tokenizer), built with
#: random weights: generation speed does not depend on the weights' values
SMOLLM2_1_7B_SHAPE = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=130000.0, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2,
)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.",
    "List three uses of copper.",
]


def environment() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "peft_qst": peft_qst.__version__,
    }


def time_generate(model, inputs, new_tokens: int, general_path: bool = False) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.no_grad(), fast_path_disabled() if general_path else contextlib.nullcontext():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens
    return elapsed, out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--side-dtype", default=None, choices=["float32", "bfloat16"],
                        help="QSTConfig.side_dtype (default: None, the 4-bit compute dtype bf16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--model", choices=["smollm2", "smollm2-1.7b-shape"], default="smollm2",
                        help="the embedded SmolLM2-135M-Instruct, or a randomly initialised model of SmolLM2-1.7B's "
                             "shape (built in a temporary folder, about 3.4 GB)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    add_overwrite_output_argument(parser)
    args = parser.parse_args(argv)
    if min(args.new_tokens, args.repeats, *args.batch_sizes) < 1:
        parser.error("--new-tokens, --repeats and every --batch-sizes value must be at least 1")
    check_output_path(parser, args.output, args.overwrite_output)
    return args


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="qst-bench-generate-") as workdir:
        rows, env = run(args, workdir)
    model_name = "SmolLM2-135M-Instruct" if args.model == "smollm2" else "random SmolLM2-1.7B-shaped model"
    print(f"\nGeneration, {model_name} 4-bit NF4, greedy, {args.new_tokens} new tokens, median of "
          f"{args.repeats} alternating runs, QST side_dtype={args.side_dtype or 'default (bf16)'}")
    print("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print("\n| batch | base tokens/s | QST tokens/s | QST time overhead | QST general path tokens/s | its overhead |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch_size']} | {row['base_tokens_per_s']} | {row['qst_tokens_per_s']} | "
              f"{row['qst_overhead_percent']:+.1f}% | {row['qst_general_path_tokens_per_s']} | "
              f"{row['qst_general_path_overhead_percent']:+.1f}% |")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump({"model": model_name, "environment": env, "rows": rows}, handle, indent=2)


def run(args, workdir: str) -> tuple[list, dict]:
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if args.model == "smollm2-1.7b-shape":
        path = os.path.join(workdir, "model")
        print(f"building a random SmolLM2-1.7B-shaped model in {path}", file=sys.stderr, flush=True)
        build_random_model(SMOLLM2_1_7B_SHAPE, path, "cpu")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization).eval()
    qst = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization),
        peft_qst.QSTConfig(task_type="CAUSAL_LM", side_dtype=args.side_dtype),
    ).eval()

    rows = []
    for batch_size in args.batch_sizes:
        chats = [[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}] for i in range(batch_size)]
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        inputs = tokenizer(texts, return_tensors="pt", padding=True)
        runs = {"base": (base, False), "qst": (qst, False), "qst_general": (qst, True)}
        for model, general in runs.values():  # warm-up
            time_generate(model, inputs, 4, general)
        timings, outputs = {name: [] for name in runs}, {}
        # the two compared ways alternate; the general path (for reference) is timed after them, so that its many
        # small operations do not disturb their timings
        for _ in range(args.repeats):
            for name in ("base", "qst"):
                model, general = runs[name]
                elapsed, outputs[name] = time_generate(model, inputs, args.new_tokens, general)
                timings[name].append(elapsed)
        for _ in range(max(1, args.repeats // 2)):
            elapsed, outputs["qst_general"] = time_generate(qst, inputs, args.new_tokens, general_path=True)
            timings["qst_general"].append(elapsed)
        # the untrained adapter's upsample is zero, so all three compute the base model's tokens: a check that the
        # timed computations are the same work with the same result
        if not (torch.equal(outputs["base"], outputs["qst"]) and torch.equal(outputs["qst"], outputs["qst_general"])):
            raise AssertionError("base, QST and QST's general path generated different tokens")
        tokens = batch_size * args.new_tokens
        tps = {name: tokens / statistics.median(times) for name, times in timings.items()}
        rows.append({
            "batch_size": batch_size,
            "side_dtype": args.side_dtype or "default",
            "new_tokens": args.new_tokens,
            "base_tokens_per_s": round(tps["base"], 1),
            "qst_tokens_per_s": round(tps["qst"], 1),
            "qst_overhead_percent": round(100 * (tps["base"] / tps["qst"] - 1), 1),
            "qst_general_path_tokens_per_s": round(tps["qst_general"], 1),
            "qst_general_path_overhead_percent": round(100 * (tps["base"] / tps["qst_general"] - 1), 1),
            "timings_s": timings,
        })

    return rows, environment()


if __name__ == "__main__":
    main()
