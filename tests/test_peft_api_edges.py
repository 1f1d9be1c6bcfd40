"""The edges of PEFT's model API a user reaches for with a QST PeftModel: whole-model copies (``copy.deepcopy``,
``pickle``, ``torch.save``), the merge family (refused: a side network is no weight delta), the state-dict helpers,
``inject_adapter_in_model``, the status reports, and the PEFT features that only take LoRA (hot-swapping, mixed
models), which must refuse before touching the adapter."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM

from peft_qst import QSTConfig, QSTLayer
from peft_qst.side import QSTSideNetwork

from .conftest import bnb_config, logits_in_fresh_process, tiny_causal_lm, train_steps

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21], [1, 2, 3, 4, 5, 6, 7, 8]])


def trained_model(base=None, **config):
    base = base if base is not None else tiny_causal_lm()
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, **config))
    train_steps(model, IDS)
    return model


def greedy(model, max_new_tokens=6):
    return model.generate(input_ids=IDS[:1], max_new_tokens=max_new_tokens, do_sample=False)


def torch_save_and_load(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)  # a whole model is a pickle: the caller's own file, by choice


def assert_independent_and_equal(original, twin, expected_logits, expected_tokens):
    """``twin`` computes what ``original`` does, holds its own tensors, and trains without changing ``original``."""
    with torch.no_grad():
        assert torch.equal(twin.eval()(input_ids=IDS).logits, expected_logits)
    assert torch.equal(greedy(twin), expected_tokens)
    ours, theirs = original.state_dict(), twin.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert not {p.data_ptr() for p in original.parameters()} & {p.data_ptr() for p in twin.parameters()}
    assert [n for n, p in twin.named_parameters() if p.requires_grad] == [
        n for n, p in original.named_parameters() if p.requires_grad
    ]
    before = {name: tensor.clone() for name, tensor in ours.items()}
    train_steps(twin, IDS, steps=2, lr=5e-2)
    with torch.no_grad():
        assert not torch.allclose(twin(input_ids=IDS).logits, expected_logits)  # the twin's adapter trains
        assert torch.equal(original.eval()(input_ids=IDS).logits, expected_logits)
    assert all(torch.equal(before[name], tensor) for name, tensor in original.state_dict().items())
    assert torch.equal(greedy(original), expected_tokens)


# --------------------------------------------------------------------------------------------------------------------
# whole-model copies
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [{}, {"copy_heads": 2}, {"backbone_lora_layers": 1}, {"quantized": True}],
    ids=["plain", "copy-heads", "backbone-lora", "4bit"],
)
def test_torch_save_of_a_whole_model_loads_to_an_independent_equal_model(tmp_path, tiny_model_dir, variant):
    """torch.save(model) failed on every QST model: the side network's norms and gates are parametrized as offsets
    (torch.nn.utils.parametrize), whose per-module classes refuse pickling ("Serialization of parametrized modules is
    only supported through state_dict()"); after a generate, the fast path's packed weights (a weak reference to the
    last cache) refused it too. A LoRA PeftModel pickles, in 4-bit as well."""
    variant = dict(variant)
    kwargs = {"quantization_config": bnb_config()} if variant.pop("quantized", False) else {}
    model = trained_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs), **variant)
    tokens = greedy(model)  # generation leaves the fast path's packed weights on the side network
    with torch.no_grad():
        logits = model.eval()(input_ids=IDS).logits

    loaded = torch_save_and_load(model)
    side = next(m for m in loaded.modules() if isinstance(m, QSTSideNetwork))
    assert sum(parametrize.is_parametrized(m) for m in side.modules()) == sum(
        parametrize.is_parametrized(m) for m in model.modules()
    ) > 0
    if not kwargs:  # (bitsandbytes' 4-bit layers fail a deepcopy of an unpickled model, LoRA's alike)
        again = pickle.loads(pickle.dumps(loaded))  # a rebuilt module pickles again, and deep-copies
        with torch.no_grad():
            assert torch.equal(copy.deepcopy(again).eval()(input_ids=IDS).logits, logits)
    assert_independent_and_equal(model, loaded, logits, tokens)

    # what the loaded model trained saves as an ordinary adapter, which loads to its outputs
    loaded.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=IDS).logits, loaded.eval()(input_ids=IDS).logits)
    assert isinstance(loaded.unload().model, type(model.get_base_model().model.get_base_layer()))


def test_a_whole_model_saved_with_torch_save_loads_in_a_fresh_process(tmp_path):
    """The per-module classes of parametrized modules exist only in the process that made them: a fresh process
    rebuilds them from the module's own class."""
    model = trained_model()
    greedy(model)
    with torch.no_grad():
        expected = model.eval()(input_ids=IDS).logits
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = logits_in_fresh_process(tmp_path, f"model = torch.load({str(path)!r}, weights_only=False)", IDS)
    assert torch.equal(loaded, expected)


