"""Added tokens on a 4-bit model, the way a QLoRA script adds them: ``resize_token_embeddings`` before
``get_peft_model``, with tied and untied embeddings, with and without the LM head trained (``modules_to_save``).
PEFT saves the resized embeddings beside the adapter (``save_embedding_layers``, set by itself because the vocabulary
differs from the base model's), and the adapter loads onto the base model resized the same way, whose added rows are
drawn afresh: only the saved ones give the trained logits. (Resizing after ``get_peft_model`` is tested in
test_adapters_and_persistence.py and test_peft_api_compat.py.)"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from peft_qst import QSTAdapterFileError, QSTConfig

from .conftest import bnb_config, saved_under_another_trunk_name, tiny_causal_lm, train_steps

VOCAB = 136  # the tiny model's 128 tokens and 8 added ones
IDS = torch.tensor([[5, 17, 130, 2, 135, 64, 7, 21], [128, 2, 3, 4, 129, 6, 7, 8]])  # with added tokens


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def base_dir(request, tmp_path):
    tiny_causal_lm(tie_word_embeddings=request.param).save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def resized_4bit(base_dir, vocab=VOCAB, quantized=True, **resize_options):
    model = AutoModelForCausalLM.from_pretrained(base_dir, **quantized_as(quantized))
    if vocab is not None:
        # the added rows are drawn at random, differently at every call
        model.resize_token_embeddings(vocab, **resize_options)
    return model


def quantized_as(quantized: bool) -> dict:
    return {"quantization_config": bnb_config()} if quantized else {}


def trained(base_dir, base=None, **options):
    base = resized_4bit(base_dir) if base is None else base
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, **options))
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
def test_a_base_model_of_another_vocabulary_size_is_resized_to_the_adapters(tmp_path, base_dir, vocab):
    """The file holds the trained embeddings (and the untied head) for every token: the base model is resized to the
    recorded size, with a warning, and the saved rows overwrite every row, so the model computes as trained, whatever
    size the base model had (PeftModel, with is_trainable too, and transformers' own loading). It was refused as
    "another vocabulary size"."""
    model = trained(base_dir)
    expected = outputs(model)
    model.save_pretrained(tmp_path / "adapter")
    resize = rf"resized from {vocab or 128} to {VOCAB} tokens \(model.resize_token_embeddings\({VOCAB}\)\)"
    # what the file holds that was loaded over every row: the head too where it is not tied to the embeddings
    tied = AutoConfig.from_pretrained(base_dir).tie_word_embeddings
    resize += rf".*trained token embeddings{'' if tied else ' and LM head'} for all of them"
    with pytest.warns(UserWarning, match=resize):
        loaded = PeftModel.from_pretrained(resized_4bit(base_dir, vocab), str(tmp_path / "adapter"))
    for reloaded, wanted in zip(outputs(loaded), expected):
        assert torch.equal(reloaded, wanted)
    with pytest.warns(UserWarning, match=resize):
        trainable = PeftModel.from_pretrained(resized_4bit(base_dir, vocab), str(tmp_path / "adapter"),
                                              is_trainable=True)
    assert torch.equal(outputs(trainable)[0], expected[0])
    assert any(p.requires_grad for p in trainable.parameters())
    base = resized_4bit(base_dir, vocab)
    with pytest.warns(UserWarning, match=resize):
        base.load_adapter(str(tmp_path / "adapter"))  # transformers' own loading
    with torch.no_grad():
        assert torch.equal(base.eval()(input_ids=IDS).logits, expected[0])


def edit(folder, change) -> None:
    """The adapter at ``folder`` with the tensors of its file changed by ``change`` (a function of the dict of them),
    and the digest recorded for the new bytes."""
    import json

    from safetensors.torch import save_file

    from peft_qst.serialization import weights_digest

    weights = change(load_file(str(folder / "adapter_model.safetensors")))
    save_file(weights, str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    config["adapter_weights_sha256"] = weights_digest(weights)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_the_resize_reads_the_saved_embeddings_under_the_names_key_mapping_gives_them(tmp_path, base_dir):
    """An adapter on a padded vocabulary saved under an older layout's trunk name, loaded with the ``key_mapping``
    that renames its weights: the resize read the file's names as saved, found no embeddings under the model's names
    and the load was refused as "another vocabulary size", though the load renames them and writes every row (the
    same file without the renaming, or the base model resized by hand, loads). Named as the load names them, the base
    model is resized and the adapter computes as trained."""
    model = trained(base_dir)
    expected = outputs(model)
    saved_under_another_trunk_name(model, tmp_path / "adapter")
    with pytest.warns(UserWarning, match=rf"resized from 128 to {VOCAB} tokens"):
        loaded = PeftModel.from_pretrained(resized_4bit(base_dir, None), str(tmp_path / "adapter"),
                                           key_mapping={"^old_trunk": "model"})
    for reloaded, wanted in zip(outputs(loaded), expected):
        assert torch.equal(reloaded, wanted)


def test_an_adapter_added_with_add_adapter_on_a_resized_vocabulary_saves_its_embeddings(tmp_path, base_dir):
    """A second adapter (``add_adapter``) on a resized vocabulary: PEFT records its ``base_model_name_or_path`` only
    after saving its weights, so ``save_embedding_layers="auto"`` compared nothing and its file held no embeddings
    (the first adapter's did). Alone it was refused as "another vocabulary size"; beside the first one it warned that
    its added tokens' rows were random, though the first one's load had written the trained ones. It is saved with
    them, and loads alone and beside the first exactly, without a warning of peft-qst's."""
    model = trained(base_dir)
    model.add_adapter("second", QSTConfig(task_type="CAUSAL_LM", r=4))
    model.set_adapter("second")
    train_steps(model, IDS)
    expected = outputs(model)[0]
    # "auto" given by position (save_directory, safe_serialization, selected_adapters, save_embedding_layers), in a
    # copy: the first save records the adapter's base_model_name_or_path
    with pytest.warns(UserWarning, match="Setting `save_embedding_layers` to `True`"):
        copy.deepcopy(model).save_pretrained(tmp_path / "positional", True, ["second"], "auto")
    saved = load_file(tmp_path / "positional" / "second" / "adapter_model.safetensors")
    assert any(".base_layer." in key and "embed_tokens" in key for key in saved)
    with pytest.warns(UserWarning, match="Setting `save_embedding_layers` to `True`"):
        model.save_pretrained(tmp_path / "adapters")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alone = PeftModel.from_pretrained(resized_4bit(base_dir, None), str(tmp_path / "adapters" / "second"))
        assert torch.equal(outputs(alone)[0], expected)
        beside = PeftModel.from_pretrained(resized_4bit(base_dir, None), str(tmp_path / "adapters"))
        beside.load_adapter(str(tmp_path / "adapters" / "second"), adapter_name="second")
        beside.set_adapter("second")
        assert torch.equal(outputs(beside)[0], expected)
    assert not [str(w.message) for w in caught if "file holds no token embeddings" in str(w.message)]


@pytest.mark.parametrize("lacking", ["embeddings", "lm_head"])
def test_a_file_without_every_vocabulary_sized_tensor_keeps_the_refusal(tmp_path, base_dir, lacking):
    """A resize draws the added tokens' rows at random: only where the file holds every row the model reads does it
    give the trained model. Saved without the embeddings (save_embedding_layers=False), the adapter is refused as
    before, the base model left as it was; without the LM head, an untied head is refused too, while a tied one reads
    the embeddings' rows and loads exactly."""
    tied = AutoConfig.from_pretrained(base_dir).tie_word_embeddings
    model = trained(base_dir)
    expected = outputs(model)[0]
    if lacking == "embeddings":
        model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    else:
        model.save_pretrained(tmp_path / "adapter")
        edit(tmp_path / "adapter", lambda weights: {key: w for key, w in weights.items() if "lm_head" not in key})
    if lacking == "lm_head" and tied:
        with pytest.warns(UserWarning, match=rf"resized from 128 to {VOCAB} tokens"):
            loaded = PeftModel.from_pretrained(resized_4bit(base_dir, None), str(tmp_path / "adapter"))
        assert torch.equal(outputs(loaded)[0], expected)
        return
    refusal = rf"vocab_size {VOCAB} against 128.*token embeddings resized to {VOCAB} \(model.resize_token_.*itself only"
    base = resized_4bit(base_dir, None)
    weight = base.get_input_embeddings().weight.detach().clone()
    with pytest.raises(ValueError, match=refusal):
        PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=refusal):
        base.load_adapter(str(tmp_path / "adapter"))  # transformers' own loading
    assert base.config.vocab_size == 128 and torch.equal(base.get_input_embeddings().weight, weight)


def test_a_file_without_the_bias_of_an_lm_head_that_has_one_keeps_the_refusal(tmp_path):
    """Phi's LM head has a bias, one entry per token: a resize draws the added tokens' entries too, so a file that
    holds the head's weight for every token but not its bias does not give the trained model (its logits on the
    added tokens would be offset at random). The load is refused as another vocabulary size, the base model left at
    its own; the whole file loads, resizing the model, and computes as trained."""
    from transformers import AutoConfig

    AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "phi", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
    )).save_pretrained(tmp_path / "base")
    base_dir = str(tmp_path / "base")
    model = trained(base_dir, base=resized_4bit(base_dir, quantized=False))
    expected = outputs(model)[0]
    model.save_pretrained(tmp_path / "adapter")
    assert load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))["base_model.model.lm_head.bias"].shape \
        == (VOCAB,)
    with pytest.warns(UserWarning, match=rf"resized from 128 to {VOCAB} tokens"):
        loaded = PeftModel.from_pretrained(resized_4bit(base_dir, None, quantized=False), str(tmp_path / "adapter"))
    assert torch.equal(outputs(loaded)[0], expected)
    edit(tmp_path / "adapter", lambda weights: {key: w for key, w in weights.items() if not key.endswith("head.bias")})
    base = resized_4bit(base_dir, None, quantized=False)
    with pytest.raises(ValueError, match=rf"vocab_size {VOCAB} against 128"):
        PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert base.config.vocab_size == 128 and base.get_output_embeddings().bias.shape == (128,)


