"""Architecture sweep: every transformers causal-LM model type through QST, with a tiny random model.

For each type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (and a ``<type>+dec`` variant with ``is_decoder=True`` for
the BERT-like types, whose ``*ForCausalLM`` is causal only in decoder mode) the sweep builds a tiny float32 model
(hidden 128, 2 layers; see ``TINY`` and ``OVERRIDES``), wraps it with ``get_peft_model(model,
QSTConfig(task_type="CAUSAL_LM"))`` and checks the invariants QST promises for any model it accepts:

  a. at the start the logits equal the base model's (the side network's output is gated to zero);
  b. the loss is finite and backward gives gradients to QST's side parameters only: the base is frozen;
  c. four AdamW steps change the logits, and ``disable_adapter()`` gives the base logits back;
  d. greedy generation with the cache equals generation without it, for equal-length prompts and with left
     padding -- blamed on QST only where the base model itself generates the same both ways;
  e. ``save_pretrained`` / ``PeftModel.from_pretrained`` onto a fresh base of the same seed gives identical logits
     (to the trained model's with its side parameters frozen, as the reloaded ones are: see ``check_save_load``);
  f. a-c again with ``backbone_lora_layers=1`` (the hybrid mode).

With ``--4bit`` each tiny model is saved once and loaded back quantized (bitsandbytes NF4, float32 compute), as
users load theirs, and every check runs on that 4-bit model; the fresh base of e. is loaded the same way. The hybrid's
checks there hold to the same tolerance as the others: its adapted 4-bit layers run bitsandbytes' repacked kernel of
CPUs with AVX512-BF16 in eval forwards, as the base model's do, and the standard one only for training steps and calls
whose input carries a gradient (docs/quality.md, "bitsandbytes on CPU"). (Until the hybrid's layers were routed so,
they ran the standard kernel throughout, and the sweep allowed 2% of the largest base logit there.)

A type is OK (all pass; a hybrid refused with a ValueError is noted), REFUSED (``get_peft_model`` raised
QSTUnsupportedModelError or ValueError), REFUSED-AT-RUN (QSTUnsupportedModelError at the first forward or the first
cached generation), BROKEN (an invariant fails, or another exception) or SKIPPED (no tiny model could be built).
Each type runs in a forked child with a timeout, so a hang or a crash costs one type only.

    .venv/bin/python integration/arch_sweep.py [--4bit] [--output PATH.json] [types...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's peft_qst

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from peft_qst import QSTConfig, QSTUnsupportedModelError  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # integration/: measure.py
from measure import add_overwrite_output_argument, check_output_path, versions  # noqa: E402

TIMEOUT_S = 120
VOCAB = 128
SEED = 0
TOLERANCE = 1e-4
#: set by ``--4bit``: the folder holding each type's saved float model, loaded back in 4-bit by ``build``
QUANTIZED_FROM: dict = {}

#: Tiny sizes, passed for every key the type's config knows.
TINY = dict(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    intermediate_size=256, vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.1,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
    # mixture of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_topk=2,
    moe_k=2, moe_intermediate_size=64, shared_expert_intermediate_size=64, expert_intermediate_size=64,
    n_shared_experts=1, num_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
    # latent attention (MLA), linear attention, windows
    q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    sliding_window=5, attention_chunk_size=16, unpadded_vocab_size=VOCAB,
)
#: Keys of TINY whose None switches a feature off: passed only where the type's default config sets them.
ONLY_WHERE_SET = {"q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                  "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                  "sliding_window", "attention_chunk_size", "unpadded_vocab_size"}
#: Vision/audio towers of multimodal configs: only their size (the sweep feeds text).
SUB_TOWER = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, depth=2,
                 num_layers=2, num_global_layers=1, intermediate_layers_indices=[0], vision_output_dim=128,
                 out_hidden_size=128)

MLA = dict(num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
           v_head_dim=32, head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1,
           mlp_layer_types=["dense", "sparse"], index_topk=64, index_head_dim=16, index_n_heads=2)
MAMBA = dict(mamba_n_heads=4, mamba_d_head=64, mamba_d_state=16, mamba_chunk_size=16, mamba_n_groups=1)
ENCDEC = dict(d_model=128, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
              decoder_ffn_dim=256, encoder_ffn_dim=256)
GEMMA4 = dict(hidden_size_per_layer_input=16, vocab_size_per_layer_input=128, global_head_dim=32,
              layer_types=["sliding_attention", "full_attention"])
ROPE = {"rope_type": "default", "rope_theta": 10000.0}
SMALL = dict(hidden_size=64, num_attention_heads=2, num_hidden_layers=1, intermediate_size=128,
             max_position_embeddings=128)

#: Per-type config keys applied over the tiny sizes (None: drop the key); "__replace__": these kwargs alone.
#: A multimodal type's text config takes the overrides of its own model type (gemma4 -> gemma4_text).
OVERRIDES = {
    **{t: MLA for t in ("axk1", "axk2", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe_lite",
                        "glm_moe_dsa", "dots3_note_text")},
    **{t: ENCDEC for t in ("bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp",
                           "pegasus", "plbart", "whisper")},
    **{t: GEMMA4 for t in ("gemma4_text", "gemma4_unified_text")},
    "gemma4_assistant": dict(GEMMA4, hidden_size_per_layer_input=0),
    "bailing_hybrid": dict(MLA, layer_types=["linear_attention", "full_attention"], num_experts=4,
                           num_experts_per_token=2, num_expert_group=1, layer_group_size=2),
    "bamba": dict(MAMBA, attn_layer_indices=[1]),
    "granitemoehybrid": dict(MAMBA, layer_types=["linear_attention", "full_attention"]),
    "falcon_h1": dict(MAMBA, mamba_d_ssm=256),
    "falcon": dict(head_dim=None),
    # Kolibri 1.1 (transformers 5.25): one indexed-attention layer after a sliding one, a dense MLP then experts;
    # 256 wide, as it rounds keys and values in blocks of 16 channels, which a 128-wide model's side width at r=16 (8)
    # cannot hold (refused: tests/test_more_architectures.py; a real Kolibri's 2560 gives one side head of 160)
    "kolibri1_1": dict(hidden_size=256, index_num_heads=1, layer_types=["sliding_attention", "indexed_attention"],
                       index_layers=[1], kv_source_layers=[0, 1], mlp_only_layers=[0], mlp_only_intermediate_size=256,
                       moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=4,
                       num_experts_per_tok=2, index_topk=8, index_pool_size=32, index_compression=4,
                       index_num_local_tokens=4, index_num_sink_tokens=1),
    "gptj": dict(rotary_dim=16),
    "codegen": dict(rotary_dim=16),
    "cohere_compass_text": dict(rope_parameters={"full_attention": ROPE, "sliding_attention": ROPE}),
    "dory": dict(num_hidden_layers=3, n_input_layers=1, n_recurrent_layers=1, n_output_layers=1,
                 n_recurrent_loops=2, sliding_window=64),
    "gemma3n_text": dict(num_kv_shared_layers=0, layer_types=["sliding_attention", "full_attention"],
                         intermediate_size=[256, 256], hidden_size_per_layer_input=16, vocab_size_per_layer_input=128,
                         laurel_rank=8, activation_sparsity_pattern=[0.0, 0.0], altup_num_inputs=2),
    "dbrx": {"__replace__": True, "d_model": 128, "n_heads": 4, "n_layers": 2, "max_seq_len": 128, "vocab_size": 128,
             "initializer_range": 0.1, "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 256, "moe_num_experts": 4, "moe_top_k": 2}},
    "gpt_neo": {"__replace__": True, "hidden_size": 128, "num_layers": 2, "num_heads": 4, "vocab_size": 128,
                "attention_types": [[["global", "local"], 1]], "window_size": 5, "max_position_embeddings": 128,
                "initializer_range": 0.1, "bos_token_id": 1, "eos_token_id": 2},
    "blt": {"__replace__": True, "vocab_size": 260, "max_position_embeddings": 128, "num_hidden_layers": 2,
            "encoder_hash_byte_group_vocab": 1000, "patch_in_forward": False,
            "encoder_config": dict(SMALL, hidden_size_global=128), "decoder_config": dict(SMALL, hidden_size_global=128),
            "global_config": dict(hidden_size=128, num_attention_heads=4, num_hidden_layers=2, intermediate_size=256,
                                  max_position_embeddings=128),
            "patcher_config": SMALL},
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "nemotron_h": dict(layers_block_type=["mamba", "attention"], num_hidden_layers=None, mamba_num_heads=8,
                       mamba_head_dim=32, n_groups=1),
    "longcat_flash": dict(num_layers=2, head_dim=16, expert_ffn_hidden_size=64, ffn_hidden_size=256,
                          zero_expert_num=2, num_hidden_layers=None),
    **{t: dict(head_dim=16) for t in ("youtu", "minicpm3", "sarvam_mla")},
    "kimi_linear": dict(head_dim=16, linear_num_heads=4, linear_head_dim=32),
    "hy_v4": dict(head_dim=16, index_topk=8, index_head_dim=16, index_n_heads=2, indexer_types=["full", "shared"]),
    "mamba2": dict(num_heads=8, head_dim=32, n_groups=1),
    "zaya": dict(num_experts_per_tok=1),
    "zamba": dict(num_hidden_layers=11, attn_layer_period=6, attn_layer_offset=4, mamba_headdim=16,
                  n_mamba_heads=4, attention_head_dim=32, layers_block_type=None, layer_types=None),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], mamba_headdim=16, n_mamba_heads=16, mamba_ngroups=1,
                   attention_head_dim=32, hybrid_layer_ids=None),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=128, head_dim=32,
                            attention_window_size=16),
    "qwen4_exp_text": dict(hc_count=2, hc_lowrank=16, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=32,
                           indexer_budget=8, indexer_compress_ratio=2, ngram_vocab_size_base=1024,
                           layer_types=["linear_attention", "indexed_attention"]),
    "hrm_text": dict(num_layers_per_stack=2, H_cycles=1, L_cycles=1, L_bp_cycles=[1], num_hidden_layers=4),
    "reformer": dict(is_decoder=True, attn_layers=["local", "local"], axial_pos_shape=[8, 16],
                     axial_pos_embds_dim=[64, 64], num_hidden_layers=None, feed_forward_size=256,
                     attention_head_size=32, local_attn_chunk_length=8, max_position_embeddings=None),
    "prophetnet": dict(num_encoder_layers=2, num_decoder_layers=2, num_hidden_layers=None, num_attention_heads=None,
                       num_encoder_attention_heads=4, num_decoder_attention_heads=4, decoder_ffn_dim=256,
                       encoder_ffn_dim=256),
    "xlnet": dict(n_head=4, d_inner=256, d_head=32),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
}
#: MusicgenForCausalLM is the decoder alone: built from its decoder config, with one codebook.
MUSICGEN = {"musicgen": ("musicgen", "MusicgenDecoderConfig", "MusicgenForCausalLM"),
            "musicgen_melody": ("musicgen_melody", "MusicgenMelodyDecoderConfig", "MusicgenMelodyForCausalLM")}


def attribute(config, name):
    """``config.name``, or None where it is missing (or, for per-layer attributes, ambiguous)."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - e.g. AmbiguousGlobalPerLayerAttributeError
        return None


