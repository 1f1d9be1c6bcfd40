"""QST on a CUDA device: a 4-bit backbone on the GPU, training with the Trainer's GPU options (bf16, gradient
checkpointing, paged 8-bit AdamW), saving and reloading, and generate's cache implementations that need CUDA
("offloaded", "offloaded_static").

These tests are skipped where torch sees no GPU (CI has none); they ran on the GPU machines some working sessions are
lent (README, "Tested versions"). Tiny random models: what matters here is the device plumbing, not learning.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_qst import QSTConfig

from .conftest import tiny_causal_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PROMPT = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21], [3, 9, 11, 12, 13, 40, 41, 42]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random LLaMA saved in bf16, which every test loads in 4-bit onto the GPU."""
    path = tmp_path_factory.mktemp("tiny-llama-bf16")
    tiny_causal_lm(hidden_size=128, intermediate_size=256, num_hidden_layers=4, vocab_size=256,
                   dtype=torch.bfloat16).save_pretrained(path)
    return str(path)


def load_4bit(path: str):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map={"": 0})


def test_training_on_the_gpu_keeps_the_backbone_frozen_and_reloads_identically(base_dir, tmp_path):
    """Forward, backward and AdamW on a 4-bit backbone on the GPU: the side network lives on the GPU, the backbone
    gets no gradients, the loss falls on a repeated batch, and the saved adapter reloads onto a fresh 4-bit base
    with the same logits."""
    from peft_qst.side import QSTSideNetwork

    torch.manual_seed(0)
    model = get_peft_model(load_4bit(base_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.device.type == "cuda" for p in trainable)
    side_networks = [m for m in model.modules() if isinstance(m, QSTSideNetwork)]
    assert side_networks
    assert all(t.device.type == "cuda" for side in side_networks for t in [*side.parameters(), *side.buffers()])
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    ids = PROMPT.cuda()
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        assert frozen_grads == []
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_4bit(base_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        actual = reloaded(input_ids=ids).logits
    assert actual.device.type == "cuda"
    torch.testing.assert_close(actual, expected)


@pytest.fixture(scope="module")
def trained(base_dir):
    """A QST model trained a few steps on the GPU, so that its side network changes the logits."""
    torch.manual_seed(0)
    model = get_peft_model(load_4bit(base_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    ids = PROMPT.cuda()
    model.train()
    for _ in range(10):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


@pytest.mark.parametrize("cache_implementation", ["offloaded", "offloaded_static", "static"])
def test_generate_with_gpu_cache_implementations_matches_uncached_forwards(trained, cache_implementation):
    """Caches that keep their layers on the CPU between steps ("offloaded", "offloaded_static"; torch refuses them
    without CUDA), and a static cache: every step's logits equal those of a full, uncached forward over the generated
    text, and every greedy token is that forward's argmax. With bf16 compute the kernels of a cached and an uncached
    forward round differently (measured on the CPU: at most 0.008 on logits of spread 0.27), hence the tolerance;
    the side network moves the logits far more than that (checked below), so a stale or missing side state fails."""
    ids = PROMPT.cuda()
    out = trained.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                           cache_implementation=cache_implementation, return_dict_in_generate=True, output_logits=True)
    steps = torch.stack(out.logits, 1).float()
    with torch.no_grad():
        full = trained(input_ids=out.sequences[:, :-1]).logits[:, ids.shape[1] - 1:].float()
        with trained.disable_adapter():
            base = trained(input_ids=out.sequences[:, :-1]).logits[:, ids.shape[1] - 1:].float()
    assert (full - base).abs().max() > 0.3  # the side network matters at this tolerance
    torch.testing.assert_close(steps, full, atol=0.03, rtol=0)
    chosen = full.gather(-1, out.sequences[:, ids.shape[1]:, None])[..., 0]
    assert (full.max(-1).values - chosen).max() <= 0.03


def test_trainer_with_bf16_checkpointing_and_paged_8bit_adamw(base_dir, tmp_path):
    """A QLoRA-style Trainer configuration on the GPU (bf16 autocast, gradient checkpointing, bitsandbytes' paged
    8-bit AdamW) trains QST, and the checkpoint it saves reloads into the trained model's logits."""
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    class Rows(Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            row = torch.arange(i, i + 12) % 200 + 1
            return {"input_ids": row, "labels": row}

    torch.manual_seed(0)
    model = get_peft_model(load_4bit(base_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3, bf16=True,
        gradient_checkpointing=True, optim="paged_adamw_8bit", logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows())
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and all(loss == loss for loss in losses)  # six finite losses
    assert result.global_step == 6
    trainer.save_model(str(tmp_path / "final"))
    ids = PROMPT.cuda()
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        actual = PeftModel.from_pretrained(load_4bit(base_dir), tmp_path / "final").eval()(input_ids=ids).logits
    # accelerate's bf16 mixed precision leaves the trained model's forward under autocast and returning float32 (as
    # with LoRA): the two forwards round differently, by about one bf16 step of the logits
    torch.testing.assert_close(actual.float(), expected.float(), atol=1e-2, rtol=0)
