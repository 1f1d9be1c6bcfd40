"""``state_dict()`` / ``save_pretrained`` leave a QST model's 4-bit backbone exactly as it was (peft_qst/bnb_compat.py).

On a CPU with AVX512-BF16, bitsandbytes repacks ``Linear4bit`` weights at the first eval forward without gradients and
unpacks them lossily in place at every ``state_dict()``; these tests assert the invariant (bit-identical logits after
saving), which holds whether or not the CPU running them repacks. Where it does, they check the repacked path ran.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_qst import QSTConfig
from peft_qst.bnb_compat import keep_4bit_weights_through_state_dict

from .conftest import bnb_config, copy_of, tiny_causal_lm, train_steps

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import QuantState, dequantize_4bit, has_avx512bf16  # noqa: E402


def _linear4bit_layers(model):
    return [(name, module) for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)]


def _cpu_packed(model) -> bool:
    return any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for _, m in _linear4bit_layers(model))


def _dequantized_from_state_dict(state_dict: dict, prefix: str) -> torch.Tensor:
    """A Linear4bit's weight rebuilt from its state-dict entries, as from_pretrained reads them."""
    entries = {k[len(prefix) + len("weight.") :]: v for k, v in state_dict.items() if k.startswith(prefix + "weight.")}
    quant_state = QuantState.from_dict(entries, device=torch.device("cpu"))
    return dequantize_4bit(state_dict[prefix + "weight"], quant_state).float()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
def test_eval_then_save_keeps_backbone_and_adapter_reloads(tiny_model_dir, tmp_path, double_quant):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config(double_quant=double_quant))
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    train_steps(model, ids, steps=2)  # a trained adapter, so reloading it is a real check; leaves eval mode

    # the backbone as loaded, before any eval forward could repack it
    fresh_state = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    before = _logits(model, ids)  # eval + no_grad: where the CPU supports it, bitsandbytes repacks here
    if has_avx512bf16():
        assert _cpu_packed(model), "expected bitsandbytes' CPU repacking on this AVX512-BF16 CPU"

    first_state = model.state_dict()
    assert torch.equal(_logits(model, ids), before)
    second_state = model.state_dict()
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)

    model.save_pretrained(tmp_path / "adapter")
    assert torch.equal(_logits(model, ids), before)
    # still the repacked layout in memory, not an unpacked one (the next eval forward would repack it differently)
    assert _cpu_packed(model) == has_avx512bf16()

    # the backbone entries state_dict() returns decode to the loaded weights: the packed layout keeps absmax in
    # bfloat16, so they agree to bfloat16 rounding (a scrambled absmax layout is off by whole block scales)
    base_state = model.get_base_model().state_dict()
    for name, _ in _linear4bit_layers(model.get_base_model()):
        prefix = name + "."
        assert torch.equal(base_state[prefix + "weight"], fresh_state[prefix + "weight"])
        expected = _dequantized_from_state_dict(fresh_state, prefix)
        got = _dequantized_from_state_dict(base_state, prefix)
        assert torch.allclose(got, expected, rtol=1e-2, atol=0), f"{name}: {(got - expected).abs().max()}"

    # the saved adapter holds the side network as trained, and reloads onto a fresh 4-bit base to the same logits
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert saved and all(".qst_side." in key for key in saved)
    fresh_base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=bnb_config(double_quant=double_quant)
    )
    reloaded = PeftModel.from_pretrained(fresh_base, str(tmp_path / "adapter")).eval()
    assert torch.equal(_logits(reloaded, ids), before)


