"""The QST part of an adapter's model card (``README.md``), written next to PEFT's own card.

PEFT writes the card (``library_name: peft``, ``base_model``, tags; QST adds the ``qst`` tag through the base model's
``model_tags``) before it saves each adapter. Loading a QST adapter needs one extra line, ``import peft_qst``, which no
PEFT user would guess, so the card says it.
"""

from __future__ import annotations

import os

MARKER = "<!-- peft-qst usage -->"


def usage_section(base_model: str | None) -> str:
    base = base_model or "<base model>"
    return f"""{MARKER}
## How to load this QST adapter

This adapter was trained with [Quantized Side Tuning](https://arxiv.org/abs/2401.07159) through `peft-qst`, a PEFT
tuner type. Install `peft-qst` and import it before loading: the import registers the `QST` method with PEFT.

```python
import torch
import peft_qst  # registers "QST" with PEFT
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16)
base = AutoModelForCausalLM.from_pretrained("{base}", quantization_config=bnb)
model = PeftModel.from_pretrained(base, "<this repository id, or the folder holding this card>")
```
"""


def add_usage_section(folder: str, base_model: str | None) -> None:
    """Append the loading instructions to the card in ``folder`` once (no card, nothing to do)."""
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if MARKER in text:
        return
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n" + usage_section(base_model))
