"""QSTConfig.backbone_lora_layers: low-rank adapters on the top k backbone blocks, trained with the side network."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_qst import QSTAdapterFileError, QSTConfig, QSTLayer
from peft_qst.backbone_lora import resolve_backbone_lora_layers

from .conftest import bnb_config, tiny_causal_lm, train_steps

IDS = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(2))
LAYERS = 4


def hybrid_config(**overrides):
    return QSTConfig(**{"task_type": "CAUSAL_LM", "r": 4, "backbone_lora_layers": 2, "backbone_lora_r": 4, **overrides})


def hybrid_model(seed=0, **overrides):
    return get_peft_model(tiny_causal_lm(seed=seed, num_hidden_layers=LAYERS), hybrid_config(**overrides))


def test_starts_at_the_pretrained_output_and_adapts_only_the_top_blocks():
    base = tiny_causal_lm(num_hidden_layers=LAYERS)
    model = hybrid_model()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, base(input_ids=IDS).logits)
    lora = {n: p for n, p in model.named_parameters() if ".backbone_lora." in n}
    # every linear layer (q, k, v, o, gate, up, down) of blocks 2 and 3, an A and a B each
    assert len(lora) == 2 * 7 * 2 and all(".qst_side.default." in n and p.requires_grad for n, p in lora.items())
    assert {n.split(".deltas.")[1].split(".")[0] for n in lora} == {"2", "3"}
    losses = train_steps(model, IDS, steps=5)
    assert losses[-1] < losses[0]
    assert all(p.abs().sum() > 0 for n, p in lora.items() if n.endswith("lora_B"))  # every B left zero


def saved_producers(model, input_ids, producers):
    """Labels of the ``(label, module)`` pairs in ``producers`` whose forward output autograd saved for backward in a
    forward + backward of ``model`` on ``input_ids``."""
    # tensors kept alive (dict values), so that their storage cannot be reused by a later tensor during the audit
    produced: dict[int, tuple[object, torch.Tensor]] = {}

    def collector(label):
        def collect(_module, _inputs, output):
            for item in output if isinstance(output, tuple) else (output,):
                if isinstance(item, torch.Tensor):
                    produced[item.untyped_storage().data_ptr()] = (label, item)

        return collect

    hooks = [module.register_forward_hook(collector(label)) for label, module in producers]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        out = model(input_ids=input_ids, labels=input_ids)
    for hook in hooks:
        hook.remove()
    out.loss.backward()
    return {produced[ptr][0] for ptr in saved if ptr in produced}


def saved_activations_by_block(model, input_ids):
    """Blocks (index, or -1 for the embeddings) whose modules produced a tensor that autograd saved for backward."""
    trunk = next(m for m in model.modules() if isinstance(m, QSTLayer)).base_layer
    producers = [(-1, m) for m in trunk.embed_tokens.modules()]
    producers += [(index, m) for index, block in enumerate(trunk.layers) for m in block.modules()]
    return saved_producers(model, input_ids, producers)


def test_no_graph_below_the_adapted_blocks():
    model = hybrid_model()
    model.train()
    train_steps(model, IDS, steps=1)
    model.train()
    blocks_with_saved = saved_activations_by_block(model, IDS)
    # the downsamplers read every block's output (handed over), so a block's *output* may be saved; what must not be
    # saved is anything inside the frozen blocks below the adapted ones
    assert blocks_with_saved - {0, 1, -1} == {2, 3}  # the adapted blocks record their graph
    model.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    for name, param in model.named_parameters():
        if ".qst_side." not in name:
            assert param.grad is None and not param.requires_grad, name
    plain = get_peft_model(tiny_causal_lm(num_hidden_layers=LAYERS), QSTConfig(task_type="CAUSAL_LM", r=4))
    plain.train()
    # the same audit on plain QST: only the handed-over block outputs (one per block) may show up, never more
    assert saved_activations_by_block(plain, IDS) <= {0, 1, 2, 3, -1}


def block_internals(model, indices):
    """``("block.name", module)`` for every submodule inside the given backbone blocks. Submodules only: a block's own
    output is the hidden state handed to the downsamplers, which may be saved."""
    layer = next(m for m in model.modules() if isinstance(m, QSTLayer))
    return [
        (f"{index}.{name}", module)
        for index in indices
        for name, module in layer.base_layer.layers[index].named_modules()
        if name
    ]


def test_no_internal_activation_of_frozen_blocks_is_saved():
    """Inside blocks 0 and 1 (below the adapted ones) nothing but their outputs may be saved for backward."""
    model = hybrid_model()
    model.train()
    train_steps(model, IDS, steps=1)
    model.train()
    leaked = sorted(saved_producers(model, IDS, block_internals(model, (0, 1))))
    assert not leaked, leaked


@pytest.mark.parametrize("reentrant", [None, False, True], ids=["off", "non-reentrant", "reentrant"])
def test_gradient_checkpointing_of_the_adapted_blocks(reentrant):
    """Under gradient checkpointing the adapted backbone blocks are checkpointed too (their recomputation in backward
    adds their adapters' deltas again), with the gradients of a run without it. Non-reentrant (transformers' and TRL's
    default): no activation inside blocks 2 and 3 is kept for backward. Reentrant: the first adapted block keeps its
    activations (its input carries no gradient, so a reentrant checkpoint would record nothing), block 3 does not."""
    reference = hybrid_model()
    reference.train()
    train_steps(reference, IDS, steps=1)
    reference.train()
    reference.zero_grad()
    reference(input_ids=IDS, labels=IDS).loss.backward()
    expected = {n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad}

    model = hybrid_model()
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()
    model.train()
    train_steps(model, IDS, steps=1)
    model.train()
    saved = {label.split(".")[0] for label in saved_producers(model, IDS, block_internals(model, (2, 3)))}
    assert saved == {None: {"2", "3"}, False: set(), True: {"2"}}[reentrant]
    model.zero_grad()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads.keys() == expected.keys()
    for name in expected:
        assert grads[name].abs().sum() > 0 or expected[name].abs().sum() == 0, name
        assert torch.allclose(grads[name], expected[name], atol=1e-6, rtol=1e-4), name
    # the checkpoint functions are the model's own again after the forward
    layer = next(m for m in model.modules() if isinstance(m, QSTLayer))
    for block in layer.base_layer.layers:
        assert block.gradient_checkpointing is (reentrant is not None)
        if reentrant is not None:
            assert block._gradient_checkpointing_func.keywords["use_reentrant"] is reentrant


def test_generation_disable_and_mixed_batches():
    model = hybrid_model()
    train_steps(model, IDS, steps=3)
    base = tiny_causal_lm(num_hidden_layers=LAYERS)
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0
    with torch.no_grad():
        for options in (dict(do_sample=False), dict(num_beams=3, do_sample=False)):
            cached = model.generate(input_ids=IDS, attention_mask=mask, max_new_tokens=16, use_cache=True, **options)
            plain = model.generate(input_ids=IDS, attention_mask=mask, max_new_tokens=16, use_cache=False, **options)
            assert torch.equal(cached, plain), options
        with model.disable_adapter():
            disabled = model.generate(input_ids=IDS, attention_mask=mask, max_new_tokens=16, do_sample=False)
            assert torch.equal(model(input_ids=IDS).logits, base(input_ids=IDS).logits)
        expected = base.generate(input_ids=IDS, attention_mask=mask, max_new_tokens=16, do_sample=False)
        assert torch.equal(disabled, expected)

        model.add_adapter("other", hybrid_config(backbone_lora_layers=1))
        routed = model(input_ids=IDS, adapter_names=["default", "__base__", "other"]).logits
        model.set_adapter("default")
        alone = model(input_ids=IDS).logits
        model.set_adapter("other")
        other = model(input_ids=IDS).logits
        assert torch.allclose(routed[0], alone[0], atol=1e-6)
        assert torch.allclose(routed[1], base(input_ids=IDS).logits[1], atol=1e-6)
        assert torch.allclose(routed[2], other[2], atol=1e-6)


@pytest.mark.parametrize("quantized", [False, True], ids=["fp32", "nf4"])
def test_save_load_identical_logits(quantized, tmp_path):
    config = tiny_causal_lm(num_hidden_layers=LAYERS).config
    path = tmp_path / "base"
    tiny_causal_lm(num_hidden_layers=LAYERS).save_pretrained(path)
    kwargs = dict(quantization_config=bnb_config()) if quantized else {}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, **kwargs), hybrid_config())
    if quantized:
        assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    train_steps(model, IDS, steps=3)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, **kwargs), tmp_path / "adapter")
    assert reloaded.peft_config["default"].backbone_lora_layers == 2 and config.num_hidden_layers == LAYERS
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=IDS).logits, expected)


def test_refusals():
    with pytest.raises(ValueError, match="backbone_lora_layers=-1"):
        QSTConfig(backbone_lora_layers=-1)
    with pytest.raises(ValueError, match="backbone_lora_r=0"):
        QSTConfig(backbone_lora_r=0)
    with pytest.raises(ValueError, match="exceeds the 4 blocks"):
        get_peft_model(tiny_causal_lm(num_hidden_layers=LAYERS), hybrid_config(backbone_lora_layers=5))


def test_a_fraction_of_the_depth_becomes_a_block_count(tmp_path):
    # rounded to the nearest block, halves up, at least one: two thirds of SmolLM2's 30 blocks are its top 20
    assert [resolve_backbone_lora_layers(f, n) for f, n in [(2 / 3, 30), (0.5, 5), (0.3, 5), (0.01, 4)]] == [20, 3, 2, 1]
    assert resolve_backbone_lora_layers(3, 4) == 3
    by_fraction, by_count = hybrid_model(backbone_lora_layers=0.5), hybrid_model(backbone_lora_layers=2)
    assert by_fraction.peft_config["default"].backbone_lora_layers == 2
    assert [n for n, _ in by_fraction.named_parameters()] == [n for n, _ in by_count.named_parameters()]
    with torch.no_grad():  # the same seed, the same adapters: the same model
        assert all(torch.equal(a, b) for a, b in zip(by_fraction.parameters(), by_count.parameters()))
    # the saved adapter records the count, so that loading it never depends on the rounding
    by_fraction.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["backbone_lora_layers"] == 2


@pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer and chat template
def test_sft_trainer_with_backbone_lora(tmp_path, smollm2_dir):
    """TRL's defaults (gradient checkpointing on, input grads enabled) with adapters in the top backbone blocks."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_causal_lm(num_hidden_layers=LAYERS, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    data = Dataset.from_list(
        [{"messages": [{"role": "user", "content": f"Repeat {i}"}, {"role": "assistant", "content": f"{i} {i}"}]}
         for i in range(48)]
    )
    args = SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=3e-3,
                     logging_steps=2, report_to=[], save_strategy="no", use_cpu=True, bf16=False)
    assert args.gradient_checkpointing
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=hybrid_config())
    lora_b = {n: p for n, p in trainer.model.named_parameters() if n.endswith("lora_B")}
    assert lora_b and not any(p.any() for p in lora_b.values())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0]
    assert all(p.any() for p in lora_b.values())  # gradients reached the adapters of the top blocks


