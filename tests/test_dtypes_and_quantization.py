"""QST on fp32, bf16 and bitsandbytes 4-bit (NF4/FP4, double quantisation on and off) backbones, on CPU."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_qst import QSTConfig, recommended_compute_dtype

from .conftest import bnb_config, train_steps
from .test_training_graph import assert_only_side_learns_and_backbone_saves_nothing

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21], [1, 2, 3, 4, 5, 6, 7, 8]])

VARIANTS = {
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16),
    "nf4-double": dict(quantization_config=bnb_config("nf4", True)),
    "nf4-single": dict(quantization_config=bnb_config("nf4", False)),
    "fp4-double": dict(quantization_config=bnb_config("fp4", True)),
    "fp4-single": dict(quantization_config=bnb_config("fp4", False)),
    # what peft_qst.recommended_compute_dtype() picks on CPUs without AVX512-BF16 (the examples' --dtype auto there)
    "nf4-float32-compute": dict(quantization_config=bnb_config("nf4", True, torch.float32), dtype=torch.float32),
}
EXPECTED_SIDE_DTYPE = {"fp32": torch.float32, "nf4-float32-compute": torch.float32}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_save_load(variant, tiny_model_dir, tmp_path):
    kwargs = VARIANTS[variant]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs)
    if "quantization_config" in kwargs:
        assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    side_dtypes = {p.dtype for n, p in model.named_parameters() if ".qst_side." in n}
    assert side_dtypes == {EXPECTED_SIDE_DTYPE.get(variant, torch.bfloat16)}
    model.train()
    assert_only_side_learns_and_backbone_saves_nothing(model, IDS)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=IDS).logits, expected)


def test_side_dtype_override(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    model = get_peft_model(base, QSTConfig(r=4, side_dtype="float32"))
    assert {p.dtype for n, p in model.named_parameters() if ".qst_side." in n} == {torch.float32}
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert torch.isfinite(logits).all()


def test_a_float16_compute_dtype_gives_a_float32_side_network_that_fp16_mixed_precision_trains(tiny_model_dir):
    """The QLoRA recipe for GPUs without bfloat16: bnb_4bit_compute_dtype=float16 and Trainer(fp16=True), whose
    gradient scaler refuses float16 gradients. The side network is float32 there (PEFT keeps LoRA in float32 too); the
    step below is the scaler's sequence as accelerate runs it, with the CPU scaler."""
    fp16_compute = bnb_config(compute_dtype=torch.float16)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=fp16_compute)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    params = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in params} == {torch.float32}
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in params]
    model.train()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(input_ids=IDS, labels=IDS).loss
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scaler.step(optimizer)
    scaler.update()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    explicit = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=fp16_compute),
        QSTConfig(task_type="CAUSAL_LM", r=4, side_dtype="float16"),
    )
    assert {p.dtype for n, p in explicit.named_parameters() if ".qst_side." in n} == {torch.float16}