def test_a_whole_model_saved_with_torch_save_trains_in_a_fresh_process(tmp_path):
    """The side trunk's attention implementation ("qst_side_sdpa", SDPA in float32 on CPU) is registered with
    transformers when a side network is built. A process that only unpickles one (torch.load of a whole model, the
    child of a multiprocessing spawn; unpickling imports peft_qst itself) did not have it: its inference ran (the fast
    path does not go through transformers' attention) but every forward with gradients failed ("`qst_side_sdpa` is
    not a valid attention implementation"). Loaded in a process that imported nothing, the model's training forward
    and backward are the original's."""
    from safetensors.torch import load_file

    from .conftest import run_python

    model = trained_model()
    side = next(m for m in model.modules() if isinstance(m, QSTSideNetwork))
    assert side.trunk.config._attn_implementation == "qst_side_sdpa"
    path, out_file = tmp_path / "model.pt", tmp_path / "grads.safetensors"
    torch.save(model, path)
    model.eval()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    expected = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    run_python(f"""
import torch
from safetensors.torch import save_file
model = torch.load({str(path)!r}, weights_only=False).eval()
loss = model(input_ids=torch.tensor({IDS.tolist()}), labels=torch.tensor({IDS.tolist()})).loss
loss.backward()
grads = {{name: p.grad for name, p in model.named_parameters() if p.requires_grad}}
save_file({{"loss": loss.detach().reshape(1), **grads}}, {str(out_file)!r})
""")
    got = load_file(out_file)
    assert torch.equal(got.pop("loss"), loss.detach().reshape(1))
    assert got.keys() == expected.keys() and len(got) > 0
    for name, grad in expected.items():
        assert torch.equal(got[name], grad), name


def test_deep_copy_after_generation_is_independent_and_equal():
    """copy.deepcopy after a generate: the copy computes the same, trains alone, and carries no copy of the fast
    path's packed weights (a float32 copy of every side weight, keyed to the original's storage: never used by the
    copy, which packs its own). Its copy heads read the copy's own LM head."""
    model = trained_model(copy_heads=2)
    tokens = greedy(model)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert "_packed_weights" in next(m for m in model.modules() if isinstance(m, QSTSideNetwork)).__dict__

    twin = copy.deepcopy(model)
    twin_side = next(m for m in twin.modules() if isinstance(m, QSTSideNetwork))
    assert "_packed_weights" not in twin_side.__dict__
    layer = next(m for m in twin.modules() if isinstance(m, QSTLayer))
    assert layer.__dict__["_output_embeddings"] is twin.get_output_embeddings()
    assert_independent_and_equal(model, twin, logits, tokens)


# --------------------------------------------------------------------------------------------------------------------
# merging, status, state dicts
# --------------------------------------------------------------------------------------------------------------------