@pytest.mark.parametrize("grad_mode", ["train", "eval"])
def test_gradients_stay_right_after_an_eval_forward_on_a_4bit_backbone(tmp_path, grad_mode):
    """bitsandbytes repacks a Linear4bit for its CPU kernel at its first eval forward (on CPUs with AVX512-BF16), and
    gradients through a repacked layer come out wrong (40-90% off before the fix). Training-mode forwards, and calls
    whose input carries a gradient, run the standard layout kept from before packing
    (bnb_compat.route_4bit_layers_by_mode): the gradients after evaluation/generation are those of before, bit for
    bit. Where the CPU does not repack, this holds trivially. ``grad_mode="eval"``: gradients taken in eval mode (a
    training loop that keeps dropout off with ``model.eval()``, an attribution method) go through layers whose input
    carries a gradient, which run the kept standard layout too."""
    tiny_causal_lm(num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config()), hybrid_config()
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)  # open the adapters, so that gradients flow through the frozen layers

    def lora_a_grads():
        model.train(grad_mode == "train")
        model.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {n: p.grad.float().clone() for n, p in model.named_parameters() if n.endswith("lora_A")}

    before = lora_a_grads()
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=IDS, max_new_tokens=3, do_sample=False)
    after = lora_a_grads()
    for name in before:
        assert torch.equal(after[name], before[name]), name


