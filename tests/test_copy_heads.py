"""Copy heads (QSTConfig.copy_heads): attention that adds the LM-head rows of earlier tokens to the hidden state."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers.masking_utils import find_packed_sequence_indices

from peft_qst import QSTConfig, QSTUnsupportedModelError
from peft_qst.side import copy_key_mask

from .conftest import copy_of, tiny_causal_lm, tiny_llama_config, train_steps
from .test_training_graph import assert_only_side_learns_and_backbone_saves_nothing

IDS = torch.randint(0, 128, (3, 14), generator=torch.Generator().manual_seed(1))


def copy_config(**overrides):
    return QSTConfig(task_type="CAUSAL_LM", r=4, copy_heads=2, copy_head_dim=8, **overrides)


def trained_copy_model(steps=4):
    model = get_peft_model(tiny_causal_lm(), copy_config())
    train_steps(model, IDS, steps=steps)
    gate = model.base_model.model.model.qst_side["default"].copy_head.gate
    assert gate.abs().min() > 0  # the heads are open: the tests below exercise them
    return model


def test_starts_at_the_pretrained_output_and_only_the_side_network_learns():
    base = tiny_causal_lm()
    model = get_peft_model(tiny_causal_lm(), copy_config())
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, base(input_ids=IDS).logits)
    names = [n for n, p in model.named_parameters() if p.requires_grad and ".copy_head." in n]
    assert sorted(n.rsplit("copy_head.", 1)[1] for n in names) == ["gate", "key.weight", "query.weight"]
    model.train()
    assert_only_side_learns_and_backbone_saves_nothing(model, IDS)


def test_copy_heads_change_the_output_towards_the_attended_tokens():
    """With an open gate, the added vector is a mixture of the LM-head rows of the tokens seen so far: the update at
    position 0 (which sees only itself) is exactly gate_sum * W_out[token_0], the row scaled to unit RMS."""
    model = get_peft_model(tiny_causal_lm(), copy_config())
    side = model.base_model.model.model.qst_side["default"]
    with torch.no_grad():
        side.copy_head.gate.fill_(0.5)
        lm_head = model.get_base_model().lm_head.weight
        hidden = {}
        handle = model.get_base_model().lm_head.register_forward_pre_hook(lambda m, a: hidden.setdefault("h", a[0]))
        model(input_ids=IDS)
        handle.remove()
        with model.disable_adapter():
            base_hidden = model.get_base_model().model(input_ids=IDS).last_hidden_state
    update = hidden["h"][:, 0] - base_hidden[:, 0]
    rows = lm_head[IDS[:, 0]]
    unit_rms_rows = rows / rows.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    assert torch.allclose(update, 2 * 0.5 * unit_rms_rows, atol=1e-5)


def test_cached_generation_equals_uncached_in_every_mode():
    model = trained_copy_model()
    mask = torch.ones_like(IDS)
    mask[1, :4] = 0  # left padding
    mask[2, :2] = 0
    with torch.no_grad():
        for options in (dict(do_sample=False), dict(num_beams=3, do_sample=False)):
            cached = model.generate(input_ids=IDS, attention_mask=mask, max_new_tokens=24, use_cache=True, **options)
            plain = model.generate(input_ids=IDS, attention_mask=mask, max_new_tokens=24, use_cache=False, **options)
            assert torch.equal(cached, plain), options
        torch.manual_seed(0)
        sampled = model.generate(input_ids=IDS, attention_mask=mask, max_new_tokens=16, do_sample=True, use_cache=True)
        torch.manual_seed(0)
        again = model.generate(input_ids=IDS, attention_mask=mask, max_new_tokens=16, do_sample=True, use_cache=False)
        assert torch.equal(sampled, again)
        # each left-padded row generates what its prompt generates alone
        batched = model.generate(input_ids=IDS, attention_mask=mask, max_new_tokens=12, do_sample=False)
        for row in range(IDS.shape[0]):
            prompt = IDS[row, int((mask[row] == 0).sum()) :].unsqueeze(0)
            alone = model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
            new = alone[0, prompt.shape[1] :]  # stops early at the end-of-sequence token; the batch pads after it
            assert torch.equal(batched[row, IDS.shape[1] : IDS.shape[1] + len(new)], new), row


def test_mixed_adapter_batch_and_disabled_adapter():
    model = trained_copy_model()
    model.add_adapter("plain", QSTConfig(task_type="CAUSAL_LM", r=4))
    model.eval()
    with torch.no_grad():
        routed = model(input_ids=IDS, adapter_names=["default", "__base__", "plain"]).logits
        model.set_adapter("default")
        alone = model(input_ids=IDS).logits
        with model.disable_adapter():
            base = model(input_ids=IDS).logits
    assert torch.equal(routed[0], alone[0])
    assert torch.equal(routed[1], base[1])
    with torch.no_grad():
        routed_gen = model.generate(input_ids=IDS, adapter_names=["default", "__base__", "default"], max_new_tokens=8)
        alone_gen = model.generate(input_ids=IDS, max_new_tokens=8)
    assert torch.equal(routed_gen[0], alone_gen[0]) and torch.equal(routed_gen[2], alone_gen[2])


def test_save_load_gives_identical_logits(tmp_path):
    model = trained_copy_model()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_causal_lm(), tmp_path)
    assert reloaded.peft_config["default"].copy_heads == 2
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=IDS).logits, expected)


def test_key_mask_causal_padding_and_packed_sequences():
    mask = copy_key_mask(1, 4, 0, None, None, torch.device("cpu"))
    assert torch.equal(mask[0], torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    # left padding hides the padded keys; a padded query still sees itself, so its softmax row is not empty
    padded = copy_key_mask(1, 3, 0, torch.tensor([[0, 1, 1]]), None, torch.device("cpu"))
    assert padded[0].tolist() == [[True, False, False], [False, True, False], [False, True, True]]
    # two sequences packed in one row (position ids restart): neither sees the other
    packed = copy_key_mask(1, 5, 0, None, torch.tensor([[0, 1, 2, 0, 1]]), torch.device("cpu"))
    assert packed[0, 3].tolist() == [False, False, False, True, False]
    assert packed[0, 4].tolist() == [False, False, False, True, True]
    # a sequence also starts where the positions jump without restarting at 0 (transformers' rule for the backbone)
    jumped = torch.tensor([[0, 1, 2, 7, 8], [3, 4, 5, 6, 0]])
    segments = find_packed_sequence_indices(jumped)
    mask = copy_key_mask(2, 5, 0, None, jumped, torch.device("cpu"))
    expected = torch.tril(torch.ones(5, 5, dtype=torch.bool)) & (segments.unsqueeze(2) == segments.unsqueeze(1))
    assert torch.equal(mask, expected) and mask[0, 3].tolist() == [False, False, False, True, False]
    # decoding: one new query after 3 cached keys sees all of them
    step = copy_key_mask(2, 1, 3, torch.ones(2, 4, dtype=torch.long), None, torch.device("cpu"))
    assert step.shape == (2, 1, 4) and step.all()
    # a chunk of several tokens after cached ones, given position ids and no attention mask: causal over all keys
    chunk = copy_key_mask(1, 2, 3, None, torch.tensor([[3, 4]]), torch.device("cpu"))
    assert chunk[0].tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    # a 2-D mask is read from its end: its last past + length columns are the keys'
    tail = copy_key_mask(1, 1, 2, torch.tensor([[0, 0, 1, 1]]), None, torch.device("cpu"))
    assert tail[0].tolist() == [[False, True, True]]



@pytest.mark.parametrize("mask_length,new", [(1, 1), (3, 1), (2, 2)], ids=["new-token", "short", "two-new-tokens"])
def test_a_2d_mask_over_fewer_than_the_past_and_new_tokens_is_read_as_transformers_reads_it(mask_length, new):
    """A 2-D mask beside a filled cache that covers fewer than past + new tokens (one over the new tokens alone, a
    common mistake in hand-written decoding loops), which the base model takes: transformers reads its columns as the
    first positions and masks the rest, so it gives what that mask padded with zeros gives. The copy heads read its
    last columns: it failed ("The size of tensor a (8) must match the size of tensor b (2)"), or, one column wide,
    was broadcast over every key."""
    model = trained_copy_model()
    ids = IDS[:2, :6]
    short = torch.ones(2, mask_length, dtype=torch.long)
    padded = torch.nn.functional.pad(short, (0, ids.shape[1] + new - mask_length))

    def step(mask):
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).past_key_values
            return model(input_ids=IDS[:2, 6:6 + new], attention_mask=mask, past_key_values=cache).logits

    torch.testing.assert_close(step(short), step(padded), atol=2e-5, rtol=1e-4)


def test_packed_row_equals_its_sequences_apart():
    """In a packed row (no attention mask, position_ids restarting per sequence, no KV cache: what TRL's packing and
    padding-free batches pass), the copy heads of each sequence see only that sequence: their output equals the output
    for the sequence run alone."""
    model = trained_copy_model()
    model.eval()
    first, second = IDS[0, :6], IDS[1, :8]
    packed = torch.cat([first, second]).unsqueeze(0)
    positions = torch.cat([torch.arange(6), torch.arange(8)]).unsqueeze(0)
    side = model.base_model.model.model.qst_side["default"]
    captured = []
    handle = side.copy_head.register_forward_hook(lambda m, a, k, out: captured.append(out), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=packed, position_ids=positions, use_cache=False)
        model(input_ids=first.unsqueeze(0), use_cache=False)
        model(input_ids=second.unsqueeze(0), use_cache=False)
    handle.remove()
    together, alone_first, alone_second = captured
    assert together[0, 6:].abs().max() > 0  # the heads are open and contribute
    torch.testing.assert_close(together[:, :6], alone_first, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(together[:, 6:], alone_second, atol=1e-5, rtol=1e-4)


def test_refusals():
    with pytest.raises(ValueError, match="copy_heads=-1"):
        QSTConfig(copy_heads=-1)
    with pytest.raises(ValueError, match="copy_head_dim=0"):
        QSTConfig(copy_head_dim=0)
    from transformers import AutoModelForSequenceClassification

    classifier = AutoModelForSequenceClassification.from_config(tiny_llama_config(num_labels=2, pad_token_id=0))
    with pytest.raises(QSTUnsupportedModelError, match="LM head"):
        get_peft_model(classifier, QSTConfig(task_type="SEQ_CLS", r=4, copy_heads=2))
    model = get_peft_model(tiny_causal_lm(), copy_config())
    embeds = model.get_base_model().model.embed_tokens(IDS)
    with pytest.raises(ValueError, match="need input_ids"):
        model(inputs_embeds=embeds)


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16-storage"])
def test_a_4bit_lm_head_is_refused_as_quantized(tiny_model_dir, storage):
    """bitsandbytes quantizes the LM head too when told to (llm_int8_skip_modules=[]); its packed (n, 1) weight was
    refused as "no LM head of the usual shape" with the advice to use an *ForCausalLM model, which it is. The error
    says the head is quantized and how to keep it unquantized."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantized_head = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=[],
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quantized_head)
    assert type(base.lm_head).__name__ == "Linear4bit"
    with pytest.raises(QSTUnsupportedModelError, match="needs the LM head's weight unquantized, but it is Params4bit"):
        get_peft_model(base, copy_config())