def test_every_merge_call_is_refused_and_leaves_the_model_as_it_was():
    """merge_adapter() (the in-place merge TRL's vLLM sync and LoRA users call) is refused with the reason and the
    fix as merge_and_unload() is; unmerge_adapter() has nothing to undo; the model still runs its adapter."""
    model = trained_model()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    for merge in (
        lambda: model.merge_adapter(),
        lambda: model.merge_adapter(adapter_names=["default"]),
        lambda: model.merge_and_unload(safe_merge=True),
        lambda: model.base_model.merge_and_unload(),
        lambda: model.get_base_model().model.merge(),  # the QSTLayer's own merge, as PEFT's tuner layers have one
    ):
        with pytest.raises(ValueError, match="cannot be merged.*unload\\(\\)"):
            merge()
    model.unmerge_adapter()
    assert model.get_model_status().merged_adapters == []
    assert isinstance(model.get_base_model().model, QSTLayer)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected)


def test_status_reports_and_a_frozen_load(tmp_path):
    """get_layer_status/get_model_status see the one QSTLayer with each adapter's trainability; an adapter loaded
    with is_trainable=False (the default) is frozen, marked for inference and in eval mode."""
    model = trained_model()
    model.add_adapter("other", QSTConfig(task_type="CAUSAL_LM", r=2))
    (layer,) = model.get_layer_status()
    assert (layer.module_type, layer.name) == ("QSTLayer", "model.model")
    assert layer.requires_grad == {"default": True, "other": False}
    assert layer.available_adapters == ["default", "other"] and layer.merged_adapters == []
    status = model.get_model_status()
    assert status.peft_types == {"default": "QST", "other": "QST"}
    assert status.trainable_params == sum(p.numel() for n, p in model.named_parameters() if ".qst_side.default." in n)
    with model.disable_adapter():
        assert model.get_model_status().enabled is False

    model.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_causal_lm(), str(tmp_path))
    assert not frozen.training and frozen.peft_config["default"].inference_mode
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.get_model_status().requires_grad == {"default": False}
    trainable = PeftModel.from_pretrained(tiny_causal_lm(), str(tmp_path), is_trainable=True)
    assert not trainable.peft_config["default"].inference_mode
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if ".qst_side.default." in n
    }


def test_state_dict_helpers_move_an_adapter_between_names_and_models():
    """get_peft_model_state_dict / set_peft_model_state_dict: one adapter's weights, without its name, into another
    name of another model, or onto a model injected with inject_adapter_in_model (no PeftModel), exactly."""
    model = trained_model()
    model.add_adapter("other", QSTConfig(task_type="CAUSAL_LM", r=4))
    model.set_adapter("other")
    train_steps(model, IDS[:, :5])
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    saved = get_peft_model_state_dict(model, adapter_name="other")
    assert saved and not any(".other." in key for key in saved)

    target = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4))
    target.add_adapter("copy", QSTConfig(task_type="CAUSAL_LM", r=4))
    assert set_peft_model_state_dict(target, saved, adapter_name="copy").unexpected_keys == []
    target.set_adapter("copy")
    with torch.no_grad():
        assert torch.equal(target.eval()(input_ids=IDS).logits, expected)

    injected = inject_adapter_in_model(QSTConfig(task_type="CAUSAL_LM", r=4), tiny_causal_lm())
    assert {n for n, p in injected.named_parameters() if p.requires_grad} == {
        n for n, _ in injected.named_parameters() if ".qst_side." in n
    }
    with torch.no_grad():
        assert torch.allclose(injected(input_ids=IDS).logits, tiny_causal_lm()(input_ids=IDS).logits, atol=1e-6)
    train_steps(injected, IDS)
    with torch.no_grad():
        injected_logits = injected(input_ids=IDS).logits
    again = inject_adapter_in_model(QSTConfig(task_type="CAUSAL_LM", r=4), tiny_causal_lm())
    assert set_peft_model_state_dict(again, get_peft_model_state_dict(injected)).unexpected_keys == []
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=IDS).logits, injected_logits)


@pytest.mark.parametrize("flags", [{}, {"ignore_mismatched_sizes": True}, {"low_cpu_mem_usage": True}],
                         ids=["plain", "ignore_mismatched_sizes", "low_cpu_mem_usage"])
