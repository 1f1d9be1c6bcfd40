"""transformers' own adapter loading: ``AutoModelForCausalLM.from_pretrained(adapter_folder)`` and
``model.load_adapter(adapter_folder)`` inject the adapter with PEFT and read its weights with transformers' loader.
A QST adapter loads there as through PEFT (same logits, same generation) with the same refusals; and the ``peft_type``
that PEFT, transformers and TRL read as an enum member (``.value``, ``"PeftType.NAME"``) behaves like one."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peft_qst import QSTAdapterFileError, QSTConfig

from .conftest import train_steps

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.fixture
def saved_adapter(tmp_path, tiny_model_dir):
    """A trained QST adapter saved to disk, and the PeftModel it was saved from (eval mode)."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    train_steps(model, IDS)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return folder, model.eval()


@pytest.mark.parametrize("how", ["AutoModelForCausalLM.from_pretrained", "load_adapter", "adapter_state_dict"])
def test_transformers_loads_a_qst_adapter_as_peft_does(tiny_model_dir, saved_adapter, how):
    folder, reference = saved_adapter
    if how == "load_adapter":
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model.load_adapter(str(folder))
    elif how == "adapter_state_dict":  # the weights and config given in memory, no folder read
        from peft_qst.layer import SIDE_ATTR

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model.load_adapter(peft_config=QSTConfig.from_pretrained(str(folder)),
                           adapter_state_dict=load_file(folder / "adapter_model.safetensors"))
        # no file was read, so there is no saved weights' digest for the side network to take as its identity
        assert not getattr(model.model, SIDE_ATTR)["default"].cache_identity().startswith("weights-sha256:")
    else:  # reads the base model's path from adapter_config.json
        model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        assert torch.equal(logits, reference(input_ids=IDS).logits)
        assert not torch.allclose(logits, base(input_ids=IDS).logits)  # the adapter is there and does something
        generated = model.generate(input_ids=IDS[:1], max_new_tokens=6, do_sample=False)
        assert torch.equal(generated, reference.generate(input_ids=IDS[:1], max_new_tokens=6, do_sample=False))


def _pickled_only(folder):
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()


