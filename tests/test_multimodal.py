"""QST on composite (multimodal) models: the side network runs beside the language model of a vision-language model.

Tiny random models of each supported family (Llava with a Llama text model, Idefics3, SmolVLM, PaliGemma, Gemma 3,
Mistral 3, Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT, LLaVA-NeXT-Video, LLaVA-OneVision, Idefics2, InternVL, Aya Vision,
GOT-OCR2, GLM-4.1V, GLM-4.5V, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5, Qwen3.5-MoE, LFM2-VL, LLaVA-OneVision-1.5, VipLlava,
Video-LLaVA, DeepSeek-VL, Janus, Ovis2, Command A Vision) are fed real ``pixel_values`` (random tensors of the vision
tower's shape) with as many image tokens in ``input_ids`` as each model's processor would put there. For each family:
the start (and ``disable_adapter()``) equals the base model exactly, training changes side parameters only and the
frozen model records nothing for backward, the side network's output depends on the image, cached greedy generation
equals token-by-token recomputation (also for a left-padded batch), and a saved adapter reloads onto a fresh base model
with identical logits.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_qst import QSTConfig, QSTLayer
from peft_qst.side import QSTUnsupportedModelError

from .test_training_graph import audit_backward, qst_layer

IMAGE = 200  # the image token id of every tiny model below
PLACEHOLDERS = [IMAGE, 201, 202, 203]  # the image, its start and end, and the video token ids (where a model has them)
TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=256, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
PINPOINTS = [[28, 56], [56, 28], [56, 56]]  # the anyres tile grids (1x2, 2x1, 2x2 tiles of the vision tower's 28x28)
#: adept/fuyu-8b's text keys (config.json), at tiny sizes
FUYU_TEXT = dict(
    model_type="persimmon", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    vocab_size=256, hidden_act="relu2", qk_layernorm=True, partial_rotary_factor=0.5, max_position_embeddings=512,
    layer_norm_eps=1e-5, rope_theta=25000.0, hidden_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)


def _vision(**overrides):
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                 patch_size=14)
    return {**sizes, **overrides}


def _qwen_vision(version: str):
    if version in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5"):
        # Qwen3-VL's deepstack: the vision tower's block outputs at deepstack_visual_indexes, merged, are added to the
        # language model's hidden states at the image tokens after its first blocks (here after both); Qwen3.5 has none
        deepstack = {} if version == "qwen3_5" else dict(deepstack_visual_indexes=[0, 1])
        return dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, **deepstack)
    if version == "qwen2_vl":
        return dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2)
    return dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=2, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])


#: config of each family, and the number of image tokens one 28x28 (Mistral 3: 56x56, GOT-OCR2: 64x64, the
#: LLaVA-NeXT family: 28x56) image takes, as the model's processor counts them: Llava (patches, CLS dropped) 2x2;
#: Idefics3/SmolVLM 2x2 patches / scale_factor^2 = 1; PaliGemma 2x2 patches; Gemma 3 mm_tokens_per_image; Mistral 3
#: 4x4 Pixtral patches merged 2x2 (the processor's [IMG_BREAK]/[IMG_END] tokens are plain text to the model);
#: Qwen2-VL/2.5-VL and GLM-4.1V a 1x4x4 patch grid merged 2x2; LLaVA-NeXT/-NeXT-Video/-OneVision the whole image's 2x2
#: patches, then its two tiles' 2x4 patches with a newline after each row (2x5); Idefics2 resampler_n_latents;
#: InternVL (2x2 patches, pixel-shuffled by 0.5) and Aya Vision (2x2 patches, downsample_factor 2) 1; GOT-OCR2 4x4
#: patches, downsampled 4x by its projector's convolutions, 1
FAMILIES = {
    "llava": (dict(text_config=dict(TEXT, model_type="llama"), image_token_index=IMAGE,
                   vision_config=_vision(model_type="clip_vision_model", projection_dim=32)), 4),
    "idefics3": (dict(text_config=dict(TEXT, model_type="llama"), vision_config=_vision(), scale_factor=2,
                      image_token_id=IMAGE), 1),
    "smolvlm": (dict(text_config=dict(TEXT, model_type="llama"), vision_config=_vision(), scale_factor=2,
                     image_token_id=IMAGE), 1),
    "paligemma": (dict(text_config=dict(TEXT, model_type="gemma"), vision_config=_vision(projection_dim=64),
                       image_token_index=IMAGE, projection_dim=64), 4),
    "gemma3": (dict(text_config=dict(TEXT, model_type="gemma3_text", sliding_window=4,
                                     layer_types=["sliding_attention", "full_attention"]),
                    vision_config=_vision(), mm_tokens_per_image=4, image_token_index=IMAGE, boi_token_index=201,
                    eoi_token_index=202), 4),
    "mistral3": (dict(text_config=dict(TEXT, model_type="mistral"), image_token_index=IMAGE, spatial_merge_size=2,
                      vision_config=_vision(model_type="pixtral", image_size=56, head_dim=16)), 4),
    **{
        version: (dict(text_config=dict(TEXT, model_type=f"{version}_text", rope_parameters=MROPE),
                       vision_config=_qwen_vision(version), image_token_id=IMAGE, video_token_id=203,
                       vision_start_token_id=201, vision_end_token_id=202), 4)
        for version in ("qwen2_vl", "qwen2_5_vl")
    },
    **{
        family: (dict(text_config=dict(TEXT, model_type=text_type), image_token_index=IMAGE, video_token_index=203,
                      vision_config=_vision(model_type=vision_type), image_grid_pinpoints=PINPOINTS), 14)
        for family, text_type, vision_type in (
            ("llava_next", "llama", "clip_vision_model"), ("llava_next_video", "llama", "clip_vision_model"),
            ("llava_onevision", "qwen2", "siglip_vision_model"),
        )
    },
    "idefics2": (dict(text_config=dict(TEXT, model_type="mistral"), vision_config=_vision(), image_token_id=IMAGE,
                      perceiver_config=dict(hidden_size=64, resampler_n_latents=4, resampler_depth=1,
                                            resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=1)), 4),
    "internvl": (dict(text_config=dict(TEXT, model_type="qwen2"), image_token_id=IMAGE,
                      vision_config=_vision(image_size=[28, 28], patch_size=[14, 14])), 1),
    # Cohere2: sliding-window layers with rotary positions and full-attention layers without
    "aya_vision": (dict(text_config=dict(TEXT, model_type="cohere2", sliding_window=4,
                                         layer_types=["sliding_attention", "full_attention"]),
                        vision_config=_vision(model_type="siglip_vision_model"), image_token_index=IMAGE,
                        downsample_factor=2), 1),
    "got_ocr2": (dict(text_config=dict(TEXT, model_type="qwen2"), image_token_index=IMAGE,
                      vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=1, num_attention_heads=2,
                                         mlp_dim=64, image_size=64, patch_size=16, window_size=2,
                                         global_attn_indexes=[0], initializer_range=0.02)), 1),
    # GLM-4.1V rotates half of each head (partial_rotary_factor 0.5), its sections adding up to half of that: heads of
    # 32 here, so that the side heads at r=4 (16 wide, 8 channels rotated) take scaled sections
    "glm4v": (dict(text_config=dict(TEXT, model_type="glm4v_text", num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=32, rope_parameters=dict(MROPE, partial_rotary_factor=0.5)),
                   vision_config=dict(_qwen_vision("qwen2_5_vl"), image_size=28), image_token_id=IMAGE,
                   video_token_id=203, image_start_token_id=201, image_end_token_id=202), 4),
}
FAMILIES.update({
    # Qwen3-VL: interleaved multimodal rotary sections, and the deepstack visual features its language model adds
    # inside (see _qwen_vision); the MoE variant's text model routes over 4 experts
    **{
        version: (dict(text_config=dict(TEXT, model_type=f"{version}_text", **moe,
                                        rope_parameters=dict(MROPE, mrope_interleaved=True)),
                       vision_config=_qwen_vision(version), image_token_id=IMAGE, video_token_id=203,
                       vision_start_token_id=201, vision_end_token_id=202), 4)
        for version, moe in (
            ("qwen3_vl", {}),
            ("qwen3_vl_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
        )
    },
    # LFM2-VL: a hybrid text model (short convolutions and attention) behind a SigLIP2 NaFlex vision tower (patches
    # flattened, spatial_shapes); a 4x4 patch grid, pixel-unshuffled by downsample_factor 2, takes 4 tokens
    "lfm2_vl": (dict(text_config=dict(TEXT, model_type="lfm2", layer_types=["conv", "full_attention"]),
                     vision_config=_vision(model_type="siglip2_vision_model", num_patches=16),
                     image_token_id=IMAGE, projector_hidden_size=64, downsample_factor=2), 4),
    # Qwen3.5: a hybrid text model (Gated DeltaNet linear attention and full attention), multimodal rotary sections
    # interleaved over the rotated quarter of each head (here half of 32, as GLM-4.1V's); the MoE variant's text model
    # routes over 4 experts beside a shared one
    **{
        version: (dict(text_config=dict(TEXT, model_type=f"{version}_text", num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=32,
                                        layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
                                        rope_parameters=dict(MROPE, partial_rotary_factor=0.5, mrope_interleaved=True),
                                        **moe),
                       vision_config=_qwen_vision("qwen3_5"), image_token_id=IMAGE, video_token_id=203,
                       vision_start_token_id=201, vision_end_token_id=202), 4)
        for version, moe in (
            ("qwen3_5", {}),
            ("qwen3_5_moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=32)),
        )
    },
    # GLM-4.5V: GLM-4.1V's layout (see glm4v) with a text model that routes over 4 experts after its first, dense block
    "glm4v_moe": (dict(text_config=dict(TEXT, model_type="glm4v_moe_text", num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=32, n_routed_experts=4, num_experts_per_tok=2,
                                        moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1,
                                        rope_parameters=dict(MROPE, partial_rotary_factor=0.5)),
                       vision_config=dict(_qwen_vision("qwen2_5_vl"), image_size=28), image_token_id=IMAGE,
                       video_token_id=203, image_start_token_id=201, image_end_token_id=202), 4),
    # LLaVA-OneVision-1.5: a Qwen3 text model (1-D positions) behind a RICE vision tower fed Qwen2-VL-style rows of
    # patches (one frame, no temporal patch) with image_grid_thw; a 1x4x4 patch grid merged 2x2
    "llava_onevision1_5": (dict(text_config=dict(TEXT, model_type="qwen3"), image_token_id=IMAGE, video_token_id=203,
                                vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, out_hidden_size=64,
                                                   num_heads=2, patch_size=14, spatial_merge_size=2),
                                vision_start_token_id=201,
                                vision_end_token_id=202), 4),
    # Janus: its own SigLIP-style vision tower (2x2 patches, num_image_tokens); the VQ model and generation head it
    # has for generating images are not used for text
    "janus": (dict(text_config=dict(TEXT, model_type="llama"), image_token_id=IMAGE,
                   vision_config=dict(_vision(), projection_dim=64, num_image_tokens=4, depth=2),
                   vq_config=dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1, 1],
                                  num_res_blocks=1, projection_dim=64, image_token_embed_dim=64, latent_channels=8,
                                  num_patches=4)), 4),
    # Ovis2: a visual tokenizer (2x2 patches, hidden_stride 2: 1 visual word) whose probabilities weight a visual
    # embedding table as wide as the text model (hidden_size)
    "ovis2": (dict(text_config=dict(TEXT, model_type="qwen2"), image_token_id=IMAGE, hidden_size=64, vocab_size=256,
                   vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      image_size=28, patch_size=14, vocab_size=64, hidden_stride=2,
                                      num_visual_indicator_tokens=5),
                   visual_indicator_token_ids=[204, 205, 206, 207, 208]), 1),
    # VipLlava: the image features of several vision layers (vision_feature_layers), concatenated; Video-LLaVA's image
    # path (CLS dropped, 2x2 patches); DeepSeek-VL's SigLIP vision tower (2x2 patches); Command A Vision (Cohere2
    # text model, 2x2 patches pixel-unshuffled by downsample_factor 2: 1 token)
    "vipllava": (dict(text_config=dict(TEXT, model_type="llama"), image_token_index=IMAGE,
                      vision_config=_vision(model_type="clip_vision_model", num_hidden_layers=2),
                      vision_feature_layers=[-2, -1]), 4),
    "video_llava": (dict(text_config=dict(TEXT, model_type="llama"), image_token_index=IMAGE, video_token_index=203,
                         vision_config=_vision(model_type="clip_vision_model")), 4),
    "deepseek_vl": (dict(text_config=dict(TEXT, model_type="llama"), image_token_id=IMAGE,
                         vision_config=_vision(model_type="siglip_vision_model")), 4),
    "cohere2_vision": (dict(text_config=dict(TEXT, model_type="cohere2", sliding_window=4,
                                             layer_types=["sliding_attention", "full_attention"]),
                            vision_config=_vision(model_type="siglip_vision_model"), image_token_id=IMAGE,
                            downsample_factor=2, alignment_intermediate_size=64), 1),
    # Fuyu: no vision tower, its image patches (30x30 here, flattened) projected linearly into the text model's
    # embeddings (one token each); built from a flat config as adept/fuyu-8b's config.json is, the text model's sizes
    # at the top level and in text_config (Persimmon: half of each head rotated, query/key layer norms, relu2)
    "fuyu": (dict({k: v for k, v in FUYU_TEXT.items() if k != "model_type"}, text_config=FUYU_TEXT, image_size=30,
                  patch_size=15, num_channels=3, image_token_id=IMAGE), 4),
})
#: families whose language model routes tokens over experts: its grouped expert kernel (grouped_mm) multiplies the
#: tokens each expert gets, from the whole batch, as one product, so another image changes the rounding of the text
#: before it (by up to 2.4e-7 in the base model's own final hidden state)
MOE_FAMILIES = ("qwen3_vl_moe", "glm4v_moe", "qwen3_5_moe")
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "glm4v", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "glm4v_moe",
                  "qwen3_5_moe")
#: families fed rows of flattened patches with image_grid_thw (1x4x4 patches per image: 16 rows each)
PATCH_ROW_FAMILIES = MROPE_FAMILIES + ("llava_onevision1_5",)
#: LLaVA-NeXT-style models: a 28x56 image is tiled (anyres) as the 1x2 grid of image_grid_pinpoints
ANYRES_FAMILIES = ("llava_next", "llava_next_video", "llava_onevision")


def build(family: str, seed: int = 0, **vision_overrides):
    from transformers import AutoConfig, AutoModelForImageTextToText

    kwargs = dict(FAMILIES[family][0])
    if "vision_config" in kwargs:  # Fuyu has no vision tower
        kwargs["vision_config"] = {**kwargs["vision_config"], **vision_overrides}
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    # frozen, as get_peft_model leaves it: PyTorch multiplies a non-contiguous 3-D input (LLaVA-OneVision's projector
    # input) by another kernel when the weight requires grad, so an unfrozen reference differs in the last bits
    model = AutoModelForImageTextToText.from_config(config).float().eval().requires_grad_(False)
    for name, parameter in model.named_parameters():
        if "mm_input_projection_weight" in name:  # Gemma 3 starts its projection at zero: no image would get through
            torch.nn.init.normal_(parameter, std=0.5, generator=torch.Generator().manual_seed(seed))
    return model


def make_inputs(family: str, batch: int = 2, words: int = 5, pixel_seed: int = 0):
    """input_ids with one image per row (its tokens laid out as the family's processor lays them out) and the
    keyword arguments the model takes with them (pixel_values and what goes with them)."""
    image_tokens = FAMILIES[family][1]
    text = torch.randint(3, 150, (batch, words), generator=torch.Generator().manual_seed(1))
    image = torch.full((batch, image_tokens), IMAGE)

    def col(token):
        return torch.full((batch, 1), token)

    pixels = torch.Generator().manual_seed(pixel_seed)
    extra = {}
    if family in PATCH_ROW_FAMILIES:
        ids = torch.cat([col(1), col(201), image, col(202), text], 1)
        frames = 1 if family == "llava_onevision1_5" else 2  # the temporal patch (an image repeated twice)
        extra["pixel_values"] = torch.randn(batch * 16, 3 * frames * 14 * 14, generator=pixels)
        extra["image_grid_thw"] = torch.tensor([[1, 4, 4]] * batch)
        if family in MROPE_FAMILIES:
            extra["mm_token_type_ids"] = (ids == IMAGE).long()
    elif family == "gemma3":
        ids = torch.cat([col(1), col(201), image, col(202), text], 1)
        extra["pixel_values"] = torch.randn(batch, 3, 28, 28, generator=pixels)
        extra["token_type_ids"] = (ids == IMAGE).long()
    elif family == "paligemma":
        ids = torch.cat([image, col(1), text], 1)
        extra["pixel_values"] = torch.randn(batch, 3, 28, 28, generator=pixels)
        extra["token_type_ids"] = torch.zeros_like(ids)  # the prompt: the prefix, attended both ways
    elif family == "mistral3":
        ids = torch.cat([col(1), image, text], 1)
        extra["pixel_values"] = torch.randn(batch, 3, 56, 56, generator=pixels)
        extra["image_sizes"] = torch.tensor([[56, 56]] * batch)
    elif family == "lfm2_vl":
        ids = torch.cat([col(1), image, text], 1)
        extra["pixel_values"] = torch.randn(batch, 16, 3 * 14 * 14, generator=pixels)  # 4x4 flattened patches
        extra["pixel_attention_mask"] = torch.ones(batch, 16, dtype=torch.long)
        extra["spatial_shapes"] = torch.tensor([[4, 4]] * batch)
    elif family == "fuyu":
        ids = torch.cat([col(1), image, text], 1)
        extra["pixel_values"] = torch.randn(batch, image_tokens, 15 * 15 * 3, generator=pixels)  # flattened patches
    elif family in ANYRES_FAMILIES:
        ids = torch.cat([col(1), image, text], 1)
        extra["pixel_values"] = torch.randn(batch, 3, 3, 28, 28, generator=pixels)  # the whole image, then 2 tiles
        extra["image_sizes"] = torch.tensor([[28, 56]] * batch)
    else:
        ids = torch.cat([col(1), image, text], 1)
        shape = {"got_ocr2": (batch, 3, 64, 64)}.get(family, (batch, 3, 28, 28))
        if family in ("idefics3", "smolvlm", "idefics2"):
            shape = (batch, 1, 3, 28, 28)  # images per row
        extra["pixel_values"] = torch.randn(*shape, generator=pixels)
    return ids, extra


def training_inputs(family: str, ids, extra):
    """Labels (image tokens ignored, as the processors' collators do) and, for PaliGemma, the suffix marked in
    token_type_ids (the prefix-LM mask it trains with)."""
    labels = ids.masked_fill(ids == IMAGE, -100)
    extra = dict(extra)
    if family == "paligemma":
        extra["token_type_ids"] = torch.zeros_like(ids)
        extra["token_type_ids"][:, FAMILIES[family][1] + 2:] = 1
        labels = labels.masked_fill(extra["token_type_ids"] == 0, -100)
    return labels, extra


def side_network(model):
    return qst_layer(model).qst_side["default"]


def perturb_upsample(model, seed: int = 0, scale: float = 0.5):
    """Move the zero-initialised upsample off zero, so that the side network changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = side_network(model).upsample.weight
        weight.copy_(torch.randn(weight.shape, generator=generator) * scale)


def logits(model, ids, extra):
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits


def train(model, family, ids, extra, steps=3, lr=1e-2):
    labels, extra = training_inputs(family, ids, extra)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=ids, labels=labels, **extra).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


SUPPORTED = list(FAMILIES)


@pytest.mark.parametrize("family", SUPPORTED)
def test_side_network_runs_beside_the_language_model(family):
    base = build(family)
    language_model = base.get_decoder()
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    layer = qst_layer(model)
    assert layer.get_base_layer() is language_model  # the language model, not the vision tower or the whole
    text = base.config.get_text_config()
    assert side_network(model).upsample.out_features == text.hidden_size
    signature = model.peft_config["default"].base_model_signature
    assert signature["model_type"] == family and signature["text_model_type"] == text.model_type
    assert signature["hidden_size"] == text.hidden_size


@pytest.mark.parametrize("family", SUPPORTED)
def test_start_and_disabled_adapter_equal_the_base_model(family):
    ids, extra = make_inputs(family)
    base = build(family)
    expected = logits(base, ids, extra)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    assert torch.equal(logits(model, ids, extra), expected)  # an untrained side network adds exactly zero
    perturb_upsample(model)
    assert not torch.equal(logits(model, ids, extra), expected)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids, extra), expected)