def test_set_peft_model_state_dict_refuses_side_weights_of_other_shapes_whatever_the_flags(flags):
    """PEFT's ignore_mismatched_sizes=True drops weights of other shapes and loads the rest, so a side network would
    be left half loaded: weights of another QST configuration (r=4 into r=8) are refused naming the shapes, whatever
    the flags, and nothing of the adapter changes (docs/loading.md, the details of the README's "Loading safely")."""
    weights = get_peft_model_state_dict(trained_model())
    model = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=8))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="have other shapes than this model's side network"):
        set_peft_model_state_dict(model, weights, **flags)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
def test_weights_of_an_injected_model_load_into_a_peft_model(tmp_path, tiny_model_dir, quantized):
    """A custom loop trains a model adapted with inject_adapter_in_model (no PeftModel) and keeps
    get_peft_model_state_dict of it, whose keys lack PeftModel's "base_model.model." prefix;
    set_peft_model_state_dict takes that prefix off for such a model but did not put it back for a PeftModel, and
    QST refused every weight as missing and unexpected, "saved from a different QST configuration". They load into a
    PeftModel (made with get_peft_model, or loaded from a folder and holding another adapter) computing what the
    injected model computes, and its saved folder loads the same."""
    kwargs = {"quantization_config": bnb_config()} if quantized else {}

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs)

    injected = inject_adapter_in_model(QSTConfig(task_type="CAUSAL_LM", r=4), base())
    train_steps(injected, IDS)
    with torch.no_grad():
        expected = injected.eval()(input_ids=IDS).logits
    weights = get_peft_model_state_dict(injected)
    assert not any(key.startswith("base_model.") for key in weights)

    model = get_peft_model(base(), QSTConfig(task_type="CAUSAL_LM", r=4))
    result = set_peft_model_state_dict(model, weights)
    assert result.unexpected_keys == [] and not any(".qst_side." in key for key in result.missing_keys)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=IDS).logits, expected)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base(), str(tmp_path), adapter_name="trained")
    loaded.add_adapter("other", QSTConfig(task_type="CAUSAL_LM", r=4))
    set_peft_model_state_dict(loaded, weights, adapter_name="other")
    for name in ("trained", "other"):
        loaded.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(input_ids=IDS).logits, expected)


