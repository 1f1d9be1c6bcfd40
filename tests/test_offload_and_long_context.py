"""Big-model offload (accelerate) and long-context rope settings.

- A copy head reads rows of the LM head's weight outside the head's forward; with the head offloaded to disk by
  ``from_pretrained(device_map=..., offload_folder=...)`` that weight waits on the meta device, and the rows come from
  accelerate's hook instead: the same logits and gradients as on the plain model.
- LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini) keeps one factor per rotary frequency: a side head of another width than
  the backbone's gets the lists at its own frequencies, rotating as the backbone does at those frequencies.
"""

from __future__ import annotations

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from peft_qst import QSTConfig

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21]])


def side_of(model):
    return model.base_model.model.model.qst_side["default"]


def test_copy_heads_with_a_disk_offloaded_lm_head(tmp_path, tiny_model_dir):
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"}
    device_map.update({f"model.layers.{index}": "cpu" for index in range(3)})
    offloaded = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert offloaded.lm_head.weight.device.type == "meta"  # the head really is offloaded

    models = []
    for base in (offloaded, AutoModelForCausalLM.from_pretrained(tiny_model_dir)):
        torch.manual_seed(0)
        model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, copy_heads=1))
        with torch.no_grad():  # a trained-looking adapter: the copy head's output reaches the logits
            torch.manual_seed(1)
            for parameter in side_of(model).parameters():
                parameter.add_(torch.randn_like(parameter) * 0.1)
        models.append(model)
    model, plain = models

    for m in models:
        m.train()
        m(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in side_of(plain).named_parameters() if p.grad is not None}
    assert any("copy_head" in name for name in grads)
    for name, parameter in side_of(model).named_parameters():
        if name in grads:
            torch.testing.assert_close(parameter.grad, grads[name])
    for m in models:
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, plain(input_ids=IDS).logits)
    cached = model.generate(input_ids=IDS, max_new_tokens=5, do_sample=False)
    assert torch.equal(cached, model.generate(input_ids=IDS, max_new_tokens=5, do_sample=False, use_cache=False))
    assert torch.equal(cached, plain.generate(input_ids=IDS, max_new_tokens=5, do_sample=False))


def tiny_longrope_phi3():
    long_factor = [2.0 + 0.1 * index for index in range(8)]  # head dimension 16: 8 rotary frequencies
    config = AutoConfig.for_model(
        "phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, pad_token_id=0, max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8, long_factor=long_factor,
            original_max_position_embeddings=16,
        ),
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_longrope_factor_lists_follow_a_side_head_of_another_width():
    """side_heads=2 at r=4 gives side heads of 8 (4 frequencies) beside the backbone's 16 (8 frequencies): transformers
    refused the backbone's lists of 8 for them. The side's frequencies are the backbone's even ones, and so must be
    its scaled frequencies; generation past original_max_position_embeddings caches as it recomputes."""
    model = get_peft_model(tiny_longrope_phi3(), QSTConfig(task_type="CAUSAL_LM", r=4, side_heads=2))
    side_rotary = side_of(model).trunk.rotary_emb
    base_rotary = model.base_model.model.model.get_base_layer().rotary_emb
    assert side_rotary.inv_freq.shape == (4,)
    for length in (12, 40):  # within original_max_position_embeddings (short factors) and past it (long factors)
        positions = torch.arange(length)[None]
        side_cos, side_sin = side_rotary(torch.zeros(1, length, 8), positions)
        base_cos, base_sin = base_rotary(torch.zeros(1, length, 16), positions)
        torch.testing.assert_close(side_cos[..., :4], base_cos[..., :8:2])
        torch.testing.assert_close(side_sin[..., :4], base_sin[..., :8:2])

    with torch.no_grad():
        torch.manual_seed(1)
        for parameter in side_of(model).parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    prompt = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    model.train()
    model(input_ids=prompt, labels=prompt).loss.backward()
    assert side_of(model).upsample.weight.grad is not None
    model.eval()
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(input_ids=prompt, **kwargs), model.generate(input_ids=prompt, use_cache=False, **kwargs))


def test_longrope_factor_lists_are_interpolated_for_a_partially_rotated_side_head():
    """Phi-4-mini's layout: LongRoPE on part of each head (partial_rotary_factor), and side heads whose frequencies fall
    between the backbone's. Heads of 16 rotating half (4 frequencies); two side heads of 12 at r=4 rotate 6 channels,
    3 frequencies, which sit at the backbone's frequencies 0, 4/3 and 8/3: the lists have 3 entries (not 6, as a full
    rotation of 12 would have), each read between its two neighbours. The side network runs past
    original_max_position_embeddings (the long factors), cached as recomputed."""
    config = AutoConfig.for_model(
        "phi3", hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, vocab_size=128, pad_token_id=0, max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_parameters=dict(
            rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 4,
            long_factor=[2.0 + 0.1 * index for index in range(4)], original_max_position_embeddings=16,
            partial_rotary_factor=0.5,
        ),
    )
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config).eval(),
                           QSTConfig(task_type="CAUSAL_LM", r=4, side_heads=2))
    side = side_of(model)
    rope = side.trunk.config.rope_parameters
    assert side.trunk.config.head_dim == 12 and rope["short_factor"] == [1.0] * 3
    torch.testing.assert_close(torch.tensor(rope["long_factor"]), torch.tensor([2.0, 2.0 + 0.4 / 3, 2.0 + 0.8 / 3]))
    assert side.trunk.rotary_emb.inv_freq.shape == (3,)
    with torch.no_grad():
        side.upsample.weight.normal_(std=0.3, generator=torch.Generator().manual_seed(1))
    prompt = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(input_ids=prompt, **kwargs)
    assert torch.equal(cached, model.generate(input_ids=prompt, use_cache=False, **kwargs))


