"""QSTConfig: validation at construction, model-fit checks in get_peft_model, adapter_config.json round trip."""

import json

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model

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
        # zero: with the upsample starting at zero too, neither gets a gradient and the side network never trains
        ({"output_gate_init": 0.0}, "finite, nonzero"),
        ({"output_gate_init": 0}, "neither gets a gradient"),
        # a bare string reached PEFT, which took each character for a module name
        ({"modules_to_save": "lm_head"}, "modules_to_save=['lm_head']"),
        ({"modules_to_save": [3]}, "give a list of module names"),
        ({"modules_to_save": 3}, "QSTConfig.modules_to_save=3"),
        ({"modules_to_save": ("lm_head", None)}, "give a list of module names"),
        ({"side_dtype": "int8"}, "float32, bfloat16, float16"),
        ({"init": "lst"}, "QSTConfig.init='lst'"),
        ({"init": None}, "choose \"random\""),
        ({"target_modules": 3}, "target_modules=3"),
        ({"side_heads": 0}, "QSTConfig.side_heads=0"),
        ({"side_heads": 1.5}, "QSTConfig.side_heads=1.5"),
        ({"side_heads": True}, "QSTConfig.side_heads=True"),
        # "auto" picks the head width nearest the model's by ratio (one head of 36 for SmolLM2's heads of 64), which
        # the message described as "heads of the model's head dimension"
        ({"side_heads": -2}, "'auto' (heads about as wide as the model's)"),
        ({"backbone_lora_layers": -1}, "QSTConfig.backbone_lora_layers=-1"),
        ({"backbone_lora_layers": 1.0}, "strictly between 0 and 1"),
        ({"backbone_lora_layers": 0.0}, "strictly between 0 and 1"),
        ({"backbone_lora_layers": 2.5}, "backbone_lora_layers=2.5"),
        ({"backbone_lora_layers": True}, "backbone_lora_layers=True"),
        ({"task_type": "SEQ_2_SEQ_LM"}, "task_type='CAUSAL_LM'"),
        # PEFT's own refusal ("Invalid task type: 'causal_lm'") named neither the field nor the accepted spelling
        ({"task_type": "causal_lm"}, "QSTConfig.task_type='causal_lm' is invalid (PEFT matches the name exactly: "
                                     "did you mean 'CAUSAL_LM'?)"),
        ({"task_type": "LM"}, "choose one of 'CAUSAL_LM', 'SEQ_CLS'"),
        # a non-string entry failed inside PEFT with "'int' object has no attribute 'split'"
        ({"target_modules": ["model", 3]}, "QSTConfig.target_modules=['model', 3]"),
        # an empty name, a suffix of every module name, failed in PEFT ("cannot be applied to modules of type QSTLayer")
        ({"modules_to_save": ["lm_head", ""]}, "(non-empty strings)"),
        # any truthy value froze the adapter: get_peft_model left nothing trainable
        ({"inference_mode": "false"}, "QSTConfig.inference_mode='false'"),
        ({"inference_mode": 0}, "give True (the adapter frozen, for inference) or False"),
        # loading compared it with the weights' digest and blamed the weights file
        ({"adapter_weights_sha256": "abc"}, "64 hexadecimal digits"),
        ({"adapter_weights_sha256": 3}, "QSTConfig.adapter_weights_sha256=3"),
        # a digest with anything after its 64 digits is none either
        ({"adapter_weights_sha256": "0" * 65}, "64 hexadecimal digits"),
        ({"side_linear_heads": "narrow"}, "QSTConfig.side_linear_heads='narrow' is invalid"),
        # zero scales every backbone LoRA delta to nothing: those adapters would never change the output
        ({"backbone_lora_alpha": 0}, "QSTConfig.backbone_lora_alpha=0 is invalid"),
        ({"backbone_lora_alpha": float("nan")}, "QSTConfig.backbone_lora_alpha=nan is invalid"),
        ({"backbone_lora_alpha": "16"}, "QSTConfig.backbone_lora_alpha='16' is invalid"),
        # the recorded fields of a hand-edited adapter_config.json, refused naming what is wrong with them
        ({"base_model_fingerprint": [[0, 1, 0.5]]}, "it is [[0, 1, 0.5]] (of type list) where a dict is expected"),
        # a name of blanks matches no module as PEFT matches them, as an empty one does
        ({"modules_to_save": ["  "]}, "(non-empty strings)"),
        ({"task_type": " causal_lm "}, "did you mean 'CAUSAL_LM'?"),
    ],
)
def test_bad_values_are_refused_at_construction(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        QSTConfig(**kwargs)
    assert fragment in str(info.value)


SIGNATURE = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4}