def known_keys(config, names) -> set:
    """The names the config knows: serialised keys, aliases, and plain (non-property) attributes."""
    props = {n for n in dir(type(config)) if isinstance(getattr(type(config), n, None), property)}
    aliases = set(getattr(config, "attribute_map", {}) or {})
    serialised = config.to_dict()
    return {n for n in names if n in serialised or n in aliases or (n not in props and attribute(config, n) is not None)}


def tiny_kwargs(default, sizes=TINY, overrides=None) -> dict:
    """Tiny-size kwargs for a config like ``default``: the keys it knows, its per-layer lists cut to two layers."""
    spec = dict(overrides or {})
    if spec.pop("__replace__", False):
        return spec
    known = known_keys(default, sizes)
    kwargs = {k: v for k, v in sizes.items()
              if k in known and (k not in ONLY_WHERE_SET or attribute(default, k) is not None)}
    layers = default.to_dict().get("num_hidden_layers")
    if isinstance(layers, int) and layers > 2 and "num_hidden_layers" not in spec:
        for name, value in default.to_dict().items():  # e.g. layer_types: the first kind and one other kind
            if isinstance(value, list) and len(value) == layers:
                kwargs[name] = [value[0], next((v for v in value if v != value[0]), value[0])]
    for k, v in spec.items():
        if v is None:
            kwargs.pop(k, None)
        else:
            kwargs[k] = v
    return kwargs