def test_a_deep_copy_runs_and_trains_its_own_backbone_adapters():
    """copy.deepcopy of a hybrid model: the copy's blocks call the copy's layer (the hooks are bound methods, which
    deepcopy rebinds), so it computes what the original does, its backbone adapters get gradients, and unloading it
    leaves the original's hooks alone."""
    import copy

    model = hybrid_model()
    train_steps(model, IDS, steps=3)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=IDS).logits, expected, rtol=0, atol=0)
        for name, parameter in twin.named_parameters():
            if ".backbone_lora." in name:
                parameter.mul_(3.0)
        assert not torch.allclose(twin(input_ids=IDS).logits, expected)  # the copy's own adapters act
    twin.train()
    twin(input_ids=IDS, labels=IDS).loss.backward()
    grads = [p.grad for n, p in twin.named_parameters() if ".backbone_lora." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)

    twin.unload()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, rtol=0, atol=0)


def backbone_hooks(model) -> dict:
    """{module name: (forward hooks, forward pre-hooks)} of every backbone module that has hooks."""
    counts = {
        name: (len(module._forward_hooks), len(module._forward_pre_hooks))
        for name, module in model.named_modules()
        if ".qst_side." not in name
    }
    return {name: count for name, count in counts.items() if any(count)}


def test_delete_adapter_removes_the_backbone_hooks_no_remaining_adapter_uses():
    """delete_adapter of an adapter with backbone adapters left its hooks on the top blocks (a forward hook on every
    linear layer, a pre-hook on every block): now the hooks the remaining adapters use stay, the others go, and
    deleting the last such adapter leaves the backbone hooked as a plain QST model's is."""
    model = hybrid_model(backbone_lora_layers=0)
    plain = backbone_hooks(model)
    model.add_adapter("wide", hybrid_config(backbone_lora_layers=3))
    model.add_adapter("narrow", hybrid_config(backbone_lora_layers=1))
    model.set_adapter("narrow")
    train_steps(model, IDS, steps=2)
    with torch.no_grad():
        narrow = model(input_ids=IDS).logits
    hybrid = get_peft_model(tiny_causal_lm(num_hidden_layers=LAYERS), hybrid_config(backbone_lora_layers=1))

    model.delete_adapter("wide")
    assert backbone_hooks(model) == backbone_hooks(hybrid)  # only the top block's, which "narrow" adapts
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, narrow)
    train_steps(model, IDS, steps=1)  # "narrow" still trains its backbone adapters
    assert all(p.grad is None or p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))

    model.delete_adapter("narrow")
    assert backbone_hooks(model) == plain
    assert sorted(model.state_dict()) == sorted(hybrid_model(backbone_lora_layers=0).state_dict())

    # the same name again, with other blocks: its hooks come back and its adapters act
    model.add_adapter("wide", hybrid_config(backbone_lora_layers=2))
    model.set_adapter("wide")
    assert backbone_hooks(model) == backbone_hooks(hybrid_model())
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        for name, param in model.named_parameters():
            if ".wide." in name and name.endswith("lora_B"):
                param.normal_(0, 0.1)
        assert not torch.allclose(model(input_ids=IDS).logits, before)


