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


def test_trl_sft_script_route_model_id_and_quantization_config(tmp_path, smollm2_dir):
    """TRL's own ``trl/scripts/sft.py`` hands SFTTrainer a model id and ``quantization_config=`` (SFTTrainer loads the
    model in 4-bit itself) with ``model_init_kwargs`` from its command line; with ``get_peft_config(model_args)``
    replaced by a QSTConfig, the trainer side-tunes the 4-bit model it loaded, and the saved adapter reloads onto the
    4-bit base with the trained side weights bit for bit."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from .conftest import bnb_config

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base_dir, out = tmp_path / "base", tmp_path / "out"
    tiny_causal_lm(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    args = SFTConfig(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=3e-3,
                     report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                     model_init_kwargs=dict(dtype=torch.bfloat16, attn_implementation=None))
    trainer = SFTTrainer(model=str(base_dir), args=args, train_dataset=Dataset.from_list(chat_rows("prompt", 12)),
                         quantization_config=bnb_config(), peft_config=QSTConfig(task_type="CAUSAL_LM", r=4))
    assert getattr(trainer.model.get_base_model(), "is_loaded_in_4bit", False)
    assert any(isinstance(m, QSTLayer) for m in trainer.model.modules())
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    trainer.save_model(str(out))
    trained = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(start[n], trained[n]) for n in trained)
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config(), dtype=torch.bfloat16), str(out)
    )
    loaded = dict(reloaded.named_parameters())
    assert all(torch.equal(loaded[n].float(), p.float()) for n, p in trained.items())


@pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer
@pytest.mark.parametrize("side_dtype", [None, "bfloat16"])
def test_peft_sft_example_float16_compute_resized_chatml_vocabulary(tmp_path, smollm2_dir, side_dtype):
    """PEFT's ``examples/sft`` (``create_and_prepare_model``): 4-bit with ``bnb_4bit_compute_dtype=float16`` (its
    default), ChatML special tokens added to the tokenizer and the embeddings resized with ``pad_to_multiple_of=8``
    before SFTTrainer, packing. SFTTrainer trains a bf16 side network; left None, ``side_dtype`` builds a float32 one
    on reload (float32 where the compute dtype is float16), so the same weights give logits within bf16 rounding;
    ``side_dtype="bfloat16"`` reloads, onto a base model the load resizes, the trained logits bit for bit."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from .conftest import bnb_config

    base_dir, out = tmp_path / "base", tmp_path / "out"
    tiny_causal_lm(vocab_size=len(AutoTokenizer.from_pretrained(smollm2_dir))).save_pretrained(base_dir)
    special = ["<|im_start|>user", "<|im_start|>assistant", "<|im_start|>system", "<|im_end|>", "<s>", "<pad>"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
                                              additional_special_tokens=special)
    quantization = bnb_config(compute_dtype=torch.float16)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    rows = [{"content": tokenizer.apply_chat_template(row["messages"], tokenize=False)}
            for row in chat_rows("messages", 12)]
    args = SFTConfig(output_dir=str(out), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True, packing=True,
                     dataset_text_field="content", max_length=64)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=QSTConfig(task_type="CAUSAL_LM", r=4, side_dtype=side_dtype))
    trainer.train()
    trainer.save_model(str(out))
    trained = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trained.values()} == {torch.bfloat16}  # TRL's cast, whatever side_dtype says
    ids = tokenizer.apply_chat_template(chat_rows("messages", 1)[0]["messages"], return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        expected = trainer.model.eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quantization)
        with pytest.warns(UserWarning, match="resized from 49152 to 49160 tokens"):
            reloaded = PeftModel.from_pretrained(base, str(out)).eval()
        logits = reloaded(input_ids=ids).logits
    loaded = dict(reloaded.named_parameters())
    assert all(torch.equal(loaded[n].float(), p.float()) for n, p in trained.items())
    if side_dtype is None:
        assert {loaded[n].dtype for n in trained} == {torch.float32}
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-2)
    else:
        assert {loaded[n].dtype for n in trained} == {torch.bfloat16}
        assert torch.equal(logits, expected)


# ----------------------------------------------------------------------------------------------------------------------
# What SFTTrainer reports, checked against the model's own logits
# ----------------------------------------------------------------------------------------------------------------------