def test_protection_is_idempotent_and_a_no_op_without_4bit_layers(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    layers = _linear4bit_layers(base)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    # injection protected every Linear4bit; a second adapter adds no second pair of hooks
    assert keep_4bit_weights_through_state_dict(model) == 0
    model.add_adapter("other", QSTConfig(task_type="CAUSAL_LM", r=4))
    assert all(len(m._state_dict_pre_hooks) == 1 and len(m._state_dict_hooks) == 1 for _, m in layers)
    assert keep_4bit_weights_through_state_dict(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
def test_a_4bit_layer_in_the_lm_head_trains_after_an_eval_forward(tmp_path, double_quant):
    """A BERT-style decoder's LM head holds a 4-bit layer (``cls.predictions.transform.dense``) between the mixed
    hidden state and the logits, which QST differentiates through. An eval forward packs it on an AVX512-BF16 CPU, and
    bitsandbytes' packed kernel has no backward: the next training step failed. Then it was unpacked for good when a
    gradient first reached it, and ran the standard kernel in eval too: ``disable_adapter()`` was 0.01 off the base
    model never adapted, and the side gradients off by the bfloat16 rounding of the unpacked block scales. Calls with
    a gradient now run the standard layout kept from before packing, for the call only: the gradients of a model never
    run in eval, bit for bit, and the layer keeps its packed kernel in eval, as the base model does."""
    _save_tiny_bert_decoder(tmp_path / "base")
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))

    def load_base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config(
            double_quant=double_quant, compute_dtype=torch.float32))

    def side_gradients(evaluate_first: bool):
        model = get_peft_model(load_base(), QSTConfig(task_type="CAUSAL_LM"))
        torch.manual_seed(2)
        for parameter in model.parameters():  # an output path that is not zero, so every side gradient is
            if parameter.requires_grad:
                parameter.data.normal_(0, 0.1)
        if evaluate_first:
            model.eval()
            _logits(model, ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        assert not evaluate_first or not has_avx512bf16() or _packed_everywhere(model)  # the LM head's layer too
        return model, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    _, expected = side_gradients(False)
    model, after_eval = side_gradients(True)
    assert expected.keys() == after_eval.keys() and len(expected) > 10
    for name, gradient in expected.items():
        assert torch.equal(after_eval[name], gradient), name
    with model.disable_adapter():
        assert torch.equal(_logits(model.eval(), ids), _logits(load_base().eval(), ids))


def test_a_4bit_layer_in_the_lm_head_packed_before_injection_stays_packed_in_eval(tmp_path):
    """A base model run in eval before ``get_peft_model`` (as ``integration/arch_sweep.py --4bit`` does) has its LM
    head's 4-bit layer packed with no standard layout kept. A gradient reaching it gets one rebuilt from the packed
    layout for the call, and the layer stays packed: after training, ``disable_adapter()`` is the base model never
    adapted, and the adapter reloads onto a fresh base to the same logits, bit for bit (both were 0.01 off)."""
    _save_tiny_bert_decoder(tmp_path / "base")
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))

    def load_base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config(
            compute_dtype=torch.float32))

    base = load_base()
    base_logits = _logits(base.eval(), ids)  # packs every layer, before QST is injected
    torch.manual_seed(2)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    train_steps(model, ids, steps=2)
    assert not has_avx512bf16() or _packed_everywhere(model)
    with model.disable_adapter():
        assert torch.equal(_logits(model.eval(), ids), base_logits)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_base(), str(tmp_path / "adapter"))
    assert torch.equal(_logits(loaded.eval(), ids), _logits(model.eval(), ids))


def _save_tiny_bert_decoder(path) -> None:
    """A tiny BERT-style decoder, whose LM head holds a dense layer that 4-bit loading quantizes."""
    from transformers import BertConfig, BertLMHeadModel

    config = BertConfig(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, is_decoder=True, max_position_embeddings=64)
    torch.manual_seed(0)
    BertLMHeadModel(config).save_pretrained(path)


def _packed_everywhere(model) -> bool:
    return all(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for _, m in _linear4bit_layers(model))