def test_delete_adapter_keeps_the_block_hooks_of_the_deepest_remaining_hybrid():
    """Deleting an adapter while hybrids of different depths remain keeps every block pre-hook down to the lowest
    block any of them adapts: without the pre-hooks of its lower blocks the deeper hybrid's backbone adapters there
    would run under the backbone's no_grad and stop training."""
    model = hybrid_model(backbone_lora_layers=0)
    model.add_adapter("wide", hybrid_config(backbone_lora_layers=3))
    model.add_adapter("narrow", hybrid_config(backbone_lora_layers=1))
    model.add_adapter("gone", hybrid_config(backbone_lora_layers=2))
    model.delete_adapter("gone")
    assert backbone_hooks(model) == backbone_hooks(hybrid_model(backbone_lora_layers=3))
    model.set_adapter("wide")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".wide." in name and name.endswith("lora_B"):
                param.normal_(0, 0.1)  # (zero-initialized lora_B leaves lora_A without a gradient)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".wide." in n and ".lora_" in n}
    assert grads and all(grad is not None and grad.abs().sum() > 0 for grad in grads.values())


def test_deleting_or_unloading_the_hybrid_gives_4bit_layers_their_cpu_kernel_back(tmp_path):
    """Deleting the hybrid or unloading the model leaves the 4-bit layers on bitsandbytes' CPU kernel, as the base
    model never adapted: once the hybrid kept its blocks' layers unpacked while loaded, and they kept the slower
    standard kernel after it went, the base model's logits (disable_adapter(), the unloaded model) off the
    never-adapted model's by bfloat16 rounding (0.004 on this model). The hybrid no longer pins the layout at all
    (bnb_compat.route_4bit_layers_by_mode runs calls with a gradient on the standard one). On CPUs without
    AVX512-BF16 bitsandbytes never repacks, and this holds trivially."""
    tiny_causal_lm(num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config())

    def flags(model):
        return [m.support_avx512bf16_for_cpu for m in model.modules() if type(m).__name__ == "Linear4bit"]

    base = load()
    with torch.no_grad():
        expected = base(input_ids=IDS).logits  # the base model runs packed here where the CPU supports it
    model = get_peft_model(load(), hybrid_config(backbone_lora_layers=0))
    model.add_adapter("hybrid", hybrid_config())
    model.set_adapter("hybrid")
    train_steps(model, IDS, steps=1)
    with torch.no_grad():
        model(input_ids=IDS)  # an eval forward: packs every 4-bit layer, the hybrid's blocks' too
    model.delete_adapter("hybrid")
    assert flags(model) == flags(base)
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=IDS).logits, expected)

    unloaded = get_peft_model(load(), hybrid_config()).unload()
    assert flags(unloaded) == flags(base)
    with torch.no_grad():
        assert torch.equal(unloaded(input_ids=IDS).logits, expected)


def test_a_hybrid_added_after_an_eval_forward_leaves_the_4bit_backbone_as_it_was(tmp_path):
    """Where an eval forward had already packed the 4-bit layers for bitsandbytes' CPU kernel (evaluating the first
    adapter, then adding a hybrid), the hybrid once unpacked its blocks' layers, and bitsandbytes' inverse
    re-quantizes double-quantized block scales. Deleting the hybrid, a refused ``load_adapter`` of one and
    ``unload()`` left them so: the base model's and the other adapter's logits stayed 0.003 off what they were (the
    next eval forward repacked them from the re-quantized scales). The hybrid now leaves the packed layers packed
    (bnb_compat.route_4bit_layers_by_mode runs its gradient-carrying calls on the standard layout kept from before
    packing). On CPUs without AVX512-BF16 bitsandbytes never repacks, and this holds trivially."""
    tiny_causal_lm(num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path / "base")

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config())

    with torch.no_grad():
        expected = load()(input_ids=IDS).logits  # the never-adapted model, packed where the CPU supports it
    model = get_peft_model(load(), hybrid_config(backbone_lora_layers=0))
    train_steps(model, IDS, steps=1)

    def logits():
        with torch.no_grad():
            adapted = model(input_ids=IDS).logits  # an eval forward: packs every 4-bit layer
            with model.disable_adapter():
                return adapted, model(input_ids=IDS).logits

    adapted, base = logits()
    assert torch.equal(base, expected)

    model.add_adapter("hybrid", hybrid_config())
    model.set_adapter("hybrid")
    train_steps(model, IDS, steps=1)
    model.save_pretrained(tmp_path / "saved", selected_adapters=["hybrid"])
    model.set_adapter("default")
    model.delete_adapter("hybrid")
    assert all(map(torch.equal, logits(), (adapted, base)))

    # a refused load under a new name: PEFT adds the adapter (and its backbone hooks) before the weights are refused
    path = tmp_path / "saved" / "hybrid" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 8):  # garble tensor bytes, keep the header valid
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with pytest.raises(QSTAdapterFileError, match="do not match the digest"):
        model.load_adapter(str(tmp_path / "saved" / "hybrid"), adapter_name="hybrid")
    assert "hybrid" not in model.peft_config
    assert all(map(torch.equal, logits(), (adapted, base)))

    model.add_adapter("hybrid", hybrid_config())
    unloaded = model.unload()
    with torch.no_grad():
        assert torch.equal(unloaded(input_ids=IDS).logits, expected)


