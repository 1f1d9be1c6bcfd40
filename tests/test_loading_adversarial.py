"""Loads that must not succeed silently with wrong weights, and refused loads that must leave nothing behind.

The weights' names, shapes and digest are checked elsewhere (test_adapters_and_persistence.py). These tests cover
what those checks cannot see: an adapter whose config computes otherwise with weights of the same names and shapes
(another activation, pooling kind, head layout, backbone-adapter scaling, ``modules_to_save``, or starting value of
the output gate or side gates, from which those are saved as offsets), which loads
whenever the adapter is not built from the folder's own config (``config=``, ``load_adapter`` into an existing name
as trainers resume, transformers' ``peft_config=``); and the state a refused load leaves: PEFT adds the adapter (and
``from_pretrained`` injects it into the caller's base model) before the weights are read.
"""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModel, AutoModelForCausalLM

from peft_qst import QSTAdapterFileError, QSTConfig

from .conftest import train_steps

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21], [1, 2, 3, 4, 5, 6, 7, 8]])


def side_names(model) -> set[str]:
    return {name.split(".qst_side.")[1].split(".")[0] for name, _ in model.named_parameters() if ".qst_side." in name}


def garble(folder) -> None:
    path = folder / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a tensor byte: the header stays valid, the digest does not match
    path.write_bytes(bytes(data))


def saved_adapter(base_dir, folder, **options):
    """A QST adapter with ``options``, trained a step (so that its side network and any module saved whole differ
    from a fresh one), saved to ``folder``."""
    config = QSTConfig(task_type="CAUSAL_LM", r=4, **options)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    train_steps(model, IDS, steps=1)
    model.save_pretrained(folder)
    return model


# the tiny Llama has 4 attention and 2 key/value heads: side_heads=None (its own 4 and 2) and 2 (2 and 2, of width 8)
# give the side blocks weights of the same shapes
SAME_SHAPES_OTHER_COMPUTATION = [
    (dict(), dict(activation="gelu"), "activation='silu'"),
    (dict(downsample="maxpool"), dict(downsample="avgpool"), "downsample='maxpool'"),
    (dict(side_heads=None), dict(side_heads=2), "side_heads=None"),
    (dict(backbone_lora_layers=1), dict(backbone_lora_layers=1, backbone_lora_alpha=64.0), "backbone_lora_alpha=16.0"),
    (dict(modules_to_save=["lm_head"]), dict(), r"modules_to_save=\['lm_head'\]"),
    # the output gate and the side gates are saved as offsets from their starting values (ConstantOffset): read beside
    # another start, the same offsets gave other gates (logits 0.05 apart on the tiny Llama after 3 steps)
    (dict(), dict(output_gate_init=2.0), "output_gate_init=1.0"),
    (dict(side_gate_init=0.7), dict(side_gate_init=0.3), "side_gate_init=0.7"),
]
IDS_OF_CASES = [
    "activation", "pooling-kind", "side-heads", "backbone-lora-alpha", "modules-to-save", "output-gate-init",
    "side-gate-init",
]


def _from_pretrained_with_config(base, folder, options):
    PeftModel.from_pretrained(base, str(folder), config=QSTConfig(task_type="CAUSAL_LM", r=4, **options))


def _load_into_the_existing_adapter(base, folder, options):
    # what Trainer's resume_from_checkpoint does, with a model built by a script whose QSTConfig changed since
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, **options))
    before = {name: p.clone() for name, p in model.state_dict().items()}
    try:
        model.load_adapter(str(folder), adapter_name="default", is_trainable=True)
    finally:
        after = model.state_dict()
        assert all(torch.equal(before[name], after[name]) for name in before)  # nothing was loaded


def _transformers_load_adapter_with_config(base, folder, options):
    base.load_adapter(str(folder), peft_config=QSTConfig(task_type="CAUSAL_LM", r=4, **options))