def test_training_after_an_eval_forward_runs_the_standard_4bit_layout(tiny_model_dir, tmp_path):
    """After an eval forward has packed the 4-bit backbone for bitsandbytes' CPU inference kernel (slower for many
    rows), training-mode forwards run on the standard layout kept from before packing: the same losses and side
    weights as training without the eval forward, bit for bit, while eval forwards (and ``disable_adapter()``) keep
    the packed kernel of the base model never adapted. An adapter loaded for inference keeps no second layout."""
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))

    def run(evaluate_first: bool):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
        torch.manual_seed(0)
        model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
        if evaluate_first:
            _logits(model.eval(), ids)
        losses = train_steps(model, ids, steps=3)
        return model, losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    plain_model, plain_losses, plain_weights = run(False)
    model, losses, weights = run(True)
    assert losses == plain_losses
    assert all(torch.equal(weights[name], value) for name, value in plain_weights.items())
    if has_avx512bf16():  # the eval forward packed the layers, and training left them packed
        assert _cpu_packed(model) and not _cpu_packed(plain_model)
        assert all("_qst_standard_layout" in vars(m) for _, m in _linear4bit_layers(model))
    never_adapted = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    with model.disable_adapter():
        assert torch.equal(_logits(model.eval(), ids), _logits(never_adapted.eval(), ids))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config()), str(tmp_path))
    torch.testing.assert_close(_logits(loaded.eval(), ids), _logits(model, ids), rtol=0, atol=0)
    assert not any("_qst_standard_layout" in vars(m) for _, m in _linear4bit_layers(loaded))


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_4bit_qst_model_pickles_and_copies_after_an_eval_forward(tiny_model_dir, how):
    """The routing hooks of the 4-bit layers (bnb_compat.route_4bit_layers_by_mode) refer to the model weakly: a
    whole model pickled (``torch.save(model)``) failed with "cannot pickle 'weakref.ReferenceType' object", and a deep
    copy's hooks asked the original model whether it trains. The copy computes and trains as the original does."""
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    torch.manual_seed(0)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    expected = _logits(model.eval(), ids)  # packs the layers where the CPU supports it
    copied = copy_of(model, how)
    assert torch.equal(_logits(copied, ids), expected)
    for _, layer in _linear4bit_layers(copied):
        routes = [hook for hook in layer._forward_pre_hooks.values() if getattr(hook, "func", None) is not None]
        assert routes and all(hook.args[0]() is copied.get_base_model() for hook in routes)
    copied.train()
    copied(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in copied.parameters() if p.requires_grad)


def test_unload_takes_the_4bit_routing_hooks_and_kept_layouts_off(tiny_model_dir):
    """``unload()`` gives the base model back without QST's hooks: the routing hooks of its 4-bit layers, and the
    standard layouts they kept after an eval forward (the 4-bit weights a second time), stayed on the model it
    returned. What it returns computes, in eval and in training mode, what the model never adapted does. A packed
    layer keeps its standard quantization state only (the block scales, for QST injected again: see
    test_training_after_a_deep_copy_or_a_reload_after_unload_is_bit_for_bit), not the 4-bit codes."""
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    before = {name: (set(vars(m)), len(m._forward_pre_hooks), len(m._forward_hooks))
              for name, m in _linear4bit_layers(base)}
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    _logits(model.eval(), ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.unload() is base
    after = {name: (set(vars(m)) - {"_qst_state_dict_keeps_cpu_packing", "_qst_standard_quant_state"},
                    len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in _linear4bit_layers(base)}
    assert after == before
    for _, layer in _linear4bit_layers(base):
        kept = vars(layer).get("_qst_standard_quant_state")
        assert (kept is not None) == has_avx512bf16()  # the eval forward packed every layer where the CPU does
        assert kept is None or isinstance(kept[0], QuantState)
        assert kept is None or not getattr(kept[0], "packing_format_for_cpu", False)  # the standard state, not data
    never_adapted = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    assert torch.equal(_logits(base.eval(), ids), _logits(never_adapted.eval(), ids))
    assert torch.equal(_logits(base.train(), ids), _logits(never_adapted.train(), ids))


def test_training_after_a_hybrid_is_deleted_still_runs_the_standard_4bit_layout(tiny_model_dir):
    """A hybrid (``backbone_lora_layers``) added after an eval forward once unpacked its blocks' 4-bit layers, using
    the standard layout kept for training, and deleting it packed them back without that kept layout, so the
    remaining adapter's training steps ran the packed kernel on those layers: its loss was no longer the one it
    computed before the hybrid was added. The hybrid now leaves the layers packed and their kept layout in place."""
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    torch.manual_seed(0)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    expected_logits = _logits(model.eval(), ids)
    with torch.no_grad():
        expected_loss = model.train()(input_ids=ids, labels=ids).loss
    model.add_adapter("hybrid", QSTConfig(task_type="CAUSAL_LM", r=4, backbone_lora_layers=1))
    model.set_adapter("hybrid")
    model(input_ids=ids, labels=ids).loss.backward()
    model.set_adapter("default")
    model.delete_adapter("hybrid")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, labels=ids).loss, expected_loss)
    assert torch.equal(_logits(model.eval(), ids), expected_logits)
    if has_avx512bf16():
        assert _cpu_packed(model) and all("_qst_standard_layout" in vars(m) for _, m in _linear4bit_layers(model))