@pytest.mark.parametrize("task_type, head", [("CAUSAL_LM", "lm_head"), ("SEQ_CLS", "score")])
def test_weights_of_an_injected_model_with_a_module_saved_whole_load_into_a_peft_model(task_type, head):
    """The keys of an injected model's modules_to_save (a trained LM head, a classification head) lack the
    "base_model.model." prefix too, and PEFT looks each one up with the prefix to give it the adapter's name before
    QST's tuner sees the weights: set_peft_model_state_dict into a PeftModel failed with a bare KeyError
    ('base_model.model.lm_head.weight'). They load, the head's trained weights included."""
    from transformers import AutoModelForSequenceClassification

    def base():
        torch.manual_seed(0)
        if task_type == "SEQ_CLS":
            from .conftest import tiny_llama_config

            return AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=3, pad_token_id=0))
        return tiny_causal_lm()

    def config():
        return QSTConfig(task_type=task_type, r=4, modules_to_save=[head])

    injected = inject_adapter_in_model(config(), base())
    for parameter in (p for n, p in injected.named_parameters() if p.requires_grad):
        with torch.no_grad():  # every trained weight away from its start, the head's included
            parameter.add_(0.01 * torch.randn_like(parameter))
    with torch.no_grad():
        expected = injected.eval()(input_ids=IDS).logits
    weights = get_peft_model_state_dict(injected)
    assert f"{head}.weight" in weights

    model = get_peft_model(base(), config())
    result = set_peft_model_state_dict(model, weights)
    assert result.unexpected_keys == [] and not any(".qst_side." in key for key in result.missing_keys)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=IDS).logits, expected)


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
def test_inject_adapter_in_model_with_the_weights_of_a_saved_folder(tmp_path, tiny_model_dir, quantized):
    """inject_adapter_in_model(config, model, state_dict=weights) has PEFT pick the modules to adapt from the
    checkpoint's keys; those of a saved folder (load_peft_weights) carry PeftModel's "base_model.model." prefix, and
    the injection failed with "Target modules model not found in the base model". The side network goes on the trunk
    the config names; the weights then load with set_peft_model_state_dict (also with low_cpu_mem_usage=True, as
    PEFT's docs pair the two) computing the trained logits, with the keys of an injected model too."""
    from peft import load_peft_weights

    kwargs = {"quantization_config": bnb_config()} if quantized else {}

    def base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs)

    model = trained_model(base())
    with torch.no_grad():
        expected = model.eval()(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    weights = load_peft_weights(str(tmp_path))
    for low_cpu_mem_usage in (False, True):
        injected = inject_adapter_in_model(QSTConfig(task_type="CAUSAL_LM", r=4), base(), state_dict=weights,
                                           low_cpu_mem_usage=low_cpu_mem_usage)
        result = set_peft_model_state_dict(injected, weights, low_cpu_mem_usage=low_cpu_mem_usage)
        assert result.unexpected_keys == []
        with torch.no_grad():
            assert torch.equal(injected.eval()(input_ids=IDS).logits, expected)
    again = inject_adapter_in_model(QSTConfig(task_type="CAUSAL_LM", r=4), base(),
                                    state_dict=get_peft_model_state_dict(injected))
    set_peft_model_state_dict(again, get_peft_model_state_dict(injected))
    with torch.no_grad():
        assert torch.equal(again.eval()(input_ids=IDS).logits, expected)


@pytest.mark.parametrize("saved_on, loaded_on", [("float32", "bfloat16"), ("4bit", "float32")])
def test_assigned_weights_take_the_side_dtype_rule(tmp_path, tiny_model_dir, saved_on, loaded_on):
    """set_peft_model_state_dict(..., low_cpu_mem_usage=True) assigns the tensors as they are, and PEFT casts them
    only in load_adapter: after inject_adapter_in_model, a side network saved in float32 stayed float32 on a bf16
    model, and one saved in bf16 from a 4-bit model stayed bf16 on a float32 one, computing otherwise than
    PeftModel.from_pretrained of the same folder. Both ways give the same dtypes and logits now."""
    from peft import load_peft_weights

    def base(kind):
        if kind == "4bit":
            return AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=getattr(torch, kind))

    trained_model(base(saved_on)).save_pretrained(tmp_path)
    reference = PeftModel.from_pretrained(base(loaded_on), str(tmp_path), low_cpu_mem_usage=True).eval()
    injected = inject_adapter_in_model(QSTConfig(task_type="CAUSAL_LM", r=4), base(loaded_on), low_cpu_mem_usage=True)
    set_peft_model_state_dict(injected, load_peft_weights(str(tmp_path)), low_cpu_mem_usage=True)
    assert side_dtypes(injected) == side_dtypes(reference) == {getattr(torch, loaded_on)}
    with torch.no_grad():
        assert torch.equal(injected.eval()(input_ids=IDS).logits, reference(input_ids=IDS).logits)


def test_lora_only_features_refuse_a_qst_adapter_before_touching_it(tmp_path):
    """PEFT's hot-swapping and mixed models take LoRA-family adapters only; they refuse QST by its type (QST's own
    swap is ``load_adapter(folder, adapter_name="default")``, which checks the weights fit first)."""
    from peft.utils.hotswap import hotswap_adapter

    model = trained_model()
    model.save_pretrained(tmp_path / "a")
    other = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4))
    train_steps(other, IDS[:, :5], steps=2)
    other.save_pretrained(tmp_path / "b")
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    with pytest.raises(ValueError, match="Hotswapping only supports.*QST"):
        hotswap_adapter(model, str(tmp_path / "b"), adapter_name="default", torch_device="cpu")
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected)
    model.load_adapter(str(tmp_path / "b"), adapter_name="default")
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=IDS).logits, other.eval()(input_ids=IDS).logits)

    with pytest.raises(ValueError, match="'QST' is not compatible with the `PeftMixedModel`"):
        get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4), mixed=True)