@pytest.mark.parametrize(
    "entries, fragment",
    [
        ({"sizes_of": "encoder"}, "its sizes_of is 'encoder' where \"decoder\" is expected"),
        ({"text_model_type": 3}, "its text_model_type is 3 (of type int) where a model type"),
        ({"intermediate_size": [128, "128"]}, "its intermediate_size is [128, '128'] (of type list) where an integer "
                                              "(or a list of them, one per layer)"),
        ({"per_layer_sizes": {"head_dim": 512}}, "its per_layer_sizes is {'head_dim': 512} where a dict of sizes set "
                                                 "per layer, each a list of one integer (or None) per layer"),
    ],
    ids=["sizes-of", "text-model-type", "per-layer-width", "per-layer-sizes"],
)
def test_signature_entries_are_accepted_as_get_peft_model_writes_them_and_refused_otherwise(entries, fragment):
    """What ``get_peft_model`` writes into ``base_model_signature`` is accepted (a list of FFN widths, one per layer, as
    Gemma 3n's config holds them; the decoder's sizes, ``"sizes_of": "decoder"``; the sizes a heterogeneous config
    sets per layer, ``per_layer_sizes``, as Gemma 4's head widths), and any other value of those
    entries is refused by name when the config is built: loading compares the signature entry by entry, so a value
    of another type or meaning would only be reported as the model differing from it."""
    QSTConfig(base_model_signature={**SIGNATURE, "intermediate_size": [128, 256], "sizes_of": "decoder",
                                    "text_model_type": "llama", "per_layer_sizes": {"head_dim": [16, 16, 32]}})
    with pytest.raises(ValueError) as info:
        QSTConfig(base_model_signature={**SIGNATURE, **entries})
    assert f"QSTConfig.base_model_signature is invalid: {fragment}" in str(info.value)


@pytest.mark.parametrize(
    "fingerprint, fragment",
    [
        ({"rows": 0}, "its rows is 0, where a positive int is expected"),
        # a negative column would index from the end and compare another entry than the one recorded
        ({"rows": 8, "input_embeddings": [[0, -1, 0.5]]}, "its input_embeddings is not a list of [row, column, value]"),
    ],
    ids=["no-rows", "negative-column"],
)
def test_a_damaged_base_model_fingerprint_is_refused_by_its_entry(fingerprint, fragment):
    QSTConfig(base_model_fingerprint={"rows": 8, "name_or_path": "base", "input_embeddings": [[0, 3, 0.5]]})
    with pytest.raises(ValueError) as info:
        QSTConfig(base_model_fingerprint=fingerprint)
    assert f"QSTConfig.base_model_fingerprint is invalid: {fragment}" in str(info.value)


def test_peft_type_reads_as_a_member_of_pefts_enum():
    """PEFT's PeftType is a closed enum: QST's type is the string "QST" with the members' name, value, str and repr."""
    from peft import PeftType

    peft_type, lora = QSTConfig().peft_type, PeftType.LORA
    assert peft_type == "QST" and peft_type.name == peft_type.value == "QST"
    assert (str(peft_type), repr(peft_type)) == ("PeftType.QST", "<PeftType.QST: 'QST'>")
    assert (str(lora), repr(lora)) == ("PeftType.LORA", "<PeftType.LORA: 'LORA'>")  # the same forms as PEFT's own


@pytest.mark.parametrize("dtype, name", [(torch.float32, "float32"), (torch.bfloat16, "bfloat16"),
                                         (torch.float16, "float16")])
def test_side_dtype_given_as_a_torch_dtype_is_kept_as_its_name(dtype, name, tmp_path):
    """``side_dtype=torch.bfloat16``, as transformers' ``dtype=`` takes a dtype, was refused ("choose one of float32,
    bfloat16, float16"); it is the same choice, kept as its name so that ``adapter_config.json`` stays JSON, and the
    side network takes that dtype."""
    config = QSTConfig(task_type="CAUSAL_LM", r=4, side_dtype=dtype)
    assert config.side_dtype == name
    model = get_peft_model(tiny_causal_lm(), config)
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {dtype}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["side_dtype"] == name
    assert PeftConfig.from_pretrained(tmp_path).side_dtype == name
    with pytest.raises(ValueError, match="side_dtype='float64' is invalid"):
        QSTConfig(side_dtype=torch.float64)


def test_side_dtype_set_as_a_torch_dtype_after_the_config_was_built(tmp_path):
    """``config.side_dtype = torch.bfloat16`` after ``QSTConfig(...)`` (as for a config read with from_pretrained)
    passes no argument check: binding the config failed with a bare "attribute name must be string, not
    'torch.dtype'". It is kept as its name there, as the constructor keeps it, and a dtype QST has no choice for is
    refused by name."""
    config = QSTConfig(task_type="CAUSAL_LM", r=4)
    config.side_dtype = torch.bfloat16
    model = get_peft_model(tiny_causal_lm(), config)
    assert {p.dtype for n, p in model.named_parameters() if p.requires_grad} == {torch.bfloat16}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["side_dtype"] == "bfloat16"
    assert {p.dtype for n, p in PeftModel.from_pretrained(tiny_causal_lm(), str(tmp_path)).named_parameters()
            if ".qst_side." in n} == {torch.bfloat16}
    config = QSTConfig(task_type="CAUSAL_LM", r=4)
    config.side_dtype = torch.float64
    with pytest.raises(ValueError, match="side_dtype='float64' is invalid"):
        get_peft_model(tiny_causal_lm(), config)


def test_defaults_follow_the_paper():
    config = QSTConfig()
    assert config.peft_type == "QST"
    assert (config.r, config.downsample, config.downsample_rank) == (16, "adapter", 16)
    assert config.init == "random"
    # not the paper's reference code (the model's head count, None): heads of the model's head dimension, chosen per
    # model by get_peft_model (test_auto_side_heads_keep_the_models_head_dimension)
    assert config.side_heads == "auto"


