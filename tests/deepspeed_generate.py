"""Evaluation and generation of a QST model under DeepSpeed ZeRO-3, run by tests/test_deepspeed.py in a process of
its own (one rank over gloo, DeepSpeed's CPU accelerator).

A tiny random Llama gets ``QSTConfig(task_type="CAUSAL_LM", r=4, **<--qst JSON>)``, with the upsample and the copy
gates moved off zero (so the adapter changes the output), and ``deepspeed.initialize`` with ZeRO stage 3 partitions
every parameter (persistence threshold 0, no prefetching: each parameter is gathered in its own module's hooks only, as
a large model's are). Then, as the Trainer and TRL generate under ZeRO-3, on the model itself (not through the engine):
a greedy ``generate`` (first, before any forward has gathered a parameter) and an evaluation forward (``no_grad``,
eval mode); their tokens and logits are written to
``<out>/deepspeed.safetensors``, the same model's outputs before partitioning to ``<out>/reference.safetensors``.

With ``--zero-init`` the base model is loaded the way the Trainer loads it once ``TrainingArguments(deepspeed=...)``
is set up: ``from_pretrained`` under ZeRO-3's ``deepspeed.zero.Init``, so that the backbone's weights are already
partitioned when ``get_peft_model`` adds the adapter (the reference model's adapter weights are loaded into it).

Usage: python tests/deepspeed_generate.py --out DIR [--qst '{"copy_heads": 1}'] [--zero-init]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
for name, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
    os.environ.setdefault(name, value)

import argparse
import json

import deepspeed
import deepspeed.ops
import torch
from peft import get_peft_model
from safetensors.torch import save_file

from peft_qst import QSTConfig
from tests.conftest import tiny_causal_lm
from tests.fsdp_train import IDS

# the CPU accelerator's JIT-compiled shared-memory all-reduce (a C++ build at the first run) is not needed for one rank
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def outputs_of(model) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        generated = model.generate(input_ids=IDS, max_new_tokens=4, do_sample=False).contiguous()
        return {"generated": generated, "logits": model(input_ids=IDS).logits.contiguous()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--qst", default="{}", help="further QSTConfig arguments, as JSON")
    parser.add_argument("--zero-init", action="store_true", help="load the base model under deepspeed.zero.Init")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4, **json.loads(args.qst)))
    side = model.base_model.model.model.qst_side["default"]
    with torch.no_grad():
        torch.nn.init.normal_(side.upsample.weight, std=0.5)
        if side.copy_head is not None:
            side.copy_head.gate.fill_(0.5)
    model.eval()
    save_file(outputs_of(model), os.path.join(args.out, "reference.safetensors"))

    deepspeed.init_distributed(dist_backend="gloo")
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0},
    }
    if args.zero_init:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        base_dir = os.path.join(args.out, "base")
        tiny_causal_lm().save_pretrained(base_dir)
        adapter = get_peft_model_state_dict(model)
        zero_config = HfDeepSpeedConfig(config)  # noqa: F841 - from_pretrained partitions while it is alive
        partitioned = AutoModelForCausalLM.from_pretrained(base_dir)
        assert partitioned.lm_head.weight.numel() == 0  # the backbone really is partitioned
        model = get_peft_model(partitioned, QSTConfig(task_type="CAUSAL_LM", r=4, **json.loads(args.qst)))
        set_peft_model_state_dict(model, adapter)
        model.eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    assert all(p.numel() == 0 for p in model.parameters())  # every parameter partitioned
    engine.eval()
    save_file(outputs_of(engine.module), os.path.join(args.out, "deepspeed.safetensors"))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
