"""Published model shapes (integration/real_shapes.py) at the default QSTConfig.

The other tests use tiny models; these build real models' configurations at full depth on the meta device, so the
shrink rules meet real widths, head layouts, rope settings and expert counts: the side network must be r=16 times
narrower, about 1/r^2 of the base model's parameters, and every side parameter (and no base parameter) must get a
gradient. A few run 2 blocks at their real widths in bfloat16 on the CPU, where only real kernels show problems
(e.g. gpt-oss: see tests/test_more_architectures.py).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peft_qst import QSTConfig

from .conftest import load_script


real_shapes = load_script("integration/real_shapes.py", "real_shapes")

#: one model per rule the shrink meets (the script checks all of real_shapes.PUBLISHED; DeepSeek-V3 alone takes 40 s)
ON_META = [
    "Llama-3.1-8B", "Llama-3.2-1B", "Mistral-Nemo-12B", "Mixtral-8x7B", "Qwen2.5-0.5B", "Qwen3-30B-A3B", "Gemma-2-9B",
    "Gemma-3-1B", "Phi-3.5-mini", "Phi-4-mini", "gpt-oss-20b", "DeepSeek-V2-Lite", "Granite-3.1-8B", "Falcon-7B",
    "StarCoder2-7B", "Command-R-35B", "Pythia-6.9B", "GPT-2-XL", "SmolLM3-3B",
]


@pytest.mark.parametrize("name", ON_META)
def test_full_depth_on_the_meta_device(name):
    row = real_shapes.check_meta(name)
    config = real_shapes.build_config(name)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    assert row["side_hidden"] * 16 == hidden
    # 1/r^2 = 0.39% of the base model, give or take the embeddings the side network does not have and the downsamplers
    # it adds
    assert 0.003 < row["trainable_parameters"] / row["base_parameters"] < 0.006, row
    if "meta_forward" in row:  # the eager experts loop reads values the meta device does not have: run below
        assert name == "gpt-oss-20b", row
        return
    assert row["side_parameters_without_gradient"] == [] and row["frozen_parameters_with_gradient"] == []
    assert row["logits_shape"][:2] == [2, 16]


@pytest.mark.parametrize("name", ["Phi-4-mini", "DeepSeek-V2-Lite", "Gemma-3-1B"])
def test_two_blocks_at_the_real_widths_in_bfloat16(name):
    assert real_shapes.check_run(name) == {
        "start_equals_base": True,
        "training_changed_the_output": True,
        "frozen_weights_unchanged": True,
        "cached_generation_equals_uncached": True,
    }


#: families with several residual streams or recurrent blocks, at the defaults of their config classes (the shapes of
#: the checkpoints their docstrings name; Qwen4-Exp's with an indexer of ours) -> the side parameters that get no
#: gradient from a language-model loss, as the backbone's they match do not (an indexer's top-k selection; Gemma 3n's
#: empty per-layer token embedding, which the side trunk never runs, is dropped: tests/test_more_architectures.py).
#: DeepSeek-V4-Flash (284 B parameters, 40 s on the meta device) is checked by the script, and its 2 blocks below
NEW_FAMILIES = {"Gemma-3n-E4B": None, "RecurrentGemma-2B": None, "Hy4-preview": ".indexer."}


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_new_families_at_full_depth_on_the_meta_device(name):
    row = real_shapes.check_meta(name)
    assert row["side_hidden"] * 16 == real_shapes.build_config(name).hidden_size
    assert 0.002 < row["trainable_parameters"] / row["base_parameters"] < 0.006, row
    without_gradient = row["side_parameters_without_gradient"]
    assert all(NEW_FAMILIES[name] in n for n in without_gradient) if NEW_FAMILIES[name] else without_gradient == []
    assert row["frozen_parameters_with_gradient"] == [] and row["logits_shape"][:2] == [2, 16]


def test_side_linear_attention_is_r_times_narrower():
    """Gated DeltaNet heads (Qwen4-Exp, Qwen3-Next) keep their widths and divide their counts by r: with the
    backbone's 16 key and 32 value heads of 128 kept, the side blocks' linear attention was as wide as the backbone's
    (in_proj_qkv 128 -> 8192), 63 M of Qwen4-Exp's 354 M trainable parameters."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            real_shapes.build_config("Qwen4-Exp (defaults)"), dtype=torch.bfloat16
        )
    base_parameters = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, QSTConfig(task_type="CAUSAL_LM"))
    trunk = next(m for m in model.modules() if type(m).__name__ == "QSTLayer").qst_side["default"].trunk
    assert (trunk.config.linear_num_key_heads, trunk.config.linear_num_value_heads) == (1, 2)
    assert tuple(trunk.layers[0].block.linear_attn.in_proj_qkv.weight.shape) == (2 * 128 + 2 * 128, 128)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0.003 < trainable / base_parameters < 0.005