def test_r_that_does_not_fit_the_model_is_refused_with_the_fitting_values():
    model = tiny_causal_lm()  # hidden 64, 4 heads, rotary
    config = QSTConfig(r=3)
    with pytest.raises(ValueError) as info:
        get_peft_model(model, config)
    message = str(info.value)
    assert "r=3 does not divide hidden_size=64" in message
    assert "Values of r that fit this model: [1, 2, 4, 8, 16, 32]" in message
    # neither the model nor the config was modified
    assert type(model.model).__name__ == "LlamaModel"
    assert config.base_model_signature is None and config.target_modules is None


def test_r_that_breaks_the_head_layout_is_refused():
    # with the model's heads: hidden 64 / r=16 = 4 channels for 4 heads -> head_dim 1, unusable by rotary embeddings
    with pytest.raises(ValueError, match="odd or too small side head dimension"):
        get_peft_model(tiny_causal_lm(), QSTConfig(r=16, side_heads=None))
    # hidden 64 / r=32 = 2 channels cannot hold 4 heads
    with pytest.raises(ValueError, match="does not split into the model's 4 attention heads"):
        get_peft_model(tiny_causal_lm(), QSTConfig(r=32, side_heads=None))
    # "auto" fits both with one head; one channel (r=64) is no head for rotary embeddings whatever the count
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_causal_lm(), QSTConfig(r=64))
    message = str(info.value)
    assert "side hidden size of 1, which no number of heads splits into heads of an even dimension" in message
    assert "Values of r that fit this model: [1, 2, 4, 8, 16, 32]" in message


def test_r_kept_from_a_lora_config_is_named_as_such_when_refused():
    """A QLoRA script switched to QST by renaming LoraConfig keeps its r (64 in many recipes), which reads as the
    reduction factor here; where it does not fit, the refusal listed the fitting values without saying that r is not
    a LoRA rank nor that leaving it out (the default, 16) is the fix, and offered side_heads="auto", which the config
    already had, as the way out."""
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_causal_lm(), QSTConfig(r=64, task_type="CAUSAL_LM"))  # hidden 64: one channel
    message = str(info.value)
    assert "Values of r that fit this model: [1, 2, 4, 8, 16, 32]" in message
    # the config already has side_heads="auto": it was offered as the way out, with the same list of values
    assert "side_heads='auto' (the default" not in message
    assert message.endswith(
        "Note that r is the side network's reduction factor here, not a LoRA rank: leave it out to use the default, "
        "16 (the paper's), which fits this model."
    )
    # the default itself refused (here by the model's own heads): no reminder to leave it out
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_causal_lm(), QSTConfig(r=16, side_heads=None))
    assert "not a LoRA rank" not in str(info.value)


def test_a_fitting_r_gets_no_lora_rank_reminder_when_side_heads_is_refused():
    """A state-space model has no attention heads, so ``side_heads=2`` is what its refusal names, whatever r is; at
    r=32, which fits the model (it is in the listed values), the reminder told to leave r out to use 16, "which fits
    this model", as if r were at fault, and that config (still with ``side_heads=2``) is refused again."""
    from .test_more_architectures import tiny

    with pytest.raises(ValueError) as info:
        get_peft_model(tiny("mamba"), QSTConfig(task_type="CAUSAL_LM", r=32, side_heads=2))
    message = str(info.value)
    assert "side_heads=2 sets the side blocks' attention heads, and this state-space model has none" in message
    assert "Values of r that fit this model: [1, 2, 4, 8, 16, 32, 64]." in message
    assert "not a LoRA rank" not in message
    # an r that does not fit the same model still gets the reminder, with the default that fits
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny("mamba"), QSTConfig(task_type="CAUSAL_LM", r=3))
    assert str(info.value).endswith("not a LoRA rank: leave it out to use the default, 16 (the paper's), which fits "
                                    "this model.")


@pytest.mark.parametrize("r, heads, kv_heads, head_dim", [(4, 1, 1, 16), (2, 2, 1, 16), (1, 4, 2, 16), (16, 1, 1, 4)])
def test_auto_side_heads_keep_the_models_head_dimension(r, heads, kv_heads, head_dim, tmp_path):
    model = get_peft_model(tiny_causal_lm(), QSTConfig(r=r))  # hidden 64, 4 heads of 16, 2 key/value heads
    side = model.base_model.model.model.qst_side["default"]
    attention = side._blocks[0].block.self_attn
    config = side.trunk.config
    assert (config.num_attention_heads, config.num_key_value_heads, attention.head_dim) == (heads, kv_heads, head_dim)
    # the choice is written into the config, and so into the saved adapter
    assert model.peft_config["default"].side_heads == heads
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["side_heads"] == heads


def test_auto_side_heads_for_real_model_shapes():
    from transformers import LlamaConfig

    from peft_qst.side_config import auto_side_heads

    smollm2_135m = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3)
    llama2_7b = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32)
    assert auto_side_heads(smollm2_135m, 16) == 1  # 36 channels: one head of 36 (the paper's layout: 9 of 4)
    assert auto_side_heads(smollm2_135m, 4) == 2  # 144 channels: two heads of 72, the nearest to 64
    assert auto_side_heads(llama2_7b, 16) == 2  # 256 channels: two heads of 128 (the paper's layout: 32 of 8)
    assert auto_side_heads(LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=32), 16) == 1