@pytest.mark.parametrize("own_cache", [False, True], ids=["returned-cache", "callers-own-cache"])
def test_a_hybrid_adapters_cache_is_not_continued_under_another_backbone(own_cache):
    """A hybrid adapter's backbone LoRA changes the keys and values its top blocks cache. Such a cache continued with
    adapters disabled generated neither the base model's tokens nor the adapter's (the base model attending to the
    adapted history), without an error; now the continuation is refused, and one with the adapter still matches
    decoding without a cache."""
    from transformers import DynamicCache

    model = hybrid_model()
    train_steps(model, IDS, steps=3, lr=3e-2)
    kwargs = dict(do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cache = DynamicCache() if own_cache else None
        first = model.generate(input_ids=IDS[:1], past_key_values=cache, max_new_tokens=4, return_dict_in_generate=True,
                               **kwargs)
        cache = cache if own_cache else first.past_key_values
        history = torch.cat([first.sequences, torch.tensor([[7, 8]])], 1)
        with model.disable_adapter(), pytest.raises(ValueError, match="backbone LoRA of adapter 'default'"):
            model.generate(input_ids=history, past_key_values=cache, max_new_tokens=6, **kwargs)
        continued = model.generate(input_ids=history, past_key_values=cache, max_new_tokens=6, **kwargs)
        assert torch.equal(continued, model.generate(input_ids=history, max_new_tokens=6, use_cache=False, **kwargs))


@pytest.mark.parametrize("empty", ["reset", "crop"])
def test_an_emptied_hybrid_cache_is_reused_under_another_backbone_like_a_fresh_one(empty):
    """The refusal to continue a hybrid adapter's cache under another backbone is about the tokens it holds: emptied
    (``cache.reset()``, or cropped to no tokens to regenerate from the start) it holds none, and generating into it
    again, with the hybrid or with adapters disabled, gives what a fresh generation gives, at every step."""
    from transformers import DynamicCache

    model = hybrid_model()
    train_steps(model, IDS, steps=3, lr=3e-2)
    kwargs = dict(input_ids=IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)

    def emptied(cache):
        cache.reset() if empty == "reset" else cache.crop(-cache.get_seq_length())
        assert cache.get_seq_length() == 0
        return cache

    with torch.no_grad():
        first = model.generate(past_key_values=DynamicCache(), return_dict_in_generate=True, **kwargs)
        adapted, cache = first.sequences, first.past_key_values  # the QSTCache, which records its routing
        assert torch.equal(model.generate(past_key_values=emptied(cache), **kwargs), adapted)
        with model.disable_adapter():
            fresh = model.generate(**kwargs)
            assert not torch.equal(fresh, adapted)
            assert torch.equal(model.generate(past_key_values=emptied(cache), **kwargs), fresh)


def test_a_mixed_batch_cache_follows_its_rows_and_refuses_other_rows():
    """In a mixed batch each row's backbone is adapted by its own hybrid adapter: the cache remembers which, follows
    a reorder of its rows, and refuses a continuation that routes a row to another backbone."""
    model = hybrid_model()
    model.add_adapter("other", hybrid_config(backbone_lora_layers=1))
    model.set_adapter("default")
    model.eval()
    routes = ["default", "__base__", "other"]
    with torch.no_grad():
        cache = model(input_ids=IDS, adapter_names=routes, use_cache=True).cache
        step = torch.tensor([[7], [8], [9]])
        with pytest.raises(ValueError, match=r"per-row backbone LoRA \['default', None, 'other'\]"):
            model(input_ids=step, cache=copy.deepcopy(cache), use_cache=True)
        rows = torch.tensor([2, 0, 1])
        cache.reorder_cache(rows)
        continued = model(input_ids=step, cache=cache, adapter_names=[routes[i] for i in rows], use_cache=True).logits
        full = model(input_ids=torch.cat([IDS[rows], step], 1), adapter_names=[routes[i] for i in rows]).logits
        torch.testing.assert_close(continued[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="per-row backbone LoRA"):
            model(input_ids=step, cache=cache, adapter_names=routes, use_cache=True)


@pytest.mark.parametrize("hybrid", [False, True], ids=["plain", "hybrid"])
def test_a_cache_saved_before_caches_recorded_their_routing_continues(hybrid, monkeypatch):
    """A cache pickled before caches recorded which backbone adapters filled them has no routing: the returned
    QSTCache failed with AttributeError (for plain adapters too), and a caller's own cache read as filled with no
    backbone adapter, so the adapter that filled it was refused. Such a cache continues unchecked, as before."""
    import pickle

    from transformers import DynamicCache

    from peft_qst import cache as cache_module

    model = (hybrid_model() if hybrid else get_peft_model(tiny_causal_lm(num_hidden_layers=LAYERS),
                                                          QSTConfig(task_type="CAUSAL_LM", r=4))).eval()
    kwargs = dict(do_sample=False, pad_token_id=0)
    # the pickled form of that version: a QSTCache without routing, side halves reduced to three arguments
    monkeypatch.setattr(cache_module._SideHalves, "__reduce__",
                        lambda self: (cache_module._restored_halves, (self.cache_class, self[0], self[1])))
    with torch.no_grad():
        own = DynamicCache()
        first = model.generate(input_ids=IDS[:1], past_key_values=own, max_new_tokens=3, **kwargs)
        returned = model.generate(input_ids=IDS[:1], max_new_tokens=3, return_dict_in_generate=True,
                                  **kwargs).past_key_values
        del vars(returned)["routing"]
        history = torch.cat([first, torch.tensor([[7]])], 1)
        expected = model.generate(input_ids=history, max_new_tokens=3, use_cache=False, **kwargs)
        for saved in (own, returned):
            loaded = pickle.loads(pickle.dumps(saved))
            assert torch.equal(model.generate(input_ids=history, past_key_values=loaded, max_new_tokens=3, **kwargs),
                               expected)


@pytest.mark.parametrize("first_layers", [0, 1], ids=["plain-beside-hybrid", "two-hybrids"])
def test_two_adapters_of_different_depth_and_rank_each_run_as_alone(first_layers, tmp_path):
    """Adapter "a" (plain QST or LoRA on the top block, rank 2) beside hybrid "b" (top two blocks, rank 8): each
    adapter, picked by set_adapter or by adapter_names rows (forward; greedy, beam and sampled generation, whose
    expanded rows keep their prompt's adapter), computes bit for bit what it computes loaded alone, "__base__" rows
    and disable_adapter() the base model's; training one leaves the other's parameters as they were; deleting "b"
    leaves "a" and the base model exact."""
    tiny_causal_lm(num_hidden_layers=LAYERS).save_pretrained(tmp_path / "base")

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()

    base = load()
    model = get_peft_model(load(), hybrid_config(backbone_lora_layers=first_layers, backbone_lora_r=2),
                           adapter_name="a")
    model.add_adapter("b", hybrid_config(backbone_lora_r=8, backbone_lora_alpha=8))
    for name, other in (("a", "b"), ("b", "a")):
        model.set_adapter(name)
        untouched = {n: p.clone() for n, p in model.named_parameters() if f".{other}." in n}
        train_steps(model, IDS, steps=3, lr=3e-2)
        assert all(torch.equal(p, untouched[n]) for n, p in model.named_parameters() if f".{other}." in n)
    model.save_pretrained(tmp_path / "adapters")
    alone = {n: PeftModel.from_pretrained(load(), tmp_path / "adapters" / n, adapter_name=n).eval() for n in "ab"}
    alone["__base__"] = base
    names = ["b", "__base__", "a"]
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0
    with torch.no_grad():
        expected = {name: m(input_ids=IDS).logits for name, m in alone.items()}
        for name in "ab":
            model.set_adapter(name)
            assert torch.equal(model(input_ids=IDS).logits, expected[name]), name
        with model.disable_adapter():
            assert torch.equal(model(input_ids=IDS).logits, expected["__base__"])
        mixed = model(input_ids=IDS, adapter_names=names).logits
        assert all(torch.equal(mixed[i], expected[name][i]) for i, name in enumerate(names))
        for options in (dict(do_sample=False), dict(num_beams=2, do_sample=False),
                        dict(do_sample=True, num_return_sequences=2)):
            kwargs = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=0, **options)
            n = options.get("num_return_sequences", 1)
            torch.manual_seed(5)
            routed = model.generate(input_ids=IDS, adapter_names=names, **kwargs)
            rows = []
            for i, name in enumerate(names):
                torch.manual_seed(5)  # the same draws: a row's sample depends on its own probabilities only
                rows.append(alone[name].generate(input_ids=IDS, **kwargs)[i * n:(i + 1) * n])
            assert torch.equal(routed, torch.cat(rows)), options

        model.set_adapter("a")
        model.delete_adapter("b")
        assert torch.equal(model(input_ids=IDS).logits, expected["a"])
        with model.disable_adapter():
            assert torch.equal(model(input_ids=IDS).logits, expected["__base__"])
    assert sorted(model.state_dict()) == sorted(alone["a"].state_dict())


def test_a_loaded_hybrid_leaves_the_base_model_and_other_adapters_bit_for_bit_on_a_4bit_backbone(tmp_path):
    """The hybrid kept its blocks' 4-bit layers out of bitsandbytes' CPU packed layout for as long as it was loaded
    (gradients through a packed layer are wrong), so on CPUs with AVX512-BF16 ``disable_adapter()``, ``"__base__"``
    rows and the other adapters ran those layers on the standard kernel: 0.004 off the base model and off what they
    computed before the hybrid was added. Now every 4-bit layer is routed by mode
    (bnb_compat.route_4bit_layers_by_mode): eval forwards without gradients run packed, everything a gradient goes
    through the standard layout, so all of them stay bit for bit, an untrained hybrid starts at the base model bit
    for bit, and the hybrid's gradients after its own eval forwards and generation stay those of before. On CPUs
    without AVX512-BF16 bitsandbytes never repacks, and this holds trivially."""
    from bitsandbytes.functional import has_avx512bf16

    tiny_causal_lm(num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config())

    mixed = ["default", "__base__", "default"]
    with torch.no_grad():
        expected_base = load()(input_ids=IDS).logits  # the never-adapted model, packed where the CPU supports it
    model = get_peft_model(load(), hybrid_config(backbone_lora_layers=0))
    train_steps(model, IDS, steps=1)
    with torch.no_grad():
        expected_default = model(input_ids=IDS).logits
        expected_mixed = model(input_ids=IDS, adapter_names=mixed).logits

    def hybrid_grads():
        model.set_adapter("hybrid")
        model.train()
        model.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        model.eval()
        return {n: p.grad.clone() for n, p in model.named_parameters() if ".hybrid." in n and p.grad is not None}

    torch.manual_seed(1)
    model.add_adapter("hybrid", hybrid_config())
    model.set_adapter("hybrid")
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, expected_base)  # an untrained hybrid starts at the base model
        for name, param in model.named_parameters():
            if ".hybrid." in name and name.endswith("lora_B"):
                param.normal_(0, 0.1)  # open the adapters, so that gradients flow through the frozen layers
    before_its_evals = hybrid_grads()
    with torch.no_grad():
        model(input_ids=IDS)  # the hybrid's eval forward and generation: the packed kernel where the CPU has one
        model.generate(input_ids=IDS, max_new_tokens=3, do_sample=False)
        model.set_adapter("default")
        assert torch.equal(model(input_ids=IDS).logits, expected_default)
        assert torch.equal(model(input_ids=IDS, adapter_names=["__base__"] * 3).logits, expected_base)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=IDS).logits, expected_base)
        rows = model(input_ids=IDS, adapter_names=["default", "__base__", "hybrid"]).logits
        assert torch.equal(rows[:2], expected_mixed[:2])
    after = hybrid_grads()
    assert after.keys() == before_its_evals.keys() and any(".backbone_lora." in n for n in after)
    assert all(torch.equal(after[n], before_its_evals[n]) for n in after)
    if has_avx512bf16():
        assert all(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if type(m).__name__ == "Linear4bit")