@pytest.mark.parametrize(
    "load",
    [_from_pretrained_with_config, _load_into_the_existing_adapter, _transformers_load_adapter_with_config],
    ids=["from_pretrained-config", "load_adapter-existing-name", "transformers-peft_config"],
)
@pytest.mark.parametrize("saved_options, other_options, named", SAME_SHAPES_OTHER_COMPUTATION, ids=IDS_OF_CASES)
def test_weights_are_not_loaded_into_an_adapter_that_computes_otherwise(
    tmp_path, tiny_model_dir, saved_options, other_options, named, load
):
    """Every weight fits by name and shape, so only the config saved with them can tell. In the modules_to_save case
    the adapter's trained ``lm_head.weight`` was loaded over the frozen base model's own LM head (which every adapter
    and ``disable_adapter`` share)."""
    saved_adapter(tiny_model_dir, tmp_path / "adapter", **saved_options)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    head = base.lm_head.weight.clone()
    refusal = rf"does not fit QST adapter 'default': it was saved by a QST adapter with {named}"
    with pytest.raises(QSTAdapterFileError, match=refusal):
        load(base, tmp_path / "adapter", other_options)
    assert torch.equal(base.lm_head.weight, head)


def test_the_same_options_given_again_still_load(tmp_path, tiny_model_dir):
    """A config given to the loaders that builds what was saved (side_heads "auto" resolving to the saved count, the
    task class adding its head to modules_to_save, a number written as an integer) is not refused, for a causal LM
    and a classifier."""
    from transformers import AutoModelForSequenceClassification

    trained = saved_adapter(tiny_model_dir, tmp_path / "lm", backbone_lora_layers=1)
    with torch.no_grad():
        expected = trained.eval()(input_ids=IDS).logits
    # output_gate_init=1: the saved 1.0, written as an integer
    options = dict(task_type="CAUSAL_LM", r=4, backbone_lora_layers=1, output_gate_init=1)
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "lm"), config=QSTConfig(**options)
    ).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, expected)

    classifier = lambda: AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)  # noqa: E731
    model = get_peft_model(classifier(), QSTConfig(task_type="SEQ_CLS", r=4))
    model.save_pretrained(tmp_path / "cls")
    PeftModel.from_pretrained(classifier(), str(tmp_path / "cls"), config=QSTConfig(task_type="SEQ_CLS", r=4))
    model.load_adapter(str(tmp_path / "cls"), adapter_name="default", is_trainable=True)


def test_a_classifier_loads_with_transformers_and_the_config_it_was_trained_with(tmp_path, tiny_model_dir):
    """PEFT's task class adds the classification head to the modules_to_save of the config it trains with, so the
    saved adapter lists it; transformers' load_adapter(..., peft_config=QSTConfig(task_type="SEQ_CLS")) builds the
    adapter without a task class, and the config the user trained with does not list it. That is not another
    computation (the saved head loads into the base model's own head, as for LoRA) and was refused."""
    from transformers import AutoModelForSequenceClassification

    def classifier():
        return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3, pad_token_id=0)

    model = get_peft_model(classifier(), QSTConfig(task_type="SEQ_CLS", r=4))
    with torch.no_grad():  # a trained side network and head, so that loading them is visible in the logits
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    model.save_pretrained(tmp_path)
    base = classifier()
    base.load_adapter(str(tmp_path), peft_config=QSTConfig(task_type="SEQ_CLS", r=4))
    with torch.no_grad():
        assert torch.equal(base.eval()(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits)


def test_a_refused_load_under_a_new_name_leaves_no_adapter_behind(tmp_path, tiny_model_dir):
    """PEFT adds the new adapter before it reads the weights. A refused file left it there, with fresh weights, for
    set_adapter to run; and a second try into that name reused the refused folder's config."""
    trained = saved_adapter(tiny_model_dir, tmp_path / "good")
    saved_adapter(tiny_model_dir, tmp_path / "garbled", downsample="linear")
    garble(tmp_path / "garbled")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    model.train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(QSTAdapterFileError, match="do not match the digest"):
        model.load_adapter(str(tmp_path / "garbled"), adapter_name="other")
    assert set(model.peft_config) == {"default"} and side_names(model) == {"default"}
    assert model.active_adapter == "default" and model.training
    assert {name for name, p in model.named_parameters() if p.requires_grad} == trainable
    # the name is free again: the right folder loads under it, with its own config
    model.load_adapter(str(tmp_path / "good"), adapter_name="other")
    model.set_adapter("other")
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=IDS).logits, trained.eval()(input_ids=IDS).logits)