def test_a_load_refused_after_the_resize_hands_the_base_model_back_at_its_size(tmp_path, base_dir):
    """The resize happens before the weights are loaded: where the load is refused after it (here, a file holding a
    tensor for a weight of the frozen base model), the base model goes back to its vocabulary, embeddings and head,
    as every refused load hands it back, and loads the adapter once the file is right. The warning that the model was
    resized (and "computes as it did in training") comes only with a load that succeeded: it came before the refusal,
    of a model handed back at its size with nothing loaded."""
    model = trained(base_dir)
    expected = outputs(model)[0]
    model.save_pretrained(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "foreign")
    norm = "base_model.model.model.base_layer.norm.weight"
    edit(tmp_path / "foreign", lambda weights: {**weights, norm: torch.ones(64)})
    base = resized_4bit(base_dir, None)
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    weights = (embeddings.weight.detach().clone(), head.weight.detach().clone())
    with torch.no_grad():
        logits = base(input_ids=IDS % 128).logits
    for load in (lambda: PeftModel.from_pretrained(base, str(tmp_path / "foreign")),
                 lambda: base.load_adapter(str(tmp_path / "foreign"))):  # and transformers' own loading
        with warnings.catch_warnings(record=True) as caught, pytest.raises(QSTAdapterFileError, match="neither"):
            warnings.simplefilter("always")
            load()
        assert not [str(w.message) for w in caught if "resized from" in str(w.message)]
        assert base.config.vocab_size == 128 and base.get_input_embeddings() is embeddings
        assert base.get_output_embeddings() is head and embeddings.num_embeddings == 128
        assert torch.equal(embeddings.weight, weights[0]) and torch.equal(head.weight, weights[1])
        assert not hasattr(base, "peft_config")
        with torch.no_grad():
            assert torch.equal(base(input_ids=IDS % 128).logits, logits)
    with pytest.warns(UserWarning, match="resized from 128"):
        assert torch.equal(outputs(PeftModel.from_pretrained(base, str(tmp_path / "adapter")))[0], expected)


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
    # a base model resized to more tokens than the adapter's is refused too, not only one with fewer
    larger = rf"vocabulary of {VOCAB} tokens .*this model's has 144.*resize_token_embeddings\({VOCAB}\)"
    with pytest.raises(QSTAdapterFileError, match=larger):
        PeftModel.from_pretrained(resized_4bit(base_dir, 144), str(tmp_path / "adapter"))
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
    # the embeddings saved on request, the vocabulary the checkpoint's: a resize line would say tokens were added
    plain.save_pretrained(tmp_path / "plain_embeddings", save_embedding_layers=True)
    card = tmp_path / "plain_embeddings" / "README.md"
    assert "resize_token_embeddings" not in loading_code(card)
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(run_card(card)(input_ids=ids).logits, plain(input_ids=ids).logits)


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
def test_auto_peft_model_loads_an_adapter_on_a_vocabulary_padded_by_the_training_script(tmp_path, base_dir, quantized):
    """PEFT's examples/sft adds chat tokens and resizes with ``pad_to_multiple_of=8``; ``trainer.save_model()``
    saves the tokenizer beside the adapter, and ``AutoPeftModelForCausalLM.from_pretrained(folder)`` resizes the
    base model to ``len(tokenizer)`` by itself: another size than the padded one, refused as another vocabulary size
    (a LoRA adapter fails there too). The file holds the trained embeddings and head for the padded size, so QST
    resizes the base model to it, with a warning, and the model computes exactly as trained (as it does loaded by
    transformers' AutoModelForCausalLM.from_pretrained(folder)); saved again, the adapter records the same size and
    holds the same tensors."""
    import json

    from peft import AutoPeftModelForCausalLM
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokens = VOCAB - 3  # the tokenizer: 133 tokens, padded to 136 by the script
    model = trained(base_dir, resized_4bit(base_dir, tokens, quantized, pad_to_multiple_of=8))
    expected = outputs(model)
    model.save_pretrained(tmp_path / "adapter")
    vocab = {f"t{i}": i for i in range(tokens)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0"))).save_pretrained(
        tmp_path / "adapter"
    )
    with pytest.warns(UserWarning, match=rf"resized from {tokens} to {VOCAB} tokens .*AutoPeftModel"):
        loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), **quantized_as(quantized))
    for reloaded, wanted in zip(outputs(loaded), expected):
        assert torch.equal(reloaded, wanted)
    with pytest.warns(UserWarning, match=rf"resized from 128 to {VOCAB} tokens"):  # transformers' own one-liner
        direct = AutoModelForCausalLM.from_pretrained(str(tmp_path / "adapter"), **quantized_as(quantized))
    with torch.no_grad():
        assert torch.equal(direct.eval()(input_ids=IDS).logits, expected[0])
    loaded.save_pretrained(tmp_path / "again")
    signature = [json.loads((tmp_path / name / "adapter_config.json").read_text())["base_model_signature"]
                 for name in ("adapter", "again")]
    assert signature[0] == signature[1] and signature[0]["vocab_size"] == VOCAB
    saved, again = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("adapter", "again"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[key], again[key]) for key in saved)