def make_config(model_type: str):
    default = AutoConfig.for_model(model_type)
    subs = set(getattr(default, "sub_configs", {}) or {}) & {"text_config", "vision_config", "audio_config"}
    if not subs or "__replace__" in OVERRIDES.get(model_type, {}):
        return AutoConfig.for_model(model_type, **tiny_kwargs(default, overrides=OVERRIDES.get(model_type)))
    kwargs = {} if "text_config" in subs else tiny_kwargs(default)  # phi4_multimodal: text keys at the top
    for name in subs:
        sub = getattr(default, name)
        if sub is None:  # e.g. gemma4 without an audio tower
            continue
        if name == "text_config":
            kwargs[name] = tiny_kwargs(sub, overrides=OVERRIDES.get(sub.model_type, OVERRIDES.get(model_type)))
        else:
            kwargs[name] = tiny_kwargs(sub, sizes=SUB_TOWER)
    return AutoConfig.for_model(model_type, **kwargs)


def build(variant: str):
    """The tiny base model of a type (``<type>+dec``: with is_decoder=True), seeded, float32, in eval mode; with
    ``--4bit`` saved once and loaded back quantized."""
    if "folder" in QUANTIZED_FROM:
        return build_4bit(variant, QUANTIZED_FROM["folder"])
    return build_float(variant)


