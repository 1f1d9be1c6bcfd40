"""The side trunk's attention on CPU (peft_qst/side_attention.py): SDPA on float32 copies of half-precision inputs,
selected for the model families that dispatch attention only through transformers' interfaces."""

from __future__ import annotations

import torch
from peft import get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from peft_qst import QSTConfig
from peft_qst.side_attention import SIDE_SDPA, side_sdpa_attention_forward


class _Attention(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True


def _inputs(dtype):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 9, 16, 4, generator=generator).to(dtype).requires_grad_()
    key = torch.randn(2, 3, 16, 4, generator=generator).to(dtype).requires_grad_()
    value = torch.randn(2, 3, 16, 4, generator=generator).to(dtype).requires_grad_()
    return query, key, value


def test_bfloat16_inputs_are_attended_in_float32_with_gradients():
    module = _Attention()
    query, key, value = _inputs(torch.bfloat16)
    output, _ = side_sdpa_attention_forward(module, query, key, value, None, scaling=0.5)
    assert output.dtype == torch.bfloat16
    output.float().pow(2).sum().backward()

    reference_inputs = [t.detach().float().requires_grad_() for t in (query, key, value)]
    reference, _ = sdpa_attention_forward(module, *reference_inputs, None, scaling=0.5)
    assert torch.equal(output, reference.to(torch.bfloat16))
    reference.to(torch.bfloat16).float().pow(2).sum().backward()
    for mine, theirs in zip((query, key, value), reference_inputs):
        torch.testing.assert_close(mine.grad, theirs.grad.to(torch.bfloat16))


def test_float32_inputs_are_passed_through_unchanged():
    module = _Attention()
    inputs = _inputs(torch.float32)
    mine, _ = side_sdpa_attention_forward(module, *inputs, None)
    theirs, _ = sdpa_attention_forward(module, *inputs, None)
    assert torch.equal(mine, theirs)


def _side_implementation(model_type: str, **sizes) -> str:
    config = AutoConfig.for_model(model_type, **sizes)
    base = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    side = next(m for m in model.modules() if type(m).__name__ == "QSTLayer").qst_side["default"]
    return model, side, side.trunk.config._attn_implementation


def test_llama_side_trunk_uses_it_and_trains():
    model, side, implementation = _side_implementation(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )
    assert implementation == SIDE_SDPA
    with torch.no_grad():
        side.upsample.weight.normal_(0.0, 0.1)  # starts at zero: open it so that gradients reach the side blocks
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: the mask path of SDPA
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    attention = side._blocks[0].block.self_attn
    assert attention.q_proj.weight.grad is not None and attention.q_proj.weight.grad.abs().max() > 0


def test_families_with_their_own_sdpa_branches_keep_sdpa():
    _, _, implementation = _side_implementation(
        "gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
    )
    assert implementation == "sdpa"


def test_switching_the_backbones_attention_keeps_the_side_trunks():
    """set_attn_implementation on the adapted model (transformers sets every PreTrainedModel it holds) switched the
    side trunk too, off SIDE_SDPA: the side trunk keeps its own, chosen for its tiny heads; a call on the side trunk
    itself still changes it."""
    model, side, _ = _side_implementation(
        "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )
    base = model.get_base_model()
    base.set_attn_implementation("eager")
    assert base.config._attn_implementation == "eager"
    assert side.trunk.config._attn_implementation == SIDE_SDPA
    model.set_attn_implementation("sdpa")  # through the PeftModel
    assert base.config._attn_implementation == "sdpa"
    assert side.trunk.config._attn_implementation == SIDE_SDPA
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()

    side.trunk.set_attn_implementation("eager")
    assert side.trunk.config._attn_implementation == "eager"
    assert base.config._attn_implementation == "sdpa"


def test_a_half_precision_additive_mask_is_added_in_float32():
    """An additive (float) mask in the inputs' half precision, as a caller builds a 4-D mask for a bf16 model, is
    cast to float32 with the query, key and value: SDPA takes a float mask only in the query's dtype."""
    module = _Attention()
    query, key, value = _inputs(torch.bfloat16)
    lowest = torch.finfo(torch.bfloat16).min
    mask = torch.zeros(2, 1, 16, 16).masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), lowest)
    mask[1, :, :, :3] = lowest  # left padding in the second row
    mask = mask.to(torch.bfloat16)
    output, _ = side_sdpa_attention_forward(module, query, key, value, mask, scaling=0.5)
    assert output.dtype == torch.bfloat16
    reference, _ = sdpa_attention_forward(
        module, *(t.detach().float() for t in (query, key, value)), mask.float(), scaling=0.5
    )
    assert torch.equal(output, reference.to(torch.bfloat16))