def test_a_4bit_weight_replaced_after_an_eval_forward_is_what_training_forwards_compute_with(tmp_path):
    """A training-mode forward of a packed layer runs the standard layout kept from before the packing
    (bnb_compat.route_4bit_layers_by_mode) only while that layout still belongs to the layer's weight. A weight
    replaced since (another model's layer, here already packed by its own eval forward) computes with its own
    values: a kept layout of the old weight would silently run the old weights in every training step."""
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    for seed in (0, 1):
        tiny_causal_lm(seed=seed).save_pretrained(tmp_path / str(seed))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "0", quantization_config=bnb_config()),
                           QSTConfig(task_type="CAUSAL_LM", r=4))
    other = AutoModelForCausalLM.from_pretrained(tmp_path / "1", quantization_config=bnb_config()).eval()
    _logits(model.eval(), ids), _logits(other, ids)  # both packed where bitsandbytes packs, one layout kept
    name = "model.layers.0.self_attn.q_proj"
    layer, source = model.get_base_model().get_submodule(name), other.get_submodule(name)
    layer.weight = source.weight
    model.train(), other.train()
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(layer(hidden), source(hidden))


@pytest.mark.parametrize(
    "config", [{}, {"backbone_lora_layers": 1}, {"backbone_lora_layers": 1, "gradient_checkpointing": True}],
    ids=["qst", "hybrid", "hybrid-checkpointed"])
def test_a_resumed_run_that_evaluates_equals_the_uninterrupted_one(tiny_model_dir, tmp_path, config):
    """With ``eval_strategy="steps"``, an eval packs the 4-bit backbone mid-run in the uninterrupted run (steps 1-6,
    evals at 2, 4, 6), but only at step 4 in a run resumed from its step-3 checkpoint (from another initialisation).
    Training steps run the standard layout kept from before packing (bnb_compat.route_4bit_layers_by_mode), so both
    runs log the same train and eval losses and end at the same adapter weights, bit for bit. Before, steps 3-6 of
    the uninterrupted run ran the packed kernel and step 4 of the resumed run did not: the losses differed from step 4
    on and the weights ended 3.5e-3 (QST) to 4.9e-3 (hybrid) apart."""
    from .test_trainer import make_trainer, trainable_state

    config = dict(config)
    checkpointing = config.pop("gradient_checkpointing", False)

    def run(output_dir, seed, resume_from_checkpoint=None):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
        torch.manual_seed(seed)
        model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, **config))
        trainer = make_trainer(output_dir, model, eval_strategy="steps", eval_steps=2,
                               gradient_checkpointing=checkpointing)
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        losses = {(entry["step"], key): entry[key] for entry in trainer.state.log_history
                  for key in ("loss", "eval_loss") if key in entry}
        return model, losses, trainable_state(model)

    straight, straight_losses, straight_weights = run(tmp_path / "straight", seed=0)
    _, resumed_losses, resumed_weights = run(tmp_path / "resumed", seed=1,
                                             resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))
    # the resumed run's history holds the checkpoint's (steps 1-3) and its own (steps 4-6, evals at 4 and 6)
    assert len(straight_losses) == 9 and resumed_losses == straight_losses
    assert resumed_weights.keys() == straight_weights.keys()
    for name, tensor in straight_weights.items():
        assert torch.equal(resumed_weights[name], tensor), name
    if has_avx512bf16():  # the evals did pack the backbone (the hybrid's adapted block excepted)
        assert _cpu_packed(straight)