def test_a_refused_load_under_a_new_name_leaves_the_modules_it_would_save_whole_unwrapped(tmp_path, tiny_model_dir):
    """Adding an adapter with ``modules_to_save=["lm_head"]`` wraps the model's LM head, and PEFT's delete_adapter
    keeps the wrapper: a refused load left the head wrapped, its weight renamed ``lm_head.original_module.weight`` in
    the model's state (and in the token embeddings PEFT saves with the other adapters)."""
    saved_adapter(tiny_model_dir, tmp_path / "garbled", modules_to_save=["lm_head"])
    garble(tmp_path / "garbled")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    state = {name: (tuple(p.shape), p.requires_grad) for name, p in model.named_parameters()}
    head = model.get_base_model().lm_head
    with pytest.raises(QSTAdapterFileError, match="do not match the digest"):
        model.load_adapter(str(tmp_path / "garbled"), adapter_name="other")
    assert model.get_base_model().lm_head is head
    assert {name: (tuple(p.shape), p.requires_grad) for name, p in model.named_parameters()} == state
    assert model.modules_to_save is None


def _causal_lm(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir)


def _trunk(base_dir):
    return AutoModel.from_pretrained(base_dir)


@pytest.mark.parametrize(
    "load_base, options",
    [
        (_causal_lm, dict(task_type="CAUSAL_LM")),
        (_causal_lm, dict(task_type="CAUSAL_LM", modules_to_save=["lm_head"], backbone_lora_layers=1)),
        (_trunk, dict(task_type="FEATURE_EXTRACTION")),
    ],
    ids=["causal-lm", "modules-to-save-and-backbone-lora", "bare-trunk"],
)
def test_a_refused_from_pretrained_leaves_the_base_model_as_it_was(tmp_path, tiny_model_dir, load_base, options):
    """PeftModel.from_pretrained injects the adapter into the caller's model in place before it reads the weights. A
    refused file left that model wrapped (a side network of fresh weights, hooks on its blocks, QST's loss and tags)
    and frozen; it is handed back as it was, and a second from_pretrained with the right folder works on it."""
    model = get_peft_model(load_base(tiny_model_dir), QSTConfig(r=4, **options))
    if options["task_type"] == "CAUSAL_LM":
        train_steps(model, IDS, steps=1)
    model.save_pretrained(tmp_path / "good")
    model.save_pretrained(tmp_path / "garbled")
    garble(tmp_path / "garbled")

    base = load_base(tiny_model_dir)
    base.get_input_embeddings().weight.requires_grad_(False)  # a flag of the caller's own, to be kept
    base.train()
    modules = [(name, type(module)) for name, module in base.named_modules()]
    flags = {name: p.requires_grad for name, p in base.named_parameters()}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules())
    with torch.no_grad():
        expected = load_base(tiny_model_dir).eval()(input_ids=IDS)[0]
    with pytest.raises(QSTAdapterFileError, match="do not match the digest"):
        PeftModel.from_pretrained(base, str(tmp_path / "garbled"))
    assert [(name, type(module)) for name, module in base.named_modules()] == modules
    assert {name: p.requires_grad for name, p in base.named_parameters()} == flags
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in base.modules()) == hooks
    assert base.training and not hasattr(base, "peft_config") and "qst" not in (getattr(base, "model_tags", None) or [])
    with torch.no_grad():
        assert torch.equal(base.eval()(input_ids=IDS)[0], expected)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "good")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS)[0], model.eval()(input_ids=IDS)[0])