def test_an_adapter_of_another_vocabulary_is_not_loaded_beside_one_by_resizing(tmp_path, base_dir):
    """A model that holds an adapter is not resized for a second one: the resize would change the embeddings the
    first computes with. Refused as before, naming why the load did not resize; the first adapter is untouched."""
    first = trained(base_dir)
    expected = outputs(first)[0]
    first.save_pretrained(tmp_path / "first")
    trained(base_dir, resized_4bit(base_dir, VOCAB + 8)).save_pretrained(tmp_path / "second")
    model = PeftModel.from_pretrained(resized_4bit(base_dir), str(tmp_path / "first"))
    with pytest.raises(ValueError, match=rf"vocab_size {VOCAB + 8} against {VOCAB}.*holds no adapter yet"):
        model.load_adapter(str(tmp_path / "second"), adapter_name="second")
    assert sorted(model.peft_config) == ["default"] and model.config.vocab_size == VOCAB
    assert torch.equal(outputs(model)[0], expected)


def test_a_multimodal_model_resized_to_the_adapters_vocabulary(tmp_path):
    """A VLM keeps its vocabulary size in text_config, which the resize sets and the signature reads. Saved with
    save_embedding_layers=True (and by default, see the test below), the adapter loads onto the base model as its
    checkpoint builds it, resized by the load, and computes exactly as trained."""
    from transformers import AutoModelForImageTextToText

    from .test_multimodal import build, logits, make_inputs, train

    ids, extra = make_inputs("llava")
    build("llava").save_pretrained(tmp_path / "base")
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "base")
    base.resize_token_embeddings(261, pad_to_multiple_of=8)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    train(model, "llava", ids, extra)
    expected = logits(model, ids, extra)
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    with pytest.warns(UserWarning, match="resized from 256 to 264 tokens"):
        loaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tmp_path / "base"),
                                           tmp_path / "adapter")
    assert loaded.config.text_config.vocab_size == 264
    assert torch.equal(logits(loaded, ids, extra), expected)