def test_a_static_cache_is_refused_with_copy_heads():
    """Copy heads read padding from a 2-D mask; generate hands a static cache's steps 4-D masks over the
    preallocated length (a dict of them for hybrid models): refused, not silently attending to padding."""
    model = trained_copy_model().eval()
    ids = torch.tensor([[0, 0, 5, 17, 33], [8, 3, 120, 45, 6]])
    mask = (ids != 0).long()
    dynamic = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert dynamic.shape == (2, 8)
    with pytest.raises(ValueError, match="copy heads, which read which positions are padding from a 2-D"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                       cache_implementation="static")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_copy_heads_read_the_lm_head_of_a_vocabulary_resized_after_get_peft_model(tied):
    """resize_token_embeddings after get_peft_model (to add tokens) replaces an untied LM head with a new, larger
    module. The copy heads kept the head they were given at injection: the added tokens' ids failed the row lookup
    (IndexError: index out of range) and the others read the old head's rows. They read the model's head as it is."""
    model = get_peft_model(tiny_causal_lm(tie_word_embeddings=tied), copy_config())
    model.resize_token_embeddings(136)
    head = model.get_base_model().get_output_embeddings()
    ids = IDS.clone()
    ids[:, 0] = torch.tensor([128, 135, 7])  # two of the added tokens
    with torch.no_grad():
        head.weight[7].mul_(3.0)  # a row the new head holds and the old one does not
        side = model.base_model.model.model.qst_side["default"]
        side.copy_head.gate.fill_(0.5)
        hidden = {}
        handle = head.register_forward_pre_hook(lambda m, a: hidden.setdefault("h", a[0]))
        model(input_ids=ids)
        handle.remove()
        with model.disable_adapter():
            base_hidden = model.get_base_model().model(input_ids=ids).last_hidden_state
    rows = head.weight[ids[:, 0]]
    unit_rms_rows = rows / rows.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    assert torch.allclose(hidden["h"][:, 0] - base_hidden[:, 0], 2 * 0.5 * unit_rms_rows, atol=1e-5)