def test_the_lora_hotswap_helpers_refuse_a_qst_adapter_before_touching_it(tmp_path):
    """The helpers hotswap_adapter is built on, which LoRA users call themselves to compile once and swap in place:
    prepare_model_for_compiled_hotswap told a QST model it had "no adapter layers" (call it "after loading the first
    adapter"), and hotswap_adapter_from_state_dict, given some side weights under QST's prefix ("qst_", as
    hotswap_adapter passes it), zeroed all the others before failing on LoRA's rank_pattern. Both refuse now, the
    model unchanged, a PeftModel or a model adapted by inject_adapter_in_model; LoRA models swap as before."""
    from peft import LoraConfig
    from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap

    other = trained_model(tiny_causal_lm(seed=1))
    side_weights = {key: value for key, value in other.state_dict().items() if ".qst_side.default." in key}
    some = dict(list(side_weights.items())[:5])
    injected = inject_adapter_in_model(QSTConfig(task_type="CAUSAL_LM", r=4), tiny_causal_lm())
    train_steps(injected, IDS)
    for model in (trained_model(), injected):
        before = {key: value.clone() for key, value in model.state_dict().items()}
        with pytest.raises(ValueError, match="prepare_model_for_compiled_hotswap works on LoRA adapters only.*"
                                             "load_adapter\\(folder, adapter_name=name\\)"):
            prepare_model_for_compiled_hotswap(model, target_rank=8)
        for config in (QSTConfig(task_type="CAUSAL_LM", r=4), LoraConfig(r=4)):
            for prefix in ("qst_", "lora_"):
                with pytest.raises(ValueError, match="hotswap_adapter_from_state_dict works on LoRA adapters only"):
                    hotswap_adapter_from_state_dict(model, some, "default", config, parameter_prefix=prefix)
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)

    def lora_model(seed):
        return get_peft_model(tiny_causal_lm(seed=seed),
                              LoraConfig(r=4, task_type="CAUSAL_LM", init_lora_weights=False))

    lora, lora_other = lora_model(0), lora_model(1)
    # a QST adapter's weights and config handed to a LoRA model: refused by the config, the LoRA weights untouched
    before = {key: value.clone() for key, value in lora.state_dict().items()}
    with pytest.raises(ValueError, match="hotswap_adapter_from_state_dict works on LoRA adapters only"):
        hotswap_adapter_from_state_dict(lora, some, "default", QSTConfig(task_type="CAUSAL_LM", r=4),
                                        parameter_prefix="qst_")
    assert all(torch.equal(value, before[key]) for key, value in lora.state_dict().items())
    lora_other.save_pretrained(tmp_path / "lora")
    prepare_model_for_compiled_hotswap(lora, target_rank=8)
    hotswap_adapter(lora, str(tmp_path / "lora"), adapter_name="default", torch_device="cpu")
    with torch.no_grad():
        swapped = lora.eval()(input_ids=IDS).logits
        reference = PeftModel.from_pretrained(tiny_causal_lm(seed=0), str(tmp_path / "lora")).eval()(input_ids=IDS)
    torch.testing.assert_close(swapped, reference.logits)


# --------------------------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------------------------