def test_auto_side_heads_match_the_head_dimension_by_ratio_on_falcon_7b():
    """Falcon-7B's real widths (4544 = 71 heads of 64, multi-query): at r=16 its 284 side channels split into even
    head dimensions of 284, 142, 4 and 2 only. The nearest to 64 by difference is 4 (71 heads: the paper's layout,
    which "auto" exists to avoid, 3.3x slower per side step), by ratio 142; the side trunk runs and generates with
    2 heads of 142. One block, a small FFN and vocabulary: the head layout depends on the width and heads only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "falcon", hidden_size=4544, num_attention_heads=71, multi_query=True, new_decoder_architecture=False,
        parallel_attn=True, bias=False, alibi=False, num_hidden_layers=1, ffn_hidden_size=4544, vocab_size=64,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config).eval(), QSTConfig(task_type="CAUSAL_LM"))
    assert model.peft_config["default"].side_heads == 2
    side = model.base_model.model.transformer.qst_side["default"]
    assert (side.trunk.config.num_attention_heads, side._blocks[0].block.self_attention.head_dim) == (2, 142)
    torch.nn.init.normal_(side.upsample.weight, std=0.05)  # the side network's output now moves the logits
    ids = torch.tensor([[5, 9, 11, 3, 7]])
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, **kwargs), model.generate(input_ids=ids, use_cache=False, **kwargs))


def test_model_heads_that_fit_no_r_are_refused_naming_auto_heads_that_work():
    """gpt-oss-20b's real widths: 2880 channels in 64 heads of 64. With the model's heads (side_heads=None, the paper's
    layout) every r gives an odd side head dimension (2880 / r / 64), so the refusal could list no r that fits; it
    names side_heads="auto", which fits r=16 with 3 heads of 60, and that alternative builds and runs. One block, two
    experts and a small vocabulary: the head layout depends on the width and heads only."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "gpt_oss", hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
        head_dim=64, num_hidden_layers=1, layer_types=["sliding_attention"], sliding_window=128,
        num_local_experts=2, num_experts_per_tok=1, vocab_size=64,
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError) as info:
        get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", side_heads=None))
    message = str(info.value)
    assert "Values of r that fit this model: []" in message
    assert "side_heads='auto' (the default: heads about as wide as the model's) fits r=16 (3 heads of 60)" in message
    ids = torch.tensor([[5, 9, 11, 3]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    assert model.peft_config["default"].side_heads == 3
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_pruned_init_refusal_names_the_r_values_and_the_random_init_alternative():
    """init="pruned" keeps the model's heads; where they do not fit r, the refusal lists the r values that fit and
    says that init="random" (side_heads="auto") fits this r."""
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_causal_lm(), QSTConfig(r=32, init="pruned"))  # 2 channels for 4 heads
    message = str(info.value)
    assert "Values of r that fit this model: [1, 2, 4, 8]" in message
    assert "init='pruned' keeps the model's heads; with init='random', side_heads='auto' (the default) fits r=32" in message


def test_pruned_init_keeps_the_models_heads_under_auto():
    model = get_peft_model(tiny_causal_lm(), QSTConfig(r=4, init="pruned"))
    assert model.peft_config["default"].side_heads is None
    assert model.base_model.model.model.qst_side["default"].trunk.config.num_attention_heads == 4


def test_adapter_config_without_side_heads_loads_with_the_models_heads(tmp_path):
    """An adapter saved before side_heads existed has no such key: its side blocks have the model's heads."""
    model = get_peft_model(tiny_causal_lm(), QSTConfig(r=4, side_heads=None))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    del saved["side_heads"]
    path.write_text(json.dumps(saved))
    loaded = QSTConfig.from_pretrained(tmp_path)
    assert loaded.side_heads is None
    reloaded = PeftModel.from_pretrained(tiny_causal_lm(), tmp_path)
    assert reloaded.base_model.model.model.qst_side["default"].trunk.config.num_attention_heads == 4


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


@pytest.mark.parametrize(
    "side_heads, expected", [("auto", (4, 1, 36)), (6, (6, 2, 24)), (3, (3, 1, 48)), (8, (8, 1, 18))]
)
def test_side_heads_that_the_grouping_does_not_divide_get_one_key_value_head(side_heads, expected):
    """SmolLM2-135M's layout (9 heads, 3 key/value heads: 3 query heads each) at 288 channels, r=2 (144 side
    channels): a side head count the grouping divides keeps it (6 heads: 2 key/value heads; 3: 1), any other gets one
    key/value head for all ("auto": 4 heads of 36, the nearest to the backbone's 32; 8 heads: not 8 // 3 = 2, groups
    of 4 that are not the backbone's grouping), not one per query head."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=288, intermediate_size=64, num_hidden_layers=1, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=64)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), QSTConfig(r=2, side_heads=side_heads))
    side = model.base_model.model.model.qst_side["default"]
    attention = side._blocks[0].block.self_attn
    heads, kv_heads, head_dim = expected
    assert (side.trunk.config.num_attention_heads, side.trunk.config.num_key_value_heads) == (heads, kv_heads)
    assert attention.k_proj.weight.shape == (kv_heads * head_dim, 144)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert attention.k_proj.weight.grad is not None


def test_side_heads_that_do_not_fit_are_refused_with_the_fitting_values():
    with pytest.raises(ValueError) as info:  # hidden 64 / r=4 = 16 side channels: 3 heads do not split them
        get_peft_model(tiny_causal_lm(), QSTConfig(r=4, side_heads=3))
    message = str(info.value)
    assert "does not split into side_heads=3" in message
    assert "Values of r that fit this model with side_heads=3: []" in message
    assert "Values of side_heads that fit r=4: [1, 2, 4, 8]" in message  # 16 channels, even head dimensions
    with pytest.raises(ValueError, match="pruning keeps each of the model's 4 attention heads"):
        get_peft_model(tiny_causal_lm(), QSTConfig(r=4, side_heads=2, init="pruned"))


def test_side_heads_refusal_lists_every_count_that_fits_and_no_counts_where_r_does_not_divide():
    """A model without rotary embeddings (GPT-2) takes side heads of any width, one channel included: at r=16 its 8
    side channels fit 1, 2, 4 and 8 heads, all listed where 3 are refused. An r that does not divide the hidden size
    fits no head count at all: the refusal names the r values that fit, and lists no side_heads (an empty list
    that said no count fits, where another r is the fix)."""
    gpt2 = dict(n_embd=128, n_layer=1, n_head=4, vocab_size=64, n_positions=64)
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_causal_lm("gpt2", **gpt2), QSTConfig(r=16, side_heads=3))
    assert "Values of side_heads that fit r=16: [1, 2, 4, 8]." in str(info.value)
    with pytest.raises(ValueError) as info:
        get_peft_model(tiny_causal_lm("gpt2", **gpt2), QSTConfig(r=3, side_heads=2))
    message = str(info.value)
    assert "r=3 does not divide hidden_size=128" in message
    assert "Values of r that fit this model with side_heads=2: [1, 2, 4, 8, 16, 32, 64]." in message
    assert "Values of side_heads" not in message


def test_encoder_decoder_model_is_refused():
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.for_model("t5", d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64)
    model = AutoModelForSeq2SeqLM.from_config(config)
    with pytest.raises(QSTUnsupportedModelError, match="t5.*encoder-decoder") as info:
        get_peft_model(model, QSTConfig(r=2))
    # the refusal names what to do instead, as the encoder-only one does
    assert "Use a decoder-only model" in str(info.value) and "LoRA" in str(info.value)


def test_block_count_that_matches_no_block_list_is_refused_naming_the_fix():
    """A config whose num_hidden_layers no longer matches the blocks (changed after loading) was refused with a bare
    "cannot find the list of 2 decoder blocks in LlamaModel": the refusal names the list it found and the fix."""
    model = tiny_causal_lm()  # 3 blocks
    model.config.num_hidden_layers = 2
    with pytest.raises(QSTUnsupportedModelError) as info:
        get_peft_model(model, QSTConfig(r=4))
    message = str(info.value)
    assert "num_hidden_layers=2" in message
    assert "'layers' holds 3" in message
    assert "set it back to the number of blocks the model has" in message


def test_block_count_of_a_whisper_decoder_is_named_as_its_config_holds_it():
    """A decoder run alone (WhisperForCausalLM) counts its blocks in decoder_layers (num_hidden_layers is the
    encoder's): a refusal named num_hidden_layers with the decoder's count, a value the config does not hold there."""
    from transformers import WhisperConfig, WhisperForCausalLM

    model = WhisperForCausalLM(WhisperConfig(
        vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, d_model=32,
        decoder_layers=2, encoder_layers=4, decoder_attention_heads=2,
        encoder_attention_heads=2, decoder_ffn_dim=64, encoder_ffn_dim=64, max_target_positions=32,
        max_source_positions=16, num_mel_bins=8,
    ))
    model.config.decoder_layers = 3
    with pytest.raises(QSTUnsupportedModelError, match=r"config\.decoder_layers=3 blocks.*'layers' holds 2.* Where "
                       r"decoder_layers was changed"):
        get_peft_model(model, QSTConfig(task_type="CAUSAL_LM", r=4))


def test_model_without_a_transformers_config_is_refused_naming_the_fix():
    import torch

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, inputs_embeds=None):
            return self.linear(inputs_embeds)

    with pytest.raises(QSTUnsupportedModelError, match="has no transformers config") as info:
        get_peft_model(Plain(), QSTConfig(r=2))
    assert "AutoModelForCausalLM.from_pretrained" in str(info.value)


@pytest.mark.parametrize("head", ["SequenceClassification", "MaskedLM"])
def test_encoder_only_model_is_refused(head):
    """BERT has get_decoder() and takes inputs_embeds, but attends both ways and classifies from its pooler: the
    side network would train without changing anything."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.for_model("bert", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=128)
    model = getattr(transformers, f"AutoModelFor{head}").from_config(config)
    with pytest.raises(QSTUnsupportedModelError, match="bert model: its attention is bidirectional"):
        get_peft_model(model, QSTConfig(task_type="SEQ_CLS" if head == "SequenceClassification" else None, r=4))


@pytest.mark.parametrize("first", ["lora", "qst"])
def test_a_peft_model_is_refused_and_left_as_it_was(first):
    """get_peft_model on a PeftModel nested a second one with only PEFT's warning: the first adapter's trainable
    weights (a LoRA inside the trunk QST runs under no_grad) never trained, and the saved adapter, named through both
    wrappers, loaded onto no base model. The refusal comes before the QST config could replace the first adapter's."""
    from peft import LoraConfig

    first_config = LoraConfig(r=4, target_modules=["q_proj"]) if first == "lora" else QSTConfig(r=4)
    model = get_peft_model(tiny_causal_lm(), first_config)
    with pytest.raises(QSTUnsupportedModelError, match=r"given a PeftModel .*merge_and_unload\(\)"):
        get_peft_model(model, QSTConfig(task_type="CAUSAL_LM", r=4))
    assert model.peft_config == {"default": first_config}
    assert type(model.get_base_model().model).__name__ == ("LlamaModel" if first == "lora" else "QSTLayer")


def test_a_model_whose_config_has_no_model_type_is_named_by_its_class():
    """A bare PretrainedConfig has model_type "": the refusal read "QST does not support the  model"."""
    import torch
    from transformers import PretrainedConfig

    class Custom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = PretrainedConfig()
            self.linear = torch.nn.Linear(4, 4)

    with pytest.raises(QSTUnsupportedModelError, match="does not support the Custom model: its config has no hidden"):
        get_peft_model(Custom(), QSTConfig(r=2))


def test_one_config_applies_to_several_base_models():
    """As with a LoraConfig, the same QSTConfig object can be applied to several models: each binds it anew ("auto"
    heads, a fraction of the depth) and keeps its own record."""
    config = QSTConfig(task_type="CAUSAL_LM", r=4, backbone_lora_layers=0.5)
    small = get_peft_model(tiny_causal_lm(num_hidden_layers=2), config)
    wide = get_peft_model(tiny_causal_lm(hidden_size=128, intermediate_size=256, num_hidden_layers=6), config)
    third = get_peft_model(tiny_causal_lm(num_hidden_layers=4), config)
    assert third.peft_config["default"].backbone_lora_layers == 2
    assert small.peft_config["default"].backbone_lora_layers == 1
    assert wide.peft_config["default"].backbone_lora_layers == 3
    assert small.peft_config["default"].base_model_signature["hidden_size"] == 64
    assert wide.peft_config["default"].base_model_signature["hidden_size"] == 128


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
        "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128, "vocab_size": 128,
    }
    assert len(saved["adapter_weights_sha256"]) == 64
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, QSTConfig)
    config = model.peft_config["default"]  # the adapter's copy, with what get_peft_model recorded
    for name in ("r", "downsample", "downsample_rank", "dropout", "side_gate_init", "output_gate_init",
                 "side_dtype", "activation", "init", "side_heads", "task_type", "target_modules",
                 "base_model_signature"):
        assert getattr(loaded, name) == getattr(config, name), name


