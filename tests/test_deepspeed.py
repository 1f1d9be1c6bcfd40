"""DeepSpeed ZeRO-3, on the CPU: one rank over gloo, in a process of its own (tests/deepspeed_generate.py).

ZeRO-3 partitions every parameter: outside the forward of the module that owns it, a parameter's data is an empty
placeholder. Within a forward called through the DeepSpeed engine, DeepSpeed also gathers a parameter read from
another module, but not in calls on the model itself, which is how the Trainer and TRL generate under ZeRO-3
(``unwrapped_model.generate``). The inference fast path packed the side network's weights from those placeholders
and failed, and copy heads failed to look up the LM head's rows; here the model's evaluation logits and greedy
generation after partitioning must equal those before. Skipped where DeepSpeed is not installed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import REPO

pytest.importorskip("deepspeed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, qst, *extra):
    env = {
        **os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
        # DeepSpeed may be importable from a further entry of the path (an install with pip --target)
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
        "DS_ACCELERATOR": "cpu", "MASTER_PORT": str(_free_port()),
    }
    command = [sys.executable, "tests/deepspeed_generate.py", "--out", str(tmp_path), "--qst", json.dumps(qst), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


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