def _audit_training_step(model, ids, labels, extra):
    """One forward + backward audited as tests/test_training_graph.py audits a text model, watching every frozen
    module of the composite model (vision tower, projector, language model: everything inside ``model.model`` but the
    side network; the LM head's output, the logits, is what the loss saves, as without QST)."""
    layer = qst_layer(model)
    side_modules = set(layer.qst_side["default"].modules())
    composite = model.get_base_model().model
    frozen = [
        m for m in composite.modules()
        if m not in side_modules and m is not composite and not isinstance(m, QSTLayer)
    ]
    return audit_backward(model, ids, watched=frozen, labels=labels, **extra)


@pytest.mark.parametrize("family", SUPPORTED)
def test_training_changes_only_the_side_network_and_saves_nothing_frozen(family):
    ids, extra = make_inputs(family)
    base = build(family)
    frozen_before = {k: v.clone() for k, v in base.state_dict().items()}
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    side_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert side_before and all(".qst_side." in n for n in side_before)
    train(model, family, ids, extra)

    # the vision tower, the projector, the language model and the LM head are bit-identical
    for key, value in model.get_base_model().state_dict().items():
        if ".qst_side." in key:
            continue
        original = key.replace(".base_layer.", ".")
        assert torch.equal(value, frozen_before[original]), f"{key} changed"
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, side_before[n])]
    assert changed, "no side parameter changed"

    # one more step, audited: only side parameters get gradients, nothing a frozen module computed is saved for
    # backward except the hidden states handed to the side network, and those carry no graph
    model.train()
    labels, train_extra = training_inputs(family, ids, extra)
    out, saved, outputs, handed_over = _audit_training_step(model, ids, labels, train_extra)
    assert torch.isfinite(out.loss)
    for name, parameter in model.named_parameters():
        if ".qst_side." in name:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        else:
            assert parameter.grad is None and not parameter.requires_grad, name
    leaked = [shape for ptr, shape in saved if ptr in outputs and ptr not in handed_over]
    assert not leaked, f"frozen activations saved for backward: {leaked[:5]}"
    assert len(handed_over) == base.config.get_text_config().num_hidden_layers + 1
    assert all(h.grad_fn is None for h in handed_over.values())