def _set_signature_entry(name, value):
    def edit(config):
        config["base_model_signature"][name] = value
    return edit


def _set(name, value):
    def edit(config):
        config[name] = value
    return edit


def _signature_as_pairs(config):
    config["base_model_signature"] = sorted(config["base_model_signature"].items())


# an adapter_config.json edited by hand: (edit, what the error names)
HAND_EDITED_CONFIGS = [
    (_set_signature_entry("hidden_size", "64"), r"its hidden_size is '64' \(of type str\) where an integer"),
    (_set_signature_entry("vocab_size", None), r"its vocab_size is None \(of type NoneType\)"),
    (_set_signature_entry("intermediate_size", 128.0), r"its intermediate_size is 128.0 \(of type float\)"),
    (_set_signature_entry("model_type", 3), r"its model_type is 3 \(of type int\) where a model type"),
    (_signature_as_pairs, r"it is \[\['head_dim', 16\].* \(of type list\) where a dict"),
    (_set("base_model_signature", "llama"), r"it is 'llama' \(of type str\) where a dict"),
    (_set("base_model_signature", {}), "it lacks model_type, hidden_size, num_hidden_layers, num_attention_heads"),
    (_set("r", "4"), r"QSTConfig.r='4' is invalid"),
]


@pytest.mark.parametrize("edit, named", HAND_EDITED_CONFIGS,
                         ids=["size-string", "size-null", "size-float", "type-int", "signature-list",
                              "signature-string", "signature-empty", "r-string"])
def test_a_hand_edited_adapter_config_is_refused_naming_the_file_and_the_fix(tmp_path, tiny_model_dir, edit, named):
    """``base_model_signature`` entries of another type than get_peft_model writes never equal the model's: the string
    "64" was refused as "they differ in hidden_size 64 against 64", a null vocabulary asked for embeddings "resized to
    None", a signature that was not a dict was to be "left None" (which would switch the check off), and an empty one
    loaded onto any model. Each is refused naming the file, the entry, what was expected and the fix; the base model
    is left as it was, and saving the adapter again over the file (the fix) works."""
    import json
    import re

    trained = saved_adapter(tiny_model_dir, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    modules = [name for name, _ in base.named_modules()]
    for load in (lambda: PeftModel.from_pretrained(base, str(tmp_path)), lambda: base.load_adapter(str(tmp_path))):
        with pytest.raises(ValueError, match=named) as info:
            load()
        message = str(info.value)
        assert message.startswith(f"{config_path}: QSTConfig.")
        if "base_model_signature" in message:
            assert re.search("restore the file .* or save the adapter again", message)
            assert "Nothing was loaded" in message
        assert [name for name, _ in base.named_modules()] == modules and not hasattr(base, "peft_config")

    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, trained.eval()(input_ids=IDS).logits)


