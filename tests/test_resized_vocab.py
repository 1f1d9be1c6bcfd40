"""Added tokens on a 4-bit model, the way a QLoRA script adds them: ``resize_token_embeddings`` before
``get_peft_model``, with tied and untied embeddings, with and without the LM head trained (``modules_to_save``).
PEFT saves the resized embeddings beside the adapter (``save_embedding_layers``, set by itself because the vocabulary
differs from the base model's), and the adapter loads onto the base model resized the same way, whose added rows are
drawn afresh: only the saved ones give the trained logits. (Resizing after ``get_peft_model`` is tested in
test_adapters_and_persistence.py and test_peft_api_compat.py.)"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_qst import QSTAdapterFileError, QSTConfig

from .conftest import bnb_config, tiny_causal_lm, train_steps

VOCAB = 136  # the tiny model's 128 tokens and 8 added ones
IDS = torch.tensor([[5, 17, 130, 2, 135, 64, 7, 21], [128, 2, 3, 4, 129, 6, 7, 8]])  # with added tokens


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def base_dir(request, tmp_path):
    tiny_causal_lm(tie_word_embeddings=request.param).save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def resized_4bit(base_dir, vocab=VOCAB):
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config())
    if vocab is not None:
        model.resize_token_embeddings(vocab)  # the added rows are drawn at random, differently at every call
    return model


def trained(base_dir, **options):
    model = get_peft_model(resized_4bit(base_dir), QSTConfig(task_type="CAUSAL_LM", r=4, **options))
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    losses = train_steps(model, IDS)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(p, before[name]) for name, p in model.named_parameters() if p.requires_grad)
    return model


def outputs(model):
    with torch.no_grad():
        logits = model.eval()(input_ids=IDS).logits
        generated = model.generate(input_ids=IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with model.disable_adapter():
            base_logits = model(input_ids=IDS).logits
    return logits, generated, base_logits


def test_vocabulary_resized_before_get_peft_model_trains_and_reloads_exactly(tmp_path, base_dir):
    model = trained(base_dir)
    logits, generated, base_logits = outputs(model)
    assert logits.shape[-1] == VOCAB and generated.shape == (2, 12)
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {key: tuple(saved[key].shape) for key in saved if ".qst_side." not in key} == {
        "base_model.model.lm_head.weight": (VOCAB, 64),
        "base_model.model.model.base_layer.embed_tokens.weight": (VOCAB, 64),
    }
    loaded = PeftModel.from_pretrained(resized_4bit(base_dir), str(tmp_path / "adapter"))
    for reloaded, expected in zip(outputs(loaded), (logits, generated, base_logits)):
        assert torch.equal(reloaded, expected)


@pytest.mark.parametrize("vocab", [None, 140], ids=["not-resized", "resized-otherwise"])
def test_a_base_model_of_another_vocabulary_size_is_refused_with_the_size_to_resize_to(tmp_path, base_dir, vocab):
    trained(base_dir).save_pretrained(tmp_path / "adapter")
    refusal = rf"vocab_size {VOCAB} against {vocab or 128}.*token embeddings resized to {VOCAB} \(model.resize_token_"
    base = resized_4bit(base_dir, vocab)
    with pytest.raises(ValueError, match=refusal):
        PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=refusal):
        resized_4bit(base_dir, vocab).load_adapter(str(tmp_path / "adapter"))  # transformers' own loading


def test_an_lm_head_trained_on_a_resized_vocabulary_reloads(tmp_path, base_dir):
    """modules_to_save=["lm_head"] (what QST's warning for trainable_token_indices recommends, so that the model
    learns to emit the added tokens) on a resized vocabulary: PEFT's save_embedding_layers saves the wrapped head's
    whole state, the adapter's trained copy again under ``lm_head.modules_to_save.``. Every load refused that file
    ("belong neither to the adapter's side network nor to a module saved whole with it"): the adapter could be saved
    but never loaded again."""
    model = trained(base_dir, modules_to_save=["lm_head"])
    expected = outputs(model)
    model.save_pretrained(tmp_path / "adapter")
    assert "base_model.model.lm_head.modules_to_save.weight" in load_file(
        str(tmp_path / "adapter" / "adapter_model.safetensors")
    )
    loaded = PeftModel.from_pretrained(resized_4bit(base_dir), str(tmp_path / "adapter"))
    for reloaded, wanted in zip(outputs(loaded), expected):  # the trained head, and the resized frozen one
        assert torch.equal(reloaded, wanted)
    # transformers' own loading, and the adapter loaded again beside the first (into a head wrapped already)
    base = resized_4bit(base_dir)
    base.load_adapter(str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(base.eval()(input_ids=IDS).logits, expected[0])
    loaded.load_adapter(str(tmp_path / "adapter"), adapter_name="other")
    loaded.set_adapter("other")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=IDS).logits, expected[0])


@pytest.mark.parametrize("head", [False, True], ids=["frozen-head", "trained-head"])
def test_an_adapter_that_predates_the_recorded_vocabulary_size_names_the_resize(tmp_path, base_dir, head):
    """Adapters saved before the vocabulary size was recorded in base_model_signature: loaded onto a base model that
    was not resized, the saved embeddings were refused by PEFT as "a module saved whole with the adapter,
    modules_to_save" (which they are not, and without the resize that fixes it) and by transformers' load_adapter
    with a bare RuntimeError ("You set `ignore_mismatched_sizes` to `False`")."""
    import json

    trained(base_dir, modules_to_save=["lm_head"] if head else None).save_pretrained(tmp_path / "adapter")
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["base_model_signature"]["vocab_size"]  # as earlier versions wrote it
    config_file.write_text(json.dumps(config))
    refusal = rf"vocabulary of {VOCAB} tokens .*this model's has 128.*resize_token_embeddings\({VOCAB}\)"
    base = resized_4bit(base_dir, None)
    with pytest.raises(QSTAdapterFileError, match=refusal):
        PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    with pytest.raises(QSTAdapterFileError, match=refusal):
        base.load_adapter(str(tmp_path / "adapter"))  # transformers' own loading, on the model handed back as it was
    assert not hasattr(base, "peft_config")
    PeftModel.from_pretrained(resized_4bit(base_dir), str(tmp_path / "adapter"))  # resized, it loads


def test_an_adapter_trained_on_another_resize_is_not_loaded_over_the_embeddings_of_another(tmp_path, base_dir):
    """The embeddings saved with an adapter load into the base model that every adapter shares. Two adapters trained
    on base models resized each on its own hold different random rows for the added tokens: the second loaded beside
    the first silently changed the first's logits. Adapters trained on the same resized base model load side by side;
    a load into the only adapter (a trainer resuming) sets the saved rows."""
    first = trained(base_dir)
    expected = outputs(first)[0]
    first.save_pretrained(tmp_path / "first")
    trained(base_dir).save_pretrained(tmp_path / "second")  # another resize_token_embeddings: other added rows
    model = PeftModel.from_pretrained(resized_4bit(base_dir), str(tmp_path / "first"))
    with pytest.raises(QSTAdapterFileError, match=r"adapter 'second' would write the token embeddings .*\['default'\]"):
        model.load_adapter(str(tmp_path / "second"), adapter_name="second")
    assert sorted(model.peft_config) == ["default"]
    assert torch.equal(outputs(model)[0], expected)
    model.load_adapter(str(tmp_path / "first"), adapter_name="again")  # the same rows: loads
    model.set_adapter("again")
    assert torch.equal(outputs(model)[0], expected)


@pytest.mark.parametrize("head", [False, True], ids=["frozen-head", "trained-head"])
def test_the_card_of_an_adapter_on_a_resized_vocabulary_resizes_the_base_model(tmp_path, base_dir, head):
    """The card's loading code built the base model as its checkpoint is (128 tokens) and loaded the adapter onto it,
    which refuses it ("they differ in vocab_size 136 against 128"): a QLoRA recipe that adds chat tokens and resizes
    the embeddings (PEFT's examples/sft, TRL's clone_chat_template) got a card whose code failed. The card now
    resizes the base model as it was when the adapter was trained, and its code gives the trained outputs exactly;
    an adapter on a vocabulary left as it was (its trained LM head saved with it, one row per token too) gets no
    resize."""
    from .test_adapter_names_and_cards import loading_code, run_card

    model = trained(base_dir, modules_to_save=["lm_head"] if head else None)
    expected = outputs(model)
    model.save_pretrained(tmp_path / "adapter")
    card = tmp_path / "adapter" / "README.md"
    assert f"base.resize_token_embeddings({VOCAB})" in loading_code(card)
    for reloaded, wanted in zip(outputs(run_card(card)), expected):
        assert torch.equal(reloaded, wanted)

    plain = get_peft_model(resized_4bit(base_dir, None), QSTConfig(task_type="CAUSAL_LM", r=4,
                                                                    modules_to_save=["lm_head"] if head else None))
    plain.save_pretrained(tmp_path / "plain")
    assert "resize_token_embeddings" not in loading_code(tmp_path / "plain" / "README.md")


def test_auto_peft_model_resizing_to_the_tokenizer_is_named_in_the_refusal(tmp_path, base_dir):
    """PEFT's examples/sft adds chat tokens and resizes with ``pad_to_multiple_of=8``; ``trainer.save_model()``
    saves the tokenizer beside the adapter, and ``AutoPeftModelForCausalLM.from_pretrained(folder)`` resizes the
    base model to ``len(tokenizer)`` by itself: another size than the padded one. The refusal named a
    ``resize_token_embeddings`` the user never called; it now names AutoPeftModel's resize and the way that loads."""
    from peft import AutoPeftModelForCausalLM
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    trained(base_dir).save_pretrained(tmp_path / "adapter")  # embeddings padded to VOCAB = 136 rows
    vocab = {f"t{i}": i for i in range(VOCAB - 3)}  # the tokenizer: 133 tokens, padded to 136 by the script
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(
        tmp_path / "adapter"
    )
    with pytest.raises(ValueError, match=rf"vocab_size {VOCAB} against {VOCAB - 3}.*AutoPeftModel\*.from_pretrained "
                                         r"resizes the base model to the length of the tokenizer.*PeftModel.from_"):
        AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), quantization_config=bnb_config())