def test_target_modules_naming_the_whole_multimodal_trunk_is_refused_naming_the_fix():
    """The side network is built from the language model's class and text config: ``target_modules="model"`` (the
    trunk name of a text model, which here names LlavaModel, vision tower and all) is refused, naming the fix; the
    language model itself may be named."""
    with pytest.raises(QSTUnsupportedModelError, match=re.escape(
            "QST side-tunes the language model of a llava model, but the module it would wrap (LlavaModel) is not it "
            "(its config is not the model's text_config). Leave QSTConfig.target_modules None")):
        get_peft_model(build("llava"), QSTConfig(task_type="CAUSAL_LM", r=4, target_modules="model"))
    named = QSTConfig(task_type="CAUSAL_LM", r=4, target_modules=r"model\.language_model")
    assert isinstance(get_peft_model(build("llava"), named).base_model.model.model.language_model, QSTLayer)


def test_input_require_grads_does_not_pull_the_vision_tower_into_backward():
    """prepare_model_for_kbit_training and gradient checkpointing call enable_input_require_grads, which in a
    composite model hooks the vision tower's embeddings too: the merged inputs_embeds then carry the vision tower's
    graph into the language model. The side network reads them detached, so backward never runs through the frozen
    vision tower and projector."""
    family = "llava"
    ids, extra = make_inputs(family)
    base = build(family)
    base.enable_input_require_grads()
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    perturb_upsample(model)
    reached = []

    def watch(_module, _inputs, output):
        if output.requires_grad:
            output.register_hook(lambda grad: reached.append(grad))

    handle = base.model.multi_modal_projector.register_forward_hook(watch)
    try:
        model.train()
        labels, extra = training_inputs(family, ids, extra)
        model(input_ids=ids, labels=labels, **extra).loss.backward()
    finally:
        handle.remove()
    assert not reached, "backward ran into the frozen projector and vision tower"
    assert all(p.grad is not None for n, p in model.named_parameters() if ".qst_side." in n)


