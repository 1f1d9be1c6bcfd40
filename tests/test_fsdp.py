"""Fully sharded data parallel (FSDP), on the CPU: two processes over gloo, started with torchrun.

tests/fsdp_train.py wraps a QST model as the FSDP recipes for PEFT models do (FSDP2 with accelerate's layout; FSDP1
with PEFT's ``fsdp_auto_wrap_policy`` and ``use_orig_params=False``), trains a few steps with a different batch on each
rank, runs an evaluation forward (and under FSDP2 ``generate``), and saves the adapter from the gathered full state
dict; with and without a copy head. Checked here: the side weights after every step are the same on both ranks and
equal those of one process training on both ranks' batches together; the backbone stays as it was; the saved adapter,
loaded onto a fresh model in this process, gives the trained model's logits and generations.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_qst import QSTConfig

from .conftest import REPO, free_port, tiny_causal_lm

STEPS = 3


def _native_abort(stderr: str) -> bool:
    """Whether a rank died of SIGABRT from C++ (a crash in the process-group runtime, not a Python error)."""
    return "terminate called" in stderr or "exitcode  : -6" in stderr


def _stages(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if line.startswith("[rank "))


def reference_training(qst: dict):
    """One process, the same model and initialisation, both ranks' batches at once (FSDP averages the two ranks'
    gradients; the batches have the same number of tokens): the trainable weights after each step."""
    from tests.fsdp_train import batch_of

    model = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4, **qst))
    backbone = {n: t.clone() for n, t in model.state_dict().items() if ".qst_side." not in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    weights = []
    for step in range(1, STEPS + 1):
        ids = torch.cat([batch_of(0, step), batch_of(1, step)])
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    return weights, backbone


# FSDP2 with accelerate's layout; FSDP1 with PEFT's wrap policy and use_orig_params=False; FSDP2 with a copy head, which
# reads the LM head's weight during the trunk's forward, while the head (an FSDP unit of its own) is still sharded;
# FSDP2 with each side network one unit too, whose mix with the backbone runs after the side network's own forward
CASES = [(2, {}, False), (1, {}, False), (2, {"copy_heads": 1}, False), (2, {"copy_heads": 1}, True)]


@pytest.mark.parametrize(
    "fsdp, qst, side_unit", CASES, ids=["fsdp2", "fsdp1-peft-policy", "fsdp2-copy-head", "fsdp2-side-network-unit"]
)
def test_fsdp_training_saving_and_reloading(tmp_path, fsdp, qst, side_unit):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "tests/fsdp_train.py", "--out", str(tmp_path), "--fsdp", str(fsdp), "--steps", str(STEPS),
        "--qst", json.dumps(qst),
    ] + (["--side-unit"] if side_unit else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    if result.returncode != 0 and _native_abort(result.stderr):
        # Seen once in some forty runs on a 2-core VM: a rank aborted in C++ ("terminate called without an active
        # exception", no Python error). The run is repeated once from scratch, and everything below is checked on the
        # repeat; the first run's stages (tests/fsdp_train.py logs them) are kept in the warning.
        warnings.warn(f"torchrun rank aborted natively; running again. Stages reached:\n{_stages(result.stderr)}")
        shutil.rmtree(tmp_path)
        tmp_path.mkdir()
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]

    reports = [json.load(open(tmp_path / f"rank{rank}-report.json")) for rank in (0, 1)]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in reports)
    for report in reports:
        assert all(torch.isfinite(torch.tensor(report["losses"])))
    assert reports[0]["losses"] != reports[1]["losses"]  # each rank trained on its own batches

    reference_weights, reference_backbone = reference_training(qst)
    for step in range(1, STEPS + 1):
        weights = [load_file(tmp_path / f"rank{rank}-step{step}.safetensors") for rank in (0, 1)]
        expected = reference_weights[step - 1]
        assert weights[0].keys() == weights[1].keys() == expected.keys()
        assert all(".qst_side." in name for name in expected)
        for name in expected:
            assert torch.equal(weights[0][name], weights[1][name]), (step, name)
            torch.testing.assert_close(weights[0][name], expected[name], atol=1e-5, rtol=1e-4, msg=(step, name))

    backbone = load_file(tmp_path / "backbone.safetensors")
    assert backbone.keys() == reference_backbone.keys()
    for name, tensor in reference_backbone.items():
        assert torch.equal(backbone[name], tensor), name

    evaluated = [load_file(tmp_path / f"rank{rank}-eval.safetensors") for rank in (0, 1)]
    loaded = PeftModel.from_pretrained(tiny_causal_lm(), str(tmp_path / "adapter")).eval()
    ids = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21]])
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            base_logits = loaded(input_ids=ids).logits
    for outputs in evaluated:
        torch.testing.assert_close(outputs["logits"], logits, atol=1e-5, rtol=1e-5)
    assert (logits - base_logits).abs().max() > 1e-3  # the adapter trained
    if fsdp == 2:
        generated = loaded.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        assert all(torch.equal(outputs["generated"], generated) for outputs in evaluated)