def build_4bit(variant: str, folder: str):
    from transformers import BitsAndBytesConfig

    saved = os.path.join(folder, "base")
    if not os.path.isdir(saved):
        model = build_float(variant)
        model.save_pretrained(saved)
        # linear layers bitsandbytes' CPU kernel cannot run at tiny widths (fewer than 32 outputs or outputs not a
        # multiple of 32, as a router over 4 experts; inputs not a multiple of its 64-wide blocks) stay unquantized:
        # the base model itself failed there ("N must be divisible by block_n"); real widths are multiples of both
        skip = sorted(name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
                      and (module.out_features % 32 or module.in_features % 64))
        with open(os.path.join(folder, "skip.json"), "w") as f:
            json.dump(skip, f)
    with open(os.path.join(folder, "skip.json")) as f:
        skip = json.load(f)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip + ["lm_head"] if skip else None,
    )
    model = AutoModelForCausalLM.from_pretrained(saved, quantization_config=quantization, dtype=torch.float32).eval()
    if not any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        raise RuntimeError("no layer was quantized to 4 bits")
    if hasattr(model, "set_default_language"):
        model.set_default_language("en_XX")
    return model


def build_float(variant: str):
    model_type, _, dec = variant.partition("+")
    if model_type in MUSICGEN:
        module, config_name, model_name = MUSICGEN[model_type]
        mod = getattr(transformers.models, module)
        config = getattr(mod, config_name)(**tiny_kwargs(getattr(mod, config_name)()), num_codebooks=1, ffn_dim=256,
                                             decoder_start_token_id=1)  # the delay pattern's pad, for generate
        torch.manual_seed(SEED)
        return getattr(mod, model_name)(config).float().eval()
    config = make_config(model_type)
    if dec:
        config.is_decoder = True
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).float().eval()
    if hasattr(model, "set_default_language"):  # xmod: adapters per language
        model.set_default_language("en_XX")
    return model


def bert_like(model_type: str) -> bool:
    """A decoder-only type with an is_decoder switch that is off by default (encoder-decoder ones force it on)."""
    try:
        config = AutoConfig.for_model(model_type)
    except Exception:  # noqa: BLE001 - an unbuildable default is reported by the plain type's run
        return False
    return (getattr(config, "is_decoder", None) is False and not getattr(config, "is_encoder_decoder", False)
            and "is_decoder" not in OVERRIDES.get(model_type, {}))


def maxdiff(a, b) -> float:
    return float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("inf")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def labels_for(variant, ids):
    return ids.unsqueeze(-1) if variant in MUSICGEN else ids  # musicgen: (batch, length, codebooks)


def check_grads(model, variant, ids) -> dict:
    """b: finite loss; only adapter (``qst_``) parameters are trainable and get gradients, and some are nonzero."""
    model.train()
    loss = model(input_ids=ids, labels=labels_for(variant, ids)).loss
    loss.backward()
    named = list(model.named_parameters())
    base_trainable = [n for n, p in named if p.requires_grad and "qst_" not in n]
    base_grads = [n for n, p in named if p.grad is not None and "qst_" not in n]
    nonzero = sum(1 for n, p in named if p.grad is not None and bool(p.grad.abs().sum() > 0))
    model.zero_grad(set_to_none=True)
    model.eval()
    finite = bool(torch.isfinite(loss))
    return {"pass": finite and not base_trainable and not base_grads and nonzero > 0, "loss": float(loss),
            "base_trainable": base_trainable[:4], "base_with_grad": base_grads[:4], "nonzero_grads": nonzero}


