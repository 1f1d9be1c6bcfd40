"""The Trainer's lifecycle around a QST model, LoRA as the control where it applies: load_best_model_at_end and
EarlyStoppingCallback (Trainer and SFTTrainer), the optimizers TrainingArguments names, train() twice, evaluate()
before training, save_model then AutoPeftModelForCausalLM, resume_from_checkpoint=True, and the card
Trainer.push_to_hub uploads. (tests/test_trainer.py has resume from a named checkpoint and load_best_model_at_end
for an adapter read from disk; tests/test_torch_compile.py has torch_compile=True.)"""

from __future__ import annotations

import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import AutoPeftModelForCausalLM, get_peft_model
from safetensors.torch import load_file

from peft_qst import QSTConfig
from peft_qst.fast_path import fast_path_disabled

from .conftest import TRAINER_RUN_IDS, tiny_causal_lm
from .test_trainer import make_trainer, qst_model, lora_model, trainable_state

BUILD = {"qst": qst_model, "lora": lora_model}


def eval_losses(trainer) -> list[tuple[int, float]]:
    return [(entry["step"], entry["eval_loss"]) for entry in trainer.state.log_history if "eval_loss" in entry]


def assert_holds_checkpoint(model, checkpoint: str) -> None:
    """The model's trainable weights are the checkpoint's adapter file, bit for bit."""
    saved = load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
    held = {name.replace(".default.", ".", 1): tensor for name, tensor in trainable_state(model).items()}
    assert saved.keys() == held.keys()
    for key, tensor in saved.items():
        assert torch.equal(held[key], tensor), key


@pytest.mark.parametrize("method", ["qst", "lora"])
def test_load_best_model_at_end_restores_the_best_checkpoint(tmp_path, method):
    """The best checkpoint is not the last one: after training the model holds its weights exactly,
    save_total_limit=1 kept it, evaluate() scores it (the inference fast path sees the reloaded weights), and the
    adapter is still trainable. The metric peaks at the second evaluation (step 6) whatever the losses do: whether an
    eval loss turns up again at a high learning rate depends on the CPU's rounding (LoRA's rose after its best on the
    AVX-512 machines and fell to the last step on an AVX2-only AMD EPYC)."""
    model = BUILD[method]()
    trainer = make_trainer(tmp_path, model, max_steps=12, eval_strategy="steps", eval_steps=3,
                           load_best_model_at_end=True, metric_for_best_model="peak", save_total_limit=1)
    evaluations = []

    def peaked_at_the_second_evaluation(_):
        evaluations.append(None)
        return {"peak": -abs(len(evaluations) - 2)}

    trainer.compute_metrics = peaked_at_the_second_evaluation
    trainer.train()
    losses = dict(eval_losses(trainer))
    assert sorted(losses) == [3, 6, 9, 12] and losses[6] != losses[12]  # the weights moved after the best
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-6")
    assert os.path.isdir(trainer.state.best_model_checkpoint)
    assert_holds_checkpoint(model, trainer.state.best_model_checkpoint)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(losses[6], abs=1e-6)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".qst_side." in n or "lora_" in n)


@pytest.mark.parametrize("method", ["qst", "lora"])
def test_early_stopping_stops_and_restores_the_best_checkpoint(tmp_path, method):
    """EarlyStoppingCallback ends the run after `patience` evaluations without improvement, long before max_steps,
    and load_best_model_at_end puts the best checkpoint's weights back."""
    from transformers import EarlyStoppingCallback

    model = BUILD[method]()
    trainer = make_trainer(tmp_path, model, max_steps=60, learning_rate=1.0, lr_scheduler_type="constant",
                           eval_strategy="steps", eval_steps=3, load_best_model_at_end=True,
                           metric_for_best_model="eval_loss")
    trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=2))
    trainer.train()
    losses = eval_losses(trainer)
    steps = [step for step, _ in losses]
    best_step = min(losses, key=lambda entry: entry[1])[0]
    assert trainer.state.global_step < 60 and steps[-1] == trainer.state.global_step
    assert steps[-3] == best_step  # stopped after two evaluations that did not improve on the best
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")
    assert_holds_checkpoint(model, trainer.state.best_model_checkpoint)


@pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer and chat template
def test_sft_load_best_model_at_end_on_a_4bit_model(tmp_path, smollm2_dir):
    """SFTTrainer with its defaults (bf16, trainable weights cast to bf16, gradient checkpointing) on a 4-bit model,
    evaluating and saving every 3 steps. The eval loss falls all along at this size, so the best checkpoint is made
    the first one with greater_is_better=True; after training the model holds its bf16 weights exactly, the other
    checkpoints were rotated away (save_total_limit=1), and evaluate() scores it."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from .conftest import bnb_config
    from .test_trl import chat_rows

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tiny_causal_lm(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config())
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=9, per_device_train_batch_size=4, learning_rate=0.5,
                     save_strategy="steps", save_steps=3, eval_strategy="steps", eval_steps=3, save_total_limit=1,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
                     report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(chat_rows("messages", 32)),
                         eval_dataset=Dataset.from_list(chat_rows("messages", 8, offset=100)),
                         processing_class=tokenizer, peft_config=QSTConfig(task_type="CAUSAL_LM", r=4))
    trainer.train()
    losses = dict(eval_losses(trainer))
    assert list(losses) == [3, 6, 9] and losses[3] > losses[9] + 0.5, losses
    assert trainer.state.best_model_checkpoint == str(tmp_path / "run" / "checkpoint-3")
    assert sorted(p for p in os.listdir(tmp_path / "run") if p.startswith("checkpoint-")) == ["checkpoint-3"]
    assert {tensor.dtype for tensor in trainable_state(trainer.model).values()} == {torch.bfloat16}
    assert_holds_checkpoint(trainer.model, trainer.state.best_model_checkpoint)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(losses[3], abs=1e-5)


@pytest.mark.parametrize(
    "optim, learning_rate",
    [("adafactor", 3e-2), ("sgd", 10.0), ("adamw_torch_fused", 3e-2), ("adamw_bnb_8bit", 3e-2),
     ("paged_adamw_8bit", 3e-2)],
)
def test_optimizers_step_the_side_network_only(tmp_path, optim, learning_rate):
    """Each optimizer holds exactly the side network's parameters, changes nothing else, and lowers the eval loss;
    the evaluations during training score the weights of their moment (equal to the general path afterwards). r=1
    makes the side blocks' MLP weights 8,192 values, above bitsandbytes' 4,096 threshold, so the 8-bit optimizers
    keep uint8 state for them (on the CPU too, with bitsandbytes 0.50)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_causal_lm(), QSTConfig(task_type="CAUSAL_LM", r=1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(tmp_path, model, max_steps=9, optim=optim, learning_rate=learning_rate, save_strategy="no",
                           eval_strategy="steps", eval_steps=9)
    initial = trainer.evaluate()["eval_loss"]
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    side = {id(p) for n, p in model.named_parameters() if ".qst_side." in n}
    assert stepped == side == {id(p) for p in model.parameters() if p.requires_grad}
    for name, parameter in model.named_parameters():
        if ".qst_side." not in name:
            assert torch.equal(parameter, before[name]), name
    if "8bit" in optim:
        assert any(v.dtype == torch.uint8 for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    (_, final), = eval_losses(trainer)
    assert final < initial - 0.05, (initial, final)
    with fast_path_disabled():
        assert trainer.evaluate()["eval_loss"] == pytest.approx(final, abs=1e-5)


def test_evaluate_before_training_train_twice_then_save_model_and_auto_peft(tmp_path, tiny_model_dir):
    """evaluate() before training scores the base model (the side network's output starts at zero); a second train()
    continues from the first run's weights (transformers keeps the optimizer, over the side network only, and makes a
    new scheduler) and lowers the eval loss further; save_model() writes an adapter that AutoPeftModelForCausalLM
    loads, in this process, to the same logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    trainer = make_trainer(tmp_path, model, max_steps=6, save_strategy="no")
    untrained = trainer.evaluate()["eval_loss"]
    with model.disable_adapter():
        assert trainer.evaluate()["eval_loss"] == pytest.approx(untrained, abs=1e-6)

    trainer.train()
    first_run = trainer.evaluate()["eval_loss"]
    after_first = trainable_state(model)
    trainer.train()
    second_run = trainer.evaluate()["eval_loss"]
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if ".qst_side." in n}
    assert any(not torch.equal(p, after_first[n]) for n, p in trainable_state(model).items())
    assert second_run < first_run < untrained, (untrained, first_run, second_run)

    trainer.save_model()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=TRAINER_RUN_IDS).logits,
                                   model.eval()(input_ids=TRAINER_RUN_IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["qst", "lora"])
def test_resume_from_checkpoint_true_restores_optimizer_and_scheduler(tmp_path, method):
    """resume_from_checkpoint=True picks the latest checkpoint in output_dir: resumed from step 3 (with another
    initialisation), the run ends with the straight run's weights, AdamW moments and scheduler state, exactly."""
    straight = BUILD[method](seed=0)
    straight_trainer = make_trainer(tmp_path / "straight", straight)
    straight_trainer.train()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed = BUILD[method](seed=1)
    resumed_trainer = make_trainer(tmp_path / "resumed", resumed)
    resumed_trainer.train(resume_from_checkpoint=True)

    assert resumed_trainer.state.global_step == 6
    expected, got = straight_trainer.optimizer.state_dict(), resumed_trainer.optimizer.state_dict()
    assert expected["state"].keys() == got["state"].keys()
    for index, state in expected["state"].items():
        for key, tensor in state.items():
            assert torch.equal(got["state"][index][key], tensor), (index, key)
    assert resumed_trainer.lr_scheduler.state_dict() == straight_trainer.lr_scheduler.state_dict()
    for name, tensor in trainable_state(straight).items():
        assert torch.equal(trainable_state(resumed)[name], tensor), name


def capture_uploads(monkeypatch, tmp_path) -> dict:
    """The Hub calls a trainer's push makes, replaced by ones that copy the folder it would upload to
    ``tmp_path / "uploaded"`` (before anything else changes it) and record the repository."""
    from transformers.utils import hub as transformers_hub

    api, uploaded = transformers_hub.hf_api(), {}

    def upload_folder(repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, tmp_path / "uploaded")
        uploaded["repo_id"] = repo_id
        return SimpleNamespace(commit_url=f"https://hub/{repo_id}/commit/0")

    monkeypatch.setattr(api, "create_repo", lambda repo_id, **kwargs: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(api, "upload_folder", upload_folder)
    return uploaded


def test_trainer_push_to_hub_uploads_the_card_with_the_loading_section(tmp_path, tiny_model_dir, monkeypatch):
    """Trainer.push_to_hub saves the model, then rewrites README.md with a training summary (create_model_card) and
    has PEFT put its fields back, then uploads the output folder. The uploaded card keeps QST's loading section (it
    was lost: QST wrote it in QSTConfig.save_pretrained only), next to PEFT's fields and the summary."""
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    trainer = make_trainer(tmp_path / "run", model, max_steps=2, save_strategy="no", hub_model_id="qst-user/run")
    trainer.train()
    uploaded = capture_uploads(monkeypatch, tmp_path)
    trainer.push_to_hub()

    assert uploaded["repo_id"] == "qst-user/run"
    card = ModelCard.load(str(tmp_path / "uploaded" / "README.md"))
    assert card.data.library_name == "peft" and card.data.base_model == tiny_model_dir
    assert {"qst", "peft-qst"} <= set(card.data.tags)
    assert "### Training hyperparameters" in card.text  # the training summary
    assert card.text.count("## How to load this QST adapter") == 1 and "import peft_qst" in card.text
    assert f'AutoModelForCausalLM.from_pretrained("{tiny_model_dir}"' in card.text


@pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer
def test_sft_trainer_push_to_hub_uploads_trls_card_with_peft_fields_and_the_loading_section(tmp_path, smollm2_dir,
                                                                                           monkeypatch):
    """SFTTrainer's create_model_card (TRL's own, which Trainer.push_to_hub writes over the saved card just before the
    upload) has library_name transformers and no word of peft_qst: the uploaded card of a QST adapter trained with TRL
    did not say how to load it. Within the push, PEFT's fields and QST's loading section follow TRL's card, whose
    text and tags stay."""
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    from .test_trl import chat_rows, tiny_sft_trainer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    trainer = tiny_sft_trainer(tmp_path / "run", tokenizer, chat_rows("messages", 8), max_steps=2,
                               per_device_train_batch_size=4, hub_model_id="qst-user/sft-run")
    trainer.train()
    uploaded = capture_uploads(monkeypatch, tmp_path)
    trainer.push_to_hub()

    assert uploaded["repo_id"] == "qst-user/sft-run"
    card = ModelCard.load(str(tmp_path / "uploaded" / "README.md"))
    assert "This model was trained with SFT" in card.text  # TRL's card, kept
    assert card.data.library_name == "peft"
    assert {"qst", "peft-qst", "sft", "trl"} <= set(card.data.tags)
    assert card.text.count("## How to load this QST adapter") == 1 and "import peft_qst" in card.text
    assert "create_model_card" not in vars(trainer)  # TRL's class is wrapped, not the instance


@pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer
def test_sft_trainer_create_model_card_after_save_model_keeps_the_loading_section(tmp_path, smollm2_dir):
    """Philipp Schmid's run_sft.py and the alignment handbook's run_sft.py call trainer.create_model_card() after
    trainer.save_model(): TRL's card (library_name transformers, a quick start that loads the folder with pipeline)
    replaced the folder's card, so a QST adapter's folder no longer said that loading needs import peft_qst, and its
    quick start failed with KeyError: 'QST' (a LoRA adapter's loads). The card now keeps TRL's text and tags and gets
    PEFT's fields and QST's loading section, once."""
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    from .test_trl import chat_rows, tiny_sft_trainer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    out = tmp_path / "run"
    trainer = tiny_sft_trainer(out, tokenizer, chat_rows("messages", 8), max_steps=2, per_device_train_batch_size=4)
    trainer.train()
    trainer.save_model(str(out))
    trainer.create_model_card(tags=["sft", "tutorial"])

    card = ModelCard.load(str(out / "README.md"))
    assert "This model was trained with SFT" in card.text  # TRL's card, kept
    assert card.data.library_name == "peft"
    assert {"qst", "peft-qst", "sft", "trl", "tutorial"} <= set(card.data.tags)
    assert card.text.count("## How to load this QST adapter") == 1 and "import peft_qst" in card.text
    trainer.create_model_card(tags=["sft", "tutorial"])  # again: still one section
    assert ModelCard.load(str(out / "README.md")).text.count("## How to load this QST adapter") == 1
    assert "create_model_card" not in vars(trainer)