def chat_rows(kind: str, n: int, offset: int = 0) -> list[dict]:
    """Generated chat data: plain conversations (``"messages"``) or conversational prompt/completion pairs."""
    rows = []
    for i in range(offset, offset + n):
        user = {"role": "user", "content": f"Repeat the number {i} twice."}
        answer = {"role": "assistant", "content": f"{i} {i}"}
        rows.append({"messages": [user, answer]} if kind == "messages" else {"prompt": [user], "completion": [answer]})
    return rows


def tiny_sft_trainer(tmp_path, tokenizer, train_rows, peft_config=None, eval_rows=None, **config):
    """SFTTrainer on the tiny random Llama (vocabulary of the real SmolLM2 tokenizer), fp32 on CPU."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = tiny_causal_lm(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    defaults = dict(output_dir=str(tmp_path), report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                    disable_tqdm=True, learning_rate=1e-2, logging_steps=1)
    args = SFTConfig(**{**defaults, **config})
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_rows),
                      eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None, processing_class=tokenizer,
                      peft_config=peft_config or QSTConfig(task_type="CAUSAL_LM", r=4))


def side_network(peft_model):
    return next(m for m in peft_model.modules() if isinstance(m, QSTLayer)).qst_side["default"]


def randomize_upsample(peft_model, seed: int = 1) -> None:
    """An untrained adapter returns the base model's output (zero upsample); a random one makes the side network count
    from the first step, so that a metric computed without it would differ."""
    torch.manual_seed(seed)
    with torch.no_grad():
        side_network(peft_model).upsample.weight.normal_(std=2.0)


def fit_side_network(peft_model, batch: dict, steps: int = 15, lr: float = 1e-2) -> None:
    """A few AdamW steps of the side network on ``batch``, so that the model predicts some tokens right (a random tiny
    model predicts none, and an accuracy of 0 would match anything)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    for _ in range(steps):
        logits = peft_model(**inputs).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def metrics_from_logits(model, batch: dict) -> dict:
    """Loss, entropy, top-1 accuracy over the labelled tokens, and the token count, from ``model(...).logits``."""
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits.float()[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    log_probs = logits.log_softmax(-1)
    token_log_probs = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return {
        "loss": -token_log_probs[mask].mean().item(),
        "entropy": -(log_probs.exp() * log_probs).sum(-1)[mask].mean().item(),
        "mean_token_accuracy": (logits.argmax(-1) == labels)[mask].float().mean().item(),
        "num_tokens": int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].shape[1],
    }


#: SmolLM2's ChatML template with the {% generation %} markers assistant_only_loss needs (the shipped one has none)
CHATML_WITH_GENERATION_MARKERS = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def collate_all(trainer, dataset) -> dict:
    return trainer.data_collator([dataset[i] for i in range(len(dataset))])


@pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer and chat template
@pytest.mark.parametrize(
    "kind, loss_on",
    [("messages", "all"), ("prompt-completion", "completion"), ("messages", "assistant")],
)
def test_sft_metrics_equal_the_models_logits(tmp_path, smollm2_dir, kind, loss_on):
    """loss, entropy, mean_token_accuracy and num_tokens as SFTTrainer logs them in training (one step, the whole data
    set in the batch) and in evaluation (eval_strategy="steps") equal what the QST model's own logits give on the same
    batch, for full-sequence, completion-only and assistant-only loss."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    if loss_on == "assistant":
        tokenizer.chat_template = CHATML_WITH_GENERATION_MARKERS
    trainer = tiny_sft_trainer(
        tmp_path, tokenizer, chat_rows(kind, 8), eval_rows=chat_rows(kind, 6, offset=100), max_steps=1,
        per_device_train_batch_size=8, per_device_eval_batch_size=6, eval_strategy="steps", eval_steps=1,
        assistant_only_loss=loss_on == "assistant",
    )
    train_batch = collate_all(trainer, trainer.train_dataset)
    eval_batch = collate_all(trainer, trainer.eval_dataset)
    fit_side_network(trainer.model, train_batch)
    labels = train_batch["labels"]
    tokens = int(train_batch["attention_mask"].sum())
    if loss_on == "all":
        assert int((labels != -100).sum()) == tokens
    else:  # the prompt (system + user turn) is left out of the loss
        assert 0 < int((labels != -100).sum()) < tokens / 2

    expected_train = metrics_from_logits(trainer.model, train_batch)
    with trainer.model.disable_adapter():
        base_train = metrics_from_logits(trainer.model, train_batch)
    assert abs(base_train["loss"] - expected_train["loss"]) > 0.1  # the side network is in what is measured
    assert 0.05 < expected_train["mean_token_accuracy"] < 0.95  # neither none nor all tokens right

    trainer.train()
    expected_eval = metrics_from_logits(trainer.model, eval_batch)  # the weights after the step, as eval saw them
    train_log = next(e for e in trainer.state.log_history if "loss" in e)
    eval_log = next(e for e in trainer.state.log_history if "eval_loss" in e)
    for key in ("loss", "entropy", "mean_token_accuracy"):
        assert train_log[key] == pytest.approx(expected_train[key], rel=1e-4, abs=1e-5), key
        assert eval_log[f"eval_{key}"] == pytest.approx(expected_eval[key], rel=1e-4, abs=1e-5), key
    assert train_log["num_tokens"] == expected_train["num_tokens"]
    assert 0.05 < expected_eval["mean_token_accuracy"] < 0.95


# ----------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing as TRL turns it on
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer and chat template
def test_trl_checkpointing_recomputes_side_blocks_not_the_backbone(tmp_path, smollm2_dir, monkeypatch):
    """With SFTConfig's default gradient_checkpointing=True, each side block runs twice per step (forward, then again
    in backward) and each backbone block once, without gradients: checkpointing costs nothing on the frozen trunk."""
    from transformers import AutoTokenizer
    from transformers.models.llama.modeling_llama import LlamaMLP

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    trainer = tiny_sft_trainer(tmp_path, tokenizer, chat_rows("messages", 8), max_steps=1,
                               per_device_train_batch_size=8)
    assert trainer.args.gradient_checkpointing
    calls = []
    original = LlamaMLP.forward

    def counting_forward(self, x):
        calls.append((id(self), torch.is_grad_enabled()))
        return original(self, x)

    monkeypatch.setattr(LlamaMLP, "forward", counting_forward)
    trainer.train()
    layer = next(m for m in trainer.model.modules() if isinstance(m, QSTLayer))
    backbone = [id(block.mlp) for block in layer.base_layer.layers]
    side = [id(block.block.mlp) for block in side_network(trainer.model).trunk.layers]
    for mlp in backbone:
        assert [grad for m, grad in calls if m == mlp] == [False]
    for mlp in side:
        assert [grad for m, grad in calls if m == mlp] == [True, True]


@pytest.mark.parametrize("downsample", ["adapter", "maxpool", "avgpool"])
@pytest.mark.parametrize("use_reentrant", [False, True, None])  # None: kwargs without it, torch's default (reentrant)
def test_checkpointing_frees_side_activations_and_keeps_gradients(use_reentrant, downsample):
    """gradient_checkpointing_enable() (what the trainers call; reentrant is what TRL forces under DeepSpeed ZeRO-3)
    keeps fewer activations for backward (counted with saved_tensors_hooks) and gives the same side-network gradients
    as without it. Also after a pooling downsampler, which has no parameters: the first side block's inputs then carry
    no gradient, and a reentrant checkpoint of it recorded no graph, so no side block got a gradient."""
    from peft import get_peft_model

    config = QSTConfig(task_type="CAUSAL_LM", r=4, downsample=downsample)
    model = get_peft_model(tiny_causal_lm(num_hidden_layers=4), config)
    randomize_upsample(model)
    input_ids = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(0))

    def step(checkpointing: bool):
        if checkpointing:
            kwargs = {"preserve_rng_state": True} if use_reentrant is None else {"use_reentrant": use_reentrant}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_disable()
        model.train()
        model.zero_grad()
        saved_bytes = []

        def pack(tensor):
            saved_bytes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return grads, sum(saved_bytes)

    plain_grads, plain_bytes = step(False)
    ckpt_grads, ckpt_bytes = step(True)
    assert ckpt_bytes < 0.75 * plain_bytes
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------------------------------
# Packed and padding-free batches
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_row_equals_the_sequences_alone(attn_implementation):
    """Two sequences packed in one row (position_ids restarting at 0, cu_seq_lens, no attention mask, use_cache=False,
    as TRL's padding-free collator and compute_loss give them) get the logits each gets alone: they do not see each
    other in the backbone nor in the side network. (transformers derives the block-diagonal mask from position_ids
    only without a cache, for the base model as for the side trunk.)"""
    from peft import get_peft_model

    model = tiny_causal_lm(attn_implementation=attn_implementation)
    model = get_peft_model(model, QSTConfig(task_type="CAUSAL_LM", r=4)).eval()
    randomize_upsample(model)
    first, second = torch.randint(0, 128, (1, 5)), torch.randint(0, 128, (1, 7))
    packed_ids = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
    cu_seq_lens = torch.tensor([0, 5, 12], dtype=torch.int32)
    with torch.no_grad():
        packed = model(input_ids=packed_ids, position_ids=position_ids, cu_seq_lens_q=cu_seq_lens,
                       cu_seq_lens_k=cu_seq_lens, max_length_q=7, max_length_k=7, use_cache=False).logits
        alone = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1)
        concatenated = model(input_ids=packed_ids, use_cache=False).logits  # one 12-token sequence
        with model.disable_adapter():
            base_packed = model(input_ids=packed_ids, position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(concatenated[:, 5:], alone[:, 5:], atol=1e-3)
    assert not torch.allclose(base_packed, packed, atol=1e-3)  # the side network is part of what was compared


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_flattened_batch_under_gradient_checkpointing_keeps_its_sequences_apart(attn_implementation):
    """A training step as ``Trainer(gradient_checkpointing=True)`` runs it on a ``DataCollatorWithFlattening`` batch
    (position ids restarting per sequence, no attention mask, no ``use_cache`` passed): transformers turns the cache
    off under gradient checkpointing, and without a cache its masks keep the sequences apart. QST's backbone runs
    under no_grad, where transformers' check does not fire: the backbone and the side network kept a cache and
    attended across sequences (the later sequences' logits units off on a tiny Llama), where the base model kept them
    apart."""
    from peft import get_peft_model
    from transformers import DataCollatorWithFlattening

    model = tiny_causal_lm(attn_implementation=attn_implementation)
    model = get_peft_model(model, QSTConfig(task_type="CAUSAL_LM", r=4))
    randomize_upsample(model)
    sequences = [torch.randint(3, 128, (n,)) for n in (6, 4, 5)]
    batch = DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in sequences])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    model.gradient_checkpointing_enable()  # what the Trainer does for gradient_checkpointing=True
    model.train()
    out = model(**batch)
    out.loss.backward()  # a training step
    with model.disable_adapter():
        base = model(**batch)
    model.eval()
    with torch.no_grad():
        alone = [model(input_ids=s[None]).logits[0] for s in sequences]
        with model.disable_adapter():
            base_alone = [model(input_ids=s[None]).logits[0] for s in sequences]
    losses = [torch.nn.functional.cross_entropy(lg[:-1], s[1:], reduction="sum") for lg, s in zip(alone, sequences)]
    torch.testing.assert_close(out.logits[0].detach(), torch.cat(alone), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss.detach(), sum(losses) / sum(len(s) - 1 for s in sequences))
    # the invariant holds for the base model in the same step, and the side network is part of what was compared
    torch.testing.assert_close(base.logits[0], torch.cat(base_alone), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base.logits, out.logits, atol=1e-3)
    assert out.past_key_values is None  # no cache was built for a training step, as without QST


@pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer and chat template
@pytest.mark.parametrize("mode", ["padding_free", "packing"])
def test_sft_padding_free_loss_equals_padded_loss(tmp_path, smollm2_dir, mode):
    """SFTTrainer's loss on a padding-free (or BFD-packed) batch equals its loss on the same sequences padded, and
    training on such batches learns."""
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    if mode == "padding_free":
        config = {"padding_free": True, "max_length": None}
    else:
        config = {"packing": True, "max_length": 128}
    trainer = tiny_sft_trainer(tmp_path, tokenizer, chat_rows("prompt-completion", 16), max_steps=6,
                               per_device_train_batch_size=4, **config)
    randomize_upsample(trainer.model)
    rows = [trainer.train_dataset[i] for i in range(4 if mode == "padding_free" else 2)]
    packed = trainer.data_collator(rows)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == 1
    if mode == "packing":  # the rows of a packed data set hold several sequences each
        assert sum(len(row["seq_lengths"]) for row in rows) >= 4
        unpacked_rows = []
        for row in rows:
            start = 0
            for length in row["seq_lengths"]:
                unpacked_rows.append({k: v[start:start + length] for k, v in row.items() if k != "seq_lengths"})
                start += length
    else:
        unpacked_rows = rows
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(unpacked_rows)
    assert padded["input_ids"].shape[0] > 1 and "attention_mask" in padded
    trainer.model.eval()
    with torch.no_grad():
        packed_loss = trainer.compute_loss(trainer.model, dict(packed))
        padded_loss = trainer.compute_loss(trainer.model, dict(padded))
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-5)

    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------------------------------------------------
# Progress and logging are the trainer's
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer and chat template
def test_training_output_is_the_trainers_own(tmp_path, smollm2_dir, capfd, caplog):
    """During SFTTrainer training the progress bar and the log lines are the trainer's; peft_qst adds no output, no
    log record and no warning of its own."""
    import logging
    import os
    import warnings

    from transformers import AutoTokenizer

    import peft_qst

    package_dir = os.path.dirname(os.path.abspath(peft_qst.__file__))
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    trainer = tiny_sft_trainer(tmp_path, tokenizer, chat_rows("messages", 12), max_steps=3,
                               per_device_train_batch_size=4, disable_tqdm=False)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        trainer.train()
    out, err = capfd.readouterr()
    assert "3/3" in err  # tqdm's bar reached the end
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    assert len(lines) == 4 and all(line.startswith("{'") for line in lines)  # 3 step logs + the train summary
    # peft_qst's warnings name the user's line that reached them (peft_qst.serialization.user_stacklevel): here,
    # this file's trainer.train()
    assert not [w for w in caught
                if os.path.abspath(w.filename).startswith(package_dir) or os.path.abspath(w.filename) == __file__]
    assert not [r for r in caplog.records if os.path.abspath(r.pathname).startswith(package_dir)]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_memory_grows_with_depth_by_the_hidden_states_only(use_reentrant):
    """Under gradient checkpointing each side layer keeps, for backward, the backbone hidden state its downsampler
    reads (which the downsampler's weight gradient needs) and its narrow block input, nothing else: the bytes saved for
    backward grow with depth by about that much per layer (counted with saved_tensors_hooks, 2 against 6 layers)."""
    from peft import get_peft_model

    batch, length, hidden, r = 2, 48, 64, 4

    def saved_bytes(layers: int) -> int:
        model = get_peft_model(tiny_causal_lm(num_hidden_layers=layers), QSTConfig(task_type="CAUSAL_LM", r=r))
        randomize_upsample(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.train()
        input_ids = torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(0))
        seen = {}

        def pack(tensor):
            seen[(tensor.data_ptr(), tensor.shape, tensor.dtype)] = tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        return sum(seen.values())

    per_layer = (saved_bytes(6) - saved_bytes(2)) / 4
    hidden_state = batch * length * hidden * 4  # float32
    block_input = batch * length * (hidden // r) * 4
    assert per_layer <= 1.1 * (hidden_state + block_input), (per_layer, hidden_state, block_input)


@pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer and chat template
def test_gate_inits_that_trls_bf16_cast_turns_into_refused_values_are_refused(tmp_path, smollm2_dir):
    """get_peft_model checks side_gate_init in the side network's dtype, float32 on a 4-bit model with float32 (or
    float16) compute, where 0.999 is below 1. SFTTrainer then casts the trainable parameters of a quantized model to
    bf16, whatever side_dtype says, and 0.999 became a gate of exactly 1 there: the side blocks' gates and
    downsamplers never moved while training ran on, silently. The first training forward after the cast refuses it,
    naming the cast; a value bf16 keeps below 1 trains them."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from .conftest import bnb_config

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tiny_causal_lm(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp_path / "base")

    def trainer(side_gate_init: float):
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                    quantization_config=bnb_config(compute_dtype=torch.float32))
        args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8,
                         learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                         disable_tqdm=True)
        return SFTTrainer(model=base, args=args, train_dataset=Dataset.from_list(chat_rows("messages", 16)),
                          processing_class=tokenizer,
                          peft_config=QSTConfig(task_type="CAUSAL_LM", r=4, side_gate_init=side_gate_init))

    def gates_and_downsamplers(model) -> dict:
        return {n: p.detach().clone() for n, p in model.named_parameters()
                if ".trunk.layers." in n and (".downsample." in n or "gate_logit" in n)}

    refused = trainer(0.999)
    assert all(p.dtype == torch.bfloat16 for p in gates_and_downsamplers(refused.model).values())  # TRL's cast
    with pytest.raises(ValueError, match=r"side_gate_init=0\.999 is 1 in the side network's dtype \(bfloat16, which "
                                         r"its parameters were cast to after it was built in float32.*"
                                         r"<= 0\.99609375 for bfloat16 \(the default is 0\.5\)\.$"):
        refused.train()

    fitting = trainer(0.99)
    before = gates_and_downsamplers(fitting.model)
    fitting.train()
    after = gates_and_downsamplers(fitting.model)
    assert before and all(not torch.equal(before[n], after[n]) for n in before), [
        n for n in before if torch.equal(before[n], after[n])]