def test_the_signature_of_a_model_whose_config_names_no_key_value_heads_records_its_attention_heads():
    """GPT-2's config has no num_key_value_heads: every head has its own keys and values, so the signature records
    as many key/value heads as attention heads (the head layout an adapter of a grouped-query model is told apart
    by), and the head width the model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), QSTConfig(task_type="CAUSAL_LM", r=4))
    assert model.peft_config["default"].base_model_signature == {
        "model_type": "gpt2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "head_dim": 16, "vocab_size": 128,
    }


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(target_modules="all-linear"), "target_modules names the decoder trunk"),
        (dict(target_modules=["q_proj", "v_proj"]), "target_modules names the decoder trunk"),
        (dict(target_modules=r".*proj"), "is not a decoder trunk"),
        (dict(modules_to_save=["embed_tokens", "lm_head"]), r"\['embed_tokens'\] lie inside the decoder trunk"),
        (dict(modules_to_save=["norm"]), "lie inside the decoder trunk"),
    ],
    ids=["all-linear", "lora-targets", "regex", "embeddings", "norm"],
)
def test_lora_settings_left_in_the_config_are_refused_with_what_they_mean_for_qst(kwargs, fragment):
    """Swapping LoraConfig(...) for QSTConfig(...) may carry LoRA's target_modules or an embeddings entry in
    modules_to_save along: the error says what the field means for QST."""
    with pytest.raises(ValueError, match=fragment):
        get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4, **kwargs))


@pytest.mark.parametrize("target_modules", ["model", ["model"]], ids=["regex", "list"])
def test_target_modules_naming_the_trunk_build_what_the_default_builds(target_modules):
    """target_modules names the decoder trunk, as a regex matched in full or as a list of names (PEFT's two forms):
    either builds the adapter the default (found automatically) builds: the same weights (``tiny_causal_lm`` seeds the
    random start of both), and with the upsample opened, the same logits."""
    ids = torch.tensor([[5, 17, 33, 2]])
    default = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4))
    named = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4, target_modules=target_modules))
    expected = default.state_dict()
    assert sorted(named.state_dict()) == sorted(expected)
    assert all(torch.equal(value, expected[key]) for key, value in named.state_dict().items())
    with torch.no_grad():
        for model in (default, named):  # at zero, any side network gives the base output
            for name, parameter in model.named_parameters():
                if name.endswith("upsample.weight"):
                    parameter.fill_(0.1)
        assert torch.equal(named(input_ids=ids).logits, default(input_ids=ids).logits)


@pytest.mark.parametrize("entry", ["layernorm", "_layernorm"])
def test_modules_to_save_entries_are_matched_as_peft_matches_them(entry):
    """PEFT wraps every module whose name ends with a modules_to_save entry (a plain suffix: "layernorm" matches
    "input_layernorm"). QST's check matched whole name segments only, so such an entry passed: PEFT then wrapped the
    backbone's norms inside the frozen trunk (and the side network's own), counted them trainable and saved them,
    and the backbone's copies never got a gradient. It is refused like "norm"."""
    from peft.utils.other import ModulesToSaveWrapper

    model = tiny_causal_lm()
    with pytest.raises(ValueError, match=rf"\['{entry}'\] lie inside the decoder trunk"):
        get_peft_model(model, QSTConfig(task_type="CAUSAL_LM", r=4, modules_to_save=[entry]))
    assert not any(isinstance(module, ModulesToSaveWrapper) for module in model.modules())