def multimodal_base(folder, quantized: bool):
    """The tiny Llava of test_multimodal.py saved at ``folder`` and a loader of it, in float32 or in bitsandbytes
    4-bit (the vision tower 64 wide, as test_llava_in_4bit_trains_generates_and_reloads builds it)."""
    from transformers import AutoModelForImageTextToText

    from .test_multimodal import build

    build("llava", **(dict(hidden_size=64, intermediate_size=128) if quantized else {})).save_pretrained(folder)
    return lambda: AutoModelForImageTextToText.from_pretrained(folder, **quantized_as(quantized))


def multimodal_inputs(quantized: bool):
    """An image and text with added tokens (ids 256 and over) for the tiny Llava."""
    from .test_multimodal import make_inputs

    ids, extra = make_inputs("llava")
    ids = ids.clone()
    ids[:, -3], ids[0, -1], ids[1, -2] = 258, 263, 256
    if quantized:
        extra["pixel_values"] = extra["pixel_values"].to(torch.bfloat16)
    return ids, extra


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
def test_a_multimodal_adapter_on_a_resized_vocabulary_saves_its_embeddings_by_default(tmp_path, quantized):
    """PEFT's save_embedding_layers="auto" compares the top-level config's vocab_size with the base checkpoint's; a
    Llava config keeps it in text_config only, so PEFT saved no embeddings: the adapter loaded onto its base model
    resized by hand (every shape fits the recorded signature) computed with the rows that resize drew, silently
    other logits on the added tokens. QST now compares text_config's vocabulary with the checkpoint's and saves the
    embeddings as PEFT does for a plain config: the adapter reloads onto a base model resized by hand, or as its
    checkpoint builds it (resized by the load), and onto both computes exactly as trained; the card resizes too."""
    import re
    import warnings

    from .test_adapter_names_and_cards import loading_code, run_card
    from .test_multimodal import logits, train

    load = multimodal_base(tmp_path / "base", quantized)

    def resized():
        base = load()
        base.resize_token_embeddings(264)  # the added rows drawn at random, differently at every call
        return base

    ids, extra = multimodal_inputs(quantized)
    model = get_peft_model(resized(), QSTConfig(task_type="CAUSAL_LM", r=4))
    train(model, "llava", ids, extra)
    expected = logits(model, ids, extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "adapter")
    assert torch.equal(logits(PeftModel.from_pretrained(resized(), tmp_path / "adapter"), ids, extra), expected)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved["base_model.model.model.language_model.base_layer.embed_tokens.weight"].shape[0] == 264
    assert any(re.search(r"save_embedding_layers.*text_config.vocab_size\) has 264 tokens.*256", str(w.message))
               for w in caught)
    with pytest.warns(UserWarning, match="resized from 256 to 264 tokens"):
        loaded = PeftModel.from_pretrained(load(), tmp_path / "adapter")
    assert torch.equal(logits(loaded, ids, extra), expected)
    assert "base.resize_token_embeddings(264)" in loading_code(tmp_path / "adapter" / "README.md")
    assert torch.equal(logits(run_card(tmp_path / "adapter" / "README.md"), ids, extra), expected)


