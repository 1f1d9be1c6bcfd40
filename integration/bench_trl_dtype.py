"""Benchmark: TRL's SFTTrainer with QST on a CPU, in the three dtype settings a user can end up with.

``peft_qst.recommended_compute_dtype()`` picks float32 on CPUs without AVX512-BF16, where bfloat16 is emulated. With
TRL the model's dtype is not all: ``SFTConfig`` turns bf16 mixed precision on by default (``bf16=True`` unless
``fp16`` is set), and on a CPU that runs the forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``, whatever
the model's dtype. So three settings are timed, each in its own fresh process, on the same data and steps:

- ``bfloat16``: the QLoRA script as usual: ``bnb_4bit_compute_dtype=torch.bfloat16``, ``SFTConfig`` defaults;
- ``float32-autocast``: the model loaded in float32 (compute dtype and ``dtype``), ``SFTConfig`` defaults (bf16 on);
- ``float32``: the model in float32 and ``SFTConfig(bf16=False)``.

The data and the trainer settings are ``examples/sft_trl.py``'s (its generated routing task, batch 8, lr 1e-3, the
embedded SmolLM2-135M-Instruct in 4-bit NF4 with double quantisation, ``QSTConfig(task_type="CAUSAL_LM")``). A step is
timed from the trainer's ``on_step_begin`` to its ``on_step_end`` callback (forward, backward, optimizer step); the
table gives the median of the steps after the first (``--steps`` in all), and each setting's step time over the
``float32`` one.

    .venv/bin/python integration/bench_trl_dtype.py                     # all three settings, 8 steps each
    .venv/bin/python integration/bench_trl_dtype.py --steps 6 --output integration/results/bench_trl_dtype_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the examples: spinning OpenMP threads on shared cores

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from measure import add_overwrite_output_argument, check_output_path  # noqa: E402

SETTINGS = {
    # name: (model dtype, SFTConfig bf16)
    "bfloat16": ("bfloat16", True),
    "float32-autocast": ("float32", True),
    "float32": ("float32", False),
}


def run_one(setting: str, steps: int, seed: int) -> dict:
    """Train ``steps`` SFTTrainer steps in this process; step times from the trainer's callbacks."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import peft_qst
    from peft_qst.smollm2 import smollm2_path

    spec = importlib.util.spec_from_file_location("sft_trl_example", REPO / "examples" / "sft_trl.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

    dtype_name, bf16 = SETTINGS[setting]
    dtype = getattr(torch, dtype_name)
    path = smollm2_path()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_dataset, _ = example.make_datasets(seed)
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="qst-bench-trl-") as output_dir:
        arguments = SFTConfig(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=8,
                              learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                              use_cpu=not torch.cuda.is_available(), bf16=bf16, seed=seed)
        trainer = SFTTrainer(model=model, args=arguments, train_dataset=train_dataset, processing_class=tokenizer,
                             peft_config=peft_qst.QSTConfig(task_type="CAUSAL_LM"), callbacks=[timer])
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "setting": setting,
        "model_dtype": str(trainer.model.get_input_embeddings().weight.dtype).removeprefix("torch."),
        "compute_dtype": str(trainer.model.config.quantization_config.bnb_4bit_compute_dtype).removeprefix("torch."),
        "bf16_mixed_precision": trainer.args.bf16,
        # SFTTrainer casts a quantized model's trainable parameters (the side network) to bfloat16 in every setting
        "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in trainer.model.parameters()
                                    if p.requires_grad}),
        "step_times_s": timer.times,
        "step_s": statistics.median(timer.times[1:] or timer.times),
        "losses": losses,
        "torch_threads": torch.get_num_threads(),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=8, help="trainer steps per setting; the first is not timed")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output", default=None, help="write the environment, every run and the table as JSON")
    add_overwrite_output_argument(parser)
    parser.add_argument("--run-one", default=None, choices=list(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be at least 2 (the first step is not timed), got {args.steps}")
    if not args.run_one:
        check_output_path(parser, args.output, args.overwrite_output)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run_one:
        Path(args.result_file).write_text(json.dumps(run_one(args.run_one, args.steps, args.seed)))
        return 0
    import trl

    from bench_train import environment

    runs = []
    with tempfile.TemporaryDirectory(prefix="qst-bench-trl-results-") as tmp:
        for setting in args.settings:
            print(f"[{setting}]", file=sys.stderr, flush=True)
            result_file = os.path.join(tmp, f"{setting}.json")
            command = [sys.executable, __file__, "--run-one", setting, "--steps", str(args.steps), "--seed",
                       str(args.seed), "--result-file", result_file]
            completed = subprocess.run(command, cwd=REPO)
            if completed.returncode != 0:
                print(f"error: the {setting} run exited with {completed.returncode}", file=sys.stderr)
                return 1
            runs.append(json.loads(Path(result_file).read_text()))
            print(f"    step {runs[-1]['step_s']:.2f} s", file=sys.stderr, flush=True)
    env = environment("cpu")
    reference = next((run["step_s"] for run in runs if run["setting"] == "float32"), None)
    lines = [
        f"TRL SFTTrainer + QSTConfig, SmolLM2-135M-Instruct 4-bit NF4, batch 8, {args.steps} steps per setting "
        "(median of all but the first), each setting in its own process",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, {env['memory_gb']} GB, torch threads "
        f"{sorted({run['torch_threads'] for run in runs})}",
        "Versions: " + ", ".join(f"{key} {env[key]}" for key in
                                ("python", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "peft_qst"))
        + f", trl {trl.__version__}",
        "",
        "| setting | model / compute dtype | SFTConfig bf16 | side network | step (s) | over float32 | last loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        ratio = f"{run['step_s'] / reference:.2f}x" if reference else "-"
        lines.append(f"| {run['setting']} | {run['model_dtype']} / {run['compute_dtype']} | "
                     f"{run['bf16_mixed_precision']} | {', '.join(run['trainable_dtypes'])} | {run['step_s']:.2f} | "
                     f"{ratio} | {run['losses'][-1]:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.output:
        Path(args.output).write_text(json.dumps({"settings": vars(args), "environment": env, "runs": runs,
                                                 "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
