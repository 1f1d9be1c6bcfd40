"""``torch.compile`` of a QST model computes what the eager model computes, and does not recompile at every step.

Compiled with the ``eager`` backend (Dynamo's tracing, guards and graph breaks, without Inductor's code generation),
which keeps these tests fast; Inductor was checked by hand (fp32 logits within 3e-7 of eager on the tiny Llama,
greedy tokens equal). QST keeps Python state beside the model (the inference fast path's packed weights, checked
against counters of optimizer steps and the parameters' sums; the low-rank LM-head backward, keyed by tensor
identity; the per-call state of its hooks): compiled code specialised on it recompiled after every optimizer step,
until Dynamo's recompile limit, or whenever another QST model or thread came along. Compiled code now takes the
general path and autograd's backward through the head, and reads the per-call state from the module it runs.
"""

from __future__ import annotations

import contextlib
import gc
import threading

import pytest
import torch
import torch._dynamo
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from peft_qst import QSTConfig

from .conftest import tiny_causal_lm

PAD = 0


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@contextlib.contextmanager
def no_recompiles():
    """Any recompilation of an already compiled frame raises (new frames may still compile)."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield


def qst_twins(seed: int = 0, layers: int = 1):
    """Two QST models with the same side weights, upsample open so that the side network changes the output."""
    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        base = tiny_causal_lm(num_hidden_layers=layers, pad_token_id=PAD)
        model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
        model.generation_config.pad_token_id = PAD
        models.append(model)
    return models


def optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def test_compiled_model_trains_and_evaluates_as_eager_without_recompiling():
    ids = torch.randint(1, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    other = qst_twins(seed=5)[0]  # another QST model that has run
    other(input_ids=ids, labels=ids).loss.backward()
    eager, model = qst_twins()
    compiled = torch.compile(model, backend="eager")
    optimizers = optimizer(eager), optimizer(model)
    for step in range(5):
        # from the third step on, the compiled frames must be reused: an eval forward after each optimizer step once
        # recompiled the side network (Dynamo guarded the fast path's optimizer-step counter and weight sums), and the
        # LM-head hook recompiled at every training step (it guarded the identity of the hidden-state tensor)
        with no_recompiles() if step >= 2 else contextlib.nullcontext():
            for twin in (eager, model):
                twin.train()
            eager(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
            compiled(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
            # (the eager twin back-propagates through the LM head in low rank, compiled code through autograd's own)
            for (name, p_eager), p_compiled in zip(eager.named_parameters(), model.parameters()):
                if p_eager.requires_grad:
                    torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-5, atol=1e-6, msg=name)
                else:
                    assert p_compiled.grad is None, name  # nothing flows into the frozen backbone
            for opt in optimizers:
                opt.step()
                opt.zero_grad()
            for twin in (eager, model):
                twin.eval()
            with torch.no_grad():  # the eager twin takes the inference fast path; compiled code the general path
                expected = eager(input_ids=ids, attention_mask=mask).logits
                torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).logits, expected,
                                           rtol=1e-5, atol=1e-5)

    # The per-call state (hidden states handed from the backbone's hooks to the side network) was kept in one
    # process-wide weak table of modules, and compiled code was specialised on the whole table: another QST model
    # freed or created recompiled it (and one freed by the garbage collector while Dynamo read the table failed the
    # compilation: "dictionary changed size during iteration"); so did a new thread for generation.
    results = {}

    def in_a_thread():
        try:
            with torch.no_grad():
                results["logits"] = compiled(input_ids=ids, attention_mask=mask).logits
        except Exception as error:  # noqa: BLE001 - re-raised in the test's thread
            results["error"] = error

    with no_recompiles():
        del other
        gc.collect()
        third = qst_twins(seed=6)[0]
        third(input_ids=ids, labels=ids).loss.backward()
        thread = threading.Thread(target=in_a_thread)
        thread.start()
        thread.join()
        if "error" in results:
            raise results["error"]
        with torch.no_grad():
            compiled_logits = compiled(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(results["logits"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(compiled_logits, expected, rtol=1e-5, atol=1e-5)


def test_training_step_compiles_to_one_graph_without_a_cache():
    """As for LoRA, ``fullgraph=True`` traces a training forward and backward whole, here with ``use_cache=False``
    (with a cache, the QSTCache pairing the backbone's and the side networks' caches is not traceable). The low-rank
    LM-head backward's lookup by tensor identity was a graph break it could not trace."""
    eager, model = qst_twins(seed=7)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    ids = torch.randint(1, 128, (2, 8), generator=torch.Generator().manual_seed(3))
    for twin in (eager, model):
        twin.train()
    expected = eager(input_ids=ids, labels=ids, use_cache=False).loss
    expected.backward()
    loss = compiled(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), model.parameters()):
        if p_eager.requires_grad:
            torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert p_compiled.grad is None, name


