"""Data-parallel SFT of a QST model, run by tests/test_multiprocess.py under ``accelerate launch --num_processes 2``.

A tiny random Llama (with the real SmolLM2 tokenizer and chat template) is trained with TRL's ``SFTTrainer`` and
``peft_config=QSTConfig(...)``, SFTConfig's defaults otherwise (gradient checkpointing on). Under ``accelerate launch``
the Trainer wraps the model in ``DistributedDataParallel`` over gloo, and each rank reads its own shard of the data.
After every optimizer step each rank writes the side network's weights to ``<out>/rank{R}-step{S}.safetensors``, and
at the end the token ids of every batch it trained on to ``<out>/rank{R}-batches.safetensors``: the test compares
them across ranks (same weights after every step although the batches differ = the gradients were all-reduced).

Usage: accelerate launch --multi_gpu --num_processes 2 tests/ddp_sft.py --out DIR [--max-steps N]
(``--multi_gpu`` starts the processes with torchrun; without a GPU they use the gloo backend on the CPU.)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json

import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

from peft_qst import QSTConfig
from peft_qst.smollm2 import smollm2_path


class SaveSideWeights(TrainerCallback):
    """After each optimizer step, write this rank's trainable (side-network) weights."""

    def __init__(self, out: str, rank: int):
        self.out, self.rank = out, rank

    def on_step_end(self, args, state, control, model=None, **kwargs):
        weights = {n: p.detach().float().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, os.path.join(self.out, f"rank{self.rank}-step{state.global_step}.safetensors"))


class RecordingCollator:
    """Wraps the trainer's collator and keeps the input ids of every batch this rank trains on."""

    def __init__(self, collator):
        self.collator = collator
        self.batches: list[torch.Tensor] = []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.batches.append(batch["input_ids"].clone())
        return batch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--ddp-find-unused-parameters", choices=["true", "false"], default=None,
                        help="TrainingArguments.ddp_find_unused_parameters (default: the Trainer's choice)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)  # the same backbone on every rank (DDP also broadcasts rank 0's trainable weights)
    model = AutoModelForCausalLM.from_config(config)
    data = Dataset.from_list(
        [{"messages": [{"role": "user", "content": f"Repeat {i}"}, {"role": "assistant", "content": f"{i} {i} {i}"}]}
         for i in range(64)]
    )
    sft_args = SFTConfig(
        output_dir=args.out, max_steps=args.max_steps, per_device_train_batch_size=4, learning_rate=3e-3,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False, seed=0,
        ddp_find_unused_parameters=None if args.ddp_find_unused_parameters is None
        else args.ddp_find_unused_parameters == "true",
    )
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=data, processing_class=tokenizer,
                         peft_config=QSTConfig(task_type="CAUSAL_LM", r=4))
    rank = trainer.args.process_index
    recorder = RecordingCollator(trainer.data_collator)
    trainer.data_collator = recorder
    trainer.add_callback(SaveSideWeights(args.out, rank))
    trainer.train()

    save_file({f"step{i}": ids.contiguous() for i, ids in enumerate(recorder.batches)},
              os.path.join(args.out, f"rank{rank}-batches.safetensors"))
    wrapped = trainer.model_wrapped
    report = {
        "world_size": trainer.args.world_size,
        "wrapper": type(wrapped).__name__,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
        "gradient_checkpointing": sft_args.gradient_checkpointing,
        "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    with open(os.path.join(args.out, f"rank{rank}-report.json"), "w") as handle:
        json.dump(report, handle)
    if torch.distributed.is_initialized():
        # left to interpreter exit, the gloo group's threads were torn down mid-use once in a loaded full run (rank 1:
        # "terminate called without an active exception", SIGABRT after training had finished), as the other
        # multi-process scripts avoid by ending the group themselves
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