def test_feature_extraction_training_after_an_eval_equals_training_without_one(tiny_model_dir):
    """FEATURE_EXTRACTION wraps the bare trunk (``AutoModel``): the side network lives in QST's wrapper, not in the
    trunk, and the routing hooks (bnb_compat.route_4bit_layers_by_mode) were handed the trunk, which has no trainable
    parameters of its own. They kept no standard layout, so once an eval forward had packed the 4-bit layers every
    training step ran the packed kernel: losses and side weights left a run that never evaluated (from step 2 of a
    Trainer run with eval_strategy="steps", as here). Training after evals now equals training without, bit for bit."""
    from transformers import AutoModel

    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))

    def run(evaluate: bool):
        base = AutoModel.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
        torch.manual_seed(0)
        model = get_peft_model(base, QSTConfig(task_type="FEATURE_EXTRACTION", r=4))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
        losses = []
        for _ in range(3):
            if evaluate:
                with torch.no_grad():
                    model.eval()(input_ids=ids)
            loss = model.train()(input_ids=ids).last_hidden_state.float().pow(2).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        return model, losses

    evaluated, evaluated_losses = run(evaluate=True)
    straight, straight_losses = run(evaluate=False)
    assert all(torch.equal(a, b) for a, b in zip(evaluated_losses, straight_losses)), (evaluated_losses, straight_losses)
    weights = dict(straight.named_parameters())
    for name, parameter in evaluated.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(parameter, weights[name]), name
    if has_avx512bf16():  # the evals did pack the backbone, and training ran the layout kept from before
        assert _cpu_packed(evaluated)
        assert all("_qst_standard_layout" in vars(m) for _, m in _linear4bit_layers(evaluated))


def _loss_and_gradients(model, ids):
    """One training-mode forward and backward: the loss and every gradient (the same dropout masks in every run)."""
    model.train()
    model.zero_grad()
    torch.manual_seed(3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_deep_copy_of_a_4bit_qst_model_loaded_by_torch_load_runs_and_trains(tiny_model_dir):
    """A whole model loaded by ``torch.load`` holds its 4-bit weights as plain ``Parameter`` objects with a
    ``quant_state`` attribute, which ``copy.deepcopy`` does not copy: the copy's first call failed with "'Parameter'
    object has no attribute 'quant_state'" (read by the routing hook before bitsandbytes' forward restores it). Here
    no eval forward ran before saving, so no layout is kept (that case: the bit-for-bit test below)."""
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    torch.manual_seed(0)
    loaded = copy_of(get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4)), "torch.save")
    copied = copy.deepcopy(loaded)
    assert torch.equal(_logits(copied.eval(), ids), _logits(loaded.eval(), ids))
    copied.train()
    copied(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in copied.parameters() if p.requires_grad)


@pytest.mark.parametrize("how", ["deepcopy", "deepcopy-of-torch.load", "reload-after-unload"])
@pytest.mark.parametrize("kind", ["hybrid", "bert-lm-head"])
def test_training_after_a_deep_copy_or_a_reload_after_unload_is_bit_for_bit(tmp_path, kind, how):
    """Two ways a model whose 4-bit layers an eval forward had packed lost the standard layouts kept from before
    packing, and trained on the packed kernel and on layouts rebuilt from it with block scales rounded to bfloat16:
    gradients through the layers up to 2.9% off a never-evaluated model's (a tiny hybrid adapting every block):

    * ``copy.deepcopy`` of the model: bitsandbytes copies a weight's quantization state outside deepcopy's memo, so
      the copied kept layouts belonged to no layer of the copy;
    * ``unload()``, then the adapter loaded again as trainable on the base model it returned: ``unload()`` dropped
      the kept layouts, block scales included.

    A deep copy of a whole model loaded by ``torch.load`` failed its first call: its weights, plain ``Parameter``
    objects there, lose their ``quant_state`` attribute in the copy, and the routing hook read it.

    Both now train exactly as a model never run in eval, in a hybrid (``backbone_lora_layers``, gradients through
    every block's 4-bit layers) and in a BERT-style decoder (gradients through the LM head's 4-bit transform layer).
    On CPUs without AVX512-BF16 bitsandbytes never packs, and this holds trivially."""
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    if kind == "hybrid":
        tiny_causal_lm(num_hidden_layers=2, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path / "base")
        config = QSTConfig(task_type="CAUSAL_LM", r=4, backbone_lora_layers=2, backbone_lora_r=4)
        compute_dtype = torch.bfloat16
    else:
        _save_tiny_bert_decoder(tmp_path / "base")
        config = QSTConfig(task_type="CAUSAL_LM")
        compute_dtype = torch.float32

    def load_base():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config(
            compute_dtype=compute_dtype))

    def load_trainable(base):
        return PeftModel.from_pretrained(base, str(tmp_path / "adapter"), is_trainable=True)

    model = get_peft_model(load_base(), config)
    torch.manual_seed(2)
    for parameter in model.parameters():  # open every path (the hybrid's lora_B start at zero), so gradients flow
        if parameter.requires_grad:
            parameter.data.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")

    expected_loss, expected = _loss_and_gradients(load_trainable(load_base()), ids)
    assert len(expected) > 10 and (kind != "hybrid" or any(".backbone_lora." in name for name in expected))
    model = load_trainable(load_base())
    _logits(model.eval(), ids)  # packs every 4-bit layer where the CPU supports it
    if how == "reload-after-unload":
        trained = load_trainable(model.unload())
    else:
        trained = copy.deepcopy(model if how == "deepcopy" else copy_of(model, "torch.save"))
    assert not has_avx512bf16() or _packed_everywhere(trained)
    loss, gradients = _loss_and_gradients(trained, ids)
    assert gradients.keys() == expected.keys()
    assert torch.equal(loss, expected_loss), (loss, expected_loss)
    for name, gradient in expected.items():
        assert torch.equal(gradients[name], gradient), name
    if how == "deepcopy":  # and the original, whose layers the copy's share nothing with, still trains as before
        loss, gradients = _loss_and_gradients(model, ids)
        assert torch.equal(loss, expected_loss) and all(torch.equal(gradients[n], g) for n, g in expected.items())
    assert not has_avx512bf16() or _packed_everywhere(trained)  # training left the layers packed for eval


