"""transformers Trainer options that meet QST's own code: gradient accumulation and label smoothing (QST's chunked loss
and the LM head's low-rank backward), NEFTune (its hook sits on the input embeddings, inside the frozen trunk), the
logits handed to compute_metrics / preprocess_logits_for_metrics / predict (QST's inference fast path), and
auto_find_batch_size retrying after an out-of-memory error raised in the side network's backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from peft_qst import QSTConfig, QSTLayer

from .conftest import tiny_causal_lm


def ragged_rows(n: int = 16, seed: int = 0) -> list[dict]:
    """Counting sequences of 4 to 16 tokens: padded batches hold different numbers of labelled tokens, so a loss
    averaged per micro-batch instead of over the whole accumulated batch would weight them wrongly."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 17, (1,), generator=generator))
        start = int(torch.randint(0, 128, (1,), generator=generator))
        ids = [(start + t) % 128 for t in range(length)]
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def pad_collator(features: list[dict]) -> dict:
    length = max(len(f["input_ids"]) for f in features)

    def padded(key, value):
        return torch.tensor([f[key] + [value] * (length - len(f[key])) for f in features])

    return {"input_ids": padded("input_ids", 0), "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", -100)}


def adapted_model(method: str):
    """The tiny Llama with an adapter whose output already counts (a zero upsample / lora_B would hide it)."""
    base = tiny_causal_lm()
    torch.manual_seed(0)
    if method == "qst":
        model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
        names = ("upsample",)
    else:
        model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        names = ("lora_B",)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(n in name for n in names):
                parameter.normal_(std=0.3)
    return model


