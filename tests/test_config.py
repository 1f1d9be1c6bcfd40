"""QSTConfig: validation at construction, model-fit checks in get_peft_model, adapter_config.json round trip."""

import json

import pytest
from peft import PeftConfig, get_peft_model

from peft_qst import QSTConfig
from peft_qst.side import QSTUnsupportedModelError

from .conftest import tiny_causal_lm


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"r": 0}, "QSTConfig.r=0"),
        ({"r": -4}, "QSTConfig.r=-4"),
        ({"r": 1.5}, "QSTConfig.r=1.5"),
        ({"r": True}, "QSTConfig.r=True"),
        ({"downsample": "conv"}, "adapter, linear, lora, maxpool, avgpool"),
        ({"downsample_rank": 0}, "downsample_rank=0"),
        ({"activation": "swishy"}, "activation='swishy'"),
        ({"dropout": 1.0}, "[0, 1)"),
        ({"dropout": -0.1}, "dropout=-0.1"),
        ({"side_gate_init": 0.0}, "strictly between 0 and 1"),
        ({"side_gate_init": 1.0}, "strictly between 0 and 1"),
        ({"output_gate_init": float("nan")}, "output_gate_init=nan"),
        ({"side_dtype": "int8"}, "float32, bfloat16, float16"),
        ({"init": "lst"}, "QSTConfig.init='lst'"),
        ({"init": None}, "choose \"random\""),
        ({"target_modules": 3}, "target_modules=3"),
        ({"side_heads": 0}, "QSTConfig.side_heads=0"),
        ({"side_heads": 1.5}, "QSTConfig.side_heads=1.5"),
        ({"side_heads": True}, "QSTConfig.side_heads=True"),
    ],
)
def test_bad_values_are_refused_at_construction(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        QSTConfig(**kwargs)
    assert fragment in str(info.value)


def test_defaults_follow_the_paper():
    config = QSTConfig()
    assert config.peft_type == "QST"
    assert (config.r, config.downsample, config.downsample_rank) == (16, "adapter", 16)
    assert config.init == "random"
    assert config.side_heads is None  # the reference code's head count: the model's own


def test_r_that_does_not_fit_the_model_is_refused_with_the_fitting_values():
    model = tiny_causal_lm()  # hidden 64, 4 heads, rotary
    config = QSTConfig(r=3)
    with pytest.raises(ValueError) as info:
        get_peft_model(model, config)
    message = str(info.value)
    assert "r=3 does not divide hidden_size=64" in message
    assert "Values of r that fit this model: [1, 2, 4, 8]" in message
    # neither the model nor the config was modified
    assert type(model.model).__name__ == "LlamaModel"
    assert config.base_model_signature is None and config.target_modules is None


def test_r_that_breaks_the_head_layout_is_refused():
    # hidden 64 / r=16 = 4 channels for 4 heads -> head_dim 1: odd, unusable by rotary embeddings
    with pytest.raises(ValueError, match="odd or too small side head dimension"):
        get_peft_model(tiny_causal_lm(), QSTConfig(r=16))
    # hidden 64 / r=32 = 2 channels cannot hold 4 heads
    with pytest.raises(ValueError, match="does not split into the model's 4 attention heads"):
        get_peft_model(tiny_causal_lm(), QSTConfig(r=32))


@pytest.mark.parametrize("side_heads, expected", [(None, (4, 2, 4)), (4, (4, 2, 4)), (2, (2, 1, 8)), (1, (1, 1, 16))])
def test_side_heads_set_the_side_blocks_heads_and_key_value_grouping(side_heads, expected):
    import torch

    model = get_peft_model(tiny_causal_lm(), QSTConfig(r=4, side_heads=side_heads))  # 4 heads, 2 key/value heads
    side = model.base_model.model.model.qst_side["default"]
    config = side.trunk.config
    attention = side._blocks[0].block.self_attn
    assert (config.num_attention_heads, config.num_key_value_heads, attention.head_dim) == expected
    heads, kv_heads, head_dim = expected
    assert attention.k_proj.weight.shape == (kv_heads * head_dim, 16)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert attention.q_proj.weight.grad is not None


def test_side_heads_that_do_not_fit_are_refused_with_the_fitting_values():
    with pytest.raises(ValueError) as info:  # hidden 64 / r=4 = 16 side channels: 3 heads do not split them
        get_peft_model(tiny_causal_lm(), QSTConfig(r=4, side_heads=3))
    message = str(info.value)
    assert "does not split into side_heads=3" in message
    assert "Values of r that fit this model with side_heads=3: []" in message
    assert "Values of side_heads that fit r=4: [1, 2, 4, 8]" in message  # 16 channels, even head dimensions
    with pytest.raises(ValueError, match="pruning keeps each of the model's 4 attention heads"):
        get_peft_model(tiny_causal_lm(), QSTConfig(r=4, side_heads=2, init="pruned"))


def test_encoder_decoder_model_is_refused():
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model("t5", d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64)
    model = AutoModelForSeq2SeqLM.from_config(config)
    with pytest.raises(QSTUnsupportedModelError, match="t5.*encoder-decoder"):
        get_peft_model(model, QSTConfig(r=2))


def test_adapter_config_json_round_trips(tmp_path, tiny_model):
    config = QSTConfig(task_type="CAUSAL_LM", r=4, downsample="lora", downsample_rank=8, dropout=0.1,
                       side_gate_init=0.25, output_gate_init=0.01, side_dtype="float32", activation="gelu",
                       init="pruned", side_heads=4)
    model = get_peft_model(tiny_model, config)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "QST"
    assert saved["base_model_signature"] == {
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
    }
    assert len(saved["adapter_weights_sha256"]) == 64
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, QSTConfig)
    for name in ("r", "downsample", "downsample_rank", "dropout", "side_gate_init", "output_gate_init",
                 "side_dtype", "activation", "init", "side_heads", "task_type", "target_modules",
                 "base_model_signature"):
        assert getattr(loaded, name) == getattr(config, name), name
