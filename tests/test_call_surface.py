"""The call surface a transformers user reaches on a QST ``PeftModel``: tuple outputs, attentions and hidden states of
a forward, generate's returned dictionary, pipelines, streamers, and the parameter counts (PEFT's and transformers'),
each against the adapted model's own forward or against what LoRA gives."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    PreTrainedTokenizerFast,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)

from peft_qst import QSTCache, QSTConfig

from .conftest import bnb_config, load_smollm2_4bit, tiny_causal_lm, train_steps
from .test_generation import PAD, PROMPTS, left_padded

IDS = torch.tensor([[5, 17, 33, 4, 99, 64, 7, 21], [8, 9, 10, 11, 12, 13, 14, 15]])


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer for the tiny models' 128 ids: id i >= 3 is the word ``w<i>``; 0, 1, 2 are pad, unk and eos. Special
    tokens are not prefixes of words, so that text round-trips to the same ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": PAD, "<unk>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 128)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>", eos_token="</s>",
                                   padding_side="left")


def trained(attn_implementation: str = "sdpa"):
    """A tiny Llama with a QST adapter trained a little, so that the adapter visibly changes the output."""
    model = get_peft_model(tiny_causal_lm(pad_token_id=PAD, attn_implementation=attn_implementation),
                           QSTConfig(task_type="CAUSAL_LM", r=4))
    torch.manual_seed(100)
    train_steps(model, torch.randint(3, 128, (4, 24)), steps=8, lr=3e-2)
    return model


@pytest.fixture(scope="module")
def model():
    return trained()


@pytest.fixture(scope="module")
def eager_model():
    return trained("eager")


def _greedy(model, ids, mask=None, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD,
                          **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_tuple_outputs_put_the_loss_first_and_the_adapted_logits_next(model):
    expected = model(input_ids=IDS, labels=IDS)
    with model.disable_adapter():
        base_logits = model(input_ids=IDS).logits
    assert not torch.allclose(expected.logits, base_logits, atol=1e-3)

    loss, logits, cache = model(input_ids=IDS, labels=IDS, return_dict=False)
    assert torch.equal(loss, expected.loss) and torch.equal(logits, expected.logits)
    assert isinstance(cache, QSTCache)
    logits, cache = model(input_ids=IDS, return_dict=False)
    assert torch.equal(logits, expected.logits)
    # use_cache=False: no cache in the tuple, nor in the dictionary
    (logits,) = model(input_ids=IDS, return_dict=False, use_cache=False)
    assert torch.equal(logits, expected.logits)
    assert model(input_ids=IDS, use_cache=False).past_key_values is None
    # the model config's return_dict=False gives the same tuple
    model.config.return_dict = False
    try:
        loss, logits, _ = model(input_ids=IDS, labels=IDS)
    finally:
        model.config.return_dict = True
    assert torch.equal(logits, expected.logits)


@torch.no_grad()
def test_the_wrapped_trunk_called_directly_takes_its_forwards_arguments(model):
    """Code that calls the decoder trunk itself (``model.model(input_ids)``, as feature extractors do) reaches the
    QSTLayer in its place: positional arguments bind as the trunk's forward binds them, ``return_dict=False`` gives the
    tuple, and calls the trunk's own signature refuses are refused naming the trunk's forward."""
    trunk = model.get_base_model().model
    expected = trunk(input_ids=IDS).last_hidden_state
    assert torch.equal(trunk(IDS).last_hidden_state, expected)
    as_tuple = trunk(input_ids=IDS, return_dict=False)
    assert type(as_tuple) is tuple and torch.equal(as_tuple[0], expected)
    with pytest.raises(TypeError, match="LlamaModel.forward got multiple values for argument 'input_ids'"):
        trunk(IDS, input_ids=IDS)
    with pytest.raises(TypeError, match="LlamaModel.forward got too many positional arguments"):
        trunk(IDS, *[None] * 20)


@torch.no_grad()
def test_the_wrapped_trunk_called_directly_routes_adapter_names_and_refuses_a_bare_name(model):
    """``adapter_names`` given to the trunk itself (not through ``PeftModel``, which checks them first) route each row
    as they do through the model, and a bare name (a string, which iterates as one-letter names) is refused."""
    trunk = model.get_base_model().model
    rows = trunk(input_ids=IDS[:2], adapter_names=["default", "__base__"]).last_hidden_state
    torch.testing.assert_close(rows[0], trunk(input_ids=IDS[:2]).last_hidden_state[0])
    with model.disable_adapter():
        torch.testing.assert_close(rows[1], trunk(input_ids=IDS[:2]).last_hidden_state[1])
    with pytest.raises(TypeError, match="one adapter name per row, got 'default'"):
        trunk(input_ids=IDS[:1], adapter_names="default")


@torch.no_grad()
def test_output_hidden_states_are_the_backbones_but_the_last_the_adapted_one(model):
    """As the README says: the embedding output and block outputs of the frozen backbone, then the final hidden state
    the LM head reads (after the final norm and QST's side output), so ``lm_head(hidden_states[-1])`` are the logits;
    asked for by argument or by the model config alike."""
    adapted = model(input_ids=IDS, output_hidden_states=True)
    with model.disable_adapter():
        base = model(input_ids=IDS, output_hidden_states=True)
    assert len(adapted.hidden_states) == len(base.hidden_states) == model.config.num_hidden_layers + 1
    for mine, theirs in zip(adapted.hidden_states[:-1], base.hidden_states[:-1]):
        assert torch.equal(mine, theirs)
    torch.testing.assert_close(model.get_output_embeddings()(adapted.hidden_states[-1]), adapted.logits)
    assert not torch.allclose(adapted.hidden_states[-1], base.hidden_states[-1], atol=1e-3)

    model.config.output_hidden_states = True
    try:
        by_config = model(input_ids=IDS)
    finally:
        model.config.output_hidden_states = False
    assert all(torch.equal(a, b) for a, b in zip(by_config.hidden_states, adapted.hidden_states))
    # in a tuple they follow the logits and the cache
    logits, cache, hidden = model(input_ids=IDS, output_hidden_states=True, return_dict=False)
    assert torch.equal(hidden[-1], adapted.hidden_states[-1])


@torch.no_grad()
@pytest.mark.parametrize("selection", [[0], -1, 1, [0, 2], [1, -1]])
def test_output_hidden_states_given_as_indices_select_as_transformers_does(model, selection):
    """transformers 5 takes ``output_hidden_states`` as an index or a list of indices too (``select_hidden_states``):
    the tuple keeps every position, the ones not selected None. QST builds the adapted forward's hidden states itself
    and read any selection as ``True``: every position came back, where the base model gives None at those not
    selected (code that keeps the entries that are not None got all of them)."""
    adapted = model(input_ids=IDS, output_hidden_states=selection)
    full = model(input_ids=IDS, output_hidden_states=True).hidden_states
    with model.disable_adapter():
        base = model(input_ids=IDS, output_hidden_states=selection).hidden_states
    assert adapted.hidden_states is not None and len(adapted.hidden_states) == len(base) == len(full)
    assert [h is None for h in adapted.hidden_states] == [h is None for h in base]
    for mine, everything in zip(adapted.hidden_states, full):
        assert mine is None or torch.equal(mine, everything)
    assert torch.equal(adapted.logits, model(input_ids=IDS).logits)


@torch.no_grad()
def test_output_hidden_states_select_the_lowest_index_and_read_zero_as_none_as_transformers_does(model):
    """The edges of a selection: the lowest negative index, ``-(num_hidden_layers + 1)``, selects the embedding
    output, and a falsy value (``0`` too, not index 0) asks for no hidden states, as the base model reads them."""
    lowest = -(model.config.num_hidden_layers + 1)
    for selection in (lowest, [lowest, -1]):
        adapted = model(input_ids=IDS, output_hidden_states=selection).hidden_states
        with model.disable_adapter():
            base = model(input_ids=IDS, output_hidden_states=selection).hidden_states
        assert adapted[0] is not None and [h is None for h in adapted] == [h is None for h in base]
    for falsy in (0, []):
        with model.disable_adapter():
            assert model(input_ids=IDS, output_hidden_states=falsy).hidden_states is None
        assert model(input_ids=IDS, output_hidden_states=falsy).hidden_states is None


@torch.no_grad()
def test_output_hidden_states_leave_no_recording_hooks_on_the_backbone():
    """The hidden states an adapted forward returns are the ones QST's own block hooks record: the backbone is not
    asked for its own. transformers installs its recording hooks (on every block and attention module) the first
    time a model is asked for hidden states and keeps them, so one ``output_hidden_states=True`` call left them on
    the backbone for good, and every later forward and decoding step took PyTorch's slower hooked path through those
    modules, for hidden states QST dropped."""
    model = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4)).eval()
    trunk = model.get_base_model().model.get_base_layer()
    hooks = {name: len(module._forward_hooks) for name, module in trunk.named_modules()}
    out = model(input_ids=IDS, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h is not None for h in out.hidden_states)
    assert {name: len(module._forward_hooks) for name, module in trunk.named_modules()} == hooks


@torch.no_grad()
def test_output_attentions_with_eager_attention_are_the_backbones(eager_model):
    expected = eager_model(input_ids=IDS).logits
    adapted = eager_model(input_ids=IDS, output_attentions=True)
    with eager_model.disable_adapter():
        base = eager_model(input_ids=IDS, output_attentions=True)
    assert torch.equal(adapted.logits, expected)
    assert len(adapted.attentions) == eager_model.config.num_hidden_layers
    for mine, theirs in zip(adapted.attentions, base.attentions):
        assert torch.equal(mine, theirs)
    loss, logits, cache, hidden, attentions = eager_model(
        input_ids=IDS, labels=IDS, output_attentions=True, output_hidden_states=True, return_dict=False
    )
    assert torch.equal(logits, expected) and isinstance(cache, QSTCache)
    assert len(hidden) == len(attentions) + 1


# --------------------------------------------------------------------------------------------------------------------
# generate, pipelines, streamers
# --------------------------------------------------------------------------------------------------------------------


def test_generate_dict_with_everything_returned_keeps_the_sequences_and_adapted_scores(eager_model):
    """Asking generate for scores, logits, hidden states and attentions changes nothing it generates; the last step's
    logits and attentions equal a forward without cache over the generated sequence."""
    ids, mask = left_padded(PROMPTS)
    plain = _greedy(eager_model, ids, mask)
    out = _greedy(eager_model, ids, mask, return_dict_in_generate=True, output_scores=True, output_logits=True,
                  output_hidden_states=True, output_attentions=True)
    assert torch.equal(out.sequences, plain)
    with eager_model.disable_adapter():
        assert not torch.equal(_greedy(eager_model, ids, mask), plain)
    mask = torch.cat([mask, torch.ones(len(PROMPTS), len(out.logits) - 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        reference = eager_model(input_ids=out.sequences[:, :-1], attention_mask=mask, output_attentions=True,
                                position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
    torch.testing.assert_close(out.logits[-1], reference.logits[:, -1], atol=2e-5, rtol=1e-4)
    for mine, theirs in zip(out.attentions[-1], reference.attentions):
        torch.testing.assert_close(mine[:, :, -1], theirs[:, :, -1], atol=1e-6, rtol=1e-5)
    scores = eager_model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    chosen = out.sequences[:, ids.shape[1]:]
    expected = torch.stack([step.log_softmax(-1).gather(1, chosen[:, [i]]).squeeze(1)
                            for i, step in enumerate(out.logits)], 1)
    torch.testing.assert_close(scores, expected)


def test_text_generation_pipeline_generates_what_generate_does(model, tmp_path):
    """On the model get_peft_model returned and on the adapter reloaded with PeftModel.from_pretrained, one prompt and
    a left-padded batch: the pipeline's text is the adapted model's greedy generation, not the base model's."""
    tokenizer = word_tokenizer()
    ids, mask = left_padded(PROMPTS)
    texts = [tokenizer.decode(row[row != PAD]) for row in ids]
    generated = _greedy(model, ids, mask)[:, ids.shape[1]:]
    expected = [tokenizer.decode(row, skip_special_tokens=True) for row in generated]
    with model.disable_adapter():
        base = [tokenizer.decode(row, skip_special_tokens=True) for row in _greedy(model, ids, mask)[:, ids.shape[1]:]]
    assert base != expected

    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_causal_lm(pad_token_id=PAD, attn_implementation="sdpa").save_pretrained(base_dir)  # the base of trained()
    model.save_pretrained(adapter_dir)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir)).eval()
    for peft_model in (model, loaded):
        generator = pipeline("text-generation", model=peft_model, tokenizer=tokenizer)
        single = generator(texts[0], max_new_tokens=8, do_sample=False, return_full_text=False)
        assert single[0]["generated_text"] == expected[0]
        batched = generator(texts, max_new_tokens=8, do_sample=False, return_full_text=False, batch_size=3)
        assert [result[0]["generated_text"] for result in batched] == expected


