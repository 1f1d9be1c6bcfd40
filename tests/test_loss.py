"""The chunked causal-LM loss QST installs: the same loss and gradients as transformers' ForCausalLMLoss."""

from __future__ import annotations

import re

import pytest
import torch
from peft import get_peft_model
from transformers.loss.loss_utils import ForCausalLMLoss

import peft_qst
from peft_qst import loss as qst_loss

from .conftest import tiny_causal_lm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options", [{}, {"num_items_in_batch": torch.tensor(37)}, {"ignore_index": -1}, {"shift_labels": True}]
)
def test_chunked_loss_equals_transformers_loss(monkeypatch, dtype, options):
    monkeypatch.setattr(qst_loss, "CHUNK_ELEMENTS", 1000)  # several chunks of 9 rows, the last one partial
    torch.manual_seed(0)
    vocab = 101
    logits = (3 * torch.randn(3, 17, vocab)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (3, 17))
    labels[0, :5] = options.get("ignore_index", -100)
    kwargs = dict(options)
    if kwargs.pop("shift_labels", False):
        kwargs["shift_labels"], labels = labels, None
    expected = ForCausalLMLoss(logits, labels, vocab, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    before = logits.detach().clone()
    got = qst_loss.chunked_causal_lm_loss(logits, labels, vocab, **kwargs)
    (got_grad,) = torch.autograd.grad(got, logits)
    assert torch.equal(logits.detach(), before)  # the chunks are computed in place, never in the caller's logits
    assert got.dtype == expected.dtype == torch.float32
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad.float(), expected_grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "case", ["all ignored", "all ignored, num_items_in_batch=0", "all ignored, shift_labels", "single token"]
)
def test_a_batch_without_targets_gets_zero_gradients_as_with_transformers_loss(dtype, case):
    """No target at all (a TRL batch whose completions are empty, a single-token sequence): the loss is NaN (0 / 0) with
    both, but transformers' gradient is 0, not NaN: NaN gradients would wreck the side network's weights in one step."""
    torch.manual_seed(0)
    vocab = 101
    length = 1 if case == "single token" else 7
    logits = (3 * torch.randn(2, length, vocab)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (2, length)) if case == "single token" else torch.full((2, length), -100)
    kwargs = {"num_items_in_batch": torch.tensor(0)} if "num_items_in_batch" in case else {}
    if "shift_labels" in case:
        kwargs["shift_labels"], labels = labels, None
    expected = ForCausalLMLoss(logits, labels, vocab, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    got = qst_loss.chunked_causal_lm_loss(logits, labels, vocab, **kwargs)
    (got_grad,) = torch.autograd.grad(got, logits)
    assert expected.isnan() and got.isnan()
    assert torch.equal(expected_grad, torch.zeros_like(logits))
    assert torch.equal(got_grad, expected_grad)


def test_a_qst_model_trained_on_labels_without_targets_gets_the_gradients_of_transformers_loss():
    base = tiny_causal_lm()
    model = get_peft_model(base, peft_qst.QSTConfig(task_type="CAUSAL_LM", r=4)).train()
    ids = torch.randint(0, 128, (2, 12))
    labels = torch.full_like(ids, -100)  # completion-only loss on examples whose completion is empty
    grads = []
    for installed in (True, False):
        if not installed:
            qst_loss.uninstall_chunked_loss(model.get_base_model())
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(grad is not None and not grad.isnan().any() for grad in grads[0])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected)


def test_qst_model_uses_it_and_unload_gives_the_default_back():
    base = tiny_causal_lm()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = base(input_ids=ids, labels=ids).loss
    model = get_peft_model(base, peft_qst.QSTConfig(task_type="CAUSAL_LM", r=4))
    assert model.get_base_model().loss_function is qst_loss.chunked_causal_lm_loss
    with torch.no_grad():  # the untrained adapter is the base model, and so is its loss
        torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, expected)
    unloaded = model.unload()
    assert type(unloaded.model).__name__ == "LlamaModel"  # the original trunk is back, no side network left
    assert not any("qst_" in name for name, _ in unloaded.named_parameters())
    assert unloaded.loss_function is ForCausalLMLoss
    with torch.no_grad():
        torch.testing.assert_close(unloaded(input_ids=ids, labels=ids).loss, expected)


def test_a_loss_function_set_by_the_user_is_kept():
    base = tiny_causal_lm()

    def own_loss(logits, labels, vocab_size, **kwargs):
        return logits.float().mean() * 0 + 7.0

    base.loss_function = own_loss
    model = get_peft_model(base, peft_qst.QSTConfig(task_type="CAUSAL_LM", r=4))
    assert model.get_base_model().loss_function is own_loss
    ids = torch.randint(0, 128, (1, 6))
    assert model(input_ids=ids, labels=ids).loss.item() == 7.0


