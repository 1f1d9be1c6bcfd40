"""DeepSpeed ZeRO, on the CPU (DeepSpeed's CPU accelerator, gloo), in processes of their own.

Evaluation and generation under ZeRO-3 (one rank, tests/deepspeed_generate.py):

ZeRO-3 partitions every parameter: outside the forward of the module that owns it, a parameter's data is an empty
placeholder. Within a forward called through the DeepSpeed engine, DeepSpeed also gathers a parameter read from
another module, but not in calls on the model itself, which is how the Trainer and TRL generate under ZeRO-3
(``unwrapped_model.generate``). The inference fast path packed the side network's weights from those placeholders
and failed, and copy heads failed to look up the LM head's rows; here the model's evaluation logits and greedy
generation after partitioning must equal those before.

Training through transformers' Trainer with ``TrainingArguments(deepspeed=<config dict>)`` (tests/deepspeed_train.py;
one rank, and two started with torchrun): ZeRO-2 and ZeRO-3, CPU offload of the optimizer and of the parameters (with
the Trainer's torch AdamW and with DeepSpeedCPUAdam), ``trainer.save_model`` with and without
``stage3_gather_16bit_weights_on_model_save``, and ``resume_from_checkpoint``. Each run must leave the side network's
weights (and the logged losses) of a plain Trainer run on the same data and seed, every backbone weight as it was, only
the side network (and a classification head) trainable, and an adapter that ``PeftModel.from_pretrained`` loads onto a
fresh base model to the trained weights and logits. Skipped where DeepSpeed is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO, free_port, assert_trained_as_by_a_plain_trainer

pytest.importorskip("deepspeed")


def _environment() -> dict[str, str]:
    return {
        **os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
        # DeepSpeed may be importable from a further entry of the path (an install with pip --target)
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
        "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(free_port()),
    }


def _run(tmp_path, qst, *extra):
    command = [sys.executable, "tests/deepspeed_generate.py", "--out", str(tmp_path), "--qst", json.dumps(qst), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=_environment())


def assert_partitioned_outputs_equal_the_reference(tmp_path, result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    reference = load_file(tmp_path / "reference.safetensors")
    partitioned = load_file(tmp_path / "deepspeed.safetensors")
    torch.testing.assert_close(partitioned["logits"], reference["logits"], atol=1e-5, rtol=1e-5)
    assert torch.equal(partitioned["generated"], reference["generated"])


@pytest.mark.parametrize("qst", [{}, {"copy_heads": 1}], ids=["fast-path", "copy-head"])
def test_zero3_evaluation_and_generation_on_the_model_itself(tmp_path, qst):
    result = _run(tmp_path, qst)
    assert_partitioned_outputs_equal_the_reference(tmp_path, result)


def test_copy_heads_on_a_base_model_loaded_under_zero3_init(tmp_path):
    """Once TrainingArguments(deepspeed=<ZeRO-3>) is set up, from_pretrained loads the model under
    deepspeed.zero.Init: the LM head's weight is already an empty placeholder (its shape in ds_shape) when
    get_peft_model adds the adapter, and copy heads were refused as if the model had no LM head (LoRA builds there).
    They build, and after deepspeed.initialize give the unpartitioned model's logits and generation."""
    result = _run(tmp_path, {"copy_heads": 1}, "--zero-init")
    assert_partitioned_outputs_equal_the_reference(tmp_path, result)


def test_pruned_initialisation_on_a_base_model_loaded_under_zero3_init_is_refused(tmp_path):
    """init="pruned" reads every backbone weight; under deepspeed.zero.Init each is a placeholder of shape (0,), and
    the refusal blamed the llama model's shapes. It names ZeRO-3's partitioning and the way round it."""
    result = _run(tmp_path, {"init": "pruned"}, "--zero-init")
    assert result.returncode != 0
    assert "DeepSpeed ZeRO-3 has partitioned them" in result.stderr, result.stderr[-3000:]
    assert "before setting up ZeRO-3" in result.stderr


# --------------------------------------------------------------------------------------------------------------------
# training through the Trainer
# --------------------------------------------------------------------------------------------------------------------

