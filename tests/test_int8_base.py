"""QST on bitsandbytes 8-bit base models (``BitsAndBytesConfig(load_in_8bit=True)``: ``Linear8bitLt`` layers).

bitsandbytes 0.50 runs 8-bit layers on the CPU, and they keep state between calls that 4-bit layers do not: the
int8 codes and row scales move from the weight to ``layer.state`` (``CB``/``SCB``) at the first forward, and the mode
chooses the kernel (training: the dequantised weight in the input's dtype, ``MatMul8bitFp``; eval: an int8 matmul of
the input cast to float16, ``MatMul8bitLt``), so a training-mode and an eval-mode forward of the base model itself
differ slightly. These tests check on tiny random Llama and Qwen2 models saved to disk and reloaded in 8-bit what the
4-bit tests check: the adapted model starts at the base model's output, only the side network gets gradients and the
8-bit backbone (codes and scales) never changes, eval forwards and generation between training steps change nothing,
and save/reload, ``disable_adapter()``, the ``backbone_lora_layers`` hybrid, the ``init="pruned"`` refusal and TRL's
SFTTrainer behave as documented.
"""

from __future__ import annotations

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from peft_qst import QSTConfig, QSTUnsupportedModelError

from .conftest import tiny_causal_lm, train_steps

pytest.importorskip("bitsandbytes")

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=256)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base_dir(request, tmp_path_factory):
    """A tiny random model of the family saved in float32, to be reloaded in 8-bit (Qwen2's q/k/v carry biases)."""
    path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    if request.param == "llama":
        model = tiny_causal_lm()
    else:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(request.param, **SIZES))
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-8bit")
    tiny_causal_lm().save_pretrained(path)
    return str(path)


def int8_config():
    return BitsAndBytesConfig(load_in_8bit=True)


def load_8bit(path):
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=int8_config())
    assert any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    return model.eval()


def backbone_state(model) -> dict[str, torch.Tensor]:
    """Every parameter outside the side networks and, for each ``Linear8bitLt``, its int8 codes and row scales
    wherever bitsandbytes keeps them at the moment (on the weight before the first forward, in ``layer.state``
    after it); named as in the base model, whether ``model`` is wrapped by PEFT or not."""

    def plain(name: str) -> str:
        return name.removeprefix("base_model.model.").replace(".base_layer", "")

    state = {plain(name): p.detach().clone() for name, p in model.named_parameters() if ".qst_side." not in name}
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear8bitLt":
            codes = module.state.CB if module.state.CB is not None else module.weight.data
            scales = module.state.SCB if module.state.SCB is not None else module.weight.SCB
            state[plain(f"{name}.CB")], state[plain(f"{name}.SCB")] = codes.clone(), scales.clone()
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, changed


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_starts_at_the_base_trains_only_the_side_network_and_reloads_exactly(base_dir, tmp_path):
    expected_base = logits(load_8bit(base_dir))
    model = get_peft_model(load_8bit(base_dir), QSTConfig(task_type="CAUSAL_LM", r=4)).eval()
    assert torch.equal(logits(model), expected_base)  # the output gate starts the side network's path at zero
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".qst_side." in name for name in trainable)
    frozen = backbone_state(model)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    assert_same_state(frozen, backbone_state(model))

    trained = logits(model)
    assert not torch.equal(trained, expected_base)
    with model.disable_adapter():
        assert torch.equal(logits(model), expected_base)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_8bit(base_dir), tmp_path / "adapter")
    assert torch.equal(logits(reloaded.eval()), trained)
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", quantization_config=int8_config())
    assert any(type(m).__name__ == "Linear8bitLt" for m in auto.modules())
    assert torch.equal(logits(auto.eval()), trained)


