"""Mixture-of-experts models asked for their router logits (``output_router_logits=True``, as QLoRA recipes for
Mixtral, Qwen-MoE, OLMoE, gpt-oss set it): the model's load-balancing ``aux_loss`` balances the side network's routers,
which train, not the frozen backbone's (whose logits, computed under no_grad, added only a constant)."""

from __future__ import annotations

import importlib
import pickle

import pytest
import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from peft_qst import QSTConfig, QSTUnsupportedModelError

#: tiny float32 models of two families whose routers return (logits, scores, indices) and whose causal-LM heads add
#: ``router_aux_loss_coef * load_balancing_loss_func(outputs.router_logits, ...)`` to the loss
FAMILIES = {
    "mixtral": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
    ),
    "qwen2_moe": dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128, num_experts=4,
        num_experts_per_tok=2,
    ),
}


def _model(model_type: str, output_router_logits: bool):
    config = AutoConfig.for_model(
        model_type, **FAMILIES[model_type], output_router_logits=output_router_logits, router_aux_loss_coef=0.5
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


def _qst(model_type: str, output_router_logits: bool = True, **config):
    base = _model(model_type, output_router_logits)
    model = get_peft_model(_model(model_type, output_router_logits), QSTConfig(task_type="CAUSAL_LM", r=4, **config))
    return base, model


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row: the load-balancing loss leaves its padding out
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _side_gates(model):
    """The side blocks' router modules (``...qst_side.default.trunk.layers.i.block.mlp.gate``), in block order."""
    return [m for n, m in model.named_modules() if ".qst_side.default.trunk.layers." in n and n.endswith("mlp.gate")]


def _side_routers(model):
    return [p for n, p in model.named_parameters() if ".qst_side." in n and n.endswith("mlp.gate.weight")]


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_aux_loss_balances_the_side_routers(model_type):
    base, model = _qst(model_type)
    config = base.config
    gates = _side_gates(model)
    assert len(gates) == config.num_hidden_layers
    recorded = []
    handles = [gate.register_forward_hook(lambda m, a, out: recorded.append(out[0])) for gate in gates]
    model.train()
    batch = _batch()
    out = model(**batch)
    for handle in handles:
        handle.remove()
    # the side blocks keep the backbone's number of experts and experts per token
    assert all(gate.num_experts == base.num_experts and gate.top_k == base.num_experts_per_tok for gate in gates)
    balancing = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    expected = balancing.load_balancing_loss_func(
        tuple(recorded), base.num_experts, base.num_experts_per_tok, batch["attention_mask"]
    )
    assert len(out.router_logits) == len(recorded)
    assert all(mine is theirs for mine, theirs in zip(out.router_logits, recorded))
    torch.testing.assert_close(out.aux_loss, expected, rtol=0, atol=0)
    # the untrained adapter (zero upsample) predicts as the base model; its loss differs by the side's aux loss only
    with torch.no_grad():
        reference = base(**batch)
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss - 0.5 * out.aux_loss, reference.loss - 0.5 * reference.aux_loss)
    out.loss.backward()
    grads = [router.grad for router in _side_routers(model)]
    assert len(grads) == config.num_hidden_layers
    # the upsample starts at zero, so on the first step the side routers' gradient comes from the aux loss alone
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_without_router_logits_nothing_changes(model_type):
    base, model = _qst(model_type, output_router_logits=False)
    batch = _batch()
    with torch.no_grad():
        out, reference = model(**batch), base(**batch)
    assert out.aux_loss is None and out.router_logits is None
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=0)
    # the same logits, the same loss up to float32 rounding: the cross-entropy's reduction order varies with the
    # thread count (with OMP_NUM_THREADS=1 Qwen2-MoE's differed in the last bit)
    torch.testing.assert_close(out.loss, reference.loss)
    # the forward kwarg turns them on for one call
    with torch.no_grad():
        asked = model(**batch, output_router_logits=True)
    assert asked.aux_loss is not None and len(asked.router_logits) == base.config.num_hidden_layers