@pytest.mark.parametrize(
    "base_dtype, side_dtype, autocast_dtype",
    [(torch.float16, None, torch.bfloat16), (torch.float32, "bfloat16", torch.float16)],
    ids=["fp16-model-bf16-autocast", "bf16-side-fp16-autocast"],
)
@pytest.mark.parametrize("copy_heads", [0, 2])
def test_inference_under_autocast_to_the_other_half_dtype(
    tiny_model_dir, base_dtype, side_dtype, autocast_dtype, copy_heads
):
    """A float16 checkpoint under bf16 autocast (Trainer(bf16=True)), and a bf16 side network (TRL casts a 4-bit
    model's to bf16) under float16 autocast (fp16=True): the fast path's torch.stack of the hidden states or of the side
    weights, and the copy heads' torch.cat, failed there ("Unexpected floating ScalarType in
    at::autocast::prioritize") while the base model ran. Both compute with autocast off: the side network adds what
    it adds without autocast, to the autocast's rounding, and generate runs."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=base_dtype)
    config = QSTConfig(task_type="CAUSAL_LM", r=4, side_dtype=side_dtype, copy_heads=copy_heads)
    model = get_peft_model(base, config)
    train_steps(model, IDS, steps=3)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=autocast_dtype):  # first: the side weights are packed under it
            added_under_autocast = model(input_ids=IDS).logits.float()
            with model.disable_adapter():
                added_under_autocast -= model(input_ids=IDS).logits.float()
            generated = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4,
                                       do_sample=False)
        added = model(input_ids=IDS).logits.float()
        with model.disable_adapter():
            added -= model(input_ids=IDS).logits.float()
    assert added.abs().max() > 0.1  # the trained side network changes the logits
    torch.testing.assert_close(added_under_autocast, added, atol=1e-2, rtol=0)
    assert generated.shape == (2, IDS.shape[1] + 4)


def test_a_float16_checkpoint_evaluates_under_trainer_bf16(tiny_model_dir, tmp_path):
    """A model loaded in float16 (transformers loads a checkpoint saved in float16 so), trained with
    Trainer(bf16=True) on the CPU (TRL's SFTConfig default): training ran, but evaluate() (eval mode, no gradients:
    the fast path, under the bf16 autocast accelerate wraps the forward in) failed on the float16 hidden states."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    rows = Dataset.from_list([{"input_ids": ids.tolist(), "labels": ids.tolist()} for ids in IDS])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float16)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    args = TrainingArguments(str(tmp_path), bf16=True, use_cpu=True, max_steps=2, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows)
    trainer.train()
    assert math.isfinite(trainer.evaluate()["eval_loss"])


def test_bf16_side_parameters_that_start_at_a_constant_keep_their_updates(tiny_model_dir):
    """Norm weights start at 1 and the output gate at output_gate_init; stored in bf16, an AdamW update of 1e-3 on
    such a value is below bf16's resolution and would be lost. They are stored as offsets from their start
    (ConstantOffset), which bf16 resolves: every one of them keeps its updates, as the matrices do."""
    from torch.nn.utils import parametrize

    from peft_qst.side import ConstantOffset

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, side_gate_init=0.9))
    side = model.base_model.model.model.qst_side["default"]
    offsets = {
        name: module.parametrizations[attr].original
        for name, module in side.named_modules()
        if parametrize.is_parametrized(module)
        for attr in module.parametrizations
        if isinstance(module.parametrizations[attr][0], ConstantOffset)
    }
    # the side trunk's norms (2 per block + final), the LayerNorm of each "adapter" downsampler (3 blocks + embeddings),
    # every block's gate (0.9 is not 0 in logit space), the output gate
    assert len(offsets) == (3 * 2 + 1) + (3 + 1) + 3 + 1, sorted(offsets)
    assert all(p.dtype == torch.bfloat16 and p.requires_grad and not p.any() for p in offsets.values())
    # a plain bf16 parameter equal to 1 keeps 1 under the same update: the failure this guards against
    assert torch.ones(1, dtype=torch.bfloat16).add_(-1e-3).item() == 1.0

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    model.train()
    for _ in range(5):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, offset in offsets.items():
        moved = (offset != 0).float().mean().item()
        assert moved > 0.9, f"{name}: only {moved:.0%} of its entries moved"
    # the value used in the forward is constant + offset, rounded to bf16 like every bf16 weight; the offset keeps
    # accumulating the updates until they show
    assert side.output_gate.weight.dtype == torch.bfloat16