def test_a_hand_edited_adapter_config_read_by_peft_config_or_auto_peft_model_names_the_file(tmp_path, tiny_model_dir):
    """``PeftConfig.from_pretrained`` (with which ``AutoPeftModelForCausalLM.from_pretrained`` reads the folder) builds
    the config of the type the file names without going through ``QSTConfig.from_pretrained``: its refusal named the
    field and the fix but not the file, where every other way of loading names it."""
    import json

    from peft import AutoPeftModelForCausalLM, PeftConfig

    saved_adapter(tiny_model_dir, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_signature"]["hidden_size"] = "64"
    config_path.write_text(json.dumps(config))
    for load in (PeftConfig.from_pretrained, QSTConfig.from_pretrained, AutoPeftModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match="its hidden_size is '64'") as info:
            load(str(tmp_path))
        assert str(info.value).startswith(f"{config_path}: QSTConfig.base_model_signature is invalid")
    (tmp_path / "sub").mkdir()  # in a subfolder: the file in it
    config_path.rename(tmp_path / "sub" / "adapter_config.json")
    with pytest.raises(ValueError) as info:
        PeftConfig.from_pretrained(str(tmp_path), subfolder="sub")
    assert str(info.value).startswith(f"{tmp_path / 'sub' / 'adapter_config.json'}: QSTConfig.")


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda text: text[: len(text) // 2], "it is not valid JSON"),
        (lambda text: "[" + text + "]", "it holds no JSON object"),
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "peft_type"}),
         "it has no peft_type"),
    ],
    ids=["truncated", "not-an-object", "no-peft-type"],
)
def test_a_damaged_adapter_config_beside_qst_weights_is_refused_naming_the_file(tmp_path, tiny_model_dir, damage,
                                                                                problem):
    """An adapter_config.json cut short, wrapped or stripped of its peft_type, beside a QST adapter's weights: every way
    of loading failed with PEFT's bare JSONDecodeError, "TypeError: list indices must be integers" or
    "KeyError: 'peft_type'", naming neither the file nor the fix. They are refused naming the file, the problem and
    the fix; the same damage to a LoRA folder keeps PEFT's own error."""
    from peft import AutoPeftModelForCausalLM, LoraConfig, PeftConfig

    saved_adapter(tiny_model_dir, tmp_path / "qst")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "lora")
    for kind in ("qst", "lora"):
        config_path = tmp_path / kind / "adapter_config.json"
        config_path.write_text(damage(config_path.read_text()))
    folder = str(tmp_path / "qst")
    loads = [
        lambda folder: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder),
        lambda folder: AutoPeftModelForCausalLM.from_pretrained(folder),
        lambda folder: PeftConfig.from_pretrained(folder),
    ]
    for load in loads:
        with pytest.raises(QSTAdapterFileError) as info:
            load(folder)
        assert str(info.value).startswith(f"{tmp_path / 'qst' / 'adapter_config.json'} cannot be read as the config")
        assert problem in str(info.value) and "save the adapter again" in str(info.value)
        with pytest.raises(Exception) as info:
            load(str(tmp_path / "lora"))
        assert not isinstance(info.value, QSTAdapterFileError)
    # into an existing adapter, as a trainer resumes (no config is read before the weights): a bare JSONDecodeError or
    # AttributeError, or a refusal for a config "predating side_heads"; nothing was loaded
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    before = {key: value.clone() for key, value in model.state_dict().items() if "qst_side" in key}
    with pytest.raises(QSTAdapterFileError) as info:
        model.load_adapter(folder, adapter_name="default", is_trainable=True)
    assert str(info.value).startswith(f"{tmp_path / 'qst' / 'adapter_config.json'} cannot be read as the config")
    assert problem in str(info.value)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