def _side_output(model, ids, extra):
    """What the side network hands to the upsample (its contribution before the gate), at every position."""
    seen = []
    handle = side_network(model).register_forward_hook(lambda _m, _args, out: seen.append(out[0]))
    try:
        logits(model, ids, extra)
    finally:
        handle.remove()
    return seen[-1]


@pytest.mark.parametrize("family", SUPPORTED)
def test_the_side_network_sees_the_image(family):
    ids, extra = make_inputs(family, pixel_seed=0)
    _, other = make_inputs(family, pixel_seed=1)
    model = get_peft_model(build(family), QSTConfig(task_type="CAUSAL_LM", r=4))
    first, second = _side_output(model, ids, extra), _side_output(model, ids, other)
    # the image tokens and the text after them differ (Llava-style models: the text before the image does not)
    after_image = (ids == IMAGE).int().cumsum(1) > 0
    assert (first - second).abs()[after_image].amax() > 1e-3
    if family in MOE_FAMILIES:  # see MOE_FAMILIES: the base model's text before the image moves in the last bits too
        torch.testing.assert_close(first[~after_image], second[~after_image], rtol=0, atol=1e-5)
    else:
        assert torch.equal(first[~after_image], second[~after_image])
    # and so its contribution to the logits changes with the image
    perturb_upsample(model)
    with model.disable_adapter():
        base_first, base_second = logits(model, ids, extra), logits(model, ids, other)
    delta = (logits(model, ids, extra) - base_first) - (logits(model, ids, other) - base_second)
    assert delta.abs().amax() > 1e-3