def check_training(model, variant, base_logits, ids, tolerance=TOLERANCE) -> dict:
    """c: four AdamW steps change the logits; disable_adapter() gives the base logits back."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(5)
    model.train()
    losses = []
    for _ in range(4):
        x = torch.randint(3, VOCAB, (2, 10), generator=g)
        loss = model(input_ids=x, labels=labels_for(variant, x)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    model.eval()
    changed = maxdiff(logits(model, ids), base_logits)
    with model.disable_adapter():
        restored = maxdiff(logits(model, ids), base_logits)
    ok = changed > tolerance and restored < tolerance and all(map(torch.isfinite, torch.tensor(losses)))
    return {"pass": bool(ok), "changed": changed, "disabled_vs_base": restored, "losses": losses}


def run_a_to_c(rec, prefix, model, variant, base_logits, ids, tolerance=TOLERANCE):
    rec["stage"] = prefix + "a"
    d = maxdiff(logits(model, ids), base_logits)
    rec[prefix + "a_start_equals_base"] = {"pass": d < tolerance, "maxdiff": d}
    rec["stage"] = prefix + "b"
    rec[prefix + "b_grads_side_only"] = check_grads(model, variant, ids)
    rec["stage"] = prefix + "c"
    rec[prefix + "c_train_and_disable"] = check_training(model, variant, base_logits, ids, tolerance)


def cached_equals_uncached(model, ids, mask) -> bool:
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(use_cache=True, **kw)
        uncached = model.generate(use_cache=False, **kw)
    return cached.shape == uncached.shape and torch.equal(cached, uncached)


def check_generation(rec, model) -> dict:
    """d: cached == uncached greedy generation; a QST failure counts only where the base model agrees with itself."""
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[1, :2], mask[1, :2] = 0, 0
    result = {}
    for case, (x, m) in {"equal_len": (ids, torch.ones_like(ids)), "left_pad": (padded, mask)}.items():
        rec["stage"] = "d:" + case
        try:
            with model.disable_adapter():
                base = cached_equals_uncached(model, x, m)
        except Exception as e:  # noqa: BLE001 - the base model's own failure is noted, not blamed on QST
            rec["notes"].append(f"d: base model cannot generate ({case}): {type(e).__name__}: {str(e)[:120]}")
            continue
        if not base:
            rec["notes"].append(f"d: base model differs itself (cached vs uncached, {case})")
        result[case] = {"qst": cached_equals_uncached(model, x, m), "base": base}
    failures = [c for c, r in result.items() if r["base"] and not r["qst"]]
    return dict(result, qst_failures=failures, **{"pass": not failures})


def check_save_load(model, variant, ids) -> dict:
    """e: save_pretrained, then PeftModel.from_pretrained onto a fresh same-seed base: identical logits.

    The trained model's logits are taken with its side parameters frozen, as the reloaded (inference) adapter's are:
    for a 3-D input that is a transposed view (the ``x_proj`` of Mamba mixers reads ``hidden_states.transpose(1, 2)``)
    torch's matmul folds it into one matrix product when an operand requires grad, even under ``no_grad``, and runs a
    batched product when none does; the two round differently. Compared as they were, Jamba's reload (1.2e-7) and
    Falcon-Mamba's in 4-bit (6e-8) differed from the trained model, with bit-identical weights."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        trained = logits(model, ids)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = PeftModel.from_pretrained(build(variant), tmp).eval()
        d = maxdiff(logits(reloaded, ids), trained)
    return {"pass": d == 0.0, "maxdiff": d}


def run_type(variant: str, rec: dict) -> None:
    """All checks of one type, filling ``rec``; exceptions propagate (the caller classifies them)."""
    rec["stage"] = "build"
    try:
        base = build(variant)
        ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
        base_logits = logits(base, ids)
    except Exception as e:  # noqa: BLE001 - any failure to build or run the plain model skips the type
        rec.update(cls="SKIPPED", reason=f"{type(e).__name__}: {e}")
        return
    rec["model_class"] = type(base).__name__
    rec["stage"] = "get_peft_model"
    try:
        model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    except ValueError as e:  # QSTUnsupportedModelError is a ValueError
        rec.update(cls="REFUSED", reason=f"{type(e).__name__}: {e}")
        return
    run_a_to_c(rec, "", model, variant, base_logits, ids)
    rec["d_generate_cache"] = check_generation(rec, model)
    rec["stage"] = "e"
    rec["e_save_load"] = check_save_load(model, variant, ids)
    del model
    rec["stage"] = "f"
    try:
        hybrid = get_peft_model(build(variant), QSTConfig(task_type="CAUSAL_LM", backbone_lora_layers=1))
    except ValueError as e:
        rec["notes"].append(f"f: hybrid refused: {type(e).__name__}: {e}")
    else:
        run_a_to_c(rec, "f_", hybrid, variant, base_logits, ids)
    rec["stage"] = "done"