def test_peft_model_from_pretrained_onto_a_disk_offloaded_base(tmp_path, tiny_model_dir):
    """PEFT's from_pretrained removes accelerate's hooks of an offloading base model and load_adapter re-dispatches
    the PeftModel under LoRA's module names (KeyError for QST, which replaces no backbone module). A QST adapter loads
    onto the base model as dispatched, with a device_map given or not, and into an existing model by load_adapter."""
    from accelerate.hooks import AlignDevicesHook
    from peft import PeftModel

    torch.manual_seed(0)
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    with torch.no_grad():
        for parameter in side_of(trained).parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    trained.eval()
    with torch.no_grad():
        expected = trained(input_ids=IDS).logits
    trained.save_pretrained(tmp_path / "adapter")

    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{index}": "disk" if index == 1 else "cpu" for index in range(3)})
    for attempt, kwargs in enumerate(({}, {"device_map": {f"base_model.model.{k}": v for k, v in device_map.items()}})):
        base = AutoModelForCausalLM.from_pretrained(
            tiny_model_dir, device_map=device_map, offload_folder=str(tmp_path / f"offload{attempt}")
        )
        model = PeftModel.from_pretrained(base, tmp_path / "adapter", offload_folder=str(tmp_path / "o"), **kwargs)
        assert base.hf_device_map == device_map  # kept, and the hooks with it
        assert any(isinstance(getattr(m, "_hf_hook", None), AlignDevicesHook) for m in base.model.layers[1].modules())
        assert all(p.device.type == "cpu" for p in side_of(model).parameters())
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=IDS).logits, expected)
        cached = model.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)
        assert torch.equal(cached, model.generate(input_ids=IDS, max_new_tokens=4, do_sample=False, use_cache=False))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, device_map=device_map, offload_folder=str(tmp_path / "o3"))
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    model.load_adapter(tmp_path / "adapter", adapter_name="default")  # as a Trainer resuming does
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected)


def assert_pruned_side_networks_equal(offloaded, plain):
    """init="pruned" builds the same side network on the offloaded base model as on the plain one."""
    sides = []
    for base in (offloaded, plain):
        torch.manual_seed(0)
        sides.append(side_of(get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned"))).state_dict())
    assert sides[0].keys() == sides[1].keys()
    for name, value in sides[1].items():
        torch.testing.assert_close(sides[0][name], value, msg=name)


def test_pruned_initialisation_reads_disk_offloaded_blocks(tmp_path, tiny_model_dir):
    """init="pruned" reads the backbone's weights outside its forward; blocks and the final norm offloaded to disk keep
    them in accelerate's hooks, which the pruning reads: the same side network as on the plain model."""
    device_map = {"model.embed_tokens": "cpu", "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{index}": "disk" if index else "cpu" for index in range(3)})
    offloaded = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert offloaded.model.layers[2].mlp.down_proj.weight.device.type == "meta"
    assert_pruned_side_networks_equal(offloaded, AutoModelForCausalLM.from_pretrained(tiny_model_dir))


def test_pruned_initialisation_reads_blocks_offloaded_whole(tmp_path, tiny_model_dir):
    """accelerate's dispatch_model(preload_module_classes=[...]) (and load_checkpoint_and_dispatch) puts one offload
    hook on each such block, which loads all of its submodules' weights for the block's forward; the submodules have
    no hook of their own. Pruning refused those blocks as not loaded although the model ran; it reads them from the
    block's hook: the same side network as on the plain model."""
    from accelerate import dispatch_model

    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{index}": "disk" if index else "cpu" for index in range(3)})
    offloaded = dispatch_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), device_map=device_map,
        offload_dir=str(tmp_path / "offload"), preload_module_classes=["LlamaDecoderLayer"],
    )
    assert offloaded.model.layers[2].mlp.down_proj.weight.device.type == "meta"
    assert not hasattr(offloaded.model.layers[2].mlp.down_proj, "_hf_hook")  # the block's hook holds it
    assert_pruned_side_networks_equal(offloaded, AutoModelForCausalLM.from_pretrained(tiny_model_dir))
