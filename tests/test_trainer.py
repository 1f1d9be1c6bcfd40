"""transformers' Trainer with a plain collator, resume_from_checkpoint and load_best_model_at_end on QST models."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from peft_qst import QSTConfig
from peft_qst.serialization import QSTAdapterFileError

from .conftest import tiny_causal_lm


def progression_rows(n: int = 24, length: int = 16, seed: int = 0) -> list[dict]:
    """Counting up from a random start (mod 128): a pattern the tiny model's side network learns in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, 128, (1,), generator=generator))
        ids = [(start + t) % 128 for t in range(length)]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def qst_model(seed: int = 0, **config):
    """The tiny random Llama (always the same weights) with a QST adapter whose side network is seeded by ``seed``."""
    base = tiny_causal_lm()
    torch.manual_seed(seed)
    return get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, **config))


def lora_model(seed: int = 0):
    base = tiny_causal_lm()
    torch.manual_seed(seed)
    return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))


def make_trainer(tmp_path, model, max_steps: int = 6, **overrides):
    from transformers import Trainer, TrainingArguments, default_data_collator

    settings = dict(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=3e-2,
                    logging_steps=1, save_strategy="steps", save_steps=3, report_to=[], use_cpu=True, seed=0,
                    disable_tqdm=True)
    settings.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=progression_rows(),
                   eval_dataset=progression_rows(8, seed=1), data_collator=default_data_collator)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_with_a_plain_collator_trains_only_the_side_network(tmp_path):
    model = qst_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, model, max_steps=12, save_strategy="no")
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1  # step-to-step noise is ~0.03
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter.detach(), before[name])
        assert changed == (".qst_side." in name) or (".qst_side." in name and not parameter.requires_grad), name
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if ".qst_side." in n)

    trainer.save_model(str(tmp_path / "final"))
    reloaded = PeftModel.from_pretrained(tiny_causal_lm(), str(tmp_path / "final")).eval()
    ids = torch.tensor([row["input_ids"] for row in progression_rows(2, seed=5)])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_evaluation_during_training_sees_the_current_weights(tmp_path):
    """With the Trainer's default optimizer (the fused AdamW, which leaves the parameters' version counters alone),
    every evaluation scores the weights of that moment: the eval losses move with training, and the last one equals
    a fresh evaluation through the general path."""
    from peft_qst.fast_path import fast_path_disabled

    model = qst_model()
    trainer = make_trainer(tmp_path, model, max_steps=9, save_strategy="no", eval_strategy="steps", eval_steps=3)
    assert trainer.args.optim == "adamw_torch_fused"
    first = trainer.evaluate()["eval_loss"]
    trainer.train()
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(losses) == 3 and len({first, *losses}) == 4 and losses[-1] < first, (first, losses)
    with fast_path_disabled():
        general = trainer.evaluate()["eval_loss"]
    assert abs(general - losses[-1]) < 1e-4