@pytest.mark.parametrize("family,r", [("qwen2_vl", 4), ("qwen2_vl", 8), ("qwen2_5_vl", 4), ("qwen2_5_vl", 8),
                                      ("glm4v", 4), ("qwen3_vl", 4), ("qwen3_vl", 8), ("qwen3_5", 4)])
def test_side_rotary_follows_the_multimodal_positions(family, r):
    """Qwen2-VL's language model rotates by 3-D positions (time, height, width of each image token): the side trunk
    gets the same position ids, and its multimodal rotary sections are scaled to its rotated head width (r=8: heads
    of 8, half the backbone's, so the sections [2, 3, 3] become four frequencies; GLM-4.1V at r=4: heads of 16, half
    the backbone's, of which it rotates half)."""
    ids, extra = make_inputs(family)
    model = get_peft_model(build(family), QSTConfig(task_type="CAUSAL_LM", r=r))
    layer = qst_layer(model)
    side = side_network(model)
    rope = side.trunk.config.rope_parameters
    sections = rope["mrope_section"]
    rotated = int(side.trunk.config.head_dim * rope.get("partial_rotary_factor", 1.0))
    assert sum(sections) == rotated // 2 and len(sections) == 3
    positions = {}

    def grab(key):
        return lambda _m, args, kwargs: positions.__setitem__(key, kwargs.get("position_ids", args[1] if len(args) > 1
                                                                                    else None))

    handles = [layer.base_layer.rotary_emb.register_forward_pre_hook(grab("backbone"), with_kwargs=True),
               side.trunk.rotary_emb.register_forward_pre_hook(grab("side"), with_kwargs=True)]
    try:
        logits(model, ids, extra)
    finally:
        for handle in handles:
            handle.remove()
    assert positions["backbone"].dim() == 3 and torch.equal(positions["side"], positions["backbone"])
    image = (ids == IMAGE)[0]
    assert not torch.equal(positions["side"][1, 0, image], positions["side"][2, 0, image])  # heights != widths