def test_streamers_stream_the_generated_text(model):
    tokenizer = word_tokenizer()
    ids = IDS[:1]
    expected = tokenizer.decode(_greedy(model, ids)[0, ids.shape[1]:])

    class CollectingStreamer(TextStreamer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.pieces = []

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            self.pieces.append(text)

    streamer = CollectingStreamer(tokenizer, skip_prompt=True)
    _greedy(model, ids, streamer=streamer)
    assert "".join(streamer.pieces) == expected

    iterator = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=120)
    thread = threading.Thread(target=_greedy, args=(model, ids), kwargs={"streamer": iterator})
    thread.start()
    streamed = "".join(iterator)
    thread.join()
    assert streamed == expected


def test_feature_extraction_pipeline_gives_the_adapted_features(tiny_model_dir):
    model = get_peft_model(AutoModel.from_pretrained(tiny_model_dir), QSTConfig(task_type="FEATURE_EXTRACTION", r=4))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".qst_side." in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    tokenizer = word_tokenizer()
    with torch.no_grad():
        expected = model(input_ids=IDS[:1]).last_hidden_state
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=IDS[:1]).last_hidden_state, expected, atol=1e-3)
    features = pipeline("feature-extraction", model=model, tokenizer=tokenizer)(tokenizer.decode(IDS[0]),
                                                                                return_tensors=True)
    torch.testing.assert_close(features, expected)