@pytest.mark.parametrize("trainable", [True, False], ids=["trainable", "loaded-for-inference"])
def test_a_model_pickled_before_kept_layouts_named_their_weight_trains_and_unloads(tiny_model_dir, tmp_path, trainable):
    """A whole model pickled (``torch.save(model)``) after an eval forward by peft-qst before kept layouts referred to
    their layer's weight (``_PackedState``) holds, where a kept standard layout or quantization state names the packed
    quantization state it belongs to, that quantization-state object itself (written here by putting it in place of
    its ``_PackedState``, all that changed). Loaded by this version, every training-mode forward and ``unload()``
    failed with "'QuantState' object has no attribute 'belongs_to'". It trains as a model never run in eval, bit for
    bit (its kept layouts still belong to its layers), and unloads; made trainable, so does one loaded for inference."""
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))

    def load(is_trainable):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
        return PeftModel.from_pretrained(base, str(tmp_path / "adapter"), is_trainable=is_trainable)

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config()),
        QSTConfig(task_type="CAUSAL_LM", r=4),
    )
    torch.manual_seed(2)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    expected_loss, expected = _loss_and_gradients(load(True), ids)
    assert expected

    model = load(trainable)
    _logits(model.eval(), ids)  # packs every 4-bit layer where the CPU supports it
    old_format = 0
    for _, layer in _linear4bit_layers(model):
        for attribute, at in (("_qst_standard_layout", 2), ("_qst_standard_quant_state", 1)):
            kept = vars(layer).get(attribute)
            if kept is not None:
                vars(layer)[attribute] = kept[:at] + (kept[at].quant_state,)
                old_format += 1
    assert old_format == (len(_linear4bit_layers(model)) if has_avx512bf16() else 0)
    loaded = copy_of(model, "pickle")
    if not trainable:
        for name, parameter in loaded.named_parameters():
            if name in expected:
                parameter.requires_grad_(True)
    loss, gradients = _loss_and_gradients(loaded, ids)
    assert gradients.keys() == expected.keys()
    assert torch.equal(loss, expected_loss), (loss, expected_loss)
    for name, gradient in expected.items():
        assert torch.equal(gradients[name], gradient), name
    base = loaded.unload()
    assert not any(vars(m).get("_qst_routes_by_mode") or "_qst_standard_layout" in vars(m)
                   for _, m in _linear4bit_layers(base))


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes packs for the CPU, and layouts are kept, only with it")
@pytest.mark.parametrize("how", ["torch.save", "deepcopy", "deepcopy-of-torch.load"])
def test_kept_layouts_their_weight_does_not_hold_now_copy_and_pickle_alike(tiny_model_dir, how):
    """A training-mode call that raised between a packed layer's pre- and post-hook leaves the standard layout on the
    weight, the packed one waiting on the layer for the next call to swap back: the kept layout does not belong to
    the weight until then. A deep copy took it as stale for good (a pickled copy did not), so the copy's next
    training call dropped its kept layouts and rebuilt them with block scales rounded to bfloat16: its loss and
    gradients were not the original's. Both copies now train as the original, bit for bit. A weight re-quantized
    since (another quantization-state object for good) keeps a layout of its copies belonging to no weight. A deep
    copy of such a model read back by ``torch.load`` (whose weights, plain ``Parameter`` objects there, lose the
    standard quantization state in the copy) failed its next call and ``unload()`` with "'Parameter' object has no
    attribute 'quant_state'"."""
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))

    def raised_mid_call():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
        torch.manual_seed(0)
        model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
        _logits(model.eval(), ids)  # packs every 4-bit layer and keeps its standard layout
        _, layer = _linear4bit_layers(model)[-1]

        def interrupt(*_):
            raise KeyboardInterrupt

        handle = layer.register_forward_pre_hook(interrupt)  # after QST's, which swapped the standard layout in
        with pytest.raises(KeyboardInterrupt):
            model.train()(input_ids=ids, labels=ids)
        handle.remove()
        assert "_qst_packed_layout_during_call" in vars(layer)
        return model

    def copy_of_it(model):
        return copy.deepcopy(copy_of(model, "torch.save")) if how == "deepcopy-of-torch.load" else copy_of(model, how)

    expected_loss, expected = _loss_and_gradients(raised_mid_call(), ids)
    copied = copy_of_it(raised_mid_call())
    loss, gradients = _loss_and_gradients(copied, ids)
    assert torch.equal(loss, expected_loss) and gradients.keys() == expected.keys()
    for name, gradient in expected.items():
        assert torch.equal(gradients[name], gradient), name
    assert all("_qst_standard_layout" in vars(m) for _, m in _linear4bit_layers(copied))

    _, layer = _linear4bit_layers(copied)[0]
    layer.weight.quant_state = copy.copy(layer.weight.quant_state)  # re-quantized in place
    again = copy_of_it(copied)
    entry = vars(again.get_submodule(_linear4bit_layers(copied)[0][0]))["_qst_standard_layout"][2]
    assert not any(entry.belongs_to(m.weight) for _, m in _linear4bit_layers(again))
    again(input_ids=ids, labels=ids).loss.backward()
    unloaded = copy_of_it(raised_mid_call()).unload()  # the packed layout back, as the next call would
    assert _packed_everywhere(unloaded)


