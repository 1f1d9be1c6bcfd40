"""``modules_to_save`` entries that name no module of the model.

PEFT (``_set_trainable``) wraps every module whose name ends with an entry and skips an entry that matches nothing
without a word, for LoRA too: a typo (``"lm_haed"``, ``"scroe"``) trained and saved nothing for that module, which
showed only after training. QST refuses such entries of a new adapter, naming them, the model class and the close
module names, and refuses to load an adapter whose saved entries name a module this model lacks while the file holds
its trained weights. The entries PEFT's task classes and TRL add themselves, which may match nothing, still pass.
"""

import json
import re

import pytest
import torch
from peft import PeftModel, get_peft_model, inject_adapter_in_model
from peft.utils.other import ModulesToSaveWrapper
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from peft_qst import QSTConfig
from peft_qst.serialization import QSTAdapterFileError

from .conftest import bnb_config, tiny_causal_lm, tiny_llama_config

IDS = torch.tensor([[1, 5, 9, 2, 7, 3]])


def _untouched(model) -> bool:
    return not any(
        isinstance(module, ModulesToSaveWrapper) or "qst_" in name for name, module in model.named_modules()
    )


def _classifier(head: str = "score"):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=3, pad_token_id=0))
    if head != "score":
        setattr(model, head, model.score)
        del model.score
    return model


def _typo_refusal(entry: str, model_class: str, close: str) -> str:
    return (
        re.escape(f"[{entry!r}] match no module of {model_class}") + ".*nothing would be trained or saved"
        + ".*" + re.escape(f"close module names of this model: {entry!r}: [{close!r}")
    )


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4bit"])
@pytest.mark.parametrize(
    "task_type, entry, close",
    [("CAUSAL_LM", "lm_haed", "lm_head"), ("SEQ_CLS", "scroe", "score")],
    ids=["lm_head", "score"],
)
def test_an_entry_matching_no_module_is_refused_naming_close_names(tiny_model_dir, task_type, entry, close, quantized):
    """get_peft_model, PeftModel.add_adapter and PEFT's inject_adapter_in_model refuse the misspelt entry before the model
    changes (LoRA and QST before trained and saved nothing for it, silently). On a real bitsandbytes 4-bit base too,
    whose head is kept unquantized as transformers does by default."""
    def base():
        torch.manual_seed(0)
        kwargs = dict(quantization_config=bnb_config()) if quantized else {}
        if task_type == "SEQ_CLS":
            kwargs.update(num_labels=3, pad_token_id=0)
            return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, **kwargs)
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs)

    model = base()
    model_class = type(model).__name__
    refusal = _typo_refusal(entry, model_class, close)
    with pytest.raises(ValueError, match=refusal):
        get_peft_model(model, QSTConfig(task_type=task_type, r=4, modules_to_save=[entry]))
    assert _untouched(model)

    # a second adapter of a PeftModel: refused, and not left behind
    peft_model = get_peft_model(model, QSTConfig(task_type=task_type, r=4))
    with pytest.raises(ValueError, match=refusal):
        peft_model.add_adapter("second", QSTConfig(task_type=task_type, r=4, modules_to_save=[close, entry]))
    assert list(peft_model.peft_config) == ["default"]
    assert not any(".second." in name for name, _ in peft_model.named_modules())

    # PEFT's injection without a task class (what transformers' adapter API calls)
    other = base()
    with pytest.raises(ValueError, match=refusal):
        inject_adapter_in_model(QSTConfig(task_type=task_type, r=4, modules_to_save=[entry]), other)
    assert _untouched(other)


def test_an_entry_without_close_names_lists_the_modules_that_can_train():
    """Where nothing is close, the error lists the modules outside the decoder trunk (the ones modules_to_save can
    train), so the user sees what the head is called in this model."""
    with pytest.raises(ValueError, match=re.escape("['output_layer'] match no module of LlamaForCausalLM")
                       + ".*" + re.escape("the modules of this model outside the decoder trunk: ['lm_head']")):
        get_peft_model(
            AutoModelForCausalLM.from_config(tiny_llama_config()),
            QSTConfig(task_type="CAUSAL_LM", r=4, modules_to_save=["lm_head", "output_layer"]),
        )


def test_an_entry_on_a_multimodal_model_lists_the_modules_beside_its_language_model_not_the_one_holding_it():
    """A Llava's decoder trunk is model.language_model, inside model: the modules that can train are the LM head and
    the vision tower and projector beside the trunk, not model, which holds the frozen trunk (an entry naming it would
    be refused as lying inside it)."""
    from .test_multimodal import build

    listed = "the modules of this model outside the decoder trunk: ['lm_head', 'model.multi_modal_projector', " \
        "'model.vision_tower']"
    with pytest.raises(ValueError, match=re.escape("['xyzzy'] match no module of LlavaForConditionalGeneration")
                       + ".*" + re.escape(listed)):
        get_peft_model(build("llava"), QSTConfig(task_type="CAUSAL_LM", r=4, modules_to_save=["lm_head", "xyzzy"]))


