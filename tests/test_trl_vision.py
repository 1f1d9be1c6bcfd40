"""TRL's SFTTrainer on image + chat data with peft_config=QSTConfig(...): the vision-language recipe, end to end.

What a user runs: a processor (tokenizer + the family's image processor), a dataset of PIL images with chat messages,
``SFTTrainer(model=..., processing_class=processor, peft_config=QSTConfig(...))`` with SFTConfig's defaults (gradient
checkpointing on), TRL's vision collator turning each batch into ``input_ids`` + ``pixel_values``. Tiny random Llava
(CLIP vision tower) and Idefics3 (SigLIP vision tower, pixel shuffle connector, ``pixel_attention_mask``) with the
real SmolLM2 tokenizer and small images, built offline. Checked: only side parameters change, the loss falls on a
fixed batch, the images reach the side network, ``save_model`` writes a PEFT adapter that reloads onto a fresh base
model with the trained logits, and cached generation with an image equals recomputation.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import PeftModel

from peft_qst import QSTConfig, QSTLayer

from .test_multimodal import TEXT, _vision

pytestmark = pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer and chat tokens

FAMILIES = ("llava", "idefics3")
#: a chat template that renders TRL's multimodal messages ({"type": "image"} / {"type": "text"} parts) in SmolLM2's
#: chat format, each image as the <image> placeholder that both families' processors expand into the image tokens
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_processor(family: str, tokenizer_dir: str):
    """The family's processor, built offline: the SmolLM2 tokenizer with the family's image tokens added and its
    image processor at 28x28 pixels (2x2 patches of 14: Llava 4 image tokens, Idefics3 1 after its 2x2 shuffle)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if family == "llava":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14, chat_template=TEMPLATE,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              image_token="<image>")
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer.add_special_tokens({"additional_special_tokens": ["<global-img>"]})  # the processor adds the others
    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 28},
                                       max_image_size={"longest_edge": 28})
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=1, chat_template=TEMPLATE)


def build_model(family: str, processor, seed: int = 0):
    """A tiny random model of the family sized to the processor's vocabulary (the same weights for the same seed: a
    fresh base model to reload an adapter onto)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    tokenizer = processor.tokenizer
    text = dict(TEXT, model_type="llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if family == "llava":
        config = AutoConfig.for_model(family, text_config=text, image_token_index=image_token,
                                      vision_config=_vision(model_type="clip_vision_model", projection_dim=32))
    else:
        config = AutoConfig.for_model(family, text_config=text, vision_config=_vision(), scale_factor=2,
                                      image_token_id=image_token)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config).float()


def random_image(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    """Image + chat rows as TRL's vision datasets hold them: ``images`` (PIL) and ``messages`` with an image part."""
    return [
        {"images": [random_image(seed + i)], "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What is in picture {i}?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"Picture {i} shows {i % 3} dots."}]},
        ]}
        for i in range(n)
    ]


def vision_tower(model):
    composite = model.get_base_model().model
    return composite.vision_tower if hasattr(composite, "vision_tower") else composite.vision_model


def side_network(model):
    return next(m for m in model.modules() if isinstance(m, QSTLayer)).qst_side["default"]


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}


def logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def side_run(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The first hidden state the side network reads (the embedding output, image features merged in) and what it
    hands to the upsample, at every position."""
    read, seen = [], []
    network = side_network(model)
    handles = [network.register_forward_pre_hook(lambda _m, args: read.append(args[0][0])),
               network.register_forward_hook(lambda _m, _args, out: seen.append(out[0]))]
    try:
        logits(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return read[-1], seen[-1]


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory, smollm2_dir):
    """SFTTrainer run once per family: 6 steps on one fixed batch of 4 image + chat rows (SFTConfig's defaults but
    the sizes: gradient checkpointing on), recording what reached the vision tower; the model left in eval mode."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    family = request.param
    processor = make_processor(family, smollm2_dir)
    base = build_model(family, processor)
    frozen_before = {k: v.clone() for k, v in base.state_dict().items()}
    rows = chat_rows(4)
    # one batch of the whole dataset: every step trains on the same batch, so its loss falls step by step
    args = SFTConfig(output_dir=str(tmp_path_factory.mktemp(f"sft-{family}")), max_steps=6,
                     per_device_train_batch_size=len(rows), learning_rate=2e-2, logging_steps=1, report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False, max_length=None, disable_tqdm=True)
    assert args.gradient_checkpointing  # SFTConfig's default, as TRL users train
    trainer = SFTTrainer(model=base, args=args, train_dataset=Dataset.from_list(rows), processing_class=processor,
                         peft_config=QSTConfig(task_type="CAUSAL_LM", r=4))
    model = trainer.model
    side_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    pixels_seen = []

    def watch_vision(_module, args, kwargs):
        pixels_seen.append(kwargs.get("pixel_values", args[0] if args else None))

    handle = vision_tower(model).register_forward_pre_hook(watch_vision, with_kwargs=True)
    try:
        trainer.train()
    finally:
        handle.remove()
    checkpointing = model.get_base_model().is_gradient_checkpointing  # the Trainer turns it on for training
    model.eval()
    return SimpleNamespace(family=family, processor=processor, rows=rows, trainer=trainer, model=model,
                           frozen_before=frozen_before, side_before=side_before, pixels_seen=pixels_seen,
                           checkpointing=checkpointing, batch=trainer.data_collator([dict(row) for row in rows]))


def test_only_the_side_network_trains_and_the_loss_falls(trained):
    model = trained.model
    assert any(isinstance(m, QSTLayer) for m in model.modules())
    assert trained.checkpointing
    assert trained.side_before and all(".qst_side." in n for n in trained.side_before)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".qst_side." not in n)
    # the loss: finite and falling on the fixed batch, step by step
    losses = [entry["loss"] for entry in trained.trainer.state.log_history if "loss" in entry]
    assert len(losses) == trained.trainer.args.max_steps and all(np.isfinite(losses))
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.1, losses
    # vision tower, projector, language model and LM head are bit-identical; side parameters changed
    for key, value in model.get_base_model().state_dict().items():
        if ".qst_side." not in key:
            original = key.replace(".base_layer.", ".")
            assert torch.equal(value, trained.frozen_before[original]), f"{key} changed"
    assert any(not torch.equal(p, trained.side_before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_the_images_reach_the_side_network(trained):
    """The collator's pixel_values reach the vision tower at every step; the side network reads the image features
    merged into the embedding output (not the <image> token's own embedding), and after training its output after
    the image, and its contribution to the logits, change with the image (the same text with another image)."""
    model, batch = trained.model, trained.batch
    assert len(trained.pixels_seen) >= trained.trainer.args.max_steps
    assert all(pixels is not None and pixels.numel() > 0 for pixels in trained.pixels_seen)
    is_image = batch["input_ids"] == trained.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert is_image.any(1).all()
    merged, first = side_run(model, batch)
    with torch.no_grad():
        plain = model.get_base_model().get_input_embeddings()(batch["input_ids"])
    assert (merged[is_image] - plain[is_image]).abs().amax() > 1e-3
    assert torch.equal(merged[~is_image], plain[~is_image])

    swapped = dict(batch, pixel_values=batch["pixel_values"].roll(1, 0))
    _, second = side_run(model, swapped)
    after_image = is_image.int().cumsum(1) > 0
    answer = after_image & (batch["labels"] != -100) & ~is_image
    assert (first - second).abs()[answer].amax() > 1e-2
    assert torch.equal(first[~after_image], second[~after_image])  # causal: what comes before the image does not
    with model.disable_adapter():
        base_first, base_second = logits(model, batch), logits(model, swapped)
    trained_first, trained_second = logits(model, batch), logits(model, swapped)
    assert not torch.equal(trained_first, base_first)
    delta = (trained_first - base_first) - (trained_second - base_second)
    assert delta[answer].abs().amax() > 1e-3


def test_save_model_reloads_onto_a_fresh_base_model(trained, tmp_path):
    """trainer.save_model writes a PEFT adapter; loaded onto a fresh base model it gives the trained logits on an
    image batch."""
    trained.trainer.save_model(str(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "QST"
    loaded = PeftModel.from_pretrained(build_model(trained.family, trained.processor), tmp_path).eval()
    assert torch.equal(logits(loaded, trained.batch), logits(trained.model, trained.batch))


def test_cached_generation_with_an_image_equals_recomputation(trained):
    model, processor = trained.model, trained.processor
    prompt = [[{"role": "user", "content": [{"type": "image", "image": random_image(100 + i)},
                                            {"type": "text", "text": "What is in this picture?"}]}] for i in range(2)]
    inputs = processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["attention_mask"].all()  # the same text: no padding
    steps = 5
    generated = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    sequence = inputs["input_ids"]
    for _ in range(steps):
        nxt = logits(model, dict(images, input_ids=sequence))[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, nxt], 1)
    assert torch.equal(generated, sequence)
