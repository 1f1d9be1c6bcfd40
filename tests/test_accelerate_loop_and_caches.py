"""A custom accelerate training loop on a QST model, whole-model pickling, weights loaded in place between two turns of
a cache, generate's other cache implementations on a model with sliding-window layers, and the loading arguments of
``PeftModel.from_pretrained``."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_qst import QSTConfig

from .conftest import (
    bnb_config,
    logits_in_fresh_process,
    saved_under_another_trunk_name,
    tiny_causal_lm,
    train_steps,
)
from .test_generation import PAD, PROMPTS, left_padded, trained_model

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21], [3, 9, 11, 12, 13, 40, 41, 42]])


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps its state process-wide; it is cleared before and after each test here, so that these loops
    meet no earlier Trainer's settings (a Trainer with torch_compile=True left its dynamo backend there, and the
    loop's model came out compiled, its state-dict keys under ``_orig_mod.``) and no later Trainer meets theirs."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# --------------------------------------------------------------------------------------------------------------------
# a custom accelerate loop
# --------------------------------------------------------------------------------------------------------------------


def _loop_parts(seed: int, base=None):
    """A QST model (its side network initialised from ``seed``; on ``base``, else a fresh tiny Llama), AdamW, a linear
    schedule and 8 batches of 2 rows."""
    from torch.utils.data import DataLoader, TensorDataset

    base = tiny_causal_lm() if base is None else base  # the same base model for every seed
    torch.manual_seed(seed)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=8)
    data = torch.randint(1, 128, (16, 12), generator=torch.Generator().manual_seed(1))
    return model, optimizer, DataLoader(TensorDataset(data), batch_size=2), scheduler


def _train(accelerator, model, optimizer, batches, scheduler, steps: int) -> list[float]:
    """The loop as users write it: accumulate, backward, clip when the gradients are synced, step."""
    model.train()
    losses = []
    for step, (batch,) in enumerate(batches):
        if step == steps:
            break
        with accelerator.accumulate(model):
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_a_custom_accelerate_loop_resumed_from_save_state_trains_as_if_uninterrupted(
    tmp_path, tiny_model_dir, fresh_accelerate_state
):
    """``save_state`` writes the whole model as safetensors (the side norms and gates under their parametrization
    names), ``load_state`` into a freshly built model, optimizer and scheduler continues exactly where the
    uninterrupted loop is at that step; the unwrapped model's ``save_pretrained`` and ``get_state_dict`` hold the
    trained side weights."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    def accelerated(seed):
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        return accelerator, *accelerator.prepare(*_loop_parts(seed))

    accelerator, model, optimizer, batches, scheduler = accelerated(seed=0)
    uninterrupted = _train(accelerator, model, optimizer, batches, scheduler, steps=8)
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    accelerator, model, optimizer, batches, scheduler = accelerated(seed=0)
    first = _train(accelerator, model, optimizer, batches, scheduler, steps=4)
    accelerator.save_state(str(tmp_path / "state"))
    saved = load_file(tmp_path / "state" / "model.safetensors")
    side = {n: p for n, p in model.state_dict().items() if ".qst_side." in n}
    assert any(n.endswith("parametrizations.weight.original") for n in side)
    assert all(torch.equal(saved[n], p) for n, p in side.items())

    accelerator, model, optimizer, batches, scheduler = accelerated(seed=3)  # other initial side weights
    accelerator.load_state(str(tmp_path / "state"))
    rest = _train(accelerator, model, optimizer, accelerator.skip_first_batches(batches, 4), scheduler, steps=4)
    assert first + rest == uninterrupted
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(parameter, expected[name]), name

    state_dict = accelerator.get_state_dict(model)
    assert all(torch.equal(state_dict[n], p) for n, p in model.state_dict().items() if ".qst_side." in n)
    accelerator.unwrap_model(model).save_pretrained(tmp_path / "adapter")
    model.eval()
    loaded = PeftModel.from_pretrained(tiny_causal_lm(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_a_4bit_accelerate_loop_resumed_with_load_state_strict_false_trains_as_if_uninterrupted(
    tmp_path, tiny_model_dir, fresh_accelerate_state
):
    """transformers' ``run_clm_no_trainer.py`` on a 4-bit base: ``save_state`` writes bitsandbytes' quantization state
    beside each packed weight (``weight.absmax``, ``weight.quant_map``, ...), which ``Linear4bit`` does not read back,
    so ``load_state`` fails with "Unexpected key(s) in state_dict" (bitsandbytes#1946; for LoRA too). With
    ``strict=False`` those keys are skipped; the base model loaded afresh from the same checkpoint holds the same
    quantization state, and the loop continues exactly where the uninterrupted one is, the 4-bit backbone unchanged."""
    from accelerate import Accelerator

    def accelerated(seed):
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
        return accelerator, *accelerator.prepare(*_loop_parts(seed, base))

    accelerator, model, optimizer, batches, scheduler = accelerated(seed=0)
    backbone = {n: t.clone() for n, t in model.state_dict().items() if ".qst_side." not in n}
    uninterrupted = _train(accelerator, model, optimizer, batches, scheduler, steps=8)
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    accelerator, model, optimizer, batches, scheduler = accelerated(seed=0)
    first = _train(accelerator, model, optimizer, batches, scheduler, steps=4)
    accelerator.save_state(str(tmp_path / "state"))

    accelerator, model, optimizer, batches, scheduler = accelerated(seed=3)  # other initial side weights
    accelerator.load_state(str(tmp_path / "state"), strict=False)
    rest = _train(accelerator, model, optimizer, accelerator.skip_first_batches(batches, 4), scheduler, steps=4)
    assert first + rest == uninterrupted
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert torch.equal(parameter, expected[name]), name
    after = {n: t for n, t in model.state_dict().items() if ".qst_side." not in n}
    assert after.keys() == backbone.keys()
    assert all(torch.equal(after[n], t) for n, t in backbone.items())


# --------------------------------------------------------------------------------------------------------------------
# pickling the whole model
# --------------------------------------------------------------------------------------------------------------------


def test_a_qst_model_pickled_with_its_optimizer_trains_on_after_unpickling(tmp_path):
    """A training loop's state pickled whole (``torch.save({"model": ..., "optimizer": ...})``; the model alone is
    in tests/test_peft_api_edges.py), after a generate: unpickled, the model computes the same logits, its optimizer
    holds the unpickled model's own parameters (the parametrized side norms' and gates' originals included), and it
    trains and generates as the original does; it pickles again, and loads in a fresh process."""
    model = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4, copy_heads=1))
    train_steps(model, IDS, steps=2)
    model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=3, pad_token_id=PAD)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits

    buffer = io.BytesIO()
    torch.save({"model": model, "optimizer": optimizer}, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    copy_model, copy_optimizer = restored["model"], restored["optimizer"]
    with torch.no_grad():
        assert torch.equal(copy_model(input_ids=IDS).logits, expected)
    parameters = {id(p) for p in copy_model.parameters() if p.requires_grad}
    assert {id(p) for group in copy_optimizer.param_groups for p in group["params"]} == parameters

    for each, its_optimizer in ((model, optimizer), (copy_model, copy_optimizer)):
        each.train()
        each(input_ids=IDS, labels=IDS).loss.backward()
        its_optimizer.step()
        its_optimizer.zero_grad()
        each.eval()
    with torch.no_grad():
        trained = model(input_ids=IDS).logits
        assert not torch.equal(trained, expected)
        assert torch.equal(copy_model(input_ids=IDS).logits, trained)
    kwargs = dict(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=6, pad_token_id=PAD)
    assert torch.equal(copy_model.generate(**kwargs), model.generate(**kwargs))

    torch.save(copy.deepcopy(copy_model), tmp_path / "model.pt")
    fresh = logits_in_fresh_process(tmp_path, f"model = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)",
                                    IDS)
    assert torch.equal(fresh, trained)


# --------------------------------------------------------------------------------------------------------------------
# weights loaded in place between two turns of a cache
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("load", ["load_state_dict", "set_peft_model_state_dict", "accelerate-load_state"])
def test_the_next_turn_after_weights_were_loaded_in_place_runs_on_the_loaded_weights(
    tmp_path, load, fresh_accelerate_state
):
    """A cache continued after the side weights were loaded in place (``model.load_state_dict``,
    ``set_peft_model_state_dict``, accelerate's ``load_state`` restoring a checkpoint): the fast path skipped its
    weight check for a forward continuing a cache it had checked, so the new tokens ran on the packed weights from
    before the load, where the general path runs on the loaded ones."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import DynamicCache

    from peft_qst.fast_path import fast_path_disabled

    model, other = trained_model(), trained_model()
    torch.manual_seed(56)
    train_steps(other, torch.randint(1, 128, (4, 24)), steps=2, lr=3e-2)
    if load == "accelerate-load_state":
        from accelerate import Accelerator

        saver = Accelerator(cpu=True)
        saver.prepare(other)
        saver.save_state(str(tmp_path))
        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(model)
    ids, mask = left_padded(PROMPTS)
    cache = DynamicCache()
    first = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6,
                           do_sample=False, pad_token_id=PAD)
    if load == "load_state_dict":
        model.load_state_dict(other.state_dict())
    elif load == "set_peft_model_state_dict":
        set_peft_model_state_dict(model, get_peft_model_state_dict(other))
    else:
        accelerator.load_state(str(tmp_path))
    ids = torch.cat([first, torch.tensor([[7, 8, 9, 10]] * len(PROMPTS))], 1)
    mask = torch.cat([mask, torch.ones(len(PROMPTS), 10, dtype=mask.dtype)], 1)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=PAD,
                  return_dict_in_generate=True, output_logits=True)
    general_cache = copy.deepcopy(cache)
    fast = model.generate(past_key_values=cache, **kwargs)
    with fast_path_disabled():
        general = model.generate(past_key_values=general_cache, **kwargs)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(general.logits), atol=2e-5, rtol=1e-4)
    assert torch.equal(fast.sequences, general.sequences)


# --------------------------------------------------------------------------------------------------------------------
# cache implementations on a model with sliding-window layers
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma2():
    """A tiny Gemma 2 (sliding-window and full-attention layers alternating, a 4-token window) with a trained
    adapter."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                                  sliding_window=4, pad_token_id=PAD)
    model = get_peft_model(AutoModelForCausalLM.from_config(config).eval(), QSTConfig(task_type="CAUSAL_LM", r=4))
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    torch.manual_seed(7)
    train_steps(model, torch.randint(1, 128, (4, 24)), steps=8, lr=3e-2)
    return model


@pytest.mark.parametrize(
    "mode",
    ["static", "static-beam-search", "static-sampling", "StaticCache", "DynamicCache(config)", "static-chunked"],
)
def test_cache_implementations_on_a_sliding_window_model_equal_uncached_decoding(gemma2, mode):
    """Each way of giving generate a cache, on prompts and continuations longer than the window, generates what
    decoding without a cache through the transformers modules generates."""
    from transformers import DynamicCache, StaticCache

    from peft_qst.fast_path import fast_path_disabled

    decoding = dict(num_beams=3) if "beam" in mode else dict(do_sample=True, top_k=20) if "sampling" in mode else {}
    cache_kwargs = {
        "StaticCache": dict(past_key_values=StaticCache(config=gemma2.config, max_cache_len=64)),
        "DynamicCache(config)": dict(past_key_values=DynamicCache(config=gemma2.config)),
        "static-chunked": dict(cache_implementation="static", prefill_chunk_size=3),
    }.get(mode, dict(cache_implementation="static"))

    def generate(**kwargs):
        ids, mask = left_padded(PROMPTS)
        torch.manual_seed(0)
        return gemma2.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=PAD,
                               **{"do_sample": False, **decoding}, **kwargs)

    with fast_path_disabled():
        expected = generate(use_cache=False)
    assert torch.equal(generate(**cache_kwargs), expected)


