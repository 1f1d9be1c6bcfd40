"""The one-line swap in TRL: SFTTrainer(peft_config=QSTConfig(...)) with SFTConfig's defaults trains and reports."""

from __future__ import annotations

import pytest
import torch

from peft_qst import QSTConfig, QSTLayer

from .conftest import tiny_causal_lm


@pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer and chat template
def test_sft_trainer_with_qst_config(tmp_path, smollm2_dir):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = tiny_causal_lm(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    data = Dataset.from_list(
        [{"messages": [{"role": "user", "content": f"Repeat {i}"}, {"role": "assistant", "content": f"{i} {i}"}]}
         for i in range(64)]
    )
    args = SFTConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3,
                     logging_steps=4, report_to=[], save_strategy="no", use_cpu=True, bf16=False)
    assert args.gradient_checkpointing  # SFTConfig's default stays on
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=QSTConfig(task_type="CAUSAL_LM", r=4))
    assert any(isinstance(m, QSTLayer) for m in trainer.model.modules())
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for key in ("loss", "entropy", "mean_token_accuracy", "num_tokens"):
        assert all(key in entry and torch.isfinite(torch.tensor(float(entry[key]))) for entry in logs), key
    assert logs[-1]["loss"] < logs[0]["loss"]
    side = {n: p for n, p in trainer.model.named_parameters() if ".qst_side." in n}
    assert side and all(p.requires_grad for p in side.values())
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".qst_side." not in n)