# --------------------------------------------------------------------------------------------------------------------
# parameter counts
# --------------------------------------------------------------------------------------------------------------------


def _stored_size(param) -> int:
    """Parameters as PEFT and transformers count them: a packed 4-bit tensor holds two values per byte of storage."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def _base_model(task_type: str, path: str, four_bit: bool):
    loader = AutoModelForCausalLM if task_type == "CAUSAL_LM" else AutoModel
    return loader.from_pretrained(path, **({"quantization_config": bnb_config()} if four_bit else {}))


@pytest.mark.parametrize("four_bit", [False, True], ids=["float32", "4bit"])
@pytest.mark.parametrize("task_type", ["CAUSAL_LM", "FEATURE_EXTRACTION"])
@pytest.mark.parametrize("method", ["qst", "lora"])
def test_parameter_counts_cover_the_adapter(tiny_model_dir, task_type, four_bit, method, capsys):
    """``get_nb_trainable_parameters``, ``print_trainable_parameters`` and transformers' ``num_parameters`` (which the
    Trainer's ``total_flos`` reads) agree: the base model's parameters plus the adapter's, the adapter's alone
    trainable. On a bare trunk (FEATURE_EXTRACTION), ``num_parameters`` used to count the trunk alone under QST
    (trainable: 0), where it counts LoRA's."""
    base = _base_model(task_type, tiny_model_dir, four_bit)
    base_size = sum(_stored_size(p) for p in base.parameters())
    config = (QSTConfig(task_type=task_type, r=4) if method == "qst"
              else LoraConfig(task_type=task_type, target_modules="all-linear"))
    model = get_peft_model(base, config)
    adapter = [p for name, p in model.named_parameters() if ("qst_side" if method == "qst" else "lora_") in name]
    adapter_size = sum(p.numel() for p in adapter)
    assert adapter_size > 0 and all(p.requires_grad for p in adapter)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == adapter_size  # the base frozen

    assert model.get_nb_trainable_parameters() == (adapter_size, base_size + adapter_size)
    assert model.num_parameters() == base_size + adapter_size
    assert model.num_parameters(only_trainable=True) == adapter_size
    embeddings = model.get_input_embeddings().weight.numel()
    assert model.num_parameters(exclude_embeddings=True) == base_size + adapter_size - embeddings
    assert model.get_memory_footprint() == sum(
        t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
    )
    capsys.readouterr()
    model.print_trainable_parameters()
    assert f"trainable params: {adapter_size:,} || all params: {base_size + adapter_size:,}" in capsys.readouterr().out