def make_trainer(tmp_path, model, trainer_class=None, **overrides):
    from transformers import Trainer, TrainingArguments

    settings = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, learning_rate=0.1,
                    optim="sgd", lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=True, seed=0, disable_tqdm=True)
    metrics = {k: overrides.pop(k) for k in ("compute_metrics", "preprocess_logits_for_metrics") if k in overrides}
    settings.update(overrides)
    return (trainer_class or Trainer)(model=model, args=TrainingArguments(**settings), train_dataset=ragged_rows(),
                                      data_collator=pad_collator, **metrics)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["qst", "lora"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_gradient_accumulation_equals_one_batch(tmp_path, method, label_smoothing):
    """One SGD step on a batch of 8 ragged rows, and the same step as 4 accumulated micro-batches of 2: the Trainer
    passes num_items_in_batch, and QST's chunked loss (or the label smoother on its logits) divides by it, so the
    logged loss and the update are the same. LoRA runs the same test."""
    updates, losses = [], []
    for batch, steps in ((8, 1), (2, 4)):
        model = adapted_model(method)
        before = trainable_state(model)
        trainer = make_trainer(tmp_path / f"{batch}", model, per_device_train_batch_size=batch,
                               gradient_accumulation_steps=steps, label_smoothing_factor=label_smoothing)
        trainer.train()
        updates.append({n: p - before[n] for n, p in trainable_state(model).items()})
        losses.append(next(e["loss"] for e in trainer.state.log_history if "loss" in e))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    scale = max(u.abs().max().item() for u in updates[0].values())
    assert scale > 1e-3
    for name, update in updates[0].items():
        torch.testing.assert_close(updates[1][name], update, rtol=0, atol=1e-5 * scale, msg=name)


def test_neftune_noise_reaches_the_side_network_in_training_only(tmp_path):
    """NEFTune's hook sits on the input embeddings, inside the frozen trunk: in training two forwards of the same ids
    differ (the side network reads the noisy embedding output), in eval mode and after training they do not."""
    from transformers import Trainer

    model = adapted_model("qst")
    ids = torch.tensor([row["input_ids"][:4] for row in ragged_rows(4, seed=3)])
    model.eval()
    with torch.no_grad():
        clean = model(input_ids=ids).logits
    seen = {}

    class Probe(Trainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            with torch.no_grad():
                seen["training"] = (model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
                with model.disable_adapter():
                    seen["base"] = (model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
            return super().compute_loss(model, inputs, *args, **kwargs)

    make_trainer(tmp_path, model, trainer_class=Probe, neftune_noise_alpha=5.0, optim="adamw_torch",
                 learning_rate=0.0).train()
    assert seen["training"] > 1e-2 and seen["base"] > 1e-2, seen
    for mode in ("eval", "train"):  # the hook is gone after train()
        getattr(model, mode)()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, clean, rtol=1e-5, atol=1e-5)


def test_metrics_and_predict_get_the_adapted_models_logits(tmp_path):
    """evaluate(prediction_loss_only=False) hands compute_metrics the adapted model's logits (QST's inference fast
    path, padded across batches of 3 rows), preprocess_logits_for_metrics gets the same logits, and predict returns
    them: all equal the general path's logits of each row alone."""
    from peft_qst.fast_path import fast_path_disabled

    model = adapted_model("qst")
    rows = ragged_rows(7, seed=5)
    got = {}

    def compute_metrics(prediction):
        got["predictions"] = prediction.predictions
        return {"rows": float(len(prediction.predictions))}

    trainer = make_trainer(tmp_path, model, compute_metrics=compute_metrics, prediction_loss_only=False,
                           per_device_eval_batch_size=3)
    model.eval()
    with torch.no_grad(), fast_path_disabled():
        expected = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0].numpy() for r in rows]
        with model.disable_adapter():
            base = model(input_ids=torch.tensor([rows[0]["input_ids"]])).logits[0].numpy()
    assert np.abs(base - expected[0]).max() > 0.1  # the adapter is in what is compared

    def assert_rows(predictions, reference):
        assert predictions.shape[0] == len(rows) and predictions.shape[1] == max(len(r["input_ids"]) for r in rows)
        for i, row in enumerate(rows):
            np.testing.assert_allclose(predictions[i, : len(row["input_ids"])], reference[i], rtol=1e-5, atol=1e-5)

    assert trainer.evaluate(rows)["eval_rows"] == len(rows)
    assert_rows(got["predictions"], expected)
    assert got["predictions"].shape[2] == 128

    trainer.preprocess_logits_for_metrics = lambda logits, labels: logits.argmax(-1)
    trainer.evaluate(rows)
    assert_rows(got["predictions"], [e.argmax(-1) for e in expected])

    trainer.preprocess_logits_for_metrics = None
    assert_rows(trainer.predict(rows).predictions, expected)


def test_auto_find_batch_size_retries_after_an_out_of_memory_error_in_backward(tmp_path):
    """An out-of-memory error raised while the side network's gradients are computed (batches over 2 rows here)
    makes auto_find_batch_size halve the batch and start again; the retried run ends at the weights a run with that
    batch size from the start reaches, and no QST state of the failed step is left behind."""
    from peft_qst.per_call import call_state

    results = {}
    for start in (8, 2):
        model = adapted_model("qst")
        before = trainable_state(model)
        layer = next(m for m in model.modules() if isinstance(m, QSTLayer))

        def out_of_memory_in_backward(_module, args):
            if args[0].shape[0] > 2 and torch.is_grad_enabled():
                args[0].register_hook(lambda grad: (_ for _ in ()).throw(RuntimeError("CUDA out of memory.")))

        layer.qst_side["default"].upsample.register_forward_pre_hook(out_of_memory_in_backward)
        trainer = make_trainer(tmp_path / str(start), model, auto_find_batch_size=True, max_steps=2,
                               per_device_train_batch_size=start, gradient_checkpointing=True)
        trainer.train()
        assert trainer._train_batch_size == 2
        results[start] = {n: p - before[n] for n, p in trainable_state(model).items()}
        assert all(value is None for value in call_state(layer).values())
    for name, update in results[2].items():
        torch.testing.assert_close(results[8][name], update, rtol=0, atol=1e-7, msg=name)
