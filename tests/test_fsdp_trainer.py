"""FSDP as users turn it on: transformers' Trainer with ``TrainingArguments(fsdp="full_shard auto_wrap",
fsdp_config={...})``, two ranks started with torchrun, on the CPU over gloo (tests/fsdp_trainer_train.py).

accelerate 1.16 takes FSDP only on GPU process groups (on the CPU the Trainer silently trains with DDP): the worker
makes its ``AcceleratorState`` take the GPU branch and leaves the rest to accelerate and the Trainer. Under FSDP2
(``fsdp_version: 2``) and FSDP1 (``fsdp_version: 1``, ``use_orig_params`` false and true), with auto wrap by the
decoder layer class, ``fsdp_activation_checkpointing`` (both failed before: the checkpoint wrappers recomputed side
blocks outside the side network's forward) or gradient checkpointing, 4-bit backbones stored as float32 and bfloat16
(``bnb_4bit_quant_storage``, with ``fsdp_cpu_ram_efficient_loading``), full and sharded state dicts and
``resume_from_checkpoint``: the side weights and logged losses equal a plain
Trainer's on the same rows (each rank trains on half of each step's rows), every backbone weight is unchanged, only
the side network requires grad, and the adapter ``trainer.save_model()`` writes reloads onto a fresh base model to the
trained logits. CPU-only limits of accelerate and torch, not of QST (LoRA is refused or fails the same way):
``sync_module_states`` (accelerate refuses it on the CPU, and with it FSDP1's ``cpu_ram_efficient_loading``) and
FSDP1's full-state-dict gather, so the FSDP1 runs keep sharded checkpoints and do not call ``save_model``; FSDP1's
sharded ``resume_from_checkpoint`` restarts from the initial adapter weights, for LoRA too, so none is resumed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO, free_port, assert_trained_as_by_a_plain_trainer

LAYER_WRAP = {"fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}
FSDP2 = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"fsdp_version": 2, **LAYER_WRAP}}
SHARDED = {"fsdp_state_dict_type": "SHARDED_STATE_DICT"}
# the QLoRA-FSDP recipe's FSDP1 settings; sync_module_states is refused on the CPU
FSDP1 = {"fsdp": "full_shard auto_wrap", "fsdp_config": {
    "fsdp_version": 1, "fsdp_use_orig_params": False, "fsdp_sync_module_states": False, **LAYER_WRAP, **SHARDED,
}}


def fsdp(base: dict, **config) -> dict:
    return {"fsdp": base["fsdp"], "fsdp_config": {**base["fsdp_config"], **config}}


RUNS = [
    {"name": "fsdp2", "fsdp": FSDP2},
    {"name": "fsdp2-resumed", "fsdp": FSDP2, "resume": "fsdp2"},
    # sharded checkpoints, the final adapter gathered whole (PEFT's FSDP recipe: set_state_dict_type before saving)
    {"name": "fsdp2-sharded", "fsdp": fsdp(FSDP2, **SHARDED), "save_full": True},
    {"name": "fsdp2-sharded-resumed", "fsdp": fsdp(FSDP2, **SHARDED), "save_full": True, "resume": "fsdp2-sharded"},
    {"name": "fsdp2-activation-checkpointing", "fsdp": fsdp(FSDP2, fsdp_activation_checkpointing=True)},
    {"name": "fsdp2-gradient-checkpointing", "fsdp": FSDP2, "training": {"gradient_checkpointing": True}},
    {"name": "fsdp2-4bit-float32-storage", "fsdp": fsdp(FSDP2, fsdp_cpu_ram_efficient_loading=True),
     "four_bit": True, "quant_storage": "float32"},
    {"name": "fsdp2-4bit-bfloat16-storage", "fsdp": fsdp(FSDP2, fsdp_cpu_ram_efficient_loading=True),
     "four_bit": True, "quant_storage": "bfloat16"},
    {"name": "fsdp1", "fsdp": FSDP1, "save": False},
    {"name": "fsdp1-use-orig-params", "fsdp": fsdp(FSDP1, fsdp_use_orig_params=True), "save": False},
    # FSDP1 checkpoints what PEFT's wrap policy wraps: the side blocks too, recomputed outside the side network
    {"name": "fsdp1-activation-checkpointing", "fsdp": fsdp(FSDP1, fsdp_activation_checkpointing=True),
     "save": False},
    {"name": "fsdp1-gradient-checkpointing", "fsdp": FSDP1, "training": {"gradient_checkpointing": True},
     "save": False},
    {"name": "fsdp1-4bit-float32-storage", "fsdp": FSDP1, "four_bit": True, "quant_storage": "float32",
     "save": False},
]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    from tests.deepspeed_train import save_base_model

    out = tmp_path_factory.mktemp("fsdp-trainer")
    save_base_model(str(out / "base"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "tests/fsdp_trainer_train.py", "--out", str(out), "--runs", json.dumps(RUNS)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, {run["name"]: run for run in RUNS}


@pytest.mark.parametrize("name", [run["name"] for run in RUNS])
def test_trainer_under_fsdp_trains_and_saves_as_a_plain_trainer(fsdp_runs, plain_trainer, name):
    from tests.deepspeed_train import STEPS, training_rows

    out, by_name = fsdp_runs
    assert_trained_as_by_a_plain_trainer(fsdp_runs, name, plain_trainer)
    ranks = [json.load(open(out / name / f"rank{rank}-rows.json")) for rank in (0, 1)]
    every_row = sorted(row["input_ids"] for row in training_rows())
    assert len(ranks[0]) == len(ranks[1]) == (STEPS - 2 if "resume" in by_name[name] else STEPS)
    for halves in zip(*ranks):
        assert len(halves[0]) == len(halves[1]) == len(every_row) // 2
        assert sorted(halves[0] + halves[1]) == every_row