@pytest.mark.smollm2
def test_smollm2_4bit_parameter_counts_and_chat_pipeline(smollm2_dir):
    """On the real 4-bit model: the counts include the packed 4-bit weights as PEFT counts them for LoRA (two values a
    byte) and the side network once; the text-generation pipeline, given chat messages, answers what generate answers
    on the chat template, with the adapter."""
    from transformers import AutoTokenizer

    base = load_smollm2_4bit(smollm2_dir)
    base_size = base.num_parameters()
    assert base_size == sum(_stored_size(p) for p in base.parameters())
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM")).eval()
    side = [p for name, p in model.named_parameters() if ".qst_side." in name]
    side_size = sum(p.numel() for p in side)
    assert model.get_nb_trainable_parameters() == (side_size, base_size + side_size)
    assert (model.num_parameters(), model.num_parameters(only_trainable=True)) == (base_size + side_size, side_size)

    torch.manual_seed(0)
    with torch.no_grad():  # an adapter that changes the answer, without training
        for param in side:
            param.add_(torch.randn_like(param) * 0.05)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    chat = [{"role": "user", "content": "Name a colour."}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answers = {}
    for adapted in (True, False):
        with contextlib.nullcontext() if adapted else model.disable_adapter():
            generated = model.generate(**inputs, max_new_tokens=10, do_sample=False)
        answers[adapted] = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answers[True] != answers[False]
    reply = pipeline("text-generation", model=model, tokenizer=tokenizer)(chat, max_new_tokens=10, do_sample=False)
    assert reply[0]["generated_text"][-1] == {"role": "assistant", "content": answers[True]}