def test_generate_with_compiled_forward_matches_eager_after_training_steps():
    eager, model = qst_twins(seed=3)
    hf_model = model.get_base_model()
    hf_model.forward = torch.compile(hf_model.forward, backend="eager")
    ids = torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = PAD, 0  # left padding
    optimizers = optimizer(eager), optimizer(model)

    def train_step():
        for twin, opt in zip((eager, model), optimizers):
            twin.train()
            twin(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
            twin.eval()

    def same_tokens(**kwargs):
        expected = eager.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kwargs)
        got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **kwargs)
        assert torch.equal(got, expected)

    for twin in (eager, model):
        twin.eval()
    same_tokens()
    train_step()  # compiles the training frames
    same_tokens()
    with no_recompiles():  # each optimizer step recompiled the side network's frames of a generation step
        for _ in range(2):
            train_step()
            same_tokens()


def test_trainer_torch_compile_trains_saves_and_reloads(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    base_dir = tmp_path / "base"
    tiny_causal_lm(num_hidden_layers=1, pad_token_id=PAD).save_pretrained(base_dir)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 128, (12,), generator=generator).tolist() for _ in range(16)]
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})

    class NoRecompilesAfterWarmUp(TrainerCallback):
        def __init__(self):
            self.patch = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2 and args.torch_compile:
                # the LM-head hook recompiled at every step, up to Dynamo's recompile limit
                self.patch = torch._dynamo.config.patch(error_on_recompile=True)
                self.patch.__enter__()

        def on_train_end(self, args, state, control, **kwargs):
            if self.patch is not None:
                self.patch.__exit__(None, None, None)

    def train(compile_: bool):
        torch.manual_seed(1)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), QSTConfig(task_type="CAUSAL_LM"))
        args = TrainingArguments(
            output_dir=str(tmp_path / f"run-{compile_}"), per_device_train_batch_size=4, max_steps=6,
            learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
            data_seed=0, disable_tqdm=True, torch_compile=compile_, torch_compile_backend="eager" if compile_ else None,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[NoRecompilesAfterWarmUp()])
        trainer.train()
        return trainer

    eager, compiled = train(False), train(True)
    assert type(compiled.model_wrapped).__name__ == "OptimizedModule"
    eager_losses = [h["loss"] for h in eager.state.log_history if "loss" in h]
    compiled_losses = [h["loss"] for h in compiled.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(compiled_losses)))
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)

    save = tmp_path / "adapter"
    compiled.save_model(str(save))
    with safe_open(str(save / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "_orig_mod" in k or "default" in k]
    ids = torch.tensor(rows[:2])
    with torch.no_grad():
        trained = compiled.model.eval()(input_ids=ids).logits
        expected = eager.model.eval()(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(save)).eval()
        torch.testing.assert_close(trained, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=0, atol=0)
        with reloaded.disable_adapter():
            assert (reloaded(input_ids=ids).logits - trained).abs().max() > 1e-3  # the adapter was trained


def test_a_base_model_wrapped_by_torch_compile_is_refused_with_the_order_that_works(tmp_path, tiny_model_dir):
    """``get_peft_model(torch.compile(model), config)`` built the adapter inside the wrapper and saved its keys as
    ``base_model.model._orig_mod.model.qst_side...``, which an uncompiled base model (the way an adapter is loaded) does
    not have: loading it was refused as "target_modules='_orig_mod\\\\.model' matches no module ... leave it None",
    a field the caller had left None, and the trained adapter was out of reach. Loading an adapter onto a compiled
    base failed alike. Both are refused before anything changes, naming the wrapper and the order that works."""
    from peft_qst.side import QSTUnsupportedModelError

    saved = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    saved.save_pretrained(tmp_path)
    for attach in (lambda m: get_peft_model(m, QSTConfig(task_type="CAUSAL_LM", r=4)),
                   lambda m: PeftModel.from_pretrained(m, str(tmp_path))):
        compiled = torch.compile(AutoModelForCausalLM.from_pretrained(tiny_model_dir), backend="eager")
        modules = [name for name, _ in compiled.named_modules()]
        with pytest.raises(QSTUnsupportedModelError, match=r"wrapped by torch\.compile.*'_orig_mod\.'.*"
                           r"torch\.compile\(get_peft_model\(model, config\)\)"):
            attach(compiled)
        assert [name for name, _ in compiled.named_modules()] == modules and not hasattr(compiled, "peft_config")