def side_dtypes(model) -> set:
    return {p.dtype for n, p in model.named_parameters() if ".qst_side." in n}


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_autocast_adapter_dtype_leaves_the_side_dtype_rule(tmp_path, autocast_adapter_dtype):
    """PEFT's autocast_adapter_dtype=True upcasts bf16/fp16 LoRA weights to float32; a side network keeps its own rule
    (the model's dtype, float32 for float16), in get_peft_model and from_pretrained, whichever the flag."""
    trained_model().save_pretrained(tmp_path)  # saved in float32
    for dtype, expected in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        created = get_peft_model(
            tiny_causal_lm(dtype=dtype), QSTConfig(task_type="CAUSAL_LM", r=4),
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
        loaded = PeftModel.from_pretrained(
            tiny_causal_lm(dtype=dtype), str(tmp_path), autocast_adapter_dtype=autocast_adapter_dtype
        )
        assert side_dtypes(created) == side_dtypes(loaded) == {expected}


def test_casting_the_whole_model_casts_the_side_network_too(tmp_path):
    """model.to(dtype), .half(), .float() cast every parameter, as for LoRA: the side network follows, the outputs
    stay finite and near float32's, generation runs, and an adapter saved from the cast model loads by the rule."""
    model = trained_model()
    with torch.no_grad():
        reference = model(input_ids=IDS).logits
    for cast, dtype in (
        (lambda m: m.to(torch.bfloat16), torch.bfloat16),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.float(), torch.float32),
    ):
        model = cast(model)
        assert {p.dtype for p in model.parameters()} == {dtype}
        with torch.no_grad():
            logits = model(input_ids=IDS).logits
        assert logits.dtype == dtype and torch.isfinite(logits).all()
        torch.testing.assert_close(logits.float(), reference, atol=2e-2, rtol=0)
        assert greedy(model, 3).shape == (1, IDS.shape[1] + 3)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    assert side_dtypes(PeftModel.from_pretrained(tiny_causal_lm(), str(tmp_path))) == {torch.float32}


def test_lora_conversion_and_scaling_helpers_refuse_a_qst_model_without_changing_it(tmp_path):
    """PEFT's convert_to_lora and save_as_lora approximate a weight delta by a LoRA; rescale_adapter_scale scales
    LoRA's. A side network is neither: each refuses by name (as docs/usage.md says) and leaves the model as it was."""
    import peft
    from peft.helpers import rescale_adapter_scale

    model = trained_model()
    assert model.supports_lora_conversion() is False
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(TypeError, match="do not support LoRA conversion.*QSTLayer"):
        peft.convert_to_lora(model, rank=2)
    with pytest.raises(TypeError, match="do not support LoRA conversion.*QSTLayer"):
        peft.save_as_lora(str(tmp_path / "lora"), model, rank=2)
    assert not (tmp_path / "lora").exists() or not any((tmp_path / "lora").iterdir())
    with pytest.raises(ValueError, match="LoraLayer"):
        with rescale_adapter_scale(model, 0.5):
            pass
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize("how", ["get_peft_model", "add_adapter", "inject_adapter_in_model"])
def test_low_cpu_mem_usage_builds_a_side_network_that_runs_before_weights_are_loaded(tiny_model_dir, how):
    """low_cpu_mem_usage=True puts LoRA's new weights on the meta device until set_peft_model_state_dict assigns
    them; a side network is built with its initial weights instead (docs/usage.md): it runs at once, starting at
    the base model's output, and loads weights as usual."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = base(input_ids=IDS).logits
    config = QSTConfig(task_type="CAUSAL_LM", r=4)
    if how == "get_peft_model":
        model, name = get_peft_model(base, config, low_cpu_mem_usage=True), "default"
    elif how == "add_adapter":
        model, name = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4)), "other"
        model.add_adapter(name, config, low_cpu_mem_usage=True)
        model.set_adapter(name)
    else:
        model, name = inject_adapter_in_model(config, base, low_cpu_mem_usage=True), "default"
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with torch.no_grad():
        assert torch.allclose(model.eval()(input_ids=IDS).logits, expected, atol=1e-6)
    trained = trained_model()
    set_peft_model_state_dict(model, get_peft_model_state_dict(trained), adapter_name=name, low_cpu_mem_usage=True)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        assert torch.equal(logits, trained.eval()(input_ids=IDS).logits)
        assert not torch.allclose(logits, expected, atol=1e-4)