def test_disabled_adapter_returns_the_base_models_router_logits_and_aux_loss():
    base, model = _qst("mixtral")
    model.eval()
    batch = _batch()
    with torch.no_grad():
        reference = base(**batch)
        with model.disable_adapter():
            out = model(**batch)
        adapted = model(**batch)
    torch.testing.assert_close(out.aux_loss, reference.aux_loss, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, reference.loss, rtol=0, atol=0)
    for mine, theirs in zip(out.router_logits, reference.router_logits, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    # the adapted forward reports its side routers, not the backbone's
    assert not torch.equal(adapted.router_logits[0], reference.router_logits[0])


def test_rows_of_several_adapters_take_their_own_router_logits():
    base, model = _qst("mixtral")
    model.add_adapter("other", QSTConfig(task_type="CAUSAL_LM", r=4))
    model.eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=["other", "__base__"])
        reference = base(input_ids=ids)
        model.set_adapter("other")
        other = model(input_ids=ids)
    for index, logits in enumerate(mixed.router_logits):
        rows = logits.view(2, ids.shape[1], -1)
        torch.testing.assert_close(rows[0], other.router_logits[index].view(2, ids.shape[1], -1)[0], rtol=0, atol=0)
        torch.testing.assert_close(rows[1], reference.router_logits[index].view(2, ids.shape[1], -1)[1], rtol=0, atol=0)
        assert not torch.equal(rows[0], reference.router_logits[index].view(2, ids.shape[1], -1)[0])


def test_cached_generation_with_router_logits():
    base, model = _qst("mixtral")
    model.eval()
    ids = _batch()["input_ids"][:1]
    expected = base.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    out = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    # the untrained adapter generates as the base model does, from a cache, with router logits on in the config
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_4bit_backbone_balances_the_side_routers(tmp_path):
    from .conftest import bnb_config

    _model("mixtral", True).save_pretrained(tmp_path / "base")  # safetensors
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config())
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    recorded = []
    for gate in _side_gates(model):
        gate.register_forward_hook(lambda m, a, out: recorded.append(out[0]))
    model.train()
    batch = _batch()
    out = model(**batch)
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    expected = load_balancing_loss_func(tuple(recorded), 4, 2, batch["attention_mask"])
    assert len(recorded) == 2
    torch.testing.assert_close(out.aux_loss, expected, rtol=0, atol=0)
    out.loss.backward()
    assert all(router.grad is not None and router.grad.abs().sum() > 0 for router in _side_routers(model))


def test_gradient_checkpointing_keeps_the_aux_loss_gradient():
    """TRL's default checkpointing (non-reentrant) recomputes the side blocks in backward; the router logits recorded
    in their forward keep their graph."""
    _, model = _qst("mixtral")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    out = model(**_batch())
    out.loss.backward()
    assert all(router.grad is not None and router.grad.abs().sum() > 0 for router in _side_routers(model))


def _recorded_side_router_logits(model):
    """Hooks on the side trunk's router modules, of the class the model's own output recorder reads the router logits
    from (``_can_record_outputs``); returns the list the logits of the next forward are appended to, in call order."""
    side = next(m for n, m in model.named_modules() if n.endswith("qst_side.default"))
    recorder = side.trunk._can_record_outputs["router_logits"]
    recorded = []
    for module in side.trunk.modules():
        if isinstance(module, recorder.target_class):
            module.register_forward_hook(lambda m, a, out: recorded.append(out[recorder.index]))
    return recorded


