"""Rows of an ``adapter_names`` batch through hybrid adapters (``backbone_lora_layers``) whose backbone layers read the
batch's tokens flattened to ``(batch * sequence, hidden)``: the shared experts of mixture-of-experts blocks (Qwen2-MoE,
Llama 4; with ``output_router_logits`` too) and OPT's ``fc1``/``fc2``. The per-row mask was
applied along their first dimension, one entry per row, and every such batch failed ("The size of tensor a (14) must
match the size of tensor b (2)"). Each row must get exactly what a batch of its adapter alone gives it. Mixtral's and
DeepSeek-V3's adapted layers read the block's layout (batch first; MLA's ``kv_b_proj`` reads ``(batch, 1, sequence,
rank)``), and their routed experts, grouped weights rather than ``nn.Linear`` layers, take no backbone adapter."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from peft_qst import QSTConfig, QSTUnsupportedModelError
from peft_qst.backbone_lora import top_block_linears

from .conftest import bnb_config
from .test_more_architectures import tiny_config

IDS = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(4))
ROWS = ["a", "__base__", "b"]
#: per family (tiny configs of tests/test_more_architectures.py): the adapted layers that read flattened tokens
FAMILIES = {
    "qwen2_moe": {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj",
                  "mlp.shared_expert_gate"},
    "llama4_text": {"feed_forward.shared_expert.gate_proj", "feed_forward.shared_expert.up_proj",
                    "feed_forward.shared_expert.down_proj"},
    "opt": {"fc1", "fc2"},
    "mixtral": set(),
    "deepseek_v3": set(),
    "mpt": set(),  # every layer reads the block's layout; see test_rows_of_plain_adapters_on_mpt
}


def _hybrids(base):
    """Two hybrid adapters on the top block, "a" and "b", their backbone adapters opened (``lora_B`` drawn, not
    zero) so that each changes every layer it adapts."""
    config = dict(task_type="CAUSAL_LM", r=4, backbone_lora_layers=1, backbone_lora_r=4)
    torch.manual_seed(1)
    model = get_peft_model(base, QSTConfig(**config), adapter_name="a")
    model.add_adapter("b", QSTConfig(**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".backbone_lora." in name and name.endswith("lora_B"):
                param.normal_(0, 0.2)
    return model.eval()


def _blocks(model):
    return next(m for m in model.modules() if type(m).__name__ == "QSTLayer").__dict__["_backbone_blocks"]


def _flattened_layers(model) -> set:
    """The adapted layers whose input is 2-D (the batch's tokens flattened) in a forward of IDS."""
    seen, hooks = set(), []
    for _, name, module in top_block_linears(_blocks(model), 1):
        hooks.append(module.register_forward_hook(
            lambda m, args, out, name=name: seen.add(name) if args[0].shape[:-1] == (IDS.numel(),) else None))
    with torch.no_grad():
        model(input_ids=IDS)
    for hook in hooks:
        hook.remove()
    return seen


def _check_rows_as_alone(model, exact: bool = True):
    """Each row of an adapter_names batch (forward, greedy generation) gets what a batch of its adapter alone gives
    it; the ``"__base__"`` row the base model's."""
    same = torch.equal if exact else (lambda x, y: torch.allclose(x, y, rtol=0, atol=1e-5))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected, generated = {}, {}
        for name in ("a", "b"):
            model.set_adapter(name)
            expected[name] = model(input_ids=IDS).logits
            generated[name] = model.generate(input_ids=IDS, **kwargs)
        with model.disable_adapter():
            expected["__base__"] = model(input_ids=IDS).logits
            generated["__base__"] = model.generate(input_ids=IDS, **kwargs)
        # the adapters differ from each other and from the base model: a row given another's delta would show
        assert not torch.allclose(expected["a"], expected["__base__"], atol=1e-3)
        assert not torch.allclose(expected["a"], expected["b"], atol=1e-3)
        mixed = model(input_ids=IDS, adapter_names=ROWS).logits
        for i, name in enumerate(ROWS):
            assert same(mixed[i], expected[name][i]), (name, (mixed[i] - expected[name][i]).abs().max())
        routed = model.generate(input_ids=IDS, adapter_names=ROWS, **kwargs)
        assert torch.equal(routed, torch.stack([generated[name][i] for i, name in enumerate(ROWS)]))
        # and two rows of one hybrid beside a row of the other
        both = model(input_ids=IDS, adapter_names=["b", "a", "b"]).logits
        for i, name in enumerate(["b", "a", "b"]):
            assert same(both[i], expected[name][i]), name


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_rows_of_hybrids_get_their_adapters_alone_output(model_type):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(model_type)).float().eval()
    model = _hybrids(base)
    adapted = {name for _, name, _ in top_block_linears(_blocks(model), 1)}
    # the routed experts are grouped weights, not nn.Linear layers: never adapted
    assert not any(".experts." in name or name.startswith("experts.") for name in adapted), adapted
    assert _flattened_layers(model) == FAMILIES[model_type]
    # routed experts run each expert over the tokens routed to it: other rows beside a row change those matmuls'
    # shapes, and so their float32 rounding (by 1e-6), not what the row computes
    _check_rows_as_alone(model, exact=model_type == "opt")