def test_lora_only_options_are_refused_by_name_with_the_fix(tmp_path):
    """A QLoRA script renamed to QSTConfig keeps LoRA's options (lora_alpha, lora_dropout, bias, ...): the error names
    them, says to drop them and what r means here; an unknown option keeps Python's own error. A config file holding
    such a key (written by hand or by a newer version) still loads, the key dropped with PEFT's warning."""
    with pytest.raises(TypeError, match=r"LoRA options side tuning does not have \(bias, lora_alpha, lora_dropout\)"
                       r".*drop them.*reduction factor"):
        QSTConfig(task_type="CAUSAL_LM", r=64, lora_alpha=16, lora_dropout=0.05, bias="none")
    with pytest.raises(TypeError, match="unexpected keyword argument 'not_an_option'$"):
        QSTConfig(task_type="CAUSAL_LM", not_an_option=1)
    QSTConfig(task_type="CAUSAL_LM", r=8).save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**saved, "lora_alpha": 16}))
    with pytest.warns(UserWarning, match="Unexpected keyword arguments.*lora_alpha"):
        loaded = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(loaded, QSTConfig) and loaded.r == 8


def test_trainable_token_indices_are_ignored_with_a_warning():
    """TRL sets trainable_token_indices on the PEFT config when its chat-template cloning adds tokens; those
    embeddings lie in the frozen trunk, so QST trains the side network (and modules_to_save) and says so."""
    config = QSTConfig(task_type="CAUSAL_LM", r=4, trainable_token_indices={"embed_tokens": [3, 4]})
    with pytest.warns(UserWarning, match="trainable_token_indices.*is ignored"):
        model = get_peft_model(tiny_causal_lm(), config)
    assert model.peft_config["default"].trainable_token_indices is None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".qst_side." in n for n in trainable)