def test_side_layers_whose_backbone_layers_route_by_token_id_are_balanced_too():
    """DeepSeek-V4's hash-routed expert layers (``hash_moe``) pick experts by token id and record no router logits;
    the side trunk never sees token ids and routes those layers with a learned router, so it returns more router
    logits than the backbone (2 against 1 here). The model's load-balancing function takes any number of layers: the
    aux loss is computed over all the side routers. Refused before, as a count that differed from the backbone's."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import load_balancing_loss_func

    from .test_more_architectures import tiny_config

    config = tiny_config("deepseek_v4", mlp_layer_types=["hash_moe", "moe"], output_router_logits=True)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(config).float(), QSTConfig(task_type="CAUSAL_LM", r=4))
    recorded = _recorded_side_router_logits(model)
    model.train()
    batch = _batch()
    out = model(**batch)
    assert len(recorded) == 2 and len(out.router_logits) == 2
    assert all(mine is theirs for mine, theirs in zip(out.router_logits, recorded))
    expected = load_balancing_loss_func(tuple(recorded), 4, 2, batch["attention_mask"])
    torch.testing.assert_close(out.aux_loss, expected, rtol=0, atol=0)
    out.loss.backward()
    side_routers = [p for n, p in model.named_parameters() if ".qst_side." in n and n.endswith("mlp.gate.weight")]
    assert len(side_routers) == 2
    assert all(router.grad is not None and router.grad.abs().sum() > 0 for router in side_routers)
    # rows of several adapters cannot take per-layer logits from networks of other layer counts: refused, named
    model.eval()
    with torch.no_grad(), pytest.raises(QSTUnsupportedModelError, match="2 router logits.*backbone returned 1"):
        model(input_ids=batch["input_ids"], adapter_names=["default", "__base__"])


def test_a_side_trunk_with_parametrized_constants_records_its_router_logits():
    """ZAYA's trunk holds a constant vector of its own (``input_hidden_states_scale``), which the side network stores
    as an offset: torch then moves the side trunk to a class of its own (``ParametrizedZayaModel``), which transformers'
    output recorder, keyed on the class, did not know. The side trunk recorded no router logits, and a forward with
    output_router_logits=True was refused; it returns the side routers' logits, as for any model."""
    config = AutoConfig.for_model(
        "zaya", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        vocab_size=128, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_experts=4,
        num_experts_per_tok=1, moe_intermediate_size=64, layer_types=["hybrid", "hybrid"],
    )
    ids = _batch()["input_ids"]

    def build():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).float().eval()

    with torch.no_grad():
        reference = build()(input_ids=ids, output_router_logits=True)
    model = get_peft_model(build(), QSTConfig(task_type="CAUSAL_LM", r=4))
    side = next(m for n, m in model.named_modules() if n.endswith("qst_side.default"))
    assert type(side.trunk).__name__ == "ParametrizedZayaModel"
    # a pickled copy (taken before a forward asks for router logits: transformers' recording hooks, installed then,
    # cannot be pickled) rebuilds the parametrized class: it records them too
    copy = pickle.loads(pickle.dumps(model))
    recorded = _recorded_side_router_logits(model)
    with torch.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    assert len(recorded) == 2
    assert len(out.router_logits) == 2 and all(mine is theirs for mine, theirs in zip(out.router_logits, recorded))
    assert not torch.equal(out.router_logits[0], reference.router_logits[0])
    with torch.no_grad():
        again = copy(input_ids=ids, output_router_logits=True)
    for mine, theirs in zip(again.router_logits, out.router_logits, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_a_side_trunk_with_parametrized_constants_pickled_records_its_router_logits_in_a_fresh_process(tmp_path):
    """transformers' output recorder knows a model's class once a model of it was built in the process (an unpickled
    model is not built: transformers registers none of its classes then; the child below builds a ZAYA model first, as
    a process that loaded the base model does). The parametrized class of ZAYA's side trunk (``ParametrizedZayaModel``)
    is rebuilt when a whole model is unpickled (``torch.load``, the child of a multiprocessing spawn) and registers
    itself then: the side routers' logits are returned there too, those of the original."""
    from safetensors.torch import load_file

    from .conftest import run_python

    config = AutoConfig.for_model(
        "zaya", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        vocab_size=128, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_experts=4,
        num_experts_per_tok=1, moe_intermediate_size=64, layer_types=["hybrid", "hybrid"],
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).float().eval()
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    path, out_file = tmp_path / "model.pt", tmp_path / "router_logits.safetensors"
    torch.save(model, path)  # before a forward asks for router logits (its recording hooks cannot be pickled)
    config.save_pretrained(tmp_path)
    ids = _batch()["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids, output_router_logits=True).router_logits
    run_python(
        "import torch\nfrom safetensors.torch import save_file\n"
        "from transformers import AutoConfig, AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_config(AutoConfig.from_pretrained({str(tmp_path)!r}))\n"
        f"model = torch.load({str(path)!r}, weights_only=False)\n"
        f"with torch.no_grad():\n    out = model(input_ids=torch.tensor({ids.tolist()}), output_router_logits=True)\n"
        f"save_file({{str(i): t.contiguous() for i, t in enumerate(out.router_logits)}}, {str(out_file)!r})\n"
    )
    loaded = load_file(out_file)
    assert len(loaded) == len(expected) == 2
    for index, logits in enumerate(expected):
        torch.testing.assert_close(loaded[str(index)], logits, rtol=0, atol=0)