# one worker process trains these one after another (a DeepSpeed run takes 1-3 s here, starting a process about 7 s)
ONE_RANK_RUNS = [
    {"name": "zero2", "stage": 2},
    {"name": "zero3", "stage": 3},
    {"name": "zero3-saved-without-16bit-gather", "stage": 3, "gather_16bit": False},
    {"name": "zero2-resumed", "stage": 2, "resume": "zero2"},
    {"name": "zero3-resumed", "stage": 3, "resume": "zero3"},
    # ZeRO-Offload keeping the Trainer's torch AdamW (accelerate swaps it for DeepSpeedCPUAdam unless told not to)
    {"name": "zero2-offload-optimizer", "stage": 2, "offload_optimizer": True, "force_ds_cpu_optimizer": False,
     "expected_optimizer": "AdamW"},
    {"name": "zero3-offload-optimizer-and-parameters", "stage": 3, "offload_optimizer": True, "offload_param": True,
     "force_ds_cpu_optimizer": False, "expected_optimizer": "AdamW"},
    # QST's own causal-LM loss (chunked) with the Trainer's num_items_in_batch, and DeepSpeed's accumulation
    {"name": "zero3-gradient-accumulation", "stage": 3,
     "training": {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}},
    {"name": "zero2-4bit", "stage": 2, "four_bit": True},  # QLoRA's usual multi-GPU setup
    {"name": "zero3-seq-cls", "stage": 3, "task": "SEQ_CLS"},  # the classification head trains too (modules_to_save)
]
# ZeRO-Offload with DeepSpeedCPUAdam, a C++ op that DeepSpeed compiles (ninja, g++) at its first use on a machine
# (about 100 s on the 2-core VM; cached under ~/.cache/torch_extensions afterwards): what accelerate makes of the
# Trainer's own AdamW by default, and what DeepSpeed builds from an optimizer section in the config
CPU_ADAM_RUNS = [
    {"name": "zero2-offload-optimizer-trainer-adamw-swapped", "stage": 2, "offload_optimizer": True,
     "expected_optimizer": "DeepSpeedCPUAdam"},
    {"name": "zero3-offload-all-optimizer-from-config", "stage": 3, "offload_optimizer": True, "offload_param": True,
     "ds_optimizer": True, "expected_optimizer": "DeepSpeedCPUAdam"},
]
# two ranks: a copy head (which reads the LM head's rows) and gradient checkpointing on top
TWO_RANK_SETTINGS = {"stage": 3, "qst": {"copy_heads": 1}, "training": {"gradient_checkpointing": True}}
TWO_RANK_RUNS = [
    {"name": "zero3", **TWO_RANK_SETTINGS},
    {"name": "zero3-resumed", "resume": "zero3", **TWO_RANK_SETTINGS},
]


def _train_under_deepspeed(out, runs, ranks: int = 1):
    from tests.deepspeed_train import save_base_model

    save_base_model(str(out / "base"))
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    command = [sys.executable, *(launcher if ranks > 1 else []), "tests/deepspeed_train.py", "--out", str(out),
               "--runs", json.dumps(runs)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=_environment())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, {run["name"]: run for run in runs}


def cpu_adam_buildable() -> bool:
    from deepspeed.ops.op_builder import CPUAdamBuilder

    return CPUAdamBuilder().is_compatible(verbose=True)


@pytest.fixture(scope="module")
def one_rank_runs(tmp_path_factory):
    """The one-rank runs and, where DeepSpeed can build its CPU Adam op here, the CPU Adam runs after them, in one
    process (a process spends about 15 s importing torch, transformers and DeepSpeed before it trains)."""
    runs = ONE_RANK_RUNS + (CPU_ADAM_RUNS if cpu_adam_buildable() else [])
    return _train_under_deepspeed(tmp_path_factory.mktemp("deepspeed-one-rank"), runs)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    return _train_under_deepspeed(tmp_path_factory.mktemp("deepspeed-two-ranks"), TWO_RANK_RUNS, ranks=2)


@pytest.mark.parametrize("name", [run["name"] for run in ONE_RANK_RUNS])
def test_trainer_under_zero_trains_and_saves_as_without_deepspeed(one_rank_runs, plain_trainer, name):
    assert_trained_as_by_a_plain_trainer(one_rank_runs, name, plain_trainer)


@pytest.mark.parametrize("name", [run["name"] for run in CPU_ADAM_RUNS])
def test_zero_offload_with_deepspeed_cpu_adam(one_rank_runs, plain_trainer, name):
    if name not in one_rank_runs[1]:
        pytest.skip("DeepSpeed cannot build its CPU Adam op on this machine")
    assert_trained_as_by_a_plain_trainer(one_rank_runs, name, plain_trainer)


@pytest.mark.parametrize("name", [run["name"] for run in TWO_RANK_RUNS])
def test_trainer_under_zero3_on_two_ranks(two_rank_runs, plain_trainer, name):
    """Each rank trains on its half of every step's rows (the plain Trainer's reference trains on all of them at once:
    ZeRO averages the ranks' gradients)."""
    from tests.deepspeed_train import STEPS, training_rows

    out, by_name = two_rank_runs
    assert_trained_as_by_a_plain_trainer(two_rank_runs, name, plain_trainer)
    ranks = [json.load(open(out / name / f"rank{rank}-rows.json")) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == (STEPS - 2 if "resume" in by_name[name] else STEPS)
    every_row = sorted(row["input_ids"] for row in training_rows())
    for halves in zip(*ranks):
        assert len(halves[0]) == len(halves[1]) == len(every_row) // 2
        assert sorted(halves[0] + halves[1]) == every_row