def _tampered(folder):
    tensors = load_file(folder / "adapter_model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, folder / "adapter_model.safetensors")


def _missing_weight_without_digest(folder):
    """A weight dropped from a file whose config records no digest (as adapters saved by early versions): only the
    key check after loading can notice."""
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, folder / "adapter_model.safetensors")
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.pop("adapter_weights_sha256")
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_pickled_only, "never unpickles"),
        (_tampered, "do not match the digest"),
        (_missing_weight_without_digest, "1 missing from the file"),
    ],
    ids=["pickled-only", "tampered", "missing-weight"],
)
def test_transformers_loading_refuses_what_peft_loading_refuses(
    tiny_model_dir, saved_adapter, monkeypatch, damage, message
):
    """Before the fix transformers unpickled adapter_model.bin, loaded tampered weights, and started a missing weight
    at its fresh initialisation with a log line. Now each is refused and the model is left as it was."""
    folder, _ = saved_adapter
    damage(folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tags = model.model_tags
    with torch.no_grad():
        before = model(input_ids=IDS).logits

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a QST adapter")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(QSTAdapterFileError, match=message):
        model.load_adapter(str(folder))
    assert not getattr(model, "peft_config", {})
    assert model.model_tags == tags
    assert not any(".qst_side." in name for name, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, before)


def test_transformers_still_loads_other_peft_adapters(tmp_path, tiny_model_dir):
    """The QST checks apply to QST adapters only: a LoRA adapter loads through transformers as it always did."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(base, LoraConfig(r=4, init_lora_weights=False))
    lora.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.load_adapter(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=IDS).logits, lora.eval()(input_ids=IDS).logits)


def test_peft_type_reads_like_a_peft_type_member(tiny_model_dir, saved_adapter):
    """PEFT's get_model_status parses str(peft_type) as "PeftType.NAME" (it reported ''); PEFT, transformers and TRL
    read peft_type.value; adapter_config.json holds the plain name."""
    folder, model = saved_adapter
    assert model.get_model_status().peft_types == {"default": "QST"}
    assert model.peft_config["default"].peft_type.value == "QST"
    assert model.peft_config["default"].peft_type == "QST"
    # a config copied (PEFT deep-copies configs) or pickled (torch.save of a whole model) keeps the type's reading
    config = model.peft_config["default"]
    for copied in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert type(copied.peft_type) is type(config.peft_type)
        assert copied.peft_type.value == "QST" and str(copied.peft_type) == "PeftType.QST"
    assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "QST"
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(folder))
    assert reloaded.get_model_status().peft_types == {"default": "QST"}


def test_a_second_adapter_through_transformers_is_refused(tiny_model_dir, saved_adapter):
    """transformers cannot switch adapters with this PEFT (its set_adapter asks for a newer one), and a second QST
    adapter injected next to the first changed what the model computed: refused, with the PEFT way to hold several."""
    folder, reference = saved_adapter
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.load_adapter(str(folder))
    with pytest.raises(ValueError, match="PeftModel.from_pretrained"):
        model.load_adapter(str(folder), adapter_name="second")
    assert list(model.peft_config) == ["default"]
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=IDS).logits, reference(input_ids=IDS).logits)


def test_a_4bit_smollm2_adapter_loads_through_transformers_with_its_quantization(tmp_path, smollm2_dir):
    """The real case: ``AutoModelForCausalLM.from_pretrained(adapter_folder, quantization_config=...)`` loads the
    4-bit base model the adapter names and the adapter on it, computing what the PeftModel saved computes."""
    from .conftest import bnb_config, load_smollm2_4bit

    model = get_peft_model(load_smollm2_4bit(smollm2_dir), QSTConfig(task_type="CAUSAL_LM"))
    train_steps(model, IDS, steps=2)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), quantization_config=bnb_config()).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits)


def test_a_load_that_fails_on_a_misshapen_weight_is_undone(tiny_model_dir, saved_adapter):
    """A config that does not match its weights (here downsample_rank edited; the digest covers the weights only, so
    it still matches) makes transformers raise on the size mismatch after it injected the adapter and loaded the
    weights that fit. The half-loaded adapter stayed on the model, changed its output and made every later load
    fail with "already holds the adapter(s)"; now the load is undone before the error surfaces."""
    folder, reference = saved_adapter
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["downsample_rank"] = 8
    config_path.write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    with pytest.raises(Exception, match="mismatch|shape"):
        model.load_adapter(str(folder))
    assert not getattr(model, "peft_config", {})
    assert not any(".qst_side." in name for name, _ in model.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, before)
    config["downsample_rank"] = 16
    config_path.write_text(json.dumps(config))
    model.load_adapter(str(folder))  # the right adapter still loads
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=IDS).logits, reference(input_ids=IDS).logits)


def test_a_refused_load_leaves_the_model_trainable_as_it_was(tiny_model_dir, saved_adapter):
    """Injection freezes every base weight and loading switches to eval mode; a refused load left the whole model
    frozen (a full fine-tune afterwards got a loss without grad_fn) and in eval mode."""
    folder, _ = saved_adapter
    _missing_weight_without_digest(folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(QSTAdapterFileError, match="1 missing from the file"):
        model.load_adapter(str(folder))
    assert all(p.requires_grad for p in model.parameters())
    assert all(module.training for module in model.modules())
    assert model(input_ids=IDS, labels=IDS).loss.requires_grad


#: the task classes beside the causal LM: PEFT task type, transformers Auto class, PEFT Auto class
TASKS = {
    "TOKEN_CLS": ("AutoModelForTokenClassification", "AutoPeftModelForTokenClassification"),
    "QUESTION_ANS": ("AutoModelForQuestionAnswering", "AutoPeftModelForQuestionAnswering"),
}


def _task_outputs(model):
    with torch.no_grad():
        out = model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
    return torch.cat([out.start_logits, out.end_logits]) if "start_logits" in out else out.logits


@pytest.fixture(params=list(TASKS))
def saved_task_adapter(request, tmp_path):
    """A QST adapter of a task class trained a few steps on a tiny random base model of that class saved to disk (so
    its head and trunk load as saved: LlamaForQuestionAnswering names its trunk ``transformer`` and finds nothing of a
    causal LM's checkpoint), saved; returns the task type, the base folder, the adapter folder and trained outputs."""
    import transformers

    from .conftest import tiny_llama_config

    task_type = request.param
    auto_class = getattr(transformers, TASKS[task_type][0])
    torch.manual_seed(0)
    auto_class.from_config(tiny_llama_config(pad_token_id=0, num_labels=3)).save_pretrained(tmp_path / "base")
    model = get_peft_model(auto_class.from_pretrained(tmp_path / "base"), QSTConfig(task_type=task_type, r=4))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        out = model(input_ids=IDS, attention_mask=torch.ones_like(IDS))
        logits = torch.cat([out.start_logits, out.end_logits]) if "start_logits" in out else out.logits
        logits.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    return task_type, str(tmp_path / "base"), str(tmp_path / "adapter"), _task_outputs(model)


@pytest.mark.parametrize("how", ["AutoPeftModel", "PeftModel.from_pretrained", "transformers-from_pretrained",
                                 "transformers-load_adapter"])
def test_a_task_adapter_loads_through_every_route_to_the_trained_outputs(saved_task_adapter, how):
    """TOKEN_CLS and QUESTION_ANS adapters load back exactly, their trained heads included, through PEFT's Auto class
    for the task, PeftModel.from_pretrained, and transformers' own adapter loading (which reads the base model's path
    from adapter_config.json, or injects into a model loaded first)."""
    import peft
    import transformers

    task_type, base, folder, trained = saved_task_adapter
    auto_class = getattr(transformers, TASKS[task_type][0])
    if how == "AutoPeftModel":
        model = getattr(peft, TASKS[task_type][1]).from_pretrained(folder, num_labels=3)
    elif how == "PeftModel.from_pretrained":
        model = PeftModel.from_pretrained(auto_class.from_pretrained(base), folder)
    elif how == "transformers-from_pretrained":
        model = auto_class.from_pretrained(folder)
    else:
        model = auto_class.from_pretrained(base)
        model.load_adapter(folder)
    assert torch.equal(_task_outputs(model.eval()), trained)


@pytest.mark.parametrize("wrong_class", ["AutoModelForCausalLM", "AutoModelForSequenceClassification"])
@pytest.mark.parametrize("how", ["from_pretrained", "load_adapter"])
def test_a_question_answering_adapter_loaded_onto_another_task_class_names_the_missing_head(tmp_path, wrong_class,
                                                                                             how):
    """LlamaForQuestionAnswering names its trunk ``transformer``, which the adapter records (target_modules); loaded
    through transformers onto a causal LM or another classifier, the refusal said that target_modules='transformer'
    matches no module and to "leave it None", a field the user never set. It names the missing qa_outputs head and
    the class to load with, and leaves the model as it was."""
    import transformers

    from .conftest import tiny_llama_config

    torch.manual_seed(0)
    config = tiny_llama_config(pad_token_id=0, num_labels=3)
    transformers.AutoModelForQuestionAnswering.from_config(config).save_pretrained(tmp_path / "base")
    qa = transformers.AutoModelForQuestionAnswering.from_pretrained(tmp_path / "base")
    get_peft_model(qa, QSTConfig(task_type="QUESTION_ANS", r=4)).save_pretrained(tmp_path / "adapter")
    wrong = getattr(transformers, wrong_class)
    refusal = r"task_type='QUESTION_ANS' trains the model's task head \(qa_outputs\).*AutoModelForQuestionAnswering"
    if how == "from_pretrained":
        with pytest.raises(ValueError, match=refusal):
            wrong.from_pretrained(str(tmp_path / "adapter"), num_labels=3)
        return
    wrong.from_config(config).save_pretrained(tmp_path / "other")
    model = wrong.from_pretrained(tmp_path / "other").eval()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=refusal):
        model.load_adapter(str(tmp_path / "adapter"))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    assert not getattr(model, "_hf_peft_config_loaded", False)