@pytest.mark.parametrize("multimodal", [False, True], ids=["text", "llava"])
def test_an_adapter_saved_without_the_embeddings_of_a_resized_vocabulary_warns(tmp_path, multimodal):
    """An adapter that records a vocabulary larger than the base checkpoint's but whose file holds no embeddings
    (save_embedding_layers=False, or saved by an earlier peft-qst from a VLM) loads onto a base model resized by hand
    with the rows that resize drew, not the trained ones: it computes otherwise on the added tokens. That load now
    warns, naming both sizes and the fix; an adapter trained without a resize loads with no such warning."""
    import warnings

    from .test_multimodal import logits, train

    if multimodal:
        load = multimodal_base(tmp_path / "base", False)
        ids, extra = multimodal_inputs(False)
        vocab, checkpoint = 264, 256
    else:
        tiny_causal_lm().save_pretrained(tmp_path / "base")

        def load():
            return AutoModelForCausalLM.from_pretrained(tmp_path / "base")

        ids, extra, vocab, checkpoint = IDS, {}, VOCAB, 128

    def resized():
        base = load()
        base.resize_token_embeddings(vocab)
        return base

    model = get_peft_model(resized(), QSTConfig(task_type="CAUSAL_LM", r=4))
    if multimodal:
        train(model, "llava", ids, extra)
    else:
        train_steps(model, IDS)
    expected = logits(model, ids, extra)
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    warning = (rf"trained on a vocabulary of {vocab} tokens.*resized from the {checkpoint} of base checkpoint.*holds "
               "no token embeddings.*Save the adapter again")
    with pytest.warns(UserWarning, match=warning):
        loaded = PeftModel.from_pretrained(resized(), tmp_path / "adapter")
    assert not torch.equal(logits(loaded, ids, extra), expected)  # what the warning is about
    with pytest.warns(UserWarning, match=warning):
        resized().load_adapter(str(tmp_path / "adapter"))  # transformers' own loading

    # trained without a resize: saved without embeddings (the vocabulary is the checkpoint's, for a VLM's
    # text_config too) and without PEFT's "Setting `save_embedding_layers`", and loaded without a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_peft_model(load(), QSTConfig(task_type="CAUSAL_LM", r=4)).save_pretrained(tmp_path / "plain")
    assert not [str(w.message) for w in caught if "save_embedding_layers" in str(w.message)]
    saved = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    assert not [key for key in saved if "embed_tokens" in key]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*holds no token embeddings")
        PeftModel.from_pretrained(load(), tmp_path / "plain")


