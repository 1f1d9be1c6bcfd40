"""The hybrid (``backbone_lora_layers``) on mixture-of-experts models asked for their router logits: the routers of the
backbone blocks it adapts see LoRA-adapted states and their logits carry a gradient, so the model's load-balancing
``aux_loss`` balances them together with the side network's routers; the frozen blocks' routers stay out."""

from __future__ import annotations

import functools
import importlib
import re

import pytest
import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from peft_qst import QSTConfig, QSTUnsupportedModelError

from .test_moe_router_logits import FAMILIES, _batch, _recorded_side_router_logits

LAYERS, ADAPTED = 4, 2  # two frozen blocks below, two adapted ones on top

#: tiny float32 models: the two families of tests/test_moe_router_logits.py and two more whose causal-LM heads add
#: ``router_aux_loss_coef * load_balancing_loss_func(outputs.router_logits, ...)`` to the loss
HYBRID_FAMILIES = {
    **FAMILIES,
    "olmoe": dict(
        hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
        num_experts=4, num_experts_per_tok=2, eos_token_id=2, pad_token_id=1,
    ),
    "qwen3_moe": dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, num_experts=4, num_experts_per_tok=2,
    ),
}


def _model(model_type: str):
    kwargs = {**HYBRID_FAMILIES[model_type], "num_hidden_layers": LAYERS}
    config = AutoConfig.for_model(model_type, **kwargs, output_router_logits=True, router_aux_loss_coef=0.5)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


def _hybrid(base):
    return get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, backbone_lora_layers=ADAPTED))


def _recorded_backbone_router_logits(model) -> dict:
    """Hooks on the backbone's router modules (the class its output recorder reads router logits from); returns the
    dict, block index -> logits of the next forward, that they fill."""
    trunk = next(m for n, m in model.named_modules() if n.endswith(".model") and hasattr(m, "qst_side")).base_layer
    recorder = trunk._can_record_outputs["router_logits"]
    recorded = {}

    def record(index, module, args, out):  # (the forward's run only: not a checkpoint's recompute in backward)
        recorded.setdefault(index, out[recorder.index])

    for name, module in trunk.named_modules():
        if isinstance(module, recorder.target_class):
            module.register_forward_hook(functools.partial(record, int(re.search(r"layers\.(\d+)\.", name).group(1))))
    return recorded


def _forward_recorded(model, train: bool = True):
    """One forward of ``model`` on the test batch, in training mode (else in eval mode without gradients), with its
    side routers' and backbone routers' logits recorded; it returns exactly the side routers' logits, then the adapted
    blocks'. Returns (output, batch, side logits, backbone logits by block, adapted blocks' logits)."""
    side = _recorded_side_router_logits(model)
    backbone = _recorded_backbone_router_logits(model)
    model.train(train)
    batch = _batch()
    with torch.set_grad_enabled(train):
        out = model(**batch)
    adapted = [backbone[i] for i in range(LAYERS - ADAPTED, LAYERS)]
    assert all(mine is theirs for mine, theirs in zip(out.router_logits, side + adapted, strict=True))
    return out, batch, side, backbone, adapted


def _lora_b(model):
    """The hybrid's LoRA ``B`` matrices (the ``A`` ones get no gradient while ``B`` is at zero), block -> list."""
    found = {}
    for name, param in model.named_parameters():
        match = re.search(r"backbone_lora\.deltas\.(\d+)\..*lora_B$", name)
        if match:
            found.setdefault(int(match.group(1)), []).append(param)
    return found


@pytest.mark.parametrize("model_type", sorted(HYBRID_FAMILIES))
def test_aux_loss_balances_the_side_routers_and_the_adapted_backbone_routers(model_type):
    base = _model(model_type)
    model = _hybrid(_model(model_type))
    # exactly the side routers, then the adapted blocks' routers; the frozen blocks' routers stay out
    out, batch, side, backbone, adapted = _forward_recorded(model)
    assert len(side) == LAYERS and sorted(backbone) == list(range(LAYERS))
    assert len(out.router_logits) == LAYERS + ADAPTED
    assert all(logits.requires_grad for logits in adapted)
    assert not any(backbone[i].requires_grad for i in range(LAYERS - ADAPTED))
    balancing = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    # the side blocks keep the backbone's number of experts and experts per token: one call takes them all
    assert {logits.shape for logits in out.router_logits} == {(14, base.num_experts)}
    expected = balancing.load_balancing_loss_func(
        tuple(side + adapted), base.num_experts, base.num_experts_per_tok, batch["attention_mask"]
    )
    torch.testing.assert_close(out.aux_loss, expected, rtol=0, atol=0)
    # the untrained hybrid predicts as the base model; its loss differs by the aux loss only
    with torch.no_grad():
        reference = base(**batch)
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss - 0.5 * out.aux_loss, reference.loss - 0.5 * reference.aux_loss)
    # the aux loss reaches the adapted blocks' LoRA through their routers' logits: the part of its gradient that
    # comes from them (the side routers reach the LoRA too, through the hidden states the side network reads)
    lora = [p for i in range(LAYERS - ADAPTED, LAYERS) for p in _lora_b(model)[i]]
    through_backbone = torch.autograd.grad(out.aux_loss, adapted, retain_graph=True)
    assert all(grad.abs().sum() > 0 for grad in through_backbone)
    side_only = balancing.load_balancing_loss_func(
        tuple(side), base.num_experts, base.num_experts_per_tok, batch["attention_mask"]
    )
    of_aux = torch.autograd.grad(out.aux_loss, lora, retain_graph=True)
    of_side = torch.autograd.grad(side_only, lora, retain_graph=True, allow_unused=True)
    assert any(not torch.allclose(a, torch.zeros_like(a) if s is None else s) for a, s in zip(of_aux, of_side))
    # and the training loss, with router_aux_loss_coef, carries it into the adapted blocks' LoRA
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)