@pytest.mark.parametrize("peft_type", ["qst", "Qst", " QST"])
def test_a_misspelt_peft_type_is_refused_naming_the_file_and_the_fix(tmp_path, tiny_model_dir, peft_type):
    """PEFT looks a config's class up by the exact ``peft_type``: "qst" (a file edited by hand, or written by another
    tool) failed with a bare ``KeyError: 'qst'`` on every way of loading. Each is refused naming the file, the value
    and the fix, and the fixed file loads."""
    import json

    from peft import AutoPeftModelForCausalLM, PeftConfig

    trained = saved_adapter(tiny_model_dir, tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["peft_type"] = peft_type
    config_path.write_text(json.dumps(config))

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    loads = [
        lambda: PeftModel.from_pretrained(fresh(), str(tmp_path)),
        lambda: get_peft_model(fresh(), QSTConfig(task_type="CAUSAL_LM", r=4)).load_adapter(str(tmp_path), "other"),
        lambda: AutoPeftModelForCausalLM.from_pretrained(str(tmp_path)),
        lambda: fresh().load_adapter(str(tmp_path)),
        lambda: PeftConfig.from_pretrained(str(tmp_path)),
        lambda: QSTConfig.from_pretrained(str(tmp_path)),
    ]
    for load in loads:
        with pytest.raises(ValueError) as info:
            load()
        assert str(info.value) == (
            f"{config_path}: peft_type {peft_type!r} is not a PEFT method name; QST adapters have peft_type 'QST' "
            "(PEFT matches the name exactly). Write \"peft_type\": \"QST\" in the file, or save the adapter again with "
            "save_pretrained."
        )

    config["peft_type"] = "QST"
    config_path.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(fresh(), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, trained.eval()(input_ids=IDS).logits)

    # in a subfolder (where an adapter of another name than "default" is saved): the file in it
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": peft_type}))
    for load in (lambda: PeftModel.from_pretrained(fresh(), str(tmp_path), subfolder="sub"),
                 lambda: PeftConfig.from_pretrained(str(tmp_path), subfolder="sub")):
        with pytest.raises(ValueError) as info:
            load()
        assert str(info.value).startswith(f"{tmp_path / 'sub' / 'adapter_config.json'}: peft_type {peft_type!r} ")


def test_weights_of_another_peft_method_are_refused_naming_it(tmp_path, tiny_model_dir):
    """A LoRA folder given a QSTConfig (``config=``, transformers' ``peft_config=``) or loaded into an existing QST
    adapter (a trainer resuming from the wrong checkpoint) was refused as a QST file that "predates side_heads", with
    the advice to set ``side_heads=None``, which led to "saved from a different QST configuration". Each way is refused
    naming the method the folder holds; the models are left as they were, and the folder loads as LoRA without the
    QSTConfig."""
    from peft import LoraConfig

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, task_type="CAUSAL_LM", init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    folder = str(tmp_path / "lora")
    qst = saved_adapter(tiny_model_dir, tmp_path / "qst")
    with torch.no_grad():
        expected = qst(input_ids=IDS).logits
    refusal = "saved by a LORA adapter .*not a QST one.*without a QSTConfig"
    for side_heads in ({}, {"side_heads": None}):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with pytest.raises(QSTAdapterFileError, match=refusal):
            PeftModel.from_pretrained(base, folder, config=QSTConfig(task_type="CAUSAL_LM", r=4, **side_heads))
        assert not hasattr(base, "peft_config") and all(p.requires_grad for p in base.parameters())
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with pytest.raises(QSTAdapterFileError, match=refusal):
            plain.load_adapter(folder, peft_config=QSTConfig(task_type="CAUSAL_LM", r=4, **side_heads))
        assert not getattr(plain, "peft_config", None)
    with pytest.raises(QSTAdapterFileError, match=refusal):
        qst.load_adapter(folder, adapter_name="default", is_trainable=True)
    with torch.no_grad():
        assert torch.equal(qst.eval()(input_ids=IDS).logits, expected)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, lora.eval()(input_ids=IDS).logits)


def test_qst_weights_loaded_into_another_methods_adapter_are_refused_naming_them(tmp_path, tiny_model_dir):
    """The converse: a QST folder loaded into a LoRA adapter (a LoRA model's ``load_adapter(qst_folder, "default")``,
    as a trainer resuming from the wrong run's checkpoint does; ``PeftModel.from_pretrained`` with
    ``config=LoraConfig(...)``). PEFT loaded none of the side network's weights and kept the adapter's own without an
    error (from_pretrained: fresh LoRA weights, with a warning of missing keys only). Each way is refused naming the
    QST weights; the models are left as they were. (Under a new adapter name PEFT refuses to mix the two methods.)"""
    from peft import LoraConfig

    def lora_config():
        return LoraConfig(r=4, task_type="CAUSAL_LM", init_lora_weights=False)

    qst_folder = str(tmp_path / "qst")
    saved_adapter(tiny_model_dir, qst_folder)
    refusal = r"into LORA adapter 'default' were saved by a QST adapter .*qst_side.*Nothing was loaded"
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora_config()).eval()
    with torch.no_grad():
        expected = lora(input_ids=IDS).logits
    with pytest.raises(QSTAdapterFileError, match=refusal):
        lora.load_adapter(qst_folder, adapter_name="default")
    assert sorted(lora.peft_config) == ["default"]
    with torch.no_grad():
        assert torch.equal(lora(input_ids=IDS).logits, expected)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(QSTAdapterFileError, match=refusal):
        PeftModel.from_pretrained(base, qst_folder, config=lora_config())
    assert not hasattr(base, "peft_config") and all(p.requires_grad for p in base.parameters())
    assert not any("lora" in name for name, _ in base.named_modules())


