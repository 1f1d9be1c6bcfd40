"""Models whose config sets widths per layer (transformers' heterogeneous configs, ``per_layer_config``).

Gemma 4 at its config's defaults gives its full-attention layers heads of ``global_head_dim`` (512) beside the others'
``head_dim`` (256), and with ``attention_k_eq_v`` their own number of key/value heads
(``num_global_key_value_heads``): every published Gemma 4 has such a config. QST refused them (it built the side
network from one value of each size); the side config now takes each layer's sizes by the rules the global ones take
(``peft_qst.side_config.side_per_layer_config``), so the side network has the backbone's per-layer structure at 1/r of
its widths. The tiny models here are the sweep's Gemma 4 (``tests/test_more_architectures.py``) with heads of 16 beside
the full-attention layer's 32.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_qst import QSTConfig

from .conftest import bnb_config, parameters_frozen, train_steps
from .test_architectures import check_default_config_end_to_end, generate_both_ways
from .test_more_architectures import V, side_of, tiny, tiny_config
from .test_training_graph import assert_only_side_learns_and_backbone_saves_nothing

#: Gemma 4's full-attention layer (layer 1) with heads twice as wide as the sliding one's (global_head_dim 32, from
#: the sweep's sizes), and also with its own key/value heads (attention_k_eq_v: its keys are its values)
HEAD_WIDTHS = dict(head_dim=16)
HEAD_WIDTHS_AND_KV_HEADS = dict(head_dim=16, attention_k_eq_v=True, num_global_key_value_heads=1)
IDS = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))


def layer_sizes(config, name):
    return [getattr(config.per_layer_config[i], name) for i in range(config.num_hidden_layers)]


def attention_widths(side):
    """(q_proj, k_proj) output widths of each side block's attention."""
    return [
        (layer.self_attn.q_proj.weight.shape[0], layer.self_attn.k_proj.weight.shape[0])
        for layer in side.trunk.layers
    ]


@pytest.mark.parametrize("extra", [HEAD_WIDTHS, HEAD_WIDTHS_AND_KV_HEADS], ids=["head_dim", "head_dim+kv_heads"])
def test_gemma4_with_head_widths_per_layer_runs_end_to_end_and_reloads(extra, tmp_path):
    """The default QSTConfig (r=16, side_heads="auto": one side head of 8 at the side width of 8) on a heterogeneous
    Gemma 4: it starts at the base model, only the side network learns, training changes the output, cached generation
    equals uncached, and save/load gives the same logits. The full-attention layer's side heads are twice as wide as
    the sliding layer's, as the backbone's are."""
    base = tiny("gemma4_text", **extra)
    assert "head_dim" in base.config.per_layer_attributes
    model, adapted = check_default_config_end_to_end(base, IDS)
    side = side_of(model)
    assert layer_sizes(side.trunk.config, "head_dim") == [8, 16]
    assert attention_widths(side) == [(8, 8), (16, 16)]  # one head; one key/value head (of the backbone's 2 and 1)
    signature = model.peft_config["default"].base_model_signature
    assert signature["per_layer_sizes"]["head_dim"] == [16, 32]
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny("gemma4_text", **extra), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, adapted)


def test_per_layer_widths_are_shrunk_by_the_rules_of_the_global_ones(tmp_path):
    """r=4 with 4 side heads (a side width of 32): the sliding layer's heads of 16 become 8, the full-attention layer's
    32 become 16 (the same ratio), and each layer's key/value heads keep its grouping of query heads (2 of 4 heads,
    then 1), so each side block has its backbone block's layout at 1/r of its widths. It trains (the full-attention
    side block gets gradients), generates cached as uncached, and reloads to the same logits."""
    config = QSTConfig(task_type="CAUSAL_LM", r=4, side_heads=4)
    model = get_peft_model(tiny("gemma4_text", **HEAD_WIDTHS_AND_KV_HEADS), config)
    side = side_of(model)
    assert layer_sizes(side.trunk.config, "head_dim") == [8, 16]
    assert layer_sizes(side.trunk.config, "num_key_value_heads") == [2, 1]
    assert attention_widths(side) == [(4 * 8, 2 * 8), (4 * 16, 1 * 16)]
    train_steps(model, IDS, lr=3e-2)  # past the start, where only the zero-initialised output upsample learns
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    full_attention = side.trunk.layers[1].self_attn
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in full_attention.parameters())
    model.zero_grad()
    model.eval()
    cached, uncached = generate_both_ways(model, IDS)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        adapted = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny("gemma4_text", **HEAD_WIDTHS_AND_KV_HEADS), str(tmp_path)).eval()
    assert layer_sizes(side_of(reloaded).trunk.config, "head_dim") == [8, 16]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, adapted)