def test_rows_with_router_logits_on_qwen2_moe():
    """With ``output_router_logits`` rows of hybrids adapting the same blocks still share one aux loss (see
    tests/test_moe_router_logits_hybrid.py); their logits are their adapters' alone."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(
        tiny_config("qwen2_moe", output_router_logits=True, router_aux_loss_coef=0.5)
    ).float().eval()
    model = _hybrids(base)
    with torch.no_grad():
        model.set_adapter("a")
        expected = {"a": model(input_ids=IDS).logits}
        model.set_adapter("b")
        expected["b"] = model(input_ids=IDS).logits
        out = model(input_ids=IDS, adapter_names=["b", "a", "a"])
    assert out.aux_loss is not None
    for i, name in enumerate(["b", "a", "a"]):
        torch.testing.assert_close(out.logits[i], expected[name][i], rtol=0, atol=1e-5)


def test_rows_of_hybrids_on_a_4bit_qwen2_moe(tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("qwen2_moe")).float().save_pretrained(tmp_path)  # safetensors
    # the routers (4 and 1 outputs) stay unquantized: bitsandbytes' CPU kernel needs multiples of 32 outputs
    config = bnb_config()
    config.llm_int8_skip_modules = ["lm_head", "mlp.gate", "shared_expert_gate"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    base.eval()
    shared = base.model.layers[-1].mlp.shared_expert
    assert all(type(m).__name__ == "Linear4bit" for m in (shared.gate_proj, shared.up_proj, shared.down_proj))
    model = _hybrids(base)
    assert _flattened_layers(model) == FAMILIES["qwen2_moe"]
    _check_rows_as_alone(model, exact=False)


def test_tokens_of_unknown_rows_are_refused():
    """A layer whose first dimension is neither one entry per row nor the batch's tokens flattened row by row, and a
    routed expert built as a module of its own (``experts.<i>``, which reads the tokens routed to it in expert
    order) even where its token count happens to match, cannot take per-row deltas: refused, naming the way out."""
    from peft_qst.backbone_lora import token_rows

    rows = torch.tensor([True, False, True])
    assert torch.equal(token_rows(rows, 7, torch.zeros(3, 7, 16), 1, "mlp.up_proj").flatten(), rows)
    assert torch.equal(token_rows(rows, 7, torch.zeros(21, 16), 1, "mlp.shared_expert.up_proj").flatten(),
                       rows.repeat_interleave(7))
    for tokens, name in ((torch.zeros(10, 16), "mlp.up_proj"), (torch.zeros(21, 16), "block_sparse_moe.experts.2.w1")):
        with pytest.raises(QSTUnsupportedModelError, match=f"{name!r} of block 1.*in a batch of their own"):
            token_rows(rows, 7, tokens, 1, name)


def test_rows_of_plain_adapters_on_mpt():
    """PEFT's ``PeftModelForCausalLM.forward`` has a branch of its own for MPT models that hands ``adapter_names`` to
    the base model without routing it; ``MptForCausalLM.forward`` swallowed it in its ``**kwargs``, and every row ran
    the active adapter, silently (hybrids too: the ``"mpt"`` case above). Each row now gets its own adapter's output,
    in a forward as in ``generate``."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("mpt")).float().eval()
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4), adapter_name="a")
    model.add_adapter("b", QSTConfig(task_type="CAUSAL_LM", r=4))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".qst_side." in name:  # both adapters trained apart: each changes the output its own way
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    _check_rows_as_alone(model.eval(), exact=True)