# --------------------------------------------------------------------------------------------------------------------
# PeftModel.from_pretrained's loading arguments
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "how", ["subfolder", "adapter_name", "torch_device", "revision", "ephemeral_gpu_offload", "key_mapping"]
)
def test_from_pretrained_loading_arguments(tmp_path, tiny_model_dir, how):
    """Each loads the saved adapter to the same logits, as LoRA's: ``subfolder`` of a local folder, another
    ``adapter_name`` (active), ``torch_device="cpu"``, a ``revision`` (ignored for a local folder, as PEFT does),
    ``ephemeral_gpu_offload`` (which QST has no use for: PEFT warns that it is ignored), and a ``key_mapping`` that
    renames the weights of an adapter saved under another trunk name."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    train_steps(model, IDS)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    folder = tmp_path / "sub"
    model.save_pretrained(folder)
    kwargs = {
        "subfolder": dict(subfolder="sub"),
        "adapter_name": dict(adapter_name="other"),
        "torch_device": dict(torch_device="cpu"),
        "revision": dict(revision="v2"),
        "ephemeral_gpu_offload": dict(ephemeral_gpu_offload=True),
        "key_mapping": dict(key_mapping={"^old_trunk": "model"}),
    }[how]
    if how == "key_mapping":  # the weights as saved from a model whose trunk was called old_trunk
        saved_under_another_trunk_name(model, folder)
    path = str(tmp_path) if how == "subfolder" else str(folder)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    if how == "ephemeral_gpu_offload":
        with pytest.warns(UserWarning, match="Ephemeral GPU offloading is not supported"):
            loaded = PeftModel.from_pretrained(base, path, **kwargs)
    else:
        loaded = PeftModel.from_pretrained(base, path, **kwargs)
    assert loaded.active_adapter == kwargs.get("adapter_name", "default")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=IDS).logits, expected)