def test_an_adapter_saved_without_embeddings_loads_without_a_warning_onto_its_base_saved_after_the_resize(tmp_path):
    """The warning about embeddings not saved reads the vocabulary of the checkpoint the model was loaded from before
    the adapter's base_model_name_or_path: a base model saved after its resize holds the rows the adapter was trained
    with (its name_or_path names the checkpoint before the resize, with 128 tokens), so the adapter loaded onto it
    computes as trained, with no warning of random rows."""
    import warnings

    tiny_causal_lm().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    base.resize_token_embeddings(VOCAB)
    base.save_pretrained(tmp_path / "resized")  # the added tokens' rows kept with the base model
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    train_steps(model, IDS)
    with torch.no_grad():
        expected = model.eval()(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "resized"),
                                           tmp_path / "adapter")
    assert not [str(w.message) for w in caught if "holds no token embeddings" in str(w.message)]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=IDS).logits, expected)


def test_an_adapter_trained_without_a_resize_loaded_with_a_config_onto_a_resized_base_gives_no_such_warning(tmp_path):
    """The warning about embeddings not saved reads the vocabulary the adapter's adapter_config.json records. It read
    the config of the adapter being loaded into, which get_peft_model (or PeftModel.from_pretrained with config=, or
    transformers' load_adapter with peft_config=) binds to the model it is given: an adapter trained on the
    checkpoint's 128 tokens, loaded that way onto a base model resized to add tokens, was said to have been "trained
    on a vocabulary of 136 tokens (recorded in its adapter_config.json)", which its file does not say."""
    import warnings

    tiny_causal_lm().save_pretrained(tmp_path / "base")

    def resized():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        base.resize_token_embeddings(VOCAB)
        return base

    get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                   QSTConfig(task_type="CAUSAL_LM", r=4)).save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    loads = {
        "PeftModel.from_pretrained(config=)": lambda: PeftModel.from_pretrained(
            resized(), adapter, config=QSTConfig(task_type="CAUSAL_LM", r=4)),
        "load_adapter into an adapter": lambda: get_peft_model(
            resized(), QSTConfig(task_type="CAUSAL_LM", r=4)).load_adapter(adapter, "default"),
        "transformers' load_adapter(peft_config=)": lambda: resized().load_adapter(
            adapter, peft_config=QSTConfig(task_type="CAUSAL_LM", r=4)),
    }
    for how, load in loads.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load()
        assert not [w for w in caught if "holds no token embeddings" in str(w.message)], how