def test_side_heads_need_a_rotary_frequency_for_each_multimodal_section():
    """Qwen2-VL's three multimodal rotary sections (time, height, width) need at least one rotary frequency each in a
    side head. A Qwen2-VL language model of six heads of 16 at r=4 (24 side channels): four side heads of 6 rotate
    three frequencies, one per section, and run; six heads of 4 rotate two, which three sections cannot share, and are
    refused naming the sections (the side network otherwise got sections adding up to more than its head rotates).
    Three heads of 8 rotate four: the sections [2, 3, 3] scale to [1, 1.5, 1.5], and the frequency left over by rounding
    goes to the first section that lost most (height), so time, height and width keep the backbone's order of
    shares."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    kwargs = dict(FAMILIES["qwen2_vl"][0])
    kwargs["text_config"] = dict(kwargs["text_config"], hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    kwargs["vision_config"] = dict(kwargs["vision_config"], hidden_size=96)  # its merger's output: the text width
    config = AutoConfig.for_model("qwen2_vl", **kwargs)

    def qst(side_heads):
        torch.manual_seed(0)
        base = AutoModelForImageTextToText.from_config(config).eval()
        return get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, side_heads=side_heads))

    with pytest.raises(ValueError, match=re.escape(
            "r=4 gives a side head dimension of 4, too small for the model's 3 multimodal rotary sections "
            "(mrope_section [2, 3, 3])")):
        qst(6)
    model = qst(4)
    side = side_network(model)
    assert (side.trunk.config.head_dim, side.trunk.config.rope_parameters["mrope_section"]) == (6, [1, 1, 1])
    perturb_upsample(model)
    ids, extra = make_inputs("qwen2_vl")
    assert torch.isfinite(logits(model, ids, extra)).all()
    three = side_network(qst(3)).trunk.config
    assert (three.head_dim, three.rope_parameters["mrope_section"]) == (8, [1, 2, 1])


def _grown(family, extra, new_tokens: int):
    """The per-token keyword arguments of a prompt grown by ``new_tokens`` generated tokens, for recomputing the
    whole sequence (PaliGemma: generated tokens are the causal suffix)."""
    grown = dict(extra)
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in extra:
            fill = 1 if family == "paligemma" and key == "token_type_ids" else 0
            grown[key] = torch.cat([extra[key], torch.full((extra[key].shape[0], new_tokens), fill)], 1)
    return grown


def _assert_cached_generation_equals_recomputation(model, family, ids, extra, steps=5):
    """Cached greedy generation (with the images or videos in ``extra``) equals recomputing the whole sequence for
    each new token, and differs from the base model's. A generated image or video token would ask for features no
    image gives, so neither way may pick one (nor eos: min_new_tokens keeps it out)."""
    options = dict(max_new_tokens=steps, min_new_tokens=steps, do_sample=False, suppress_tokens=PLACEHOLDERS)
    generated = model.generate(input_ids=ids, **extra, **options)
    sequence = ids
    for step in range(steps):
        step_logits = logits(model, sequence, _grown(family, extra, step))[:, -1]
        step_logits[:, PLACEHOLDERS + [model.generation_config.eos_token_id]] = float("-inf")
        nxt = step_logits.argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, nxt], 1)
    assert torch.equal(generated, sequence)
    with model.disable_adapter():  # the side network changed what was generated
        plain = model.generate(input_ids=ids, **extra, **options)
    assert not torch.equal(plain, generated)


@pytest.mark.parametrize("family", SUPPORTED)
def test_cached_generation_with_an_image_equals_recomputation(family):
    ids, extra = make_inputs(family)
    model = get_peft_model(build(family), QSTConfig(task_type="CAUSAL_LM", r=4))
    perturb_upsample(model, scale=2.0)
    _assert_cached_generation_equals_recomputation(model, family, ids, extra)


#: the video token id and the number of video tokens a 3-frame 28x28 video takes: one per frame (its 2x2 patches
#: pooled 2x2), and LLaVA-OneVision's newline after the video
VIDEO, VIDEO_TOKENS = 203, {"llava_next_video": 3, "llava_onevision": 4}


@pytest.mark.parametrize("family", list(VIDEO_TOKENS))
def test_the_side_network_sees_the_video_and_generates_with_it(family):
    """The video path of LLaVA-NeXT-Video and LLaVA-OneVision (``pixel_values_videos``: frames through the vision
    tower, pooled, merged into inputs_embeds at the video tokens) reaches the side network as the images do."""
    with_image, _ = make_inputs(family)  # bos, the image tokens, 5 words: the video tokens replace the image's
    ids = torch.cat([with_image[:, :1], torch.full((2, VIDEO_TOKENS[family]), VIDEO), with_image[:, -5:]], 1)
    first, second = (
        {"pixel_values_videos": torch.randn(2, 3, 3, 28, 28, generator=torch.Generator().manual_seed(seed))}
        for seed in (0, 1)
    )
    model = get_peft_model(build(family), QSTConfig(task_type="CAUSAL_LM", r=4))
    after_video = (ids == VIDEO).int().cumsum(1) > 0
    difference = _side_output(model, ids, first) - _side_output(model, ids, second)
    assert difference.abs()[after_video].amax() > 1e-3 and not difference[~after_video].any()
    perturb_upsample(model, scale=2.0)
    _assert_cached_generation_equals_recomputation(model, family, ids, first)


@pytest.mark.parametrize("family", SUPPORTED)
def test_left_padded_batch_generates_as_each_row_alone(family):
    """A batch whose second row is left-padded (as batched generation pads prompts): cached generation equals
    uncached, and the padded row generates what it generates alone."""
    ids, extra = make_inputs(family)
    model = get_peft_model(build(family), QSTConfig(task_type="CAUSAL_LM", r=4))
    perturb_upsample(model, scale=2.0)
    padded = torch.cat([torch.tensor([[1, 1], [0, 0]]), ids], 1)
    mask = torch.ones_like(padded)
    mask[1, :2] = 0
    padded_extra = dict(extra)
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in extra:
            padded_extra[key] = torch.cat([torch.zeros(2, 2, dtype=extra[key].dtype), extra[key]], 1)
    options = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    cached = model.generate(input_ids=padded, attention_mask=mask, **padded_extra, **options)
    uncached = model.generate(input_ids=padded, attention_mask=mask, **padded_extra, **options, use_cache=False)
    assert torch.equal(cached, uncached)
    _, alone_extra = make_inputs(family, batch=1)
    if family in PATCH_ROW_FAMILIES:  # the same image as the second row's: its patches are rows 16-31 of the batch's
        alone_extra["pixel_values"] = extra["pixel_values"][16:]
    else:
        alone_extra["pixel_values"] = extra["pixel_values"][1:]
    alone = model.generate(input_ids=ids[1:], **alone_extra, **options)
    assert torch.equal(cached[1, padded.shape[1]:], alone[0, ids.shape[1]:])


@pytest.mark.parametrize("family", SUPPORTED)
def test_save_and_load_on_a_fresh_base_model(family, tmp_path):
    ids, extra = make_inputs(family)
    model = get_peft_model(build(family), QSTConfig(task_type="CAUSAL_LM", r=4))
    train(model, family, ids, extra)
    expected = logits(model, ids, extra)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(family), tmp_path)
    assert torch.equal(logits(loaded, ids, extra), expected)


def test_unsupported_composite_types_are_refused_by_name():
    """Mllama's language model cross-attends to the vision states in layers of its own (cross_attention_states), which
    a side network reading its hidden states would not follow: refused, naming the type and the reason."""
    with pytest.raises(QSTUnsupportedModelError, match="mllama.*checked with images.*cross_attention_states"):
        get_peft_model(_mllama(), QSTConfig(task_type="CAUSAL_LM", r=4))


def _mllama(**top_level):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(
        "mllama", text_config=dict(TEXT, model_type="mllama_text_model", cross_attention_layers=[1]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_global_layers=1,
                           attention_heads=2, image_size=28, patch_size=14, max_num_tiles=4, vision_output_dim=64,
                           intermediate_layers_indices=[0]),
        image_token_index=IMAGE, **top_level,
    )
    return AutoModelForImageTextToText.from_config(config)


#: the text sizes a flat config.json (adept/fuyu-8b's) also has at its top level, beside text_config
FLAT = {name: TEXT[name] for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")}


def test_a_flat_config_of_an_unsupported_composite_type_is_refused_by_name():
    """Text sizes at the top level of a composite config (left there by a flat config.json, as adept/fuyu-8b's) made
    it pass for a text model's: Mllama was side-tuned, its cross-attention to the image states unfollowed, instead of
    refused as it is without them."""
    with pytest.raises(QSTUnsupportedModelError, match="mllama.*checked with images.*cross_attention_states"):
        get_peft_model(_mllama(**FLAT), QSTConfig(task_type="CAUSAL_LM", r=4))


@pytest.mark.parametrize("family", ["fuyu", "llava"])
def test_a_flat_config_is_side_tuned_as_the_composite_model_it_is(family):
    """A supported composite model whose config also has the text sizes at its top level (Fuyu's is built from
    fuyu-8b's flat keys, see FAMILIES; a Llava given them here) is side-tuned as a composite model: its signature
    records the language model's type, and its sizes are the language model's, not the top-level copies (Llava's has
    no num_key_value_heads there: the side network took the 4 of a model without grouped queries for the Llama's 2)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    kwargs = dict(FAMILIES[family][0], **FLAT)
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_config(AutoConfig.for_model(family, **kwargs))
    assert base.config.hidden_size == TEXT["hidden_size"]  # the top-level copies are there
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    signature = model.peft_config["default"].base_model_signature
    text = base.config.text_config
    assert signature["text_model_type"] == text.model_type
    assert signature["num_key_value_heads"] == getattr(text, "num_key_value_heads", text.num_attention_heads)
    ids, extra = make_inputs(family)
    perturb_upsample(model)
    with torch.no_grad():
        side_tuned = model(input_ids=ids, **extra).logits
        with model.disable_adapter():
            plain = model(input_ids=ids, **extra).logits
    assert not torch.equal(side_tuned, plain)


def test_copy_heads_are_refused_for_composite_models():
    with pytest.raises(QSTUnsupportedModelError, match="copy_heads.*inputs_embeds"):
        get_peft_model(build("llava"), QSTConfig(task_type="CAUSAL_LM", r=4, copy_heads=1))


#: the families checked in bitsandbytes 4-bit: Llava, LLaVA-NeXT, Qwen3-VL and every type added with Qwen3-VL
FAMILIES_IN_4BIT = ["llava", "llava_next", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "lfm2_vl",
                    "llava_onevision1_5", "vipllava", "video_llava", "cohere2_vision", "deepseek_vl", "janus", "ovis2",
                    "glm4v_moe", "fuyu"]


@pytest.mark.parametrize("family", FAMILIES_IN_4BIT)
def test_llava_in_4bit_trains_generates_and_reloads(family, tmp_path):
    """The QLoRA setting: the whole composite model (vision tower, projector, language model) in bitsandbytes 4-bit
    with bf16 compute; LLaVA-NeXT with its anyres tiles (``image_sizes``); Qwen3-VL with its deepstack features and
    multimodal rotary positions; the hybrid text models of Qwen3.5 (linear attention) and LFM2-VL (short
    convolutions); the mixture-of-experts text models of Qwen3-VL-MoE, Qwen3.5-MoE and GLM-4.5V; Fuyu's linear patch
    projection (the test's name is older than its families). The side network starts at the base model, trains in
    bf16, generates with the image and reloads onto a fresh 4-bit base with identical logits. (The vision tower is 64
    wide here: bitsandbytes' CPU 4-bit layout does not take a layer narrower than its block of 64.)"""
    from transformers import AutoModelForImageTextToText

    from .conftest import bnb_config

    base = build(family, hidden_size=64, intermediate_size=128)
    base.save_pretrained(tmp_path / "base")
    # linear layers bitsandbytes' CPU kernel cannot run at these tiny widths (outputs not a multiple of 32, inputs not
    # a multiple of its 64-wide blocks: Qwen3.5's linear-attention gates, a projector's 32-wide half, Fuyu's 675 pixel
    # inputs) stay unquantized, as in integration/arch_sweep.py; the base model itself fails on them otherwise
    skip = sorted(name for name, module in base.named_modules() if isinstance(module, torch.nn.Linear)
                  and (module.out_features % 32 or module.in_features % 64))
    quantization = bnb_config()
    if skip:
        quantization.llm_int8_skip_modules = skip + ["lm_head"]

    def load():
        return AutoModelForImageTextToText.from_pretrained(tmp_path / "base", quantization_config=quantization)

    base = load()
    assert any(type(m).__name__ == "Linear4bit" for m in base.model.language_model.modules())
    ids, extra = make_inputs(family)
    if "model.vision_embed_tokens" not in skip:  # Fuyu multiplies its pixels by that layer as they come, uncast
        extra["pixel_values"] = extra["pixel_values"].to(torch.bfloat16)
    expected = logits(base, ids, extra)
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    assert torch.equal(logits(model, ids, extra), expected)
    train(model, family, ids, extra)
    trained = logits(model, ids, extra)
    assert not torch.equal(trained, expected)
    generated = model.generate(input_ids=ids, **extra, max_new_tokens=3, do_sample=False)
    assert generated.shape == (ids.shape[0], ids.shape[1] + 3)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load(), tmp_path / "adapter")
    assert torch.equal(logits(loaded, ids, extra), trained)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe"])
def test_the_side_network_reads_the_deepstack_features_in_the_backbone_states(family):
    """Qwen3-VL's language model adds visual features (deepstack_visual_embeds, backbone-wide, at visual_pos_masks) to
    its hidden states after its first blocks. The side network reads them as the paper's side network reads every
    backbone state, downsampled, in the blocks' outputs that follow and the trunk's final one; its trunk, of the same
    class but narrower, is not handed the backbone-wide features (it failed adding them to its own states). Zeroing
    the features the backbone gets changes the side output at the image tokens and after, and nothing before."""
    ids, extra = make_inputs(family)
    model = get_peft_model(build(family), QSTConfig(task_type="CAUSAL_LM", r=4))
    side, backbone = side_network(model), qst_layer(model).get_base_layer()
    handed = {}
    handles = [
        backbone.register_forward_pre_hook(lambda _m, _a, kwargs: handed.update(backbone=kwargs), with_kwargs=True),
        side.trunk.register_forward_pre_hook(lambda _m, _a, kwargs: handed.update(side=kwargs), with_kwargs=True),
    ]
    try:
        with_features = _side_output(model, ids, extra)
    finally:
        for handle in handles:
            handle.remove()
    assert len(handed["backbone"]["deepstack_visual_embeds"]) == 2  # after both blocks
    assert "deepstack_visual_embeds" not in handed["side"] and "visual_pos_masks" not in handed["side"]

    def zero_features(_module, args, kwargs):
        kwargs["deepstack_visual_embeds"] = [torch.zeros_like(e) for e in kwargs["deepstack_visual_embeds"]]
        return args, kwargs

    handle = backbone.register_forward_pre_hook(zero_features, with_kwargs=True)
    try:
        without = _side_output(model, ids, extra)
    finally:
        handle.remove()
    after_image = (ids == IMAGE).int().cumsum(1) > 0
    assert (with_features - without).abs()[after_image].amax() > 1e-3
    if family in MOE_FAMILIES:  # see MOE_FAMILIES: the text before the image moves in the last bits too
        torch.testing.assert_close(with_features[~after_image], without[~after_image], rtol=0, atol=1e-5)
    else:
        assert torch.equal(with_features[~after_image], without[~after_image])


def test_gemma3n_is_refused_naming_its_residual_streams_and_per_layer_inputs():
    """Gemma 3n's language model takes per-layer inputs the composite model computes from the token ids (its several
    residual streams, AltUp, QST reads, as in gemma3n_text). Its vision tower needs timm, which the tests do not
    install, so the check is called with the type alone."""
    from peft_qst.model import _check_composite_model

    with pytest.raises(QSTUnsupportedModelError, match="gemma3n.*AltUp.*per_layer_inputs"):
        _check_composite_model("gemma3n", QSTConfig(task_type="CAUSAL_LM", r=4))


@pytest.mark.parametrize("options", [dict(init="pruned"), dict(backbone_lora_layers=1)])
def test_pruned_start_and_backbone_adapters_on_a_composite_model(options):
    """The options that reach into the language model: pruned initialisation (mapped by the text model's type, here
    llama) and low-rank adapters on its top block; the vision tower and projector stay as they are."""
    family = "llava"
    ids, extra = make_inputs(family)
    base = build(family)
    expected = logits(base, ids, extra)
    vision = {k: v.clone() for k, v in base.model.vision_tower.state_dict().items()}
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM", r=4, **options))
    assert torch.equal(logits(model, ids, extra), expected)
    train(model, family, ids, extra)
    assert not torch.equal(logits(model, ids, extra), expected)
    assert all(torch.equal(v, base.model.vision_tower.state_dict()[k]) for k, v in vision.items())


@pytest.mark.parametrize("family,module", [("llava", "multi_modal_projector"), ("qwen2_vl", "visual"),
                                           ("idefics3", "connector")])
def test_modules_before_the_language_model_are_refused_in_modules_to_save(family, module):
    """The projector or vision tower in modules_to_save (LLaVA-style recipes train the projector): their output
    reaches the loss only through the language model, which QST runs under no_grad, so PEFT's trainable copies got
    no gradient and were saved unchanged, silently (LoRA trains them). Refused, naming them."""
    with pytest.raises(ValueError, match=f"{module}.*before the language model.*could not train"):
        get_peft_model(build(family), QSTConfig(task_type="CAUSAL_LM", r=4, modules_to_save=[module]))


def test_the_lm_head_in_modules_to_save_trains_on_a_composite_model():
    family = "llava"
    ids, extra = make_inputs(family)
    model = get_peft_model(build(family), QSTConfig(task_type="CAUSAL_LM", r=4, modules_to_save=["lm_head"]))
    model.train()
    labels, extra = training_inputs(family, ids, extra)
    model(input_ids=ids, labels=labels, **extra).loss.backward()
    head = [p for n, p in model.named_parameters() if "lm_head.modules_to_save" in n]
    assert head and all(p.grad is not None and p.grad.abs().sum() > 0 for p in head)


@pytest.mark.parametrize("family", SUPPORTED)
def test_the_model_card_of_a_composite_adapter_loads_the_base_model_with_its_auto_class(family, tmp_path):
    """The card's usage section names the Auto class to build the base model with: AutoModelForCausalLM refuses a
    Llava or Qwen2-VL config ("Unrecognized configuration class"), so a composite adapter's card names
    AutoModelForImageTextToText, and that class loads the base model, which takes the adapter."""
    import re

    import transformers

    base_dir = str(tmp_path / "base")
    build(family).save_pretrained(base_dir)
    model = get_peft_model(build(family), QSTConfig(task_type="CAUSAL_LM", r=4))
    model.peft_config["default"].base_model_name_or_path = base_dir
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    auto_class = re.search(r"base = (\w+)\.from_pretrained\(", card).group(1)
    assert auto_class == "AutoModelForImageTextToText"
    base = getattr(transformers, auto_class).from_pretrained(base_dir)
    assert type(base) is type(build(family))
    PeftModel.from_pretrained(base, tmp_path / "adapter")


#: the composite types whose configs AutoModelForCausalLM also builds (docs/architectures.md says so for
#: AutoPeftModelForCausalLM)
CAUSAL_LM_AUTO_CLASS_LOADS = ("gemma3", "got_ocr2", "qwen3_5", "qwen3_5_moe", "fuyu")


@pytest.mark.parametrize("family", SUPPORTED)
def test_auto_model_for_causal_lm_refuses_the_composite_configs_the_readme_names(family):
    """docs/architectures.md sends composite adapters through AutoModelForImageTextToText because
    AutoPeftModelForCausalLM's AutoModelForCausalLM refuses these configs, all but Gemma 3's, GOT-OCR2's, Fuyu's and
    Qwen3.5's (and its MoE variant's, for which it builds the language model alone): a transformers fact the docs
    state, checked here so that a transformers release that changes it shows up."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **FAMILIES[family][0])
    if family in CAUSAL_LM_AUTO_CLASS_LOADS:
        assert AutoModelForCausalLM.from_config(config) is not None
    else:
        with pytest.raises(ValueError, match="Unrecognized configuration class"):
            AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_auto_peft_model_for_causal_lm_refuses_a_qwen3_5_adapter_on_the_language_model_alone(family, tmp_path):
    """What docs/architectures.md says of Qwen3.5's composite adapters loaded with AutoPeftModelForCausalLM: its
    AutoModelForCausalLM builds the language model alone from the composite config, and the adapter, trained on the
    composite model, is refused there naming both types (not loaded onto a model without its vision tower)."""
    from peft import AutoPeftModelForCausalLM

    base_dir = str(tmp_path / "base")
    build(family).save_pretrained(base_dir)
    model = get_peft_model(build(family), QSTConfig(task_type="CAUSAL_LM", r=4))
    model.peft_config["default"].base_model_name_or_path = base_dir
    model.save_pretrained(tmp_path / "adapter")
    text_type = FAMILIES[family][0]["text_config"]["model_type"]
    with pytest.raises(ValueError, match=f"built for a {family} model with a {text_type} language model.*onto a "
                                         f"{text_type} model"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")


def test_an_adapter_is_refused_on_a_composite_model_with_another_language_model_of_the_same_sizes(tmp_path):
    """A Llava whose language model is a Mistral instead of a Llama of the same sizes: its side network has the same
    weight names and shapes, but is another model's (the text models alone are refused by their model_type), so the
    recorded signature names the language model's type too."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    def llava(text_type):
        kwargs = dict(FAMILIES["llava"][0], text_config=dict(TEXT, model_type=text_type))
        torch.manual_seed(0)
        return AutoModelForImageTextToText.from_config(AutoConfig.for_model("llava", **kwargs))

    model = get_peft_model(llava("llama"), QSTConfig(task_type="CAUSAL_LM", r=4))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="llama language model.*mistral language model"):
        PeftModel.from_pretrained(llava("mistral"), tmp_path)
    PeftModel.from_pretrained(llava("llama"), tmp_path)  # the same base model loads
    assert model.peft_config["default"].base_model_signature["text_model_type"] == "llama"