def test_eval_and_generation_take_the_same_routers():
    """Without gradients (evaluation, generation) the aux loss covers the same routers as in training."""
    base = _model("mixtral")
    model = _hybrid(_model("mixtral"))
    out, batch, side, _, adapted = _forward_recorded(model, train=False)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    expected = load_balancing_loss_func(tuple(side + adapted), 4, 2, batch["attention_mask"])
    torch.testing.assert_close(out.aux_loss, expected, rtol=0, atol=0)
    # the untrained hybrid generates as the base model does, from a cache, with router logits on in the config
    ids = batch["input_ids"][:1]
    expected = base.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    generated = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(generated, expected, rtol=0, atol=0)


def test_gradient_checkpointing_keeps_the_adapted_routers():
    """Non-reentrant checkpointing recomputes the adapted blocks in backward; their router logits, recorded in the
    forward, stay in the aux loss once and carry its gradient into the LoRA."""
    model = _hybrid(_model("mixtral"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out, _, _, _, adapted = _forward_recorded(model)
    (grad,) = torch.autograd.grad(out.aux_loss, [adapted[-1]], retain_graph=True)
    assert grad.abs().sum() > 0
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _lora_b(model)[LAYERS - 1])


def test_rows_of_several_adapters_with_a_hybrid():
    """Rows of one hybrid take its side routers layer by layer and the adapted routers, as the hybrid alone; rows that
    would take different numbers of backbone routers (the base model's beside a hybrid's) cannot share one aux loss
    over the batch's layers where it could train (gradients enabled): refused, naming the way out, not a loss of
    neither model. Without gradients (generation, evaluation) they take the layers they all have."""
    model = _hybrid(_model("mixtral"))
    model.eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        alone = model(input_ids=ids)
        rows = model(input_ids=ids, adapter_names=["default", "default"])
        assert len(rows.router_logits) == LAYERS + ADAPTED
        for mine, theirs in zip(rows.router_logits, alone.router_logits, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        torch.testing.assert_close(rows.aux_loss, alone.aux_loss, rtol=0, atol=0)
        mixed = model(input_ids=ids, adapter_names=["default", "__base__"], output_router_logits=False)
    assert mixed.router_logits is None
    with pytest.raises(QSTUnsupportedModelError, match=r"'default': 2, '__base__': 0.*output_router_logits=False"):
        model(input_ids=ids, adapter_names=["default", "__base__"])


def test_mixed_adapter_generation_of_a_hybrid_with_router_logits_in_the_config():
    """generate(adapter_names=[...]) runs without gradients and computes aux_loss at every step where the config asks
    for router logits (QLoRA recipes save it so): rows of a hybrid beside the base model's or a plain adapter's were
    refused as unable to share one aux loss, failing the mixed-adapter generation that worked before the hybrid's
    adapted routers were balanced. Without gradients such rows take the layers they all have (each row its own
    network's routers, layer by layer), and each row generates as its adapter alone."""
    model = _hybrid(_model("mixtral"))
    model.add_adapter("plain", QSTConfig(task_type="CAUSAL_LM", r=4))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:  # trained adapters: every row's network computes something else
                parameter.add_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    model.eval()
    ids = _batch()["input_ids"][:, 2:]
    side = _recorded_side_router_logits(model)
    backbone = _recorded_backbone_router_logits(model)
    with torch.no_grad():
        out = model(input_ids=ids, adapter_names=["default", "__base__"])
    assert len(out.router_logits) == LAYERS
    for layer, logits in enumerate(out.router_logits):
        rows = logits.reshape(2, ids.shape[1], -1)
        torch.testing.assert_close(rows[0], side[layer].reshape(2, ids.shape[1], -1)[0], rtol=0, atol=0)
        torch.testing.assert_close(rows[1], backbone[layer].reshape(2, ids.shape[1], -1)[1], rtol=0, atol=0)
    generate = functools.partial(model.generate, max_new_tokens=4, do_sample=False)
    for other in ("__base__", "plain"):
        mixed = generate(input_ids=ids, adapter_names=["default", other])
        assert torch.equal(mixed[0], generate(input_ids=ids[:1], adapter_names=["default"])[0])
        assert torch.equal(mixed[1], generate(input_ids=ids[1:], adapter_names=[other])[0])


def test_4bit_backbone_balances_the_adapted_routers(tmp_path):
    from .conftest import bnb_config

    _model("mixtral").save_pretrained(tmp_path / "base")  # safetensors
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config())
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    model = _hybrid(base)
    out, batch, side, _, adapted = _forward_recorded(model)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    expected = load_balancing_loss_func(tuple(side + adapted), 4, 2, batch["attention_mask"])
    torch.testing.assert_close(out.aux_loss, expected, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(out.aux_loss, [adapted[0]], retain_graph=True)
    assert grad.abs().sum() > 0
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for i in _lora_b(model) for p in _lora_b(model)[i])