@pytest.mark.parametrize("made_trainable", ["requires_grad_", "load_adapter"])
def test_a_hybrid_loaded_for_inference_trains_bit_for_bit_after_its_eval_forwards(made_trainable, tmp_path):
    """An adapter loaded for inference (``PeftModel.from_pretrained`` without ``is_trainable``) keeps no second copy
    of its 4-bit weights when an eval forward packs them. Made trainable afterwards (its parameters'
    ``requires_grad_`` set by hand, or a second adapter loaded with ``is_trainable=True``), a hybrid adapting every
    block got gradients 4% off a never-evaluated model's: its training-mode forwards ran the packed kernel where the
    input carried no gradient, and the standard layout rebuilt for the others had its block scales rounded to
    bfloat16 (before the hybrid stopped pinning its blocks' layers unpacked, they were exact). The packed layers now
    keep their standard quantization state (small), and the standard layout is rebuilt from it exactly. On CPUs
    without AVX512-BF16 bitsandbytes never repacks, and this holds trivially."""
    tiny_causal_lm(num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path / "base")

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config())

    torch.manual_seed(1)
    model = get_peft_model(load(), hybrid_config(backbone_lora_layers=LAYERS))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)  # open the adapters, so that gradients flow through the frozen layers
    model.save_pretrained(tmp_path / "adapter")

    def grads(model):
        model.train()
        model.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {n.replace(".second.", ".default."): p.grad.clone()
                for n, p in model.named_parameters() if p.grad is not None}

    expected = grads(PeftModel.from_pretrained(load(), tmp_path / "adapter", is_trainable=True))
    model = PeftModel.from_pretrained(load(), tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=IDS, max_new_tokens=3, do_sample=False)  # packs every 4-bit layer
    if made_trainable == "requires_grad_":
        for name, param in model.named_parameters():
            if ".qst_side." in name:
                param.requires_grad_(True)
    else:
        model.load_adapter(str(tmp_path / "adapter"), adapter_name="second", is_trainable=True)
        model.set_adapter("second")
    got = grads(model)
    assert got.keys() == expected.keys() and any(".backbone_lora." in n for n in got)
    assert all(torch.equal(got[n], expected[n]) for n in got)