@pytest.mark.parametrize("backbone_lora_layers", [0, 1], ids=["side-only", "hybrid"])
def test_eval_forwards_and_generation_between_training_steps_change_nothing(llama_dir, backbone_lora_layers):
    """``Linear8bitLt`` runs another kernel in eval mode and keeps its state across calls: a run that evaluates and
    generates in the middle of training ends at the weights of one that does not, bit for bit."""

    def run(interrupt: bool):
        torch.manual_seed(0)
        config = QSTConfig(task_type="CAUSAL_LM", r=4, backbone_lora_layers=backbone_lora_layers)
        model = get_peft_model(load_8bit(llama_dir), config)
        losses = train_steps(model, IDS, steps=2)
        if interrupt:
            first = logits(model)
            model.generate(input_ids=IDS[:, :4], attention_mask=torch.ones(2, 4, dtype=torch.long), max_new_tokens=4,
                           do_sample=False)
            model.state_dict()
            assert torch.equal(logits(model), first)
        losses += train_steps(model, IDS, steps=2)
        return model, losses

    straight, straight_losses = run(False)
    interrupted, interrupted_losses = run(True)
    assert interrupted_losses == straight_losses
    expected = {name: p for name, p in straight.named_parameters() if p.requires_grad}
    for name, p in interrupted.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, expected[name]), name


def test_the_hybrid_trains_its_top_block_adapters_on_8bit_layers_and_reloads_exactly(llama_dir, tmp_path):
    expected_base = logits(load_8bit(llama_dir))
    model = get_peft_model(load_8bit(llama_dir), QSTConfig(task_type="CAUSAL_LM", r=4, backbone_lora_layers=1))
    assert torch.equal(logits(model.eval()), expected_base)
    frozen = backbone_state(model)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    deltas = {name: p.grad for name, p in model.named_parameters() if ".lora_A" in name or ".lora_B" in name}
    assert deltas and all(grad is not None for grad in deltas.values())  # gradients pass through the 8-bit layers
    assert any(grad.abs().sum() > 0 for name, grad in deltas.items() if ".lora_B" in name)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    model.zero_grad()

    losses = train_steps(model, IDS, steps=4)
    assert losses[-1] < losses[0]
    assert_same_state(frozen, backbone_state(model))
    trained = logits(model)
    with model.disable_adapter():
        assert torch.equal(logits(model), expected_base)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_8bit(llama_dir), tmp_path / "adapter")
    assert reloaded.peft_config["default"].backbone_lora_layers == 1
    assert torch.equal(logits(reloaded.eval()), trained)


def test_pruned_initialisation_is_refused_naming_the_8bit_weights(llama_dir):
    model = load_8bit(llama_dir)
    before = backbone_state(model)
    refusal = r"8-bit integers \(bitsandbytes load_in_8bit\).*init=\"random\""
    with pytest.raises(QSTUnsupportedModelError, match=refusal):
        get_peft_model(model, QSTConfig(task_type="CAUSAL_LM", r=4, init="pruned"))
    assert not hasattr(model, "peft_config") and not any("QST" in type(m).__name__ for m in model.modules())
    assert_same_state(before, backbone_state(model))


@pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer and chat template
def test_sft_trainer_on_an_8bit_base(tmp_path, smollm2_dir):
    """TRL's SFTTrainer casts the trainable parameters of any bitsandbytes model, 8-bit too, to bf16; with
    ``side_dtype="bfloat16"`` (or an 8-bit model loaded in bf16) the reloaded adapter is then the trained one bit for
    bit. Without it, on a float32 8-bit base, the reloaded side network follows ``side_dtype``'s rule (float32) and
    matches the trained one to bf16 rounding only, as a LoRA adapter does (PEFT upcasts it)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from .test_trl import chat_rows

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    base = tmp_path / "base"
    tiny_causal_lm(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id).save_pretrained(base)
    model = load_8bit(base)
    frozen = backbone_state(model)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                     logging_steps=1, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4, report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(chat_rows("messages", 16)),
                         eval_dataset=Dataset.from_list(chat_rows("messages", 4, offset=100)),
                         processing_class=tokenizer,
                         peft_config=QSTConfig(task_type="CAUSAL_LM", r=4, side_dtype="bfloat16"))
    trained_params = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained_params and all(".qst_side." in name for name in trained_params)
    assert {p.dtype for p in trained_params.values()} == {torch.bfloat16}
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert sum("eval_loss" in entry for entry in trainer.state.log_history) == 2
    assert_same_state(frozen, backbone_state(trainer.model))

    ids = torch.tensor([tokenizer("Repeat the number 3 twice.")["input_ids"]])
    trained = logits(trainer.model.eval(), ids)
    trainer.model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_8bit(base), tmp_path / "adapter")
    assert torch.equal(logits(reloaded.eval(), ids), trained)