def _downsampler_gradients_after_a_step(model) -> list[float]:
    """The largest gradient of each side block's downsampler and gate in the second step (the first moves only the
    upsample, which starts at zero)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    return [p.grad.abs().max().item() for n, p in model.named_parameters()
            if ".trunk.layers." in n and (".downsample." in n or "gate_logit" in n)]


def test_gate_inits_that_the_side_dtype_turns_into_refused_values_are_refused(tiny_model_dir):
    """QSTConfig checks side_gate_init in (0, 1) and a finite, nonzero output_gate_init as numbers; the side network
    computes them in its dtype. side_gate_init=0.999 is a sigmoid gate of exactly 1 in bf16, the default side dtype of
    a 4-bit model with bf16 compute: the side blocks never read the backbone blocks' outputs, and their gates and
    downsamplers got no gradient while training ran on without a word. output_gate_init=1e5 is inf in float16 (NaN
    outputs from the start), 1e-8 is 0 there (the saddle point output_gate_init=0 is refused for). get_peft_model and
    add_adapter refuse them before the model changes, naming the dtype and the fix; with side_dtype="float32" the
    same gate trains."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    with pytest.raises(ValueError, match=r"side_gate_init=0\.999 is 1 in the side network's dtype \(bfloat16\).*"
                                         r"<= 0\.99609375 for bfloat16.*side_dtype=\"float32\""):
        get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, side_gate_init=0.999))
    assert not any(type(m).__name__ == "QSTLayer" for m in base.modules())

    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, side_gate_init=0.999, side_dtype="float32"))
    gradients = _downsampler_gradients_after_a_step(model)
    assert gradients and all(g > 0 for g in gradients), gradients

    for value, shown in ((1e5, "inf"), (1e-8, "0")):
        with pytest.raises(ValueError, match=rf"output_gate_init={value!r} is {shown} in the side network's dtype "
                                             r"\(float16\).*between 6\.10352e-05 and 65504 for float16"):
            model.add_adapter("other", QSTConfig(task_type="CAUSAL_LM", r=4, side_dtype="float16",
                                                 output_gate_init=value))
        assert list(model.peft_config) == ["default"]
    # what the dtype keeps is accepted: bf16 resolves 0.99 below 1
    model.add_adapter("other", QSTConfig(task_type="CAUSAL_LM", r=4, side_gate_init=0.99))
    model.set_adapter("other")
    gradients = _downsampler_gradients_after_a_step(model)
    assert gradients and all(g > 0 for g in gradients), gradients


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_weights_a_trainer_kept_in_float32_reload_in_float32(tiny_model_dir, tmp_path, low_cpu_mem_usage):
    """TRL's ORPO and CPO trainers (``peft_module_casting_to_bf16``, under ``bf16=True`` on a 4-bit model) cast every
    module named ``norm`` to float32: the side network's norms and the downsamplers' LayerNorms train in float32 beside
    the bf16 rest, and are saved so. Reloaded onto the same 4-bit model with side_dtype unset they keep float32, so the
    side network is the trained one bit for bit (rounded to bf16, the reload's logits were 0.004 off after three
    steps); the rest keeps the rule's bf16. Onto an fp32 model the rule gives float32 throughout, as for any adapter."""
    from trl.experimental.utils import peft_module_casting_to_bf16

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    peft_module_casting_to_bf16(model)
    # the frozen embeddings and LM head the same function casts to bf16: given back, so that only the side network
    # differs between the trained and the reloaded model (a LoRA adapter does not reload those casts either)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    model.get_input_embeddings().weight.data = fresh.get_input_embeddings().weight.data.clone()
    model.get_output_embeddings().weight.data = fresh.get_output_embeddings().weight.data.clone()
    trained = {n: p for n, p in model.named_parameters() if ".qst_side." in n}
    kept = {n for n, p in trained.items() if p.dtype == torch.float32}
    assert kept and any(".norm." in n for n in kept) and {p.dtype for p in trained.values()} == {
        torch.bfloat16, torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_steps(model, IDS, lr=1e-2)
    model.save_pretrained(tmp_path)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=IDS).logits

    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config()), tmp_path,
        low_cpu_mem_usage=low_cpu_mem_usage,
    ).eval()
    loaded = {n: p for n, p in reloaded.named_parameters() if ".qst_side." in n}
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = reloaded(input_ids=IDS).logits
        assert torch.equal(got, expected), (got - expected).abs().max()
    different = [n for n, p in trained.items() if not torch.equal(p.detach(), loaded[n].detach())]
    assert not different, different
    assert {n for n, p in loaded.items() if p.dtype == torch.float32} == kept
    with torch.no_grad():
        assert torch.isfinite(reloaded(input_ids=IDS).logits).all()  # and it runs without autocast

    onto_fp32 = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage
    )
    assert {p.dtype for n, p in onto_fp32.named_parameters() if ".qst_side." in n} == {torch.float32}

    # loaded again into the trained adapter itself, as Trainer(resume_from_checkpoint=...) does: it stays as it trains
    model.load_adapter(tmp_path, adapter_name="default", is_trainable=True, low_cpu_mem_usage=low_cpu_mem_usage)
    resumed = {n: p for n, p in model.named_parameters() if ".qst_side." in n}
    assert {n for n, p in resumed.items() if p.dtype == torch.float32} == kept
    assert all(torch.equal(p.detach(), loaded[n].detach()) for n, p in resumed.items())


