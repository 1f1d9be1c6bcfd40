"""Every decoder-only family listed in the README works with the default QSTConfig, by general shrink rules.

Tiny random configs exercise what makes shrinking delicate: explicit head_dim (Qwen3, Gemma), grouped and multi-query
KV heads (Mistral, Falcon), partial rotary (GPT-NeoX), sliding-window and hybrid layer types (Mistral, Gemma 2/3),
parallel attention (Falcon, GPT-NeoX), learned positional embeddings (OPT, GPT-2), tied embeddings (Gemma).
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from peft_qst import QSTConfig, QSTUnsupportedModelError

from .conftest import REPO, bnb_config, parameters_frozen, train_steps
from .test_training_graph import assert_only_side_learns_and_backbone_saves_nothing

V = 96
COMMON = dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=V)
TINY = {
    "llama": dict(COMMON, num_key_value_heads=2),
    "mistral": dict(COMMON, num_key_value_heads=1, sliding_window=6),
    "qwen2": dict(COMMON, num_key_value_heads=2),
    "qwen3": dict(COMMON, num_key_value_heads=2, head_dim=64),
    "gemma2": dict(COMMON, num_key_value_heads=2, head_dim=64, sliding_window=6),
    "gemma3_text": dict(COMMON, num_key_value_heads=2, head_dim=64, sliding_window=6),
    "phi3": dict(COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "opt": dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256, vocab_size=V,
                word_embed_proj_dim=512, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(n_embd=512, n_layer=2, n_head=4, vocab_size=V, n_positions=64, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(COMMON),
    "falcon": dict(hidden_size=512, num_hidden_layers=2, num_attention_heads=4, vocab_size=V, multi_query=True,
                   new_decoder_architecture=False, parallel_attn=True),
}


def readme_architectures() -> list[str]:
    text = open(f"{REPO}/README.md").read()
    section = text.split("## Supported architectures", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.M)


def test_readme_lists_exactly_the_tested_architectures():
    assert readme_architectures() == list(TINY)


def tiny(model_type, **kwargs):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY[model_type]), **kwargs).eval()


def generate_both_ways(model, ids):
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    return model.generate(input_ids=ids, **kwargs), model.generate(input_ids=ids, use_cache=False, **kwargs)


def check_default_config_end_to_end(base, ids):
    """The default QSTConfig on a base model: it starts at the base model's logits, only the side network learns
    (nothing the backbone computed is kept for backward), training changes the output, and cached greedy generation
    equals uncached. Returns the adapted model and its logits."""
    with torch.no_grad(), parameters_frozen(base):  # as get_peft_model leaves the backbone
        expected_start = base(input_ids=ids).logits
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected_start)
    model.train()
    assert_only_side_learns_and_backbone_saves_nothing(model, ids)
    train_steps(model, ids, lr=3e-2)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, expected_start)
    cached, uncached = generate_both_ways(model, ids)
    assert torch.equal(cached, uncached)
    return model, adapted


@pytest.mark.parametrize("model_type", list(TINY))
def test_default_config_end_to_end(model_type, tmp_path):
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    model, adapted = check_default_config_end_to_end(tiny(model_type), ids)

    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny(model_type), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)


@pytest.mark.parametrize("model_type", list(TINY))
def test_model_side_heads_train_generate_and_reload(model_type, tmp_path):
    """side_heads=None (the paper's layout: the model's 4 heads, narrower) in every architecture; the other tests
    here run the default, "auto", which gives these tiny models one or two side heads."""
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    model = get_peft_model(tiny(model_type), QSTConfig(task_type="CAUSAL_LM", side_heads=None))
    side = next(m for m in model.modules() if type(m).__name__ == "QSTLayer").qst_side["default"]
    assert side.trunk.config.num_attention_heads == 4
    model.train()
    train_steps(model, ids, lr=3e-2)
    cached, uncached = generate_both_ways(model, ids)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny(model_type), str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)


# transformers' bitsandbytes integration finds no quantizable linear layer in tiny GPT-2 (Conv1D) and Falcon models
@pytest.mark.parametrize("model_type", [t for t in TINY if t not in ("gpt2", "falcon")])
def test_default_config_on_4bit(model_type, tmp_path):
    config = AutoConfig.for_model(model_type, **TINY[model_type])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config())
    assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(1))
    model.train()
    assert_only_side_learns_and_backbone_saves_nothing(model, ids)
    model.eval()
    cached, uncached = generate_both_ways(model, ids)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb_config())
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, adapted)


def test_unsupported_model_fails_at_get_peft_model_naming_type_and_reason():
    config = AutoConfig.for_model("opt", hidden_size=64, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
                                  vocab_size=V, word_embed_proj_dim=32)
    with pytest.raises(QSTUnsupportedModelError, match="opt model: its word_embed_proj_dim=32 differs"):
        get_peft_model(AutoModelForCausalLM.from_config(config), QSTConfig(r=4))


def test_partial_rotary_rule():
    # GPT-NeoX rotates a quarter of each head: at r=32 with the model's 4 heads the side head (512/32/4 = 4 dims)
    # keeps a single rotary dim
    with pytest.raises(ValueError, match=r"rotary dimension \(4 x partial_rotary_factor 0.25\)"):
        get_peft_model(tiny("gpt_neox"), QSTConfig(r=32, side_heads=None))
    # side_heads="auto" makes one head of all 16 channels: 4 rotary dims
    model = get_peft_model(tiny("gpt_neox"), QSTConfig(r=32))
    assert model.peft_config["default"].side_heads == 1


TINY_LAYERS = {name: sizes.get("num_hidden_layers", sizes.get("n_layer")) for name, sizes in TINY.items()}


@pytest.mark.parametrize("model_type", list(TINY))
def test_side_network_reads_the_hidden_states_transformers_reports(model_type):
    """QST records the backbone's hidden states with its own block hooks; they are exactly transformers'
    ``output_hidden_states`` (embedding output, every block's output, the last one after the final norm)."""
    model = get_peft_model(tiny(model_type), QSTConfig(task_type="CAUSAL_LM")).eval()
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(1))
    side = next(m for m in model.modules() if type(m).__name__ == "QSTLayer").qst_side["default"]
    seen = []
    original = side.forward
    side.forward = lambda hidden_states, **kwargs: seen.append(hidden_states) or original(hidden_states, **kwargs)
    with torch.no_grad():
        model(input_ids=ids)
        with model.disable_adapter():
            reference = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert len(seen) == 1 and len(seen[0]) == len(reference) == TINY_LAYERS[model_type] + 1
    for ours, theirs in zip(seen[0], reference):
        assert torch.equal(ours, theirs)


def test_unload_removes_every_hook_qst_put_on_the_backbone():
    base = tiny("llama")
    blocks = base.model.layers
    before = [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in base.modules()]
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", backbone_lora_layers=1))
    assert len(blocks[0]._forward_hooks) == 1 and len(blocks[-1]._forward_pre_hooks) == 1
    unloaded = model.unload()
    assert [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in unloaded.modules()] == before
