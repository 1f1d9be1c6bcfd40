"""Several devices and several processes.

- Data parallel: ``accelerate launch --multi_gpu --num_processes 2`` on CPU (torchrun, gloo) runs TRL's SFTTrainer with a
  QSTConfig under DistributedDataParallel (tests/ddp_sft.py); the side network's gradients are all-reduced, so every
  rank holds the same side weights after every step although each rank trains on different batches.
- Model parallel placement: each side block goes to the device its backbone block computes on, also when accelerate's
  dispatch hooks (``from_pretrained(device_map=...)``, CPU/disk offload) keep that block's weights on the meta device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_qst import QSTConfig
from peft_qst.side import module_device

from .conftest import REPO, free_port, tiny_causal_lm

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21]])


def side_of(model):
    return model.base_model.model.model.qst_side["default"]


def device_of(module) -> str:
    return next(module.parameters()).device.type


# --------------------------------------------------------------------------------------------------------------------
# placement
# --------------------------------------------------------------------------------------------------------------------


def test_each_side_block_goes_where_its_backbone_block_is():
    """Backbone blocks on two devices (CPU and meta, the devices a CPU machine has): side block i follows block i, the
    embedding downsampler the embeddings, the side trunk's final norm, upsample and output gate the last block."""
    model = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4))
    trunk = model.base_model.model.model.get_base_layer()
    side = side_of(model)
    for index in (1, 2):
        trunk.layers[index].to("meta")
    side.place(trunk)
    assert [device_of(block) for block in side._blocks] == ["cpu", "meta", "meta"]
    assert device_of(side.embed_downsample) == "cpu"
    assert device_of(side.upsample) == device_of(side.trunk.norm) == "meta"
    assert all(p.device.type == "meta" for n, p in side.named_parameters() if "output_gate" in n)

    model = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4))
    trunk = model.base_model.model.model.get_base_layer()
    side = side_of(model)
    trunk.embed_tokens.to("meta")
    trunk.layers[0].to("meta")
    side.place(trunk)
    assert [device_of(block) for block in side._blocks] == ["meta", "cpu", "cpu"]
    assert device_of(side.embed_downsample) == "meta"
    assert device_of(side.upsample) == "cpu"


def offloading_device_map(num_layers: int) -> dict[str, str]:
    """Embeddings and the first block on the CPU, the middle block offloaded to disk, the rest on the CPU."""
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for index in range(num_layers):
        device_map[f"model.layers.{index}"] = "disk" if index == 1 else "cpu"
    return device_map


def test_forward_and_training_with_a_disk_offloaded_backbone_block(tmp_path, tiny_model_dir):
    """from_pretrained(device_map=...) with a block offloaded to disk: accelerate's AlignDevicesHook keeps its weights on
    the meta device and loads them for each forward. Its side block must go to the hook's execution device (CPU), not
    to meta; the adapted model then matches the same adapter on the plain model."""
    from accelerate.hooks import AlignDevicesHook

    offloaded = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, device_map=offloading_device_map(3), offload_folder=str(tmp_path / "offload")
    )
    block = offloaded.model.layers[1]
    assert next(block.parameters()).device.type == "meta"  # the weights really are offloaded
    assert any(isinstance(getattr(m, "_hf_hook", None), AlignDevicesHook) for m in block.modules())
    assert module_device(block) == torch.device("cpu")

    torch.manual_seed(0)
    model = get_peft_model(offloaded, QSTConfig(task_type="CAUSAL_LM", r=4))
    assert all(p.device.type == "cpu" for p in side_of(model).parameters())
    torch.manual_seed(0)
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))

    # a training step on each: same loss, same gradients into the side network
    for m in (model, plain):
        m.train()
        m(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in side_of(plain).named_parameters() if p.grad is not None}
    assert grads
    for name, parameter in side_of(model).named_parameters():
        if name in grads:
            torch.testing.assert_close(parameter.grad, grads[name])
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, plain(input_ids=IDS).logits)


def test_a_block_offloaded_in_parts_puts_its_side_block_on_the_execution_device(tmp_path, tiny_model_dir):
    """A device map that names a block's parts rather than the block (its attention on disk, the rest on the CPU):
    accelerate hooks the parts only, and the block's first parameter waits on the meta device. Its side block goes to
    the execution device of a hook inside the block (module_device), not to meta."""
    device_map = offloading_device_map(3)
    del device_map["model.layers.1"]
    for part in ("input_layernorm", "mlp", "post_attention_layernorm"):
        device_map[f"model.layers.1.{part}"] = "cpu"
    device_map["model.layers.1.self_attn"] = "disk"
    offloaded = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    block = offloaded.model.layers[1]
    assert next(block.parameters()).device.type == "meta"  # the attention's weights really are offloaded
    assert module_device(block) == torch.device("cpu")
    model = get_peft_model(offloaded, QSTConfig(task_type="CAUSAL_LM", r=4))
    assert all(p.device.type == "cpu" for p in side_of(model).parameters())
    with torch.no_grad():
        assert torch.isfinite(model.eval()(input_ids=IDS).logits).all()


# --------------------------------------------------------------------------------------------------------------------
# data parallel
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.smollm2  # tests/ddp_sft.py borrows the real SmolLM2 tokenizer and chat template
def test_ddp_with_accelerate_launch_all_reduces_side_gradients(tmp_path):
    steps = 3
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        "tests/ddp_sft.py", "--out", str(tmp_path), "--max-steps", str(steps),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-4000:]

    reports = [json.load(open(tmp_path / f"rank{rank}-report.json")) for rank in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2
        assert report["wrapper"] == "DistributedDataParallel"
        assert report["backend"] == "gloo"
        assert report["gradient_checkpointing"]  # SFTConfig's default, kept

    batches = [load_file(tmp_path / f"rank{rank}-batches.safetensors") for rank in (0, 1)]
    # (accelerate's data loader fetches one batch ahead, so a rank may collate one more batch than it trains on)
    assert len(batches[0]) >= steps and len(batches[1]) >= steps
    # each rank trained on its own shard: without the all-reduce their weights would drift apart
    assert all(not torch.equal(batches[0][f"step{i}"], batches[1][f"step{i}"]) for i in range(steps))

    previous = None
    for step in range(1, steps + 1):
        weights = [load_file(tmp_path / f"rank{rank}-step{step}.safetensors") for rank in (0, 1)]
        assert weights[0].keys() == weights[1].keys()
        assert all(".qst_side." in name for name in weights[0])
        for name in weights[0]:
            assert torch.equal(weights[0][name], weights[1][name]), (step, name)
        if previous is not None:  # and the weights do change from step to step
            assert any(not torch.equal(weights[0][n], previous[n]) for n in previous)
        previous = weights[0]