@pytest.mark.parametrize("name", ["RecurrentGemma-2B", "Gemma-3n-E4B", "Qwen4-Exp (defaults)", "DeepSeek-V4-Flash"])
def test_new_families_two_blocks_at_the_real_widths_in_bfloat16(name):
    assert real_shapes.check_run(name) == {
        "start_equals_base": True,
        "training_changed_the_output": True,
        "frozen_weights_unchanged": True,
        "cached_generation_equals_uncached": True,
    }


def test_an_adapter_saved_before_side_linear_heads_loads_with_the_models_linear_heads(tmp_path):
    """Side networks of Gated DeltaNet models kept the model's linear-attention head counts until
    ``side_linear_heads="divided"`` became the default. An ``adapter_config.json`` written before the option existed
    has no such key: it loads as ``"backbone"``, the layout its weights have, with the trained logits; refused with a
    shape error before, it would have been lost."""
    import json

    from peft import PeftModel
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen3_next", vocab_size=64, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=16,
                                  linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2,
                                  moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                  layer_types=["linear_attention", "full_attention"])

    def base():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()

    model = get_peft_model(base(), QSTConfig(task_type="CAUSAL_LM", r=2, side_linear_heads="backbone"))
    side = next(m for m in model.modules() if type(m).__name__ == "QSTLayer").qst_side["default"]
    assert (side.trunk.config.linear_num_key_heads, side.trunk.config.linear_num_value_heads) == (4, 8)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.02 * torch.randn_like(parameter))
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    del saved["side_linear_heads"]  # as the version before the option wrote it
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))

    loaded = PeftModel.from_pretrained(base(), str(tmp_path)).eval()
    assert loaded.peft_config["default"].side_linear_heads == "backbone"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    fresh = get_peft_model(base(), QSTConfig(task_type="CAUSAL_LM", r=2))
    side = next(m for m in fresh.modules() if type(m).__name__ == "QSTLayer").qst_side["default"]
    assert (side.trunk.config.linear_num_key_heads, side.trunk.config.linear_num_value_heads) == (2, 4)


def test_phi4_multimodal_side_network_has_no_image_or_audio_towers(monkeypatch):
    """Phi-4-multimodal at its config class's defaults (5.31 B parameters): the side trunk is handed hidden states,
    never images or audio, and its copies of the image and audio towers (870.5 M parameters, 98% of what was counted
    trainable) are dropped once built: 15.3 M trainable parameters (0.29%), every one of them gets a gradient, as the
    README's "Supported architectures" and its details in docs/architectures.md say."""
    monkeypatch.setitem(real_shapes.PUBLISHED, "Phi-4-multimodal (defaults)", ("phi4_multimodal", {}))
    row = real_shapes.check_meta("Phi-4-multimodal (defaults)")
    assert row["base_parameters"] == 5_308_268_992
    assert row["trainable_parameters"] == 15_330_576
    assert row["side_parameters_without_gradient"] == [] and row["frozen_parameters_with_gradient"] == []
