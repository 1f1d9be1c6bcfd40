"""PEFT and transformers APIs that reach a QST model the way they reach a LoRA model: trunk submodules assigned through
the wrapper (``set_input_embeddings``, ``resize_token_embeddings``), PEFT's ``disable_input_dtype_casting`` helper, and
LoRA's ``add_weighted_adapter``."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_qst import QSTConfig

from .conftest import train_steps

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21], [1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize("method", ["qst", "lora"])
def test_set_input_embeddings_reaches_the_backbone(tiny_model_dir, method):
    """transformers' set_input_embeddings assigns ``model.model.embed_tokens``; under QST ``model.model`` is the
    QSTLayer, which registered the new module on itself while the trunk kept running the old one."""
    config = QSTConfig(task_type="CAUSAL_LM", r=4) if method == "qst" else LoraConfig(r=4, task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config).eval()
    torch.manual_seed(3)
    new = torch.nn.Embedding(128, 64)
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    reference.set_input_embeddings(new)
    with torch.no_grad():
        with model.disable_adapter():
            assert torch.equal(model(input_ids=IDS).logits, reference(input_ids=IDS).logits)
        # the untrained adapter starts at the base model's output, now the base model with the new embeddings
        assert torch.allclose(model(input_ids=IDS).logits, reference(input_ids=IDS).logits, atol=1e-6)


def test_resizing_after_wrapping_saves_the_embeddings_once(tmp_path, tiny_model_dir):
    """resize_token_embeddings after get_peft_model registered the embedding a second time on the QSTLayer: every
    saved adapter held the whole matrix twice. Saved once, it still reloads to the same logits."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    model.resize_token_embeddings(130)
    assert "embed_tokens" not in model.get_base_model().model._modules  # only inside the trunk
    train_steps(model, IDS)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert [key for key in saved if key.endswith("embed_tokens.weight")] == [
        "base_model.model.model.base_layer.embed_tokens.weight"
    ]
    ids = torch.cat([IDS, torch.tensor([[129], [128]])], dim=1)
    resized = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    resized.resize_token_embeddings(130)
    loaded = PeftModel.from_pretrained(resized, str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_disable_input_dtype_casting_helper_runs(tiny_model_dir):
    """peft.helpers.disable_input_dtype_casting reads ``cast_input_dtype_enabled`` on every tuner layer; on the
    QSTLayer the read went to the trunk: AttributeError: 'LlamaModel' object has no attribute ..."""
    from peft.helpers import disable_input_dtype_casting

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    train_steps(model, IDS)
    layer = model.get_base_model().model
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        with disable_input_dtype_casting(model):
            assert layer.cast_input_dtype_enabled is False
            inside = model(input_ids=IDS).logits
    assert layer.cast_input_dtype_enabled is True
    assert torch.equal(before, inside)


def test_add_weighted_adapter_is_refused_with_a_reason(tiny_model_dir):
    """It failed with AttributeError: 'LlamaForCausalLM' object has no attribute 'add_weighted_adapter'."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), QSTConfig(task_type="CAUSAL_LM", r=4))
    model.add_adapter("other", QSTConfig(task_type="CAUSAL_LM", r=4))
    with pytest.raises(ValueError, match="side network.*set_adapter"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="linear")
    assert sorted(model.peft_config) == ["default", "other"]


def test_a_causal_lm_whose_trunk_is_not_found_is_not_called_a_bare_trunk(tiny_model_dir):
    """A (remote-code) causal LM whose get_decoder() returns the model itself and whose trunk has an unusual name is a
    model with a head, not the bare trunk AutoModel loads: the error must point at target_modules (which works), not
    tell the user to load it with AutoModelForCausalLM, which they did."""
    from transformers import GenerationMixin, LlamaConfig, LlamaModel, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from peft_qst import QSTUnsupportedModelError

    class BodyForCausalLM(PreTrainedModel, GenerationMixin):
        config_class = LlamaConfig

        def __init__(self, config):
            super().__init__(config)
            self.body = LlamaModel(config)
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, **kwargs):
            hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                               **kwargs).last_hidden_state
            return CausalLMOutputWithPast(logits=self.lm_head(hidden))

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    assert BodyForCausalLM(config).get_decoder() is not None
    with pytest.raises(QSTUnsupportedModelError, match="target_modules") as error:
        get_peft_model(BodyForCausalLM(config), QSTConfig(task_type="CAUSAL_LM", r=4))
    assert "bare decoder trunk" not in str(error.value)
    model = get_peft_model(BodyForCausalLM(config), QSTConfig(task_type="CAUSAL_LM", r=4, target_modules="body"))
    assert model(input_ids=IDS).logits.shape == (2, 8, 128)