def child(variant: str, path: str) -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    rec = {"type": variant, "notes": []}
    try:
        if QUANTIZED_FROM:
            with tempfile.TemporaryDirectory() as folder:
                QUANTIZED_FROM["folder"] = folder
                run_type(variant, rec)
        else:
            run_type(variant, rec)
    except QSTUnsupportedModelError as e:
        at_run = rec["stage"] in ("a", "d:equal_len")  # the first forward, the first cached generation
        rec.update(cls="REFUSED-AT-RUN" if at_run else "BROKEN", reason=f"{type(e).__name__}: {e}")
    except Exception as e:  # noqa: BLE001 - a crash anywhere after get_peft_model is a finding
        rec.update(cls="BROKEN", reason=f"at stage {rec['stage']}: {type(e).__name__}: {e}")
    with open(path, "w") as f:
        json.dump(rec, f, default=str)
    os._exit(0)  # skip the interpreter's teardown in the forked child


def classify(rec: dict) -> None:
    if "cls" in rec:
        return
    failed = [k for k, v in rec.items() if isinstance(v, dict) and v.get("pass") is False]
    rec["cls"] = "BROKEN" if failed else "OK"
    if failed:
        rec["reason"] = "failed: " + ", ".join(failed)


def run_in_child(variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rec.json")
        proc = mp.get_context("fork").Process(target=child, args=(variant, path))
        start = time.time()
        proc.start()
        proc.join(TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
            proc.join()
            rec = {"type": variant, "cls": "BROKEN", "reason": f"timeout after {TIMEOUT_S} s"}
        elif not os.path.exists(path):
            rec = {"type": variant, "cls": "BROKEN", "reason": f"child died with exit code {proc.exitcode}"}
        else:
            with open(path) as f:
                rec = json.load(f)
    classify(rec)
    rec["seconds"] = round(time.time() - start, 1)
    return rec


def all_types() -> list:
    types = []
    for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        types += [t, t + "+dec"] if bert_like(t) else [t]
    return types


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", help="write the JSON report here")
    add_overwrite_output_argument(parser)
    parser.add_argument("--4bit", dest="four_bit", action="store_true",
                        help="load each tiny model in 4-bit (bitsandbytes NF4) and run the checks on that")
    parser.add_argument("types", nargs="*", help="model types (<type>+dec: with is_decoder=True); default: all")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.types) - set(all_types()))
    if unknown:
        parser.error(f"unknown model types {unknown}: give MODEL_FOR_CAUSAL_LM_MAPPING types (<type>+dec for the "
                     "BERT-style ones with is_decoder=True)")
    check_output_path(parser, args.output, args.overwrite_output)
    return args


def main() -> None:
    args = parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.four_bit:
        QUANTIZED_FROM["enabled"] = True  # each child sets its own folder
    records = []
    for variant in args.types or all_types():
        rec = run_in_child(variant)
        records.append(rec)
        notes = "; ".join(rec.get("notes", []))
        print(f"{variant:30s} {rec['cls']:15s} {rec['seconds']:6.1f}s  {rec.get('reason', '')[:200]}"
              + (f"  [{notes[:160]}]" if notes else ""), flush=True)
    counts = {}
    for rec in records:
        counts.setdefault(rec["cls"], []).append(rec["type"])
    print("\n| class | count | types |\n|---|---:|---|")
    for cls in ("OK", "REFUSED", "REFUSED-AT-RUN", "BROKEN", "SKIPPED"):
        names = counts.get(cls, [])
        print(f"| {cls} | {len(names)} | {', '.join(names) if cls != 'OK' else ''} |")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        report = {"environment": versions(), "quantization": "4-bit NF4" if args.four_bit else None,
                  "counts": {c: len(n) for c, n in counts.items()}, "records": records}
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
