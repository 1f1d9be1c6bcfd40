"""QST on fp32, bf16 and bitsandbytes 4-bit (NF4/FP4, double quantisation on and off) backbones, on CPU."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_qst import QSTConfig

from .conftest import bnb_config
from .test_training_graph import assert_only_side_learns_and_backbone_saves_nothing

IDS = torch.tensor([[5, 17, 33, 2, 99, 64, 7, 21], [1, 2, 3, 4, 5, 6, 7, 8]])

VARIANTS = {
    "fp32": dict(dtype=torch.float32),
    "bf16": dict(dtype=torch.bfloat16),
    "nf4-double": dict(quantization_config=bnb_config("nf4", True)),
    "nf4-single": dict(quantization_config=bnb_config("nf4", False)),
    "fp4-double": dict(quantization_config=bnb_config("fp4", True)),
    "fp4-single": dict(quantization_config=bnb_config("fp4", False)),
}
EXPECTED_SIDE_DTYPE = {"fp32": torch.float32}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_save_load(variant, tiny_model_dir, tmp_path):
    kwargs = VARIANTS[variant]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs)
    if "quantization_config" in kwargs:
        assert any(type(m).__name__ == "Linear4bit" for m in base.modules())
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    side_dtypes = {p.dtype for n, p in model.named_parameters() if ".qst_side." in n}
    assert side_dtypes == {EXPECTED_SIDE_DTYPE.get(variant, torch.bfloat16)}
    model.train()
    assert_only_side_learns_and_backbone_saves_nothing(model, IDS)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, **kwargs), tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=IDS).logits, expected)


def test_side_dtype_override(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb_config())
    model = get_peft_model(base, QSTConfig(r=4, side_dtype="float32"))
    assert {p.dtype for n, p in model.named_parameters() if ".qst_side." in n} == {torch.float32}
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    assert torch.isfinite(logits).all()