@pytest.mark.parametrize("method", ["qst", "lora"])
def test_resume_from_checkpoint_ends_at_the_same_weights(tmp_path, method):
    """6 steps straight, and 3 steps + resume_from_checkpoint to 6 starting from a differently initialised adapter,
    end at the same trainable weights (fp32 tiny model: equal up to float rounding). LoRA runs the same test."""
    build = qst_model if method == "qst" else lora_model
    straight = build(seed=0)
    make_trainer(tmp_path / "straight", straight).train()
    assert (tmp_path / "straight" / "checkpoint-3" / "adapter_model.safetensors").is_file()

    resumed = build(seed=1)
    other_start = trainable_state(resumed)
    assert any(not torch.equal(other_start[n], p) for n, p in trainable_state(build(seed=0)).items())
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    make_trainer(tmp_path / "resumed", resumed).train(resume_from_checkpoint=str(checkpoint))

    expected, got = trainable_state(straight), trainable_state(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_load_best_model_at_end_for_an_adapter_loaded_from_disk(tmp_path):
    """load_best_model_at_end reloads the best checkpoint into the adapter, also when training continues an adapter
    read with PeftModel.from_pretrained (whose config carries the digest of the file it was read from). The best
    checkpoint is made an early one (greater_is_better on a falling eval loss), so that reloading it is visible."""
    qst_model().save_pretrained(str(tmp_path / "start"))
    model = PeftModel.from_pretrained(tiny_causal_lm(), str(tmp_path / "start"), is_trainable=True)
    trainer = make_trainer(tmp_path / "run", model, eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                           metric_for_best_model="eval_loss", greater_is_better=True)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-3")
    saved = load_file(str(tmp_path / "run" / "checkpoint-3" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors"))
    state = {n.replace(".default.", ".", 1): p for n, p in trainable_state(model).items()}
    assert saved.keys() == state.keys()
    for key, tensor in saved.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0, msg=key)
    assert any(not torch.equal(last[key], saved[key]) for key in saved)


def test_load_best_model_at_end_reloads_the_trained_adapter_beside_default(tmp_path):
    """Training adapter "b" beside "default": the checkpoints hold "default" at their root and "b" in its subfolder,
    and transformers reloaded the root into "b", ending with "default"'s weights in "b". "b" must end as the best
    checkpoint's "b/", with "default" untouched."""
    model = qst_model()
    model.add_adapter("b", QSTConfig(task_type="CAUSAL_LM", r=4))
    model.set_adapter("b")
    default_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    trainer = make_trainer(tmp_path / "run", model, eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                           metric_for_best_model="eval_loss", greater_is_better=True)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-3")
    saved = load_file(str(tmp_path / "run" / "checkpoint-3" / "b" / "adapter_model.safetensors"))
    state = {n.replace(".b.", ".", 1): p for n, p in model.named_parameters() if ".qst_side.b." in n}
    assert saved.keys() == state.keys()
    for key, tensor in saved.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0, msg=key)
    assert all(torch.equal(p, default_before[n]) for n, p in model.named_parameters() if ".default." in n)
    assert model.active_adapters == ["b"] and all(".qst_side.b." in n for n in trainable_state(model))


def test_load_best_model_at_end_reloads_a_lone_adapter_not_named_default(tmp_path):
    """A model made with get_peft_model(..., adapter_name="b") saves nothing at the checkpoint's root, only "b/";
    transformers found no weights at the root, warned that it could not locate the best model and kept the last
    step's weights. "b" must end as the best checkpoint's "b/"."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=4), adapter_name="b")
    trainer = make_trainer(tmp_path / "run", model, eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                           metric_for_best_model="eval_loss", greater_is_better=True, save_only_model=True)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-3")
    assert not (tmp_path / "run" / "checkpoint-3" / "adapter_model.safetensors").exists()
    saved = load_file(str(tmp_path / "run" / "checkpoint-3" / "b" / "adapter_model.safetensors"))
    last = load_file(str(tmp_path / "run" / "checkpoint-6" / "b" / "adapter_model.safetensors"))
    state = {n.replace(".b.", ".", 1): p for n, p in model.named_parameters() if ".qst_side.b." in n}
    assert saved.keys() == state.keys()
    for key, tensor in saved.items():
        torch.testing.assert_close(state[key], tensor, rtol=0, atol=0, msg=key)
    assert any(not torch.equal(last[key], saved[key]) for key in saved)


def test_resume_from_a_checkpoint_of_another_configuration_fails_loudly(tmp_path):
    """Trainer resumes with load_adapter(..., is_trainable=True) and PEFT's strict=False; QST checks the key set itself,
    so a checkpoint saved from another QST configuration is refused instead of resuming from the wrong weights."""
    make_trainer(tmp_path / "adapter-downsample", qst_model(), max_steps=3).train()
    checkpoint = tmp_path / "adapter-downsample" / "checkpoint-3"
    other = qst_model(downsample="linear")
    before = trainable_state(other)
    with pytest.raises(QSTAdapterFileError, match="does not fit QST adapter 'default'.*nothing was loaded"):
        make_trainer(tmp_path / "resumed", other).train(resume_from_checkpoint=str(checkpoint))
    for name, tensor in trainable_state(other).items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer and chat template
def test_sft_resume_on_a_4bit_model_in_bf16_is_exact(tmp_path, smollm2_dir):
    """The QLoRA setting: a bitsandbytes 4-bit model under SFTTrainer's defaults (bf16, trainable parameters cast to
    bf16 by TRL, gradient checkpointing). 4 steps straight and 2 steps + resume_from_checkpoint (from another
    initialisation) end at bit-identical bf16 side weights. (PEFT's LoRA in the same setting ends about 1e-3 apart:
    load_adapter upcasts the resumed LoRA weights to float32, so the resumed run no longer trains in bf16.)"""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from .conftest import bnb_config
    from .test_trl import chat_rows

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tiny_causal_lm(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp_path / "base")

    def run(output_dir, seed, resume_from_checkpoint=None):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config())
        torch.manual_seed(seed)
        args = SFTConfig(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                         save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True)
        assert args.bf16 and args.gradient_checkpointing
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(chat_rows("messages", 16)),
                             processing_class=tokenizer, peft_config=QSTConfig(task_type="CAUSAL_LM", r=4))
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        return trainable_state(trainer.model)

    straight = run(tmp_path / "straight", seed=0)
    resumed = run(tmp_path / "resumed", seed=1, resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert {tensor.dtype for tensor in straight.values()} == {torch.bfloat16}
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