@pytest.mark.parametrize(
    "edit, fragment",
    [
        ({"task_type": "causal_lm"}, "did you mean 'CAUSAL_LM'?"),
        ({"target_modules": ["model", 3]}, "QSTConfig.target_modules=['model', 3] is invalid"),
        ({"modules_to_save": [""]}, "QSTConfig.modules_to_save=[''] is invalid"),
        ({"inference_mode": "false"}, "QSTConfig.inference_mode='false' is invalid"),
        ({"adapter_weights_sha256": "abc"}, "QSTConfig.adapter_weights_sha256='abc' is invalid"),
    ],
    ids=["task_type", "target_modules", "modules_to_save", "inference_mode", "digest"],
)
def test_hand_edited_adapter_config_values_are_refused_naming_the_file_and_field(edit, fragment, tmp_path):
    """A value edited into adapter_config.json by hand failed in PEFT without naming the file or field (a misspelt
    task_type, an AttributeError or TypeError for odd target_modules or modules_to_save entries), was taken as True
    ("false" for inference_mode), or had loading blame the weights file as corrupt (a digest that is none). Each is
    refused when the config is read, naming the file, the field and the value, before the model is touched."""
    get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4)).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    for load in (lambda: PeftConfig.from_pretrained(str(tmp_path)),
                 lambda: PeftModel.from_pretrained(tiny_causal_lm(), str(tmp_path))):
        with pytest.raises(ValueError) as info:
            load()
        message = str(info.value)
        assert message.startswith(f"{path}: ") and fragment in message


def test_task_type_that_does_not_fit_the_models_head_is_refused():
    """task_type="SEQ_CLS" on an *ForCausalLM built without a word: PEFT's task class found no head to train and the
    loss, the LM's on class labels, came out NaN. task_type="CAUSAL_LM" on a classifier failed inside PEFT with
    "object has no attribute 'prepare_inputs_for_generation'". Both are refused naming the task type, the model class
    and the fix; a classifier with its own task type still builds, its head trainable."""
    from transformers import AutoModelForSequenceClassification

    from .conftest import tiny_llama_config

    for task_type in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
        with pytest.raises(ValueError, match=rf"task_type='{task_type}' trains the model's task head .* but "
                                             r"LlamaForCausalLM has none.*task_type of this model \(CAUSAL_LM\)"):
            get_peft_model(tiny_causal_lm(), QSTConfig(task_type=task_type, r=4))
    config = tiny_llama_config(num_labels=3, pad_token_id=0)
    with pytest.raises(ValueError, match="task_type='CAUSAL_LM' needs a model that generates .* but "
                                         "LlamaForSequenceClassification does not"):
        get_peft_model(AutoModelForSequenceClassification.from_config(config), QSTConfig(task_type="CAUSAL_LM", r=4))
    model = get_peft_model(AutoModelForSequenceClassification.from_config(config), QSTConfig(task_type="SEQ_CLS", r=4))
    assert any(".score." in n for n, p in model.named_parameters() if p.requires_grad)