def test_weights_stored_as_integers_are_refused(tmp_path, tiny_model_dir):
    """A tensor of the right name and shape but an integer dtype (a file not written by save_pretrained, whose config
    carries no digest or a digest of that file) was cast into the float weight by load_state_dict: the side network
    computed with truncated values."""
    import json

    from safetensors.torch import load_file, save_file

    from peft_qst.serialization import weights_digest

    saved_adapter(tiny_model_dir, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    name = sorted(key for key in weights if key.endswith("weight"))[0]
    weights[name] = (weights[name] * 100).to(torch.int32)
    save_file(weights, tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["adapter_weights_sha256"] = weights_digest(weights)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(QSTAdapterFileError, match=r"not stored as floating-point .*torch\.int32 for a torch\.float32"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path))


def _load_with_peft(base, folder):
    PeftModel.from_pretrained(base, str(folder))


def _load_into_a_new_name(base, folder):
    get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4)).load_adapter(str(folder), adapter_name="other")


def _resume_into_the_same_name(base, folder):
    get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4)).load_adapter(str(folder), adapter_name="default")


def _load_with_transformers(base, folder):
    base.load_adapter(str(folder))


@pytest.mark.parametrize(
    "load",
    [_load_with_peft, _load_into_a_new_name, _resume_into_the_same_name, _load_with_transformers],
    ids=["from_pretrained", "load_adapter-new-name", "load_adapter-existing-name", "transformers-load_adapter"],
)
@pytest.mark.parametrize(
    "key",
    ["base_model.model.model.base_layer.layers.0.mlp.up_proj.weight", "base_model.model.model.base_layer.norm.weight",
     "base_model.model.model.layers.0.mlp.up_proj.weight"],
    ids=["backbone-layer", "backbone-norm", "names-nothing"],
)
def test_a_tensor_of_the_base_model_in_the_adapter_file_is_refused(tmp_path, tiny_model_dir, key, load):
    """An adapter file holding, besides the side network, a tensor named for a weight of the frozen base model (a file
    written by another tool or altered, with a digest that matches it): PEFT and transformers load every key that
    names a weight of the model, so it was written over the backbone every adapter and disable_adapter share, without
    a word; a key naming nothing was dropped without a word. Both are refused before anything is written."""
    import json

    from safetensors.torch import load_file, save_file

    from peft_qst.serialization import weights_digest

    saved_adapter(tiny_model_dir, tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights[key] = torch.zeros(64) if key.endswith("norm.weight") else torch.zeros(128, 64)
    save_file(weights, tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["adapter_weights_sha256"] = weights_digest(weights)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    backbone = {name: p.detach().clone() for name, p in base.named_parameters()}
    with pytest.raises(QSTAdapterFileError, match=rf"holds 1 tensors that belong neither .*\['{re.escape(key)}'\]"):
        load(base, tmp_path)
    after = {name.replace("base_layer.", ""): p for name, p in base.named_parameters() if ".qst_side." not in name}
    assert all(torch.equal(after[name], value) for name, value in backbone.items())


def test_weights_of_a_diverged_run_are_saved_and_loaded_with_a_warning_naming_them(tmp_path, tiny_model_dir):
    """A run that diverged leaves NaN in the side network. The file is intact (its digest matches), so nothing
    refuses it; saving and loading it warn, naming the tensors, and still save and load it as it is (it is the
    user's to inspect). A finite adapter saves and loads without that warning."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    with warnings.catch_warnings(record=True) as finite:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "finite")
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "finite")
    assert not [w for w in finite if "NaN or infinite" in str(w.message)]

    name, parameter = next((n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2)
    with torch.no_grad():
        parameter[0, 0] = float("nan")
        parameter[1, 1] = float("inf")
    saved_name = re.escape(name.replace(".default", ""))  # PEFT saves the key without the adapter's name
    with pytest.warns(UserWarning, match=rf"saved to .*NaN or infinite values in 1 of \d+ tensors \({saved_name}\)"):
        model.save_pretrained(tmp_path / "diverged")
    with pytest.warns(UserWarning, match=rf"read from .*NaN or infinite values in 1 of .*{saved_name}.*loaded as they"):
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "diverged")
    reloaded = dict(loaded.named_parameters())[name]
    assert torch.isnan(reloaded[0, 0]) and torch.isinf(reloaded[1, 1])


def test_the_warning_for_weights_of_a_diverged_run_points_at_the_users_call(tmp_path, tiny_model_dir):
    """The warning for NaN or infinite adapter weights is raised deep inside a save or a load (PEFT's and
    transformers' methods, which QST wraps, and the Trainer's checkpointing around them): a fixed stacklevel reported
    it at a line of peft_qst/registration.py or PEFT, not at the user's call, which is what a warning's location is
    for (and what ``-W``/``filterwarnings`` by module select on). Each entry point reports the line that called it:
    ``save_pretrained``, ``PeftModel.from_pretrained``, PEFT's ``load_adapter`` (a new name, and the adapter's own
    name, as trainers resume), transformers' ``load_adapter``, and the Trainer's checkpoint save and
    ``resume_from_checkpoint``."""
    from .test_trainer_options import make_trainer

    def diverged():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               QSTConfig(task_type="CAUSAL_LM", r=4))
        parameter = next(p for p in model.parameters() if p.requires_grad and p.dim() == 2)
        with torch.no_grad():
            parameter[0, 0] = float("nan")
        return model

    def nan_warnings(caught):
        found = [w for w in caught if "NaN or infinite" in str(w.message)]
        assert found
        return found

    folder = str(tmp_path / "diverged")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = diverged()
        model.save_pretrained(folder)
        assert [w.filename for w in nan_warnings(caught)] == [__file__]
    for load in (
        lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder),
        lambda: model.load_adapter(folder, "other"),
        lambda: model.load_adapter(folder, "default"),
        lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir).load_adapter(folder),
    ):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load()
            assert {w.filename for w in nan_warnings(caught)} == {__file__}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path / "run", diverged(), save_strategy="steps", save_steps=1).train()
        assert {w.filename for w in nan_warnings(caught)} == {__file__}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint = str(tmp_path / "run" / "checkpoint-1")
        make_trainer(tmp_path / "resumed", diverged()).train(resume_from_checkpoint=checkpoint)
        assert {w.filename for w in nan_warnings(caught)} == {__file__}


def test_weights_with_infinities_and_no_nan_are_warned_of_too(tmp_path, tiny_model_dir):
    """A float16 run that overflowed leaves infinities without a NaN (the next step's arithmetic makes the NaN): every
    output of the model is then inf or NaN as well. Saving and loading such weights warn as for NaN, naming the
    tensor; a check for NaN alone let them through without a word."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    name, parameter = next((n, p) for n, p in model.named_parameters() if p.requires_grad and p.dim() == 2)
    with torch.no_grad():
        parameter[0, 0] = float("-inf")
    saved_name = re.escape(name.replace(".default", ""))
    with pytest.warns(UserWarning, match=rf"saved to .*NaN or infinite values in 1 of \d+ tensors \({saved_name}\)"):
        model.save_pretrained(tmp_path / "overflowed")
    with pytest.warns(UserWarning, match=rf"read from .*NaN or infinite values in 1 of .*{saved_name}"):
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                           tmp_path / "overflowed")
    assert torch.isneginf(dict(loaded.named_parameters())[name][0, 0])
