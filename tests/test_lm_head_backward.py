"""The LM head's low-rank backward in training (peft_qst/lm_head.py): the gradients autograd gives, where it applies,
and autograd's own backward everywhere else."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import peft_qst.lm_head as lm_head
from peft_qst import QSTConfig

V = 100


def qst_model(dtype=torch.float32, **config):
    torch.manual_seed(0)
    base_config = AutoConfig.for_model(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=V,
    )
    base = AutoModelForCausalLM.from_config(base_config, dtype=dtype)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, **config))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # open the zero-initialised upsample so that every side parameter gets a gradient
        for parameter in model.parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator) * 0.1
                parameter.add_(noise.to(parameter.dtype))
    return model


def count_low_rank_backwards(monkeypatch) -> list:
    calls = []
    original = lm_head.LowRankHeadGradient.backward

    def counted(ctx, grad):
        calls.append(1)
        return original(ctx, grad)

    monkeypatch.setattr(lm_head.LowRankHeadGradient, "backward", staticmethod(counted))
    return calls


def gradients(model, low_rank: bool, **inputs) -> dict:
    head = model.get_output_embeddings()
    handle = getattr(head, lm_head._LOW_RANK_HANDLE_ATTR)
    if not low_rank:
        handle.remove()
        delattr(head, lm_head._LOW_RANK_HANDLE_ATTR)
    try:
        model.zero_grad()
        out = model(**inputs)
        loss = out.loss if out.loss is not None else out.logits.float().pow(2).mean()
        loss.backward()
    finally:
        lm_head.install_lm_head_hooks(model)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def batch():
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def test_low_rank_backward_gives_autograds_gradients(monkeypatch):
    model = qst_model()
    calls = count_low_rank_backwards(monkeypatch)
    mine = gradients(model, True, **batch())
    assert len(calls) == 1
    reference = gradients(model, False, **batch())
    assert len(calls) == 1
    assert set(mine) == set(reference) and len(mine) > 10
    for name in reference:
        torch.testing.assert_close(mine[name], reference[name], atol=1e-6, rtol=1e-4, msg=name)
    for name in ("upsample", "output_gate"):  # the three parameters the low-rank backward computes directly
        assert any(name in n and g.abs().max() > 0 for n, g in mine.items())


def test_bfloat16_gradients_agree_to_rounding(monkeypatch):
    model = qst_model(dtype=torch.bfloat16)
    calls = count_low_rank_backwards(monkeypatch)
    mine = gradients(model, True, **batch())
    reference = gradients(model, False, **batch())
    assert len(calls) == 1
    for name in reference:
        scale = reference[name].float().abs().max().clamp(min=1e-6)
        assert (mine[name].float() - reference[name].float()).abs().max() <= 0.03 * scale, name


def test_a_gradient_with_respect_to_the_returned_hidden_state_is_autograds(monkeypatch):
    """With ``output_hidden_states=True`` the mixed hidden state is handed out, and a gradient with respect to it
    (``torch.autograd.grad(loss, out.hidden_states[-1])``, as attribution methods take) must exist: the low-rank
    backward, which goes from the logits straight to the side output, gate and upsample, failed that with "The
    differentiated Tensor ... appears to not have been used in the graph". Autograd's backward runs instead, with
    the side parameters' gradients the low-rank backward gives without hidden states."""
    model = qst_model()
    calls = count_low_rank_backwards(monkeypatch)
    data = batch()
    out = model(**data, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    assert hidden is not None and hidden.requires_grad
    (by_hidden,) = torch.autograd.grad(out.logits.float().pow(2).mean(), hidden, retain_graph=True)
    assert calls == []
    detached = hidden.detach().requires_grad_()
    (reference,) = torch.autograd.grad(model.get_output_embeddings()(detached).float().pow(2).mean(), detached)
    assert reference.abs().max() > 0
    torch.testing.assert_close(by_hidden, reference)
    with_hidden = gradients(model, True, **data, output_hidden_states=True)
    assert calls == []
    without_hidden = gradients(model, True, **data)
    assert len(calls) == 1
    assert set(with_hidden) == set(without_hidden)
    for name in without_hidden:
        torch.testing.assert_close(with_hidden[name], without_hidden[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize(
    "config,inputs",
    [
        ({"copy_heads": 2}, {}),  # the copy heads add another term to the hidden state
        ({}, {"logits_to_keep": 4}),  # the head sees a slice of the hidden state
        ({"backbone_lora_layers": 1}, {}),  # the backbone's last hidden state has a gradient too
    ],
    ids=["copy-heads", "sliced", "backbone-lora"],
)
def test_autograds_backward_wherever_the_low_rank_form_does_not_hold(monkeypatch, config, inputs):
    model = qst_model(**config)
    calls = count_low_rank_backwards(monkeypatch)
    data = batch()
    if "logits_to_keep" in inputs:
        data = dict(data, labels=None, **inputs)
    mine = gradients(model, True, **data)
    assert calls == []
    reference = gradients(model, False, **data)
    for name in reference:
        torch.testing.assert_close(mine[name], reference[name], msg=name)


def test_a_trained_lm_head_keeps_autograds_backward(monkeypatch):
    model = qst_model()
    head = model.get_output_embeddings()
    head.weight.requires_grad_(True)
    calls = count_low_rank_backwards(monkeypatch)
    grads = gradients(model, True, **batch())
    assert calls == [] and head.weight.grad is not None and head.weight.grad.abs().max() > 0
    assert any("upsample" in name for name in grads)


class LinearOnlyWeight(torch.Tensor):
    """A weight as torchao's ``quantize_`` leaves it in an ``nn.Linear`` (a tensor subclass such as ``Int8Tensor``):
    ``F.linear`` works, plain matrix products are not implemented."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "mm", "__matmul__", "__rmatmul__"):
            raise NotImplementedError(f"{cls.__name__} dispatch: unimplemented operator {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_quantized_tensor_subclass_head_keeps_autograds_backward(monkeypatch):
    """torchao's quantize_(model, Int8WeightOnlyConfig()) quantizes every nn.Linear, the LM head included, and leaves it
    an nn.Linear whose weight is a tensor subclass implementing F.linear only: the low-rank backward's matmuls failed
    with NotImplementedError at the first training step (LoRA trains there). Such a head keeps autograd's backward."""
    model = qst_model()
    reference = gradients(model, True, **batch())
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(LinearOnlyWeight(head.weight.detach().clone()), requires_grad=False)
    assert type(head.weight) is LinearOnlyWeight
    calls = count_low_rank_backwards(monkeypatch)
    grads = gradients(model, True, **batch())
    assert calls == []
    assert set(grads) == set(reference)
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], atol=1e-6, rtol=1e-4, msg=name)


def test_unload_removes_the_hook():
    model = qst_model()
    head = model.get_output_embeddings()
    assert getattr(head, lm_head._LOW_RANK_HANDLE_ATTR, None) is not None
    base = model.unload()
    assert getattr(base.get_output_embeddings(), lm_head._LOW_RANK_HANDLE_ATTR, None) is None
    assert not base.get_output_embeddings()._forward_hooks


def test_the_record_lives_with_the_hidden_state_and_does_not_travel_with_it(tmp_path):
    """The mixed hidden state is recorded beside the tensor, not on it: saving the tensor writes plain weights, and
    the record goes when the tensor does."""
    import gc

    model = qst_model()
    seen = []  # the mixed hidden state, as the LM head receives it
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    out = model(**batch())
    handle.remove()
    view = seen.pop()  # transformers hands the head hidden[:, slice(0, None)]
    mixed = view if view._base is None else view._base
    del view
    assert lm_head._low_rank_record(mixed) is not None
    torch.save(mixed, tmp_path / "h.pt")
    assert torch.equal(torch.load(tmp_path / "h.pt", weights_only=True), mixed)
    before = len(lm_head._low_rank_records)
    del out, mixed
    gc.collect()
    assert len(lm_head._low_rank_records) == before - 1


def test_logits_edited_in_place_keep_autograds_gradients(monkeypatch):
    """User code may change the logits in place before its loss (a temperature, a banned token): the low-rank
    backward's output was a view of its input, which autograd refuses to modify in place ("Output 0 of
    LowRankHeadGradient is a view and is being modified inplace"), where the head's own F.linear output allows it."""
    model = qst_model()
    data = batch()
    inputs = dict(data, labels=None)

    def edited_logits_loss(low_rank: bool) -> dict:
        head = model.get_output_embeddings()
        if not low_rank:
            getattr(head, lm_head._LOW_RANK_HANDLE_ATTR).remove()
            delattr(head, lm_head._LOW_RANK_HANDLE_ATTR)
        try:
            model.zero_grad()
            logits = model(**inputs).logits
            logits.div_(0.7)
            logits[..., 0] = -1e4
            logp = logits[:, :-1].log_softmax(-1).gather(-1, data["input_ids"][:, 1:, None]).squeeze(-1)
            (-logp.mean()).backward()
        finally:
            lm_head.install_lm_head_hooks(model)
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    calls = count_low_rank_backwards(monkeypatch)
    mine = edited_logits_loss(True)
    assert len(calls) == 1
    reference = edited_logits_loss(False)
    assert set(mine) == set(reference) and len(mine) > 10
    for name in reference:
        torch.testing.assert_close(mine[name], reference[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("frozen", ["output_gate", "upsample"])
def test_low_rank_backward_with_the_gate_or_the_upsample_frozen_gives_autograds_gradients(monkeypatch, frozen):
    """A user may freeze one of the two parameters the low-rank backward computes (the output gate, to keep the
    side output's scale, or the upsample): the other's gradient is still computed, and equals autograd's."""
    model = qst_model()
    for name, parameter in model.named_parameters():
        if frozen in name:
            parameter.requires_grad_(False)
    trained = "upsample" if frozen == "output_gate" else "output_gate"
    calls = count_low_rank_backwards(monkeypatch)
    mine = gradients(model, True, **batch())
    assert len(calls) == 1
    reference = gradients(model, False, **batch())
    assert set(mine) == set(reference)
    assert not any(frozen in name for name in mine)
    assert any(trained in name and grad.abs().max() > 0 for name, grad in mine.items())
    for name in reference:
        torch.testing.assert_close(mine[name], reference[name], atol=1e-6, rtol=1e-4, msg=name)


def test_an_lm_head_whose_bias_trains_keeps_autograds_backward(monkeypatch):
    """A frozen head weight with a trainable bias (BitFit-style, on a head with a bias such as GPT-J's or Phi's): the
    low-rank backward computes no gradient for the head, so autograd's backward runs and the bias trains."""
    model = qst_model()
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(V))
    calls = count_low_rank_backwards(monkeypatch)
    grads = gradients(model, True, **batch())
    assert calls == [] and head.bias.grad is not None and head.bias.grad.abs().max() > 0
    assert any("upsample" in name for name in grads)


@pytest.mark.parametrize("pieces", [False, True], ids=["one-piece", "pieces-of-7-rows"])
def test_bfloat16_on_a_cpu_without_onednn_kernels_gives_the_exact_gradients_rounded(monkeypatch, pieces):
    """Where PyTorch has no oneDNN kernel for bfloat16 on the CPU (AVX2-only x86 CPUs; set so here, whatever this CPU
    is), the backward of bfloat16 logits computes in float32 (``lm_head._backward_dtype``: the generic bfloat16 matmul
    took 6.2 s for SmolLM2's head where float32 took 0.18 s), over the vocabulary in pieces of at most
    ``_CPU_FLOAT32_ELEMENTS``. Each gradient is then the float64 one rounded to bfloat16; products in bfloat16, with
    the intermediate ``s^T G`` rounded, matched it in about half of the values."""
    monkeypatch.setattr(lm_head, "_cpu_matmul_is_native", lambda dtype: False)
    batch, width = (2, 11), 64
    if pieces:  # 7 vocabulary rows a piece: 15 pieces, the last of 2 rows
        monkeypatch.setattr(lm_head, "_CPU_FLOAT32_ELEMENTS", 7 * (width + batch[0] * batch[1]))
    gradients, exact = low_rank_gradients_and_float64_ones(batch, width)
    for mine, reference in zip(gradients, exact):
        assert mine.dtype == torch.bfloat16
        assert (mine == reference.to(torch.bfloat16)).float().mean() >= 0.98
        assert ((mine.double() - reference).abs() <= 2**-7 * reference.abs()).all()


def test_bfloat16_on_a_cpu_with_onednn_kernels_stays_in_bfloat16(monkeypatch):
    """Where oneDNN multiplies bfloat16 (AVX-512, AMX; set so here), the products stay in bfloat16, as on GPUs: the
    gradients agree with the float64 ones to bfloat16's rounding of the intermediate products."""
    monkeypatch.setattr(lm_head, "_cpu_matmul_is_native", lambda dtype: True)
    assert lm_head._backward_dtype(torch.zeros(1, dtype=torch.bfloat16)) == torch.bfloat16
    assert lm_head._backward_dtype(torch.zeros(1, dtype=torch.float32)) == torch.float32
    gradients, exact = low_rank_gradients_and_float64_ones((2, 11), 64)
    for mine, reference in zip(gradients, exact):
        assert mine.dtype == torch.bfloat16
        assert (mine.double() - reference).abs().max() <= 0.03 * reference.abs().max()


def low_rank_gradients_and_float64_ones(batch: tuple, width: int, rank: int = 4) -> tuple:
    """LowRankHeadGradient's gradients of the side output, gate and upsample for random bfloat16 inputs (``batch``:
    rows x tokens, vocabulary V), and the same gradients computed by autograd in float64."""
    generator = torch.Generator().manual_seed(3)

    def random(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).bfloat16()

    side, gate, up = random(*batch, rank), random(width), random(width, rank, scale=0.1)
    for parameter in (side, gate, up):
        parameter.requires_grad_()
    weight, grad = random(V, width, scale=0.1), random(*batch, V)
    logits = torch.zeros(*batch, V, dtype=torch.bfloat16)
    lm_head.LowRankHeadGradient.apply(logits, side, gate, up, weight).backward(grad)

    exact = [t.detach().double().requires_grad_() for t in (side, gate, up)]
    ((exact[1] * (exact[0] @ exact[2].T)) @ weight.double().T).backward(grad.double())
    return (side.grad, gate.grad, up.grad), tuple(t.grad for t in exact)