def test_copy_heads_read_the_frozen_lm_head_under_modules_to_save():
    """With modules_to_save=["lm_head"] the logits come from the adapter's trained copy of the head, while the copy
    heads add the rows of the frozen original (as documented), in training and in generation alike."""
    model = get_peft_model(tiny_causal_lm(), copy_config(modules_to_save=["lm_head"]))
    train_steps(model, IDS, steps=3)
    wrapper = model.get_base_model().lm_head
    trained, original = wrapper.modules_to_save["default"].weight, wrapper.original_module.weight
    assert not torch.equal(trained, original) and not original.requires_grad
    captured = []
    side = model.base_model.model.model.qst_side["default"]
    handle = side.copy_head.register_forward_pre_hook(lambda m, a, k: captured.append(k["token_rows"]),
                                                      with_kwargs=True)
    with torch.no_grad():
        model(input_ids=IDS)
        model.generate(input_ids=IDS[:1], max_new_tokens=2, do_sample=False)
    handle.remove()
    assert torch.equal(captured[0], original[IDS])
    assert torch.equal(captured[1], original[IDS[:1]])


def test_a_deleted_model_is_freed_without_the_garbage_collector():
    """The layers look the LM head up on the model at each forward. A strong reference from a layer to the model that
    holds it made a cycle: ``del model`` (then ``torch.cuda.empty_cache()``) no longer freed the model's weights, only
    the garbage collector's next run did."""
    import gc
    import weakref

    model = get_peft_model(tiny_causal_lm(), copy_config()).eval()
    with torch.no_grad():
        model(input_ids=IDS)
    base = weakref.ref(model.get_base_model())
    gc.collect()
    gc.disable()
    try:
        del model
        assert base() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copied_model_reads_its_own_lm_head(how):
    """A deep copy or a pickled model (the layers refer to their model weakly) reads its own model's LM head."""
    from peft_qst import QSTLayer

    model = trained_copy_model(steps=2).eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    copied = copy_of(model, how)
    layer = next(m for m in copied.modules() if isinstance(m, QSTLayer))
    assert layer._output_head() is copied.get_base_model().get_output_embeddings()
    with torch.no_grad():
        copied.get_base_model().get_output_embeddings().weight[IDS[0, 0]].mul_(2.0)
        assert torch.equal(model(input_ids=IDS).logits, expected)  # the copy's head, not the original's
        assert not torch.equal(copied(input_ids=IDS).logits, expected)