def test_weights_kept_in_float32_run_on_the_general_path_without_autocast(tiny_model_dir, tmp_path):
    """An adapter whose norms a trainer kept in float32 beside its bf16 side network (TRL's ORPO and CPO) reloads so;
    they trained under the trainer's autocast. Without one, the general path (a forward with gradients, training mode,
    a static cache) fed a float32 norm's output to a bf16 Linear and failed ("expected m1 and m2 to have the same
    dtype"), where the all-bf16 reload of earlier versions ran; it now runs the side network under autocast, as it
    trained, and gives the fast path's result up to bf16 rounding."""
    from trl.experimental.utils import peft_module_casting_to_bf16

    from peft_qst.fast_path import fast_path_disabled

    def bf16_base():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)

    model = get_peft_model(bf16_base(), QSTConfig(task_type="CAUSAL_LM", r=4))
    peft_module_casting_to_bf16(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_steps(model, IDS, lr=1e-2)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(bf16_base(), tmp_path, is_trainable=True).eval()
    assert {p.dtype for n, p in reloaded.named_parameters() if ".qst_side." in n} == {torch.bfloat16, torch.float32}
    with torch.no_grad():
        fast = reloaded(input_ids=IDS).logits
    with fast_path_disabled(), torch.no_grad():
        general = reloaded(input_ids=IDS).logits
    torch.testing.assert_close(general.float(), fast.float(), atol=1e-2, rtol=0)
    out = reloaded.generate(input_ids=IDS, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert out.shape == (2, 11)
    reloaded.train()
    loss = reloaded(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.dtype == torch.float32 for p in reloaded.parameters() if p.requires_grad)


OTHER_HALF = {"bfloat16": torch.float16, "float16": torch.bfloat16}


def _autocast_steps(model, autocast_dtype, steps: int = 3) -> list[float]:
    """``train_steps`` under a CPU autocast, with the gradient scaler's sequence where it is float16 (as accelerate
    runs ``Trainer(fp16=True)``) and the side network is not (the scaler refuses float16 gradients). AdamW's eps is
    one float16 resolves: its default 1e-8 rounds to 0 there, and a squared gradient that underflows gave inf."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, eps=1e-4)
    scaling = autocast_dtype == torch.float16 and all(p.dtype != torch.float16 for p in params)
    scaler = torch.amp.GradScaler("cpu", enabled=scaling)
    model.train()
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=autocast_dtype):
            loss = model(input_ids=IDS, labels=IDS).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("side_dtype", list(OTHER_HALF), ids=["bf16-side-fp16-autocast", "fp16-side-bf16-autocast"])
@pytest.mark.parametrize("base", ["fp32", "nf4-bf16-compute", "nf4-fp16-compute", "gpt2-fp32"])
def test_training_under_autocast_to_the_other_half_dtype(tiny_model_dir, side_dtype, base):
    """A bf16 side network (TRL casts a 4-bit model's to bf16) under a float16 CPU autocast (Trainer(fp16=True)'s on
    an accelerator), and a float16 one under bf16 autocast (Trainer(bf16=True)'s): every training step failed in the
    downsampler's LayerNorm ("mixed dtype (CPU): expect parameter to have scalar type of Float"), CPU autocast handing
    it the other half dtype's input beside its own half weights, and so did evaluation and generate off the fast
    path. The side network now computes as under the autocast to its own dtype: for the same hidden states, bit for
    bit; the model's loss, gradients and logits follow those under the matching autocast within the backbone's
    rounding to the other half dtype. GPT-2's side blocks have LayerNorms of their own, which failed alike."""
    from peft_qst.fast_path import fast_path_disabled

    from .conftest import tiny_causal_lm
    from .test_training_graph import qst_layer

    autocast_dtype, own_dtype = OTHER_HALF[side_dtype], getattr(torch, side_dtype)
    if base == "gpt2-fp32":
        base_model = tiny_causal_lm("gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=128, n_positions=64)
    else:
        kwargs = {"fp32": dict(dtype=torch.float32)}.get(base) or dict(
            quantization_config=bnb_config(compute_dtype=torch.bfloat16 if "bf16" in base else torch.float16)
        )
        base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs)
    model = get_peft_model(base_model, QSTConfig(task_type="CAUSAL_LM", r=4, side_dtype=side_dtype))
    side = qst_layer(model).qst_side["default"].train()
    torch.manual_seed(1)
    hidden = tuple(torch.randn(2, IDS.shape[1], 64) for _ in range(4))
    outputs = {}
    for dtype in (autocast_dtype, own_dtype):
        torch.manual_seed(2)  # the same dropout (GPT-2's side blocks keep its 0.1)
        with torch.autocast("cpu", dtype=dtype):
            outputs[dtype] = side(hidden)[0]
    assert outputs[autocast_dtype].dtype == own_dtype
    assert torch.equal(outputs[autocast_dtype], outputs[own_dtype])

    losses = _autocast_steps(model, autocast_dtype)
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    # the trained model in training mode (the general path), then in eval mode, under each autocast
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    loss, grads = {}, {}
    for dtype in (autocast_dtype, own_dtype):
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=dtype):
            loss[dtype] = model(input_ids=IDS, labels=IDS).loss
        grads[dtype] = torch.autograd.grad(loss[dtype], list(params.values()))
    torch.testing.assert_close(loss[autocast_dtype], loss[own_dtype], atol=1e-2, rtol=0)
    for name, grad, expected in zip(params, grads[autocast_dtype], grads[own_dtype]):
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad.float(), expected.float(), atol=0.05 * expected.abs().max().item() + 1e-6,
                                   rtol=0, msg=name)
    model.eval()
    with torch.no_grad(), fast_path_disabled(), torch.autocast("cpu", dtype=own_dtype):
        expected_logits = model(input_ids=IDS).logits.float()
        with model.disable_adapter():
            assert (model(input_ids=IDS).logits.float() - expected_logits).abs().max() > 0.1  # the side network counts
    for fast in (False, True):
        with torch.no_grad(), (nullcontext() if fast else fast_path_disabled()):
            with torch.autocast("cpu", dtype=autocast_dtype):
                logits = model(input_ids=IDS).logits.float()
                # min_new_tokens: the tiny random model's greedy tokens may reach its end-of-sequence token early (in
                # both rows on an AVX2-only CPU), which ends generate there
                generated = model.generate(input_ids=IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=4,
                                           min_new_tokens=4, do_sample=False)
        torch.testing.assert_close(logits, expected_logits, atol=4e-2, rtol=0)
        assert generated.shape == (2, IDS.shape[1] + 4)


def test_trainer_bf16_trains_and_evaluates_a_float16_side_network(tiny_model_dir, tmp_path):
    """Trainer(bf16=True) on the CPU (accelerate's bf16 autocast; TRL's SFTConfig default) with a float16 side network
    (``side_dtype="float16"``) on a 4-bit base computing in float16: train() failed at its first step ("mixed dtype
    (CPU): expect parameter to have scalar type of Float"), and so did evaluate() off the fast path. (Trainer(fp16=True)
    runs no autocast on the CPU: accelerate enables its float16 mixed precision on accelerators only.)"""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from peft_qst.fast_path import fast_path_disabled

    from .test_training_graph import qst_layer

    rows = Dataset.from_list([{"input_ids": ids.tolist(), "labels": ids.tolist()} for ids in IDS])
    fp16_compute = bnb_config(compute_dtype=torch.float16)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=fp16_compute)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, side_dtype="float16"))
    autocasts = set()
    qst_layer(model).qst_side["default"].register_forward_pre_hook(
        lambda *_: autocasts.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(str(tmp_path), bf16=True, use_cpu=True, max_steps=2, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", disable_tqdm=True, learning_rate=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows)
    assert math.isfinite(trainer.train().training_loss)
    assert autocasts == {torch.bfloat16}  # the mixed precision's autocast, the other half dtype
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    with fast_path_disabled():
        assert math.isfinite(trainer.evaluate()["eval_loss"])


def test_recommended_compute_dtype_on_this_cpu():
    """bfloat16 where bitsandbytes finds AVX512-BF16 (its native kernels), float32 on other CPUs, where bfloat16 is
    emulated (docs/performance.md); the default device is the CPU when torch sees no GPU."""
    from bitsandbytes.functional import has_avx512bf16

    expected = torch.bfloat16 if has_avx512bf16() else torch.float32
    assert recommended_compute_dtype("cpu") == recommended_compute_dtype(torch.device("cpu")) == expected
    if not torch.cuda.is_available():
        assert recommended_compute_dtype() == expected


@pytest.mark.parametrize("native", [True, False])
def test_recommended_compute_dtype_follows_the_cpus_bfloat16_support(monkeypatch, native):
    import bitsandbytes.functional

    monkeypatch.setattr(bitsandbytes.functional, "has_avx512bf16", lambda: native)
    assert recommended_compute_dtype("cpu") == (torch.bfloat16 if native else torch.float32)


def test_recommended_compute_dtype_refuses_what_it_cannot_answer():
    with pytest.raises(ValueError, match="'gpu0' is not a device.*pass 'cpu', 'cuda' or None"):
        recommended_compute_dtype("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' was asked for, but torch sees no GPU"):
            recommended_compute_dtype("cuda")


def test_recommended_compute_dtype_refuses_the_meta_device():
    """A model built on the meta device (init_empty_weights, a lazy load) has no compute device yet: the "other device
    types" answer, bfloat16, was wrong for the AVX2-only CPU it is then loaded on (float32 there)."""
    for device in ("meta", torch.device("meta")):
        with pytest.raises(ValueError, match="'meta' device holds no data.*pass the device the model will run on"):
            recommended_compute_dtype(device)


def test_recommended_compute_dtype_takes_a_gpu_index():
    """An int is a GPU index, as in device_map={"": 0}: cuda:N on a machine with a GPU, a clear error without one
    (it said "0 is not a device")."""
    if torch.cuda.is_available():
        assert recommended_compute_dtype(0) == recommended_compute_dtype("cuda:0")
    else:
        with pytest.raises(ValueError, match="device 0 is a GPU index, but torch sees no GPU.*pass 'cpu' or None"):
            recommended_compute_dtype(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_recommended_compute_dtype_answers_for_the_gpu_asked_for():
    """cuda:N is answered by GPU N's compute capability, not by the current device's (torch.cuda.is_bf16_supported()
    answers for the current device only), and a GPU that is not there is refused instead of answered for cuda:0."""
    count = torch.cuda.device_count()
    for index in range(count):
        native = torch.cuda.get_device_capability(index)[0] >= 8 or bool(torch.version.hip)
        expected = torch.bfloat16 if native else torch.float16
        assert recommended_compute_dtype(f"cuda:{index}") == recommended_compute_dtype(torch.device("cuda", index))
        assert recommended_compute_dtype(f"cuda:{index}") == expected
    with pytest.raises(ValueError, match=f"device 'cuda:{count}' was asked for, but torch sees {count} GPU"):
        recommended_compute_dtype(f"cuda:{count}")