def test_gemma4_with_widths_per_layer_in_4bit(tmp_path):
    """The same on the model loaded back in bitsandbytes 4-bit (its per_layer_config round-trips through its
    config.json): the side network trains and the backbone keeps nothing for backward, cached generation equals
    uncached, and the adapter reloads onto a fresh 4-bit model to the same logits."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("gemma4_text", **HEAD_WIDTHS_AND_KV_HEADS))
    base.save_pretrained(tmp_path / "base")
    # linear layers bitsandbytes' CPU kernel cannot run at these tiny widths (outputs not a multiple of 32, inputs not
    # a multiple of its 64-wide blocks: the per-layer input gates of 16) stay unquantized, as in arch_sweep.py
    quantization = bnb_config()
    quantization.llm_int8_skip_modules = ["lm_head"] + sorted(
        name for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear) and (module.out_features % 32 or module.in_features % 64)
    )
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization)
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    assert base.config.per_layer_attributes == {"head_dim", "num_key_value_heads"}
    with torch.no_grad(), parameters_frozen(base):
        expected = base(input_ids=IDS).logits
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, side_heads=4))
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected)
    assert attention_widths(side_of(model)) == [(32, 16), (64, 16)]
    model.train()
    assert_only_side_learns_and_backbone_saves_nothing(model, IDS)
    train_steps(model, IDS, lr=3e-2)
    cached, uncached = generate_both_ways(model, IDS)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        adapted = model(input_ids=IDS).logits
    assert not torch.allclose(adapted, expected)
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=IDS).logits, adapted)


@pytest.mark.parametrize(
    "other, recorded, found",
    [
        # another full-attention head width, the global sizes the same
        (dict(head_dim=16, global_head_dim=64), "{'head_dim': [16, 32]}", "{'head_dim': [16, 64]}"),
        # a homogeneous Gemma 4 (global_head_dim equal to head_dim), which records no per-layer sizes
        (dict(head_dim=16, global_head_dim=16), "{'head_dim': [16, 32]}", "None"),
    ],
    ids=["other-per-layer-widths", "homogeneous"],
)
def test_an_adapter_does_not_load_onto_a_gemma4_of_other_per_layer_widths(other, recorded, found, tmp_path):
    """The signature records the sizes set per layer: an adapter of one Gemma 4 shape is refused on another whose
    global sizes are the same but whose layers differ (its side blocks would be of other shapes), naming them."""
    get_peft_model(tiny("gemma4_text", **HEAD_WIDTHS), QSTConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"they differ in per_layer_sizes {recorded} against {found}")):
        PeftModel.from_pretrained(tiny("gemma4_text", **other), str(tmp_path))


def test_an_adapter_of_a_homogeneous_gemma4_does_not_load_onto_a_heterogeneous_one(tmp_path):
    """The other way round: the homogeneous model's adapter records no per-layer sizes (as adapters saved before
    they were recorded), and is refused on a model that sets them, rather than failing on its weights' shapes."""
    homogeneous = tiny("gemma4_text", head_dim=16, global_head_dim=16)
    assert not homogeneous.config.per_layer_attributes
    get_peft_model(homogeneous, QSTConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    expected = "they differ in per_layer_sizes None against {'head_dim': [16, 32]}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        PeftModel.from_pretrained(tiny("gemma4_text", **HEAD_WIDTHS), str(tmp_path))


def test_a_per_layer_head_width_that_does_not_scale_is_refused_naming_the_layer():
    """A full-attention head width of 18 beside 16: at r=16 the side width of 8 splits into no heads whose width
    scales to 18/16 of it as a whole, even number of channels (one head of 8 would give 9). Refused, naming the layer,
    its value and the r values that fit; an explicit side_heads is refused with the side_heads that fit."""
    with pytest.raises(ValueError, match=re.escape(
            "with one side head, its side head dimension of 8 scales to an odd one (9) for layer 1's head_dim 18 (the "
            "others' is 16), which rotary embeddings cannot use. Values of r that fit this model: [1, 2, 4, 8].")):
        get_peft_model(tiny("gemma4_text", head_dim=16, global_head_dim=18), QSTConfig(task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match=re.escape(
            "its side head dimension of 4 does not scale to layer 1's head_dim 18 (the others' is 16): 4 x 18 / 16 "
            "is not a whole number of channels. Values of r that fit this model with side_heads=2: [1, 2, 4]")):
        get_peft_model(tiny("gemma4_text", head_dim=16, global_head_dim=18),
                       QSTConfig(task_type="CAUSAL_LM", side_heads=2))
    model = get_peft_model(tiny("gemma4_text", head_dim=16, global_head_dim=18), QSTConfig(task_type="CAUSAL_LM", r=8))
    assert layer_sizes(side_of(model).trunk.config, "head_dim") == [16, 18]



@pytest.mark.parametrize(
    "extra", [dict(head_dim=32), HEAD_WIDTHS_AND_KV_HEADS], ids=["homogeneous", "head_dim+kv_heads"]
)
def test_gemma4_with_kv_shared_layers_generates(extra):
    """Gemma 4's top layers can reuse the keys and values of earlier ones (``num_kv_shared_layers``, as in Gemma 3n),
    and its trunk takes ``logits_to_keep``: in generate's prefill (``logits_to_keep=1``) it runs the prompt's other
    positions through none of the blocks from its first KV-shared one on. QST's side networks read every block's states
    at every position, and the first generate was refused ("its blocks pass hidden states of shape (2, 9, 128) between
    them, not (2, 1, 128)"), homogeneous or not. Both trunks now run every position: the default config trains,
    greedy generation cached equals uncached, and ``logits_to_keep=1`` gives a full forward's last logits."""
    base = tiny("gemma4_text", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                num_kv_shared_layers=2, **extra)
    assert base.model.first_kv_shared_layer_idx == 2
    model, adapted = check_default_config_end_to_end(base, IDS)
    with torch.no_grad():
        last = model(input_ids=IDS, logits_to_keep=1).logits
    assert last.shape == (2, 1, V)
    torch.testing.assert_close(last[:, 0], adapted[:, -1])