def test_task_type_is_checked_against_the_head_only_where_a_peft_task_class_wraps_the_model(tmp_path):
    """inject_adapter_in_model (and transformers' load_adapter, which goes through it) wraps the model in no PEFT task
    class and ignores task_type: a QSTConfig of another task_type than the model's head injected and ran there, and
    the task-head check, meant for get_peft_model, refused it. It runs only where a task class wraps the model
    (get_peft_model, PeftModel.from_pretrained); there the mismatch is still refused."""
    import torch
    from peft import inject_adapter_in_model
    from transformers import AutoModelForSequenceClassification

    from peft_qst import QSTLayer

    from .conftest import tiny_llama_config

    ids = torch.tensor([[5, 17, 33, 2, 99, 64]])

    def classifier():
        return AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=3, pad_token_id=0))

    for base, task_type in ((tiny_causal_lm(), "SEQ_CLS"), (classifier(), "CAUSAL_LM")):
        expected = base(input_ids=ids).logits.shape
        injected = inject_adapter_in_model(QSTConfig(task_type=task_type, r=4), base)
        assert injected is base and any(isinstance(m, QSTLayer) for m in injected.modules())
        assert injected(input_ids=ids).logits.shape == expected
    with pytest.raises(ValueError, match="task_type='SEQ_CLS' trains the model's task head"):
        get_peft_model(tiny_causal_lm(), QSTConfig(task_type="SEQ_CLS", r=4))
    with pytest.raises(ValueError, match="task_type='CAUSAL_LM' needs a model that generates"):
        get_peft_model(classifier(), QSTConfig(task_type="CAUSAL_LM", r=4))

    # a saved adapter whose config says SEQ_CLS: transformers' load_adapter injects it into a causal LM; PEFT's
    # from_pretrained, whose task class would train a head the model lacks, refuses it
    get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4)).save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "task_type": "SEQ_CLS"}))
    loaded = tiny_causal_lm()
    loaded.load_adapter(str(tmp_path))
    assert any(isinstance(m, QSTLayer) for m in loaded.modules())
    assert loaded(input_ids=ids).logits.shape == (1, ids.shape[1], loaded.config.vocab_size)
    with pytest.raises(ValueError, match="task_type='SEQ_CLS' trains the model's task head"):
        PeftModel.from_pretrained(tiny_causal_lm(), str(tmp_path))


def test_task_head_of_another_name_listed_in_modules_to_save_is_accepted():
    """A classifier whose head is not named ``score``/``classifier`` (here ``classification_head``, as BART's is) is
    trained by PEFT's task class when ``modules_to_save`` names it, as it was before the task-head check: that check
    refused it as a model without a head. Without the entry it is still refused (PEFT would train no head)."""
    from transformers import AutoModelForSequenceClassification

    from .conftest import tiny_llama_config

    def classifier():
        model = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=3, pad_token_id=0))
        model.classification_head = model.score
        del model.score
        return model

    model = get_peft_model(classifier(), QSTConfig(task_type="SEQ_CLS", r=4, modules_to_save=["classification_head"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".classification_head." in n for n in trainable)
    assert any(".qst_side." in n for n in trainable)
    with pytest.raises(ValueError, match="a head of another name is trained when modules_to_save names it"):
        get_peft_model(classifier(), QSTConfig(task_type="SEQ_CLS", r=4))


@pytest.mark.parametrize("model_type, trunk", [("llama", "model"), ("gpt2", "transformer")])
def test_modules_to_save_naming_the_trunk_itself_is_refused_naming_it(model_type, trunk):
    """``modules_to_save=[<the trunk>]`` (to fine-tune the whole decoder beside the side network) cannot train: QST
    runs the trunk frozen. The check of entries inside the trunk let the trunk itself through, and PEFT failed with
    its NoMatchingPeftModuleError ("No modules were targeted for adaptation"), naming neither the entry nor the
    reason; it is refused before anything changes, naming the entry, the trunk and what trains the trunk instead."""
    from peft.utils.other import ModulesToSaveWrapper
    from transformers import AutoConfig, AutoModelForCausalLM

    from peft_qst import QSTLayer

    if model_type == "llama":
        model = tiny_causal_lm()
    else:
        config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=rf"\['{trunk}'\] name the decoder trunk '{trunk}'.*backbone_lora_layers"):
        get_peft_model(model, QSTConfig(task_type="CAUSAL_LM", r=4, modules_to_save=[trunk, "lm_head"]))
    assert not any(isinstance(module, (ModulesToSaveWrapper, QSTLayer)) for module in model.modules())