def test_the_backbone_deltas_are_scaled_by_alpha_over_rank():
    """Each adapted linear layer computes ``W x + (alpha / rank) B A x`` (``backbone_lora_alpha`` over
    ``backbone_lora_r``, as LoRA's ``lora_alpha``): with the side network's update at its start (zero), the logits are
    those of the base model with ``(alpha / rank) B A`` merged into the weights of the top blocks' linear layers. A
    scaling of 1 (the default alpha of 16 over the default rank of 16) would not tell the two apart."""
    from peft_qst.backbone_lora import LowRankDelta

    alpha, rank = 10.0, 4
    model = hybrid_model(backbone_lora_alpha=alpha, backbone_lora_r=rank)
    merged = tiny_causal_lm(num_hidden_layers=LAYERS)
    generator = torch.Generator().manual_seed(3)
    count = 0
    with torch.no_grad():
        for name, delta in model.named_modules():
            if not isinstance(delta, LowRankDelta):
                continue
            delta.lora_B.copy_(torch.randn(delta.lora_B.shape, generator=generator) * 0.1)
            index, key = name.split(".deltas.")[1].split(".")
            target = merged.model.layers[int(index)].get_submodule(key.replace("__", "."))
            target.weight += (alpha / rank) * delta.lora_B @ delta.lora_A
            count += 1
        assert count == 2 * 7  # q, k, v, o, gate, up, down of blocks 2 and 3
        expected = merged(input_ids=IDS).logits
        assert (expected - tiny_causal_lm(num_hidden_layers=LAYERS)(input_ids=IDS).logits).abs().max() > 1e-2
        torch.testing.assert_close(model(input_ids=IDS).logits, expected, atol=1e-5, rtol=1e-5)