def test_saving_a_multimodal_adapter_whose_base_is_named_by_hub_id_warns_of_an_unreachable_hub_once(
        tmp_path, monkeypatch):
    """Saving the adapter of a VLM reads the base checkpoint's text_config.vocab_size (save_embedding_layers="auto");
    where the base model is named by a Hub id and the Hub cannot be reached, PEFT's own lookup warns "Unable to fetch
    remote file ... config.json" (and that it assumes the vocabulary unchanged). The lookup peft-qst makes beside it
    printed that warning a second time at every save (and at every Trainer checkpoint): it is given once."""
    import warnings

    from huggingface_hub import hf_api

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline mode skips the lookup, and PEFT says so itself
    monkeypatch.setattr(hf_api.api, "endpoint", "http://127.0.0.1:9")  # a Hub that refuses every connection
    load = multimodal_base(tmp_path / "base", False)
    base = load()
    base.name_or_path = "peft-qst-tests/tiny-llava"
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "adapter")
    unreachable = [str(w.message) for w in caught if "Unable to fetch remote file" in str(w.message)]
    assert len(unreachable) == 1 and "peft-qst-tests/tiny-llava" in unreachable[0]
    assert [w for w in caught if "will assume that the vocabulary was not modified" in str(w.message)]


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "4bit"])
def test_the_usual_lifecycle_without_a_resize_gives_no_warning_of_peft_qst(tmp_path, quantized):
    """get_peft_model, training, save_pretrained, PeftModel.from_pretrained (to infer and with is_trainable=True, then
    training on and saving again), AutoPeftModelForCausalLM and transformers' AutoModelForCausalLM on the adapter's
    folder, generate: none of it resizes a vocabulary, and none of peft-qst's warnings (those about resized
    vocabularies and embeddings saved or not included) may fire. peft-qst's warnings name the user's line
    (serialization.user_stacklevel): here, a line of this file; a library's warning that peft-qst's own call caused
    names a line of peft_qst."""
    import os
    import warnings

    from peft import AutoPeftModelForCausalLM

    import peft_qst

    package_dir = os.path.dirname(os.path.abspath(peft_qst.__file__)) + os.sep
    tiny_causal_lm().save_pretrained(tmp_path / "base")

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", **quantized_as(quantized))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = get_peft_model(load(), QSTConfig(task_type="CAUSAL_LM", r=4))
        train_steps(model, IDS[:, :4] % 128)
        model.save_pretrained(tmp_path / "adapter")
        for loaded in (PeftModel.from_pretrained(load(), tmp_path / "adapter"),
                       AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", **quantized_as(quantized)),
                       AutoModelForCausalLM.from_pretrained(tmp_path / "adapter", **quantized_as(quantized))):
            loaded.generate(input_ids=IDS[:, :4] % 128, max_new_tokens=3, do_sample=False, pad_token_id=0)
        resumed = PeftModel.from_pretrained(load(), tmp_path / "adapter", is_trainable=True)
        train_steps(resumed, IDS[:, :4] % 128, steps=2)
        resumed.save_pretrained(tmp_path / "resumed")
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
            if os.path.abspath(w.filename).startswith(package_dir) or os.path.abspath(w.filename) == __file__]
    assert not ours


