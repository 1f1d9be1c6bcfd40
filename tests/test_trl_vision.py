"""TRL's SFTTrainer on image + chat data with peft_config=QSTConfig(...): the vision-language recipe, end to end.

What a user runs: a processor (tokenizer + the family's image processor), a dataset of PIL images with chat messages,
``SFTTrainer(model=..., processing_class=processor, peft_config=QSTConfig(...))`` with SFTConfig's defaults (gradient
checkpointing on), TRL's vision collator turning each batch into ``input_ids`` + ``pixel_values``. Tiny random Llava
(CLIP vision tower) and Idefics3 (SigLIP vision tower, pixel shuffle connector, ``pixel_attention_mask``) with the
real SmolLM2 tokenizer and small images, built offline; and the families whose image token count depends on the
image's size: LLaVA-NeXT and LLaVA-OneVision (anyres: each image tiled by the grid of ``image_grid_pinpoints`` that
fits it best, ``image_sizes`` telling the model how to unpad the tiles) and Idefics2 (``do_image_splitting``: each
image split into 4 crops beside the whole, padded to the batch's largest with ``pixel_attention_mask`` marking the
pixels), on batches of images of different sizes. Checked: only side parameters change, the loss falls on a fixed
batch, the images reach the side network, ``save_model`` writes a PEFT adapter that reloads onto a fresh base model
with the trained logits, and cached generation with an image (prompts of different lengths, left-padded, where the
images' sizes differ) equals recomputation.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import PeftModel

from peft_qst import QSTConfig, QSTLayer

from .test_multimodal import FAMILIES as MODEL_CONFIGS
from .test_multimodal import PINPOINTS

pytestmark = pytest.mark.smollm2  # borrows the real SmolLM2 tokenizer and chat tokens

FAMILIES = ("llava", "idefics3", "llava_next", "llava_onevision", "idefics2")
#: the image sizes (height, width) of the rows, in turn: one size where the processor resizes every image to its
#: 28x28; for the families whose image token count follows the image's size, sizes that tile (and split) differently
IMAGE_SIZES = {family: [(28, 28)] for family in ("llava", "idefics3")} | {
    family: [(28, 56), (56, 28), (56, 56), (28, 28)] for family in ("llava_next", "llava_onevision", "idefics2")
}
#: a chat template that renders TRL's multimodal messages ({"type": "image"} / {"type": "text"} parts) in SmolLM2's
#: chat format, each image as the <image> placeholder that every family's processor expands into the image tokens
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_processor(family: str, tokenizer_dir: str):
    """The family's processor, built offline: the SmolLM2 tokenizer with the family's image tokens added and its
    image processor at 28x28 pixels (2x2 patches of 14: Llava 4 image tokens, Idefics3 1 after its 2x2 shuffle). The
    LLaVA-NeXT family tiles an image by the grids of PINPOINTS (tiles of 28x28, as the tiny models' vision tower
    takes); Idefics2 splits it, resizes each part to 28-56 pixels a side and takes 4 resampler latents per part."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if family == "llava_next":
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        images = LlavaNextImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                            image_grid_pinpoints=PINPOINTS)
        return LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14, chat_template=TEMPLATE,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  image_token="<image>")
    if family == "llava_onevision":
        from transformers import LlavaOnevisionProcessor
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        class ImageOnlyProcessor(LlavaOnevisionProcessor):
            """LlavaOnevisionProcessor requires a video processor, and every video processor torchvision, which
            the tests do not install: the same processor (its image token counting, its __call__) without one."""

            def __init__(self, image_processor, tokenizer, **kwargs):
                super().__init__(image_processor, tokenizer, None, **kwargs)

        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
        images = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=PINPOINTS)
        return ImageOnlyProcessor(images, tokenizer, num_image_tokens=4, vision_feature_select_strategy="full",
                                  chat_template=TEMPLATE)
    if family == "idefics2":
        from transformers import Idefics2Processor
        from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

        images = Idefics2ImageProcessorPil(do_image_splitting=True, size={"shortest_edge": 28, "longest_edge": 56})
        return Idefics2Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4, chat_template=TEMPLATE)
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
    """A tiny random model of the family (tests/test_multimodal.py's config, its language model of the same type)
    sized to the processor's vocabulary and with its image (and video) token ids (the same weights for the same seed:
    a fresh base model to reload an adapter onto)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    tokenizer = processor.tokenizer
    kwargs = dict(MODEL_CONFIGS[family][0])
    kwargs["text_config"] = dict(
        kwargs["text_config"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    for key, token in (("image_token_index", "<image>"), ("image_token_id", "<image>"),
                       ("video_token_index", "<video>")):
        if key in kwargs:
            kwargs[key] = tokenizer.convert_tokens_to_ids(token)
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config).float()


def random_image(seed: int, size: tuple[int, int] = (28, 28)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def image_size(family: str, row: int) -> tuple[int, int]:
    sizes = IMAGE_SIZES[family]
    return sizes[row % len(sizes)]


def chat_rows(family: str, n: int, seed: int = 0) -> list[dict]:
    """Image + chat rows as TRL's vision datasets hold them: ``images`` (PIL) and ``messages`` with an image part.
    Rows made with another seed hold the same text with other images of the same sizes."""
    return [
        {"images": [random_image(seed + i, image_size(family, i))], "messages": [
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
    rows = chat_rows(family, 4)
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
    if trained.family in ("llava_next", "llava_onevision"):  # tiles and image tokens as many as each size takes
        assert batch["image_sizes"].tolist() == [list(image_size(trained.family, i)) for i in range(len(trained.rows))]
        assert len(set(is_image.sum(1).tolist())) > 1
    if trained.family == "idefics2":  # 4 crops and the whole image, padded to the batch's largest
        assert batch["pixel_values"].shape[1] == 5 and not batch["pixel_attention_mask"].all()
    merged, first = side_run(model, batch)
    with torch.no_grad():
        plain = model.get_base_model().get_input_embeddings()(batch["input_ids"])
    assert (merged[is_image] - plain[is_image]).abs().amax() > 1e-3
    assert torch.equal(merged[~is_image], plain[~is_image])

    # other images of the same sizes: the same tokens (the image token counts follow the sizes)
    swapped = trained.trainer.data_collator(chat_rows(trained.family, len(trained.rows), seed=50))
    assert torch.equal(swapped["input_ids"], batch["input_ids"])
    assert not torch.equal(swapped["pixel_values"], batch["pixel_values"])
    _, second = side_run(model, swapped)
    after_image = is_image.int().cumsum(1) > 0
    answer = after_image & (batch["labels"] != -100) & ~is_image
    # small bounds: Idefics2's random resampler hands out mostly its latents, its features of two images ~1e-2 apart
    assert (first - second).abs()[answer].amax() > 1e-3
    assert torch.equal(first[~after_image], second[~after_image])  # causal: what comes before the image does not
    with model.disable_adapter():
        base_first, base_second = logits(model, batch), logits(model, swapped)
    trained_first, trained_second = logits(model, batch), logits(model, swapped)
    assert not torch.equal(trained_first, base_first)
    delta = (trained_first - base_first) - (trained_second - base_second)
    assert delta[answer].abs().amax() > 1e-4


def test_save_model_reloads_onto_a_fresh_base_model(trained, tmp_path):
    """trainer.save_model writes a PEFT adapter; loaded onto a fresh base model it gives the trained logits on an
    image batch."""
    trained.trainer.save_model(str(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "QST"
    loaded = PeftModel.from_pretrained(build_model(trained.family, trained.processor), tmp_path).eval()
    assert torch.equal(logits(loaded, trained.batch), logits(trained.model, trained.batch))


def test_cached_generation_with_an_image_equals_recomputation(trained):
    """Two prompts with images of the family's first two sizes (left-padded where their image token counts differ,
    as batched generation pads): cached greedy generation equals recomputing the whole sequence for each new token
    (with generate's positions: counted over the attention mask), and each prompt generates alone what it generates
    in the batch. A generated image token would ask for image features no image gives, so neither way may pick
    one."""
    model, processor = trained.model, trained.processor
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")

    def encode(rows):
        prompt = [[{"role": "user", "content": [
            {"type": "image", "image": random_image(100 + i, image_size(trained.family, i))},
            {"type": "text", "text": "What is in this picture?"},
        ]}] for i in rows]
        return processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt",
                                             processor_kwargs=dict(padding=True, padding_side="left"))

    inputs = encode([0, 1])
    # the same text: padded where the image token counts follow the images' sizes (Idefics2's do not)
    assert inputs["attention_mask"].all() == (trained.family not in ("llava_next", "llava_onevision"))
    assert inputs["attention_mask"][:, -1].all()  # padded on the left
    steps = 5
    options = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, suppress_tokens=[image_token])
    generated = model.generate(**inputs, **options)
    images = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    sequence, mask = inputs["input_ids"], inputs["attention_mask"]
    for _ in range(steps):
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        step = dict(images, input_ids=sequence, attention_mask=mask, position_ids=positions)
        step_logits = logits(model, step)[:, -1]
        step_logits[:, image_token] = float("-inf")
        nxt = step_logits.argmax(-1, keepdim=True)
        sequence, mask = torch.cat([sequence, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(generated, sequence)
    for row in range(2):
        alone = model.generate(**encode([row]), **options)
        assert torch.equal(alone[0, -steps:], generated[row, -steps:])