def test_logits_edited_in_place_after_the_loss_are_refused_by_name():
    """transformers' loss keeps a float32 copy and lets code after the forward edit the returned logits in place (a
    distillation loss's ``logits /= temperature`` beside the model's own loss); the chunked loss reads those logits
    again in backward, so it cannot: it says so and names the ways round, instead of autograd's message about a tensor
    of its own (``[torch.FloatTensor [18, 128]] ... is at version 1``) that points nowhere near the caller's edit."""
    base = tiny_causal_lm()
    model = get_peft_model(base, peft_qst.QSTConfig(task_type="CAUSAL_LM", r=4)).train()
    ids = torch.randint(0, 128, (2, 9))
    out = model(input_ids=ids, labels=ids)
    out.logits.div_(2.0)
    with pytest.raises(RuntimeError, match=r"modified in place after the forward.*uninstall_chunked_loss"):
        out.loss.backward()

    out = model(input_ids=ids, labels=ids)  # a copy edited: the loss back-propagates as transformers' does
    distilled = (out.logits / 2.0).log_softmax(-1).mean()
    (out.loss - distilled).backward()
    qst_loss.uninstall_chunked_loss(model.get_base_model())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    (out.loss - (out.logits / 2.0).log_softmax(-1).mean()).backward()
    assert grads and grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, msg=name)


@pytest.mark.parametrize(
    "batch_size,inputs",
    [
        (1, {"labels": slice(0, 1)}),  # a single label for a longer sequence: a NaN loss, where transformers raises
        (2, {"labels": slice(0, 5)}),
        (2, {"labels": slice(None), "logits_to_keep": 3}),
    ],
    ids=["one-label", "short-labels", "logits-to-keep"],
)
def test_labels_that_do_not_match_the_logits_are_refused_as_by_transformers_loss(batch_size, inputs):
    """cross_entropy refuses targets of another length than the logits' rows; the chunked loss must not compute a
    value (nor a cryptic gather error) there, where transformers' loss raises its ValueError."""
    base = tiny_causal_lm()
    model = get_peft_model(base, peft_qst.QSTConfig(task_type="CAUSAL_LM", r=4)).train()
    ids = torch.randint(0, 128, (batch_size, 9))
    kwargs = dict(inputs, labels=ids[:, inputs["labels"]])
    messages = []
    for installed in (True, False):
        if not installed:
            qst_loss.uninstall_chunked_loss(model.get_base_model())
        assert (model.get_base_model().loss_function is qst_loss.chunked_causal_lm_loss) is installed
        with pytest.raises(ValueError, match=r"Expected input batch_size \(\d+\) to match target batch_size") as info:
            model(input_ids=ids, **kwargs)
        messages.append(str(info.value))
    assert messages[0].startswith(messages[1].rstrip("."))  # the same numbers as transformers' message


@pytest.mark.parametrize(
    "make_labels, error, fragments",
    [
        (lambda ids: ids.float(), TypeError, ["labels of dtype torch.float32", "integer tensor", "not logits"]),
        (lambda ids: ids.to(torch.uint8), TypeError, ["labels of dtype torch.uint8", "torch.long", "8 bits"]),
        (lambda ids: ids.to(torch.int16), TypeError, ["labels of dtype torch.int16", "torch.long", "16 bits"]),
        (lambda ids: ids.masked_fill(ids < 64, -1), IndexError,
         [r"Target -1 is out of bounds", r"labels \[-1\]", "with -100"]),
        (lambda ids: ids.masked_fill(ids >= 64, 128), IndexError,
         [r"Target 128 is out of bounds", r"0 to 127", "resize_token_embeddings"]),
    ],
    ids=["float-labels", "uint8-labels", "int16-labels", "padding-marked-minus-one", "tokens-beyond-the-vocabulary"],
)
def test_labels_that_are_not_token_ids_are_refused_naming_them_and_the_fix(make_labels, error, fragments):
    """Labels that are not token ids of the model: floats (logits or probabilities passed as labels), integers too
    narrow for token ids (``uint8`` failed padding the shifted labels with -100, ``int16`` in the gather), padding marked
    with -1 instead of ignore_index, ids of a tokenizer with tokens the model lacks. The chunked loss's gather failed
    with a RuntimeError about an index ("gather(): Expected dtype int32/int64 for index", "index -1 is out of bounds
    for dimension 1 with size 128") that named neither the labels nor the fix; transformers' loss at least says
    "Target -1 is out of bounds" (an IndexError), which the refusal keeps, naming the values and the fix."""
    model = get_peft_model(tiny_causal_lm(), peft_qst.QSTConfig(task_type="CAUSAL_LM", r=4)).train()
    assert model.get_base_model().loss_function is qst_loss.chunked_causal_lm_loss
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with pytest.raises(error) as info:
        model(input_ids=ids, labels=make_labels(ids))
    for fragment in fragments:
        assert re.search(fragment, str(info.value)), str(info.value)
    # valid labels still give transformers' value
    loss = model(input_ids=ids, labels=ids.masked_fill(ids < 64, -100)).loss
    qst_loss.uninstall_chunked_loss(model.get_base_model())
    assert torch.allclose(loss, model(input_ids=ids, labels=ids.masked_fill(ids < 64, -100)).loss, atol=1e-6)