@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
def test_gradients_through_a_4bit_layer_packed_before_injection_are_a_never_packed_models(tmp_path, double_quant):
    """A layer packed before ``get_peft_model`` (no standard layout kept) gets one rebuilt from the packed layout when
    a gradient first reaches it: the 4-bit codes exactly, the block scales to bfloat16 rounding. bitsandbytes' inverse
    leaves a plain (not double-quantized) ``absmax`` transposed; read as the flat standard vector, each block got
    another block's scale. The side gradients through the BERT-style LM head's 4-bit layer are a never-packed model's,
    up to that rounding."""
    _save_tiny_bert_decoder(tmp_path / "base")
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))

    def side_gradients(packed_first: bool) -> dict:
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config(
            double_quant=double_quant, compute_dtype=torch.float32))
        if packed_first:
            _logits(base.eval(), ids)  # packs every layer, before QST is injected
        model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
        torch.manual_seed(2)
        for parameter in model.parameters():  # an output path that is not zero, so every side gradient is
            if parameter.requires_grad:
                parameter.data.normal_(0, 0.1)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        assert not packed_first or not has_avx512bf16() or _packed_everywhere(model)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    expected = side_gradients(False)
    got = side_gradients(True)
    assert expected.keys() == got.keys() and len(expected) > 10
    expected_all = torch.cat([gradient.flatten() for gradient in expected.values()])
    got_all = torch.cat([got[name].flatten() for name in expected])
    assert (got_all - expected_all).norm() <= 0.02 * expected_all.norm()
