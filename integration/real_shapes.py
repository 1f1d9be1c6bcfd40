"""Published model shapes through the default QSTConfig: what the side network of a real model looks like.

The tests use tiny random models. The shrink rules meet real models' widths, head layouts, rope settings and expert
counts only here: for each configuration below (the sizes of the model's published ``config.json``, written out by
hand because this project has no model hub), the script builds the model at full depth on the meta device (no
memory, no weights), wraps it with ``get_peft_model(model, QSTConfig(task_type="CAUSAL_LM"))`` and runs a forward
and backward on the meta device, which checks every shape. It reports the side network's layout and its number of
trainable parameters against the base model's.

With ``--run`` it also builds each model with 2 layers at its real widths (vocabulary cut to 1024 tokens: the side
network does not depend on it) in bfloat16 on the CPU with random weights, and checks what only real kernels show:
the start equals the base model, a training step changes only side parameters, and cached greedy generation equals
recomputation.

    .venv/bin/python integration/real_shapes.py [--run] [--output PATH.json] [names...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's peft_qst

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from peft_qst import QSTConfig  # noqa: E402
from peft_qst.layer import QSTLayer  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # integration/: measure.py
from measure import add_overwrite_output_argument, check_output_path, versions  # noqa: E402

_LLAMA3_ROPE = dict(
    rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)


def _longrope(rotary_dim: int, original: int) -> dict:
    """LongRoPE parameters of a head with ``rotary_dim`` rotated channels. The factor lists have the published
    lengths (one factor per rotated channel pair); their values are not the published ones (they do not change
    any shape)."""
    pairs = rotary_dim // 2
    return dict(
        rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=original,
        short_factor=[1.0 + i / pairs for i in range(pairs)], long_factor=[1.0 + 4 * i / pairs for i in range(pairs)],
    )


#: name -> (model type, the sizes of the published config.json that shape the model)
PUBLISHED: dict[str, tuple[str, dict]] = {
    "Llama-2-7B": ("llama", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)),
    "Llama-2-70B": ("llama", dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)),
    "Llama-3.2-1B": ("llama", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=True, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0})),
    "Llama-3.2-3B": ("llama", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=True, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0})),
    "Llama-3.1-8B": ("llama", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_parameters=_LLAMA3_ROPE)),
    "Llama-3.1-70B": ("llama", dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_parameters=_LLAMA3_ROPE)),
    "SmolLM2-1.7B": ("llama", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=130000.0))),
    "SmolLM3-3B": ("smollm3", dict(
        hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=128256, max_position_embeddings=65536, tie_word_embeddings=True,
        no_rope_layer_interval=4)),
    "Mistral-7B-v0.1": ("mistral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, sliding_window=4096)),
    "Mistral-Nemo-12B": ("mistral", dict(
        hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=131072, max_position_embeddings=1024000,
        sliding_window=None, rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "Mixtral-8x7B": ("mixtral", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768, num_local_experts=8,
        num_experts_per_tok=2, rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "Qwen2.5-0.5B": ("qwen2", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "Qwen2.5-7B": ("qwen2", dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "Qwen2.5-72B": ("qwen2", dict(
        hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=152064, max_position_embeddings=32768,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "Qwen3-8B": ("qwen3", dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "Qwen3-30B-A3B": ("qwen3_moe", dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        vocab_size=151936, max_position_embeddings=40960,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0))),
    "Gemma-2-2B": ("gemma2", dict(
        hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
        sliding_window=4096, query_pre_attn_scalar=256)),
    "Gemma-2-9B": ("gemma2", dict(
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, vocab_size=256000, max_position_embeddings=8192,
        sliding_window=4096, query_pre_attn_scalar=256)),
    "Gemma-3-1B": ("gemma3_text", dict(
        hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, vocab_size=262144, max_position_embeddings=32768,
        sliding_window=512, query_pre_attn_scalar=256)),
    "Phi-3.5-mini": ("phi3", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32064, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rope_parameters=_longrope(96, 4096))),
    "Phi-4-mini": ("phi3", dict(
        hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24,
        num_key_value_heads=8, vocab_size=200064, max_position_embeddings=131072, tie_word_embeddings=True,
        partial_rotary_factor=0.75, original_max_position_embeddings=4096, rope_parameters=_longrope(96, 4096))),
    "Phi-4": ("phi3", dict(
        hidden_size=5120, intermediate_size=17920, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=10, vocab_size=100352, max_position_embeddings=16384,
        rope_parameters=dict(rope_type="default", rope_theta=250000.0))),
    "gpt-oss-20b": ("gpt_oss", dict(
        hidden_size=2880, intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
        num_key_value_heads=8, head_dim=64, num_local_experts=32, num_experts_per_tok=4, vocab_size=201088,
        sliding_window=128, max_position_embeddings=131072)),
    "DeepSeek-V2-Lite": ("deepseek_v2", dict(
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
        num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, vocab_size=102400, max_position_embeddings=163840)),
    "DeepSeek-V3": ("deepseek_v3", dict(
        hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        first_k_dense_replace=3, n_group=8, topk_group=4, vocab_size=129280, max_position_embeddings=163840)),
    "OLMo-2-7B": ("olmo2", dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=100352, max_position_embeddings=4096)),
    "Granite-3.1-8B": ("granite", dict(
        hidden_size=4096, intermediate_size=12800, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=49155, max_position_embeddings=131072, embedding_multiplier=12.0,
        residual_multiplier=0.22, attention_multiplier=0.0078125, logits_scaling=16.0, tie_word_embeddings=True)),
    "Falcon-7B": ("falcon", dict(
        hidden_size=4544, num_hidden_layers=32, num_attention_heads=71, vocab_size=65024, multi_query=True,
        parallel_attn=True, new_decoder_architecture=False, bias=False, alibi=False)),
    "StarCoder2-7B": ("starcoder2", dict(
        hidden_size=4608, intermediate_size=18432, num_hidden_layers=32, num_attention_heads=36,
        num_key_value_heads=4, vocab_size=49152, max_position_embeddings=16384, sliding_window=4096,
        bos_token_id=0, eos_token_id=0)),
    "Command-R-35B": ("cohere", dict(
        hidden_size=8192, intermediate_size=22528, num_hidden_layers=40, num_attention_heads=64,
        num_key_value_heads=64, vocab_size=256000, max_position_embeddings=131072, logit_scale=0.0625)),
    "Pythia-6.9B": ("gpt_neox", dict(
        hidden_size=4096, intermediate_size=16384, num_hidden_layers=32, num_attention_heads=32,
        vocab_size=50432, max_position_embeddings=2048, rotary_pct=0.25, use_parallel_residual=True)),
    "GPT-2-XL": ("gpt2", dict(n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024)),
    # Several residual streams and recurrent blocks: the defaults of each config class in transformers 5.25, which
    # its docstring says match the checkpoint named here (Gemma 3n: the language model of google/gemma-3n-E4B)
    "Gemma-3n-E4B": ("gemma3n_text", {}),
    "RecurrentGemma-2B": ("recurrent_gemma", {}),
    "DeepSeek-V4-Flash": ("deepseek_v4", {}),
    "Hy4-preview": ("hy_v4", {}),
    # Qwen/Qwen4-Exp's defaults leave its sparse-attention indexer unset, which transformers cannot build (its indexed
    # attention layers divide indexer_budget by indexer_compress_ratio): these five are ours, not published values.
    # Nor are its n-gram per-layer embeddings (about 45 B parameters in the checkpoint) on by default
    "Qwen4-Exp (defaults)": ("qwen4_exp_text", dict(
        indexer_n_heads=16, indexer_kv_heads=1, indexer_head_dim=256, indexer_budget=2048, indexer_compress_ratio=4)),
}

#: what the 2-block run (check_run) changes besides the depth: per-layer lists cut to 2 layers, at least one layer of
#: each kind, and fewer routed experts where 2 blocks of them would not fit a small machine's memory (8 GB and more
#: in float32); the widths stay the published ones
TWO_BLOCKS: dict[str, dict] = {
    "Gemma-3n-E4B": dict(num_kv_shared_layers=0, activation_sparsity_pattern=[0.95, 0.0],
                         layer_types=["sliding_attention", "full_attention"]),
    "RecurrentGemma-2B": dict(block_types=["recurrent", "attention"]),
    "DeepSeek-V4-Flash": dict(n_routed_experts=8, mlp_layer_types=["hash_moe", "moe"]),
    "Hy4-preview": dict(n_routed_experts=8),
    "Qwen4-Exp (defaults)": dict(num_experts=16, layer_types=["linear_attention", "indexed_attention"]),
}


def build_config(name: str, **overrides):
    model_type, sizes = PUBLISHED[name]
    return AutoConfig.for_model(model_type, **{**sizes, **overrides})


def _side_layout(model) -> dict:
    layer = next(m for m in model.modules() if isinstance(m, QSTLayer))
    side_config = layer.qst_side["default"].trunk.config
    heads = getattr(side_config, "num_attention_heads", None) or getattr(side_config, "n_head", None)
    hidden = getattr(side_config, "hidden_size", None) or side_config.n_embd
    return {
        "side_hidden": int(hidden),
        "side_heads": int(heads),
        "side_kv_heads": int(getattr(side_config, "num_key_value_heads", None) or heads),
        "side_head_dim": int(getattr(side_config, "head_dim", None) or hidden // heads),
    }


def check_meta(name: str) -> dict:
    """Full depth on the meta device: build, wrap with the default QSTConfig, forward and backward."""
    with torch.device("meta"):  # bfloat16, as models are loaded for QLoRA (grouped experts need it on the CPU)
        model = AutoModelForCausalLM.from_config(build_config(name), dtype=torch.bfloat16)
    base_parameters = sum(p.numel() for p in model.parameters())
    model = get_peft_model(model, QSTConfig(task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row = {"base_parameters": base_parameters, "trainable_parameters": trainable, **_side_layout(model)}
    input_ids = torch.zeros(2, 16, dtype=torch.long, device="meta")
    try:
        out = model(input_ids=input_ids, labels=input_ids)
    except (RuntimeError, NotImplementedError) as error:
        if "meta" not in str(error):
            raise
        # transformers' eager experts loop (side experts whose width is not a multiple of 8, e.g. gpt-oss) reads
        # which tokens each expert got, and Qwen4-Exp's indexed attention which blocks its indexer picked: values the
        # meta device does not have. --run checks these models.
        row["meta_forward"] = f"not on the meta device ({str(error)[:200]})"
        return row
    out.loss.backward()
    row["logits_shape"] = list(out.logits.shape)
    row["side_parameters_without_gradient"] = [
        n for n, p in model.named_parameters() if p.requires_grad and p.grad is None
    ]
    row["frozen_parameters_with_gradient"] = [
        n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None
    ]
    return row


def check_run(name: str, layers: int = 2, vocab: int = 1024, dtype=torch.bfloat16) -> dict:
    """``layers`` blocks at the real widths in ``dtype`` on the CPU: start, a training step, cached generation."""
    torch.manual_seed(0)
    depth = "n_layer" if PUBLISHED[name][0] == "gpt2" else "num_hidden_layers"
    config = build_config(name, **{depth: layers, "vocab_size": vocab, **TWO_BLOCKS.get(name, {})})
    for special in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids of the published vocabulary
        if isinstance(getattr(config, special, None), int) and getattr(config, special) >= vocab:
            setattr(config, special, 0)
    base = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    input_ids = torch.randint(3, vocab, (2, 12))
    with torch.no_grad():
        base_logits = base(input_ids=input_ids).logits
    model = get_peft_model(base, QSTConfig(task_type="CAUSAL_LM"))
    with torch.no_grad():
        start_equal = torch.equal(model(input_ids=input_ids).logits, base_logits)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    frozen_unchanged = all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with torch.no_grad():
        trained_logits = model(input_ids=input_ids).logits
    prompt = input_ids[:1, :6]
    cached = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    return {
        "start_equals_base": start_equal,
        "training_changed_the_output": not torch.equal(trained_logits, base_logits),
        "frozen_weights_unchanged": frozen_unchanged,
        "cached_generation_equals_uncached": torch.equal(cached, uncached),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"models to check (default: all {len(PUBLISHED)})")
    parser.add_argument("--run", action="store_true", help="also run 2 layers at the real widths on the CPU")
    parser.add_argument("--output", help="write the results as JSON")
    add_overwrite_output_argument(parser)
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in PUBLISHED]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(PUBLISHED)}")
    check_output_path(parser, args.output, args.overwrite_output)
    return args


def main() -> None:
    args = parse_args()
    results = {}
    for name in args.names or PUBLISHED:
        start = time.perf_counter()
        try:
            row = check_meta(name)
            if args.run:
                row["run"] = check_run(name)
        except Exception as error:  # noqa: BLE001 - reported per model
            row = {"error": f"{type(error).__name__}: {error}"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = row
        if "error" in row:
            print(f"{name:18s} ERROR {row['error'][:300]}", flush=True)
            continue
        share = 100 * row["trainable_parameters"] / row["base_parameters"]
        print(
            f"{name:18s} {row['base_parameters'] / 1e9:8.2f} B  trainable {row['trainable_parameters'] / 1e6:8.2f} M "
            f"({share:.3f}%)  side {row['side_hidden']} wide, {row['side_heads']} x {row['side_head_dim']} heads "
            f"({row['side_kv_heads']} kv)" + (f"  run {row['run']}" if "run" in row else ""),
            flush=True,
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"environment": versions(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