def test_an_entry_on_a_bare_trunk_says_that_nothing_lies_outside_it():
    """A bare decoder trunk (AutoModel, for its features) has no head: an entry naming one is refused saying that no
    module lies outside the trunk, rather than listing an empty set of trainable modules."""
    from transformers import AutoModel

    model = AutoModel.from_config(tiny_llama_config())
    with pytest.raises(ValueError, match=re.escape("['lm_head'] match no module of LlamaModel") + ".*"
                       + re.escape("(no module of this model lies outside the decoder trunk)")):
        get_peft_model(model, QSTConfig(task_type="FEATURE_EXTRACTION", r=4, modules_to_save=["lm_head"]))
    assert _untouched(model)


def test_the_entries_peft_and_trl_add_themselves_still_pass(tmp_path):
    """PEFT's task class adds both "classifier" and "score" for SEQ_CLS (a model has one of them), and TRL adds
    "lm_head" beside trainable_token_indices when its chat-template cloning added tokens, also for a classifier
    (RewardTrainer), which has none: neither is the user's, and LoRA passes both. Such an adapter saves and loads
    back (its file holds no weights for the entries that matched nothing)."""
    config = QSTConfig(task_type="SEQ_CLS", r=4, modules_to_save=["lm_head"], trainable_token_indices=[3, 4])
    with pytest.warns(UserWarning, match="trainable_token_indices.*is ignored"):
        model = get_peft_model(_classifier(), config)
    assert set(model.peft_config["default"].modules_to_save) == {"lm_head", "classifier", "score"}
    assert isinstance(model.base_model.model.score, ModulesToSaveWrapper)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_classifier(), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits)


@pytest.mark.parametrize("loader", ["peft", "transformers"])
def test_an_adapter_whose_saved_head_the_model_lacks_is_refused_naming_it(tmp_path, loader):
    """An adapter trained with modules_to_save=["classification_head"] (a classifier whose head has that name),
    loaded onto a classifier whose head is "score": PEFT skipped the entry without a word, and the load failed on
    "score" lacking weights in the file (PEFT's task class adds it), or, through transformers, as tensors "written by
    something other than save_pretrained"; neither named the cause. Now the saved entry is named, with what this
    model has instead, and nothing is loaded. An entry with no weights in the file (a typo saved before new adapters
    were checked) trained nothing: such an adapter still loads as it was saved."""
    trained = get_peft_model(
        _classifier("classification_head"),
        QSTConfig(task_type="SEQ_CLS", r=4, modules_to_save=["classification_head"]),
    )
    trained.save_pretrained(tmp_path)
    refusal = (
        re.escape("was saved with modules_to_save entries ['classification_head'] and their trained weights")
        + ".*" + re.escape("match no module of LlamaForSequenceClassification")
        + ".*" + re.escape("outside the decoder trunk: ['score']") + ".*nothing was loaded"
    )
    base = _classifier()
    with pytest.raises(QSTAdapterFileError, match=refusal):
        if loader == "peft":
            PeftModel.from_pretrained(base, str(tmp_path))
        else:
            base.load_adapter(str(tmp_path))
    if loader == "transformers":
        assert _untouched(base)

    # a causal-LM adapter saved with a misspelt entry (no weights for it in the file) loads as saved
    model = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
    model.save_pretrained(tmp_path / "lm")
    path = tmp_path / "lm" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "modules_to_save": ["lm_haed"]}))
    loaded = PeftModel.from_pretrained(tiny_causal_lm(), str(tmp_path / "lm"))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=IDS).logits, model.eval()(input_ids=IDS).logits)


@pytest.mark.parametrize("loader", ["peft", "peft_trainable", "transformers"])
def test_a_saved_config_without_signature_is_checked_against_its_weights_not_as_a_new_adapter(tmp_path, loader):
    """A config that records no base_model_signature (written by hand, or by a version before the signature) looked
    like a new adapter's to the binding, which refused its entry that matches nothing ("lm_haed", no weights for it in
    the file) as a typo to correct before training: the adapter, which trained nothing for it, could not be loaded at
    all, by PEFT or transformers. Loading checks the saved entries against the weights read with them, as for an
    adapter that records its signature: such an adapter loads as it was saved."""
    model = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 0.1)
        expected = model.eval()(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    saved.pop("base_model_signature")
    path.write_text(json.dumps({**saved, "modules_to_save": ["lm_haed"]}))
    base = tiny_causal_lm()
    if loader == "transformers":
        base.load_adapter(str(tmp_path))
        loaded = base
    else:
        loaded = PeftModel.from_pretrained(base, str(tmp_path), is_trainable=loader == "peft_trainable")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=IDS).logits, expected)
    # a new adapter with that entry is still refused
    with pytest.raises(ValueError, match=_typo_refusal("lm_haed", "LlamaForCausalLM", "lm_head")):
        get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4, modules_to_save=["lm_haed"]))