def test_a_load_refused_after_the_added_tokens_check_gives_the_refusal_alone(tmp_path):
    """An adapter whose file holds no embeddings of its resized vocabulary, altered besides (a tensor of neither the
    side network nor the base model, with a digest that matches it): its load warned that "its file holds no token
    embeddings" and was then refused, nothing loaded. The warning is given only once the load succeeded."""
    import json

    from safetensors.torch import save_file

    from peft_qst.serialization import weights_digest

    tiny_causal_lm().save_pretrained(tmp_path / "base")

    def resized():
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
        base.resize_token_embeddings(VOCAB, mean_resizing=False)
        return base

    get_peft_model(resized(), QSTConfig(task_type="CAUSAL_LM", r=4)).save_pretrained(
        tmp_path / "adapter", save_embedding_layers=False)
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.0.mlp.nothing.weight"] = torch.zeros(4)
    save_file(weights, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["adapter_weights_sha256"] = weights_digest(weights)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))

    for load in (lambda: PeftModel.from_pretrained(resized(), tmp_path / "adapter"),
                 lambda: resized().load_adapter(str(tmp_path / "adapter"))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(QSTAdapterFileError, match="belong neither"):
                load()
        assert not [w for w in caught if "holds no token embeddings" in str(w.message)]


def test_a_refusal_for_the_vocabulary_alone_does_not_describe_both_models_alike(tmp_path):
    """An adapter saved at the checkpoint's vocabulary, loaded onto the same base model resized to add tokens: only
    the vocabulary differs, which the models' descriptions leave out, so the refusal read "built for a llama model
    (hidden_size=64, ...) but is being loaded onto a llama model (hidden_size=64, ...)", the same text twice, as if
    the check had compared a model with itself. It now says the model is of the same type and sizes, and which value
    is the adapter's."""
    tiny_causal_lm().save_pretrained(tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), QSTConfig(task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    base.resize_token_embeddings(VOCAB)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    message = str(info.value)
    assert message.startswith(
        "This QST adapter was built for a llama model (hidden_size=64, 3 layers, 4 attention heads) but is being "
        "loaded onto one of the same type and those sizes (LlamaForCausalLM); they differ in vocab_size 128 against "
        f"{VOCAB} (the adapter's value first). Load it onto the base model it was trained on"
    ), message
    assert message.count("hidden_size=64") == 1


def test_an_adapter_of_a_resized_vocabulary_onto_a_base_model_of_other_sizes_too_is_refused_unresized(tmp_path):
    """The load resizes the base model to the adapter's vocabulary only where the vocabulary is all that differs: onto
    a model of another depth as well (another base model), the refusal names both differences and the model is
    handed back at its own vocabulary, not resized for an adapter that cannot load."""
    tiny_causal_lm(tie_word_embeddings=False).save_pretrained(tmp_path / "base")
    trained(str(tmp_path / "base"), base=resized_4bit(str(tmp_path / "base"), quantized=False)).save_pretrained(
        tmp_path / "adapter")
    other = tiny_causal_lm(tie_word_embeddings=False, num_hidden_layers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=rf"num_hidden_layers 3 against 2, vocab_size {VOCAB} against 128"):
            PeftModel.from_pretrained(other, str(tmp_path / "adapter"))
    assert not [w for w in caught if "resized from" in str(w.message)]
    assert other.config.vocab_size == 128 and other.get_input_embeddings().num_embeddings == 128