def test_a_mixed_batch_cache_repeated_row_by_row_keeps_each_rows_backbone():
    """``batch_repeat_interleave`` repeats each row of a cache in place (rows a, b -> a, a, b, b), as generate's
    expansions do: the cache's record of which hybrid adapter filled each row follows it, so that the repeated rows
    continue under their own adapters (matching a forward without a cache) instead of being refused as routed to
    another backbone."""
    model = hybrid_model()
    model.add_adapter("other", hybrid_config(backbone_lora_layers=1))
    model.set_adapter("default")
    train_steps(model, IDS, steps=2, lr=3e-2)
    model.set_adapter("other")
    train_steps(model, IDS, steps=2, lr=3e-2)
    routes = ["default", "__base__", "other"]
    repeated = [name for name in routes for _ in range(2)]
    with torch.no_grad():
        cache = model(input_ids=IDS, adapter_names=routes, use_cache=True).cache
        cache.batch_repeat_interleave(2)
        step = torch.arange(7, 13).view(6, 1)
        continued = model(input_ids=step, cache=cache, adapter_names=repeated, use_cache=True).logits
        full = model(input_ids=torch.cat([IDS.repeat_interleave(2, 0), step], 1), adapter_names=repeated).logits
    torch.testing.assert_close(continued[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)


def test_gradients_through_a_mixed_batch_of_two_hybrids_of_different_depth():
    """A forward with gradients whose rows go to two hybrid adapters of different depth (``adapter_names``, in eval
    mode, e.g. for a gradient-based attribution) records autograd from the lowest block either adapts: each adapter's
    backbone deltas get the gradients of a forward of its rows alone, the deeper adapter's lowest block included."""
    model = hybrid_model()  # "default": blocks 2 and 3
    model.add_adapter("other", hybrid_config(backbone_lora_layers=1))  # block 3
    model.eval()
    for name, parameter in model.named_parameters():  # both adapters train (set_adapter leaves only one trainable)
        if ".qst_side." in name:
            parameter.requires_grad_(True)
    routes = ["default", "other"]

    def gradients(ids, **kwargs):  # of a loss that is a sum over rows: each row's part is its own
        model.zero_grad()
        model(input_ids=ids, **kwargs).logits.pow(2).sum().backward()
        return {n: p.grad for n, p in model.named_parameters() if ".backbone_lora." in n and n.endswith("lora_B")}

    mixed = {n: None if g is None else g.clone() for n, g in gradients(IDS[:2], adapter_names=routes).items()}
    for row, name in enumerate(routes):
        model.set_adapter(name)
        alone = gradients(IDS[row:row + 1])
        own = [n for n in alone if f".{name}." in n]
        assert len(own) == (14 if name == "default" else 7)
        for n in own:
            assert mixed[n] is not None, n
            torch.testing.assert_close(mixed[n], alone[n], atol=1e-5, rtol=1e-4, msg=n)


def test_a_mixed_batch_cache_narrowed_to_one_adapters_rows_continues_without_adapter_names():
    """A mixed batch whose remaining rows all belong to one hybrid adapter (``batch_select_indices`` dropping the
    others, or ``adapter_names`` naming one adapter for every row) is that adapter's cache: it continues with the
    adapter active and no ``adapter_names``, as a cache that adapter filled alone does, rather than being refused as
    routed per row."""
    model = hybrid_model()
    model.add_adapter("other", hybrid_config(backbone_lora_layers=1))
    model.set_adapter("default")
    train_steps(model, IDS, steps=2, lr=3e-2)
    model.eval()
    kept = torch.tensor([0, 2])
    step = torch.tensor([[7], [8]])
    with torch.no_grad():
        full = model(input_ids=torch.cat([IDS[kept], step], 1)).logits
        cache = model(input_ids=IDS, adapter_names=["default", "other", "default"], use_cache=True).cache
        cache.batch_select_indices(kept)
        continued = model(input_ids=step, cache=cache, use_cache=True).logits
        torch.testing.assert_close(continued[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)
        cache = model(input_ids=IDS[kept], adapter_names=["default", "default"], use_cache=True).cache
        continued = model(input_ids=step, cache=cache, use_cache=True).logits
        torch.testing.assert_close(continued[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)


def test_blocks_without_linear_layers_are_refused_naming_the_fix():
    """GPT-2's blocks project with transformers' ``Conv1D``, not ``nn.Linear``: the hybrid finds nothing to adapt in
    the top blocks and says so, naming ``backbone_lora_layers=0``, with which the same model is adapted."""
    def gpt2():
        return tiny_causal_lm("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128)

    with pytest.raises(ValueError, match=r"backbone_lora_layers=1 found no nn.Linear layer in the top backbone blocks "
                                         r".*use backbone_lora_layers=0"):
        get_peft_model(gpt2(), hybrid_config(backbone_lora_layers=1))
    model = get_peft_model(gpt2(), hybrid_config(backbone_lora_layers=0))
    assert model(input_ids=IDS).logits.shape == (*IDS.shape, 128)
